"""What a tune shows: the table (rich), the JSON for CI, the frontier plot (PNG, and an HTML page with it and the
table, as `mvlm history plot` makes), and ``--apply``'s files: the chosen GGUFs under llama.cpp's names, a device
profile snippet and the `mvlm serve` line with the chosen settings."""

from __future__ import annotations

import base64
import html
import shlex
import statistics
from pathlib import Path

from mvlm_tune.frontier import Point, Recommendation, frontier
from mvlm_tune.search import SearchOutcome
from mvlm_tune.space import BUDGET_KEYS, OBJECTIVE_NAMES, OBJECTIVES, Budget, Candidate


def status(p: Point, front: set[int], rec: Recommendation, dropped: dict[str, str]) -> str:
    if rec.pick is p:
        return "recommended"
    if p.failed:
        return "failed"
    if not p.samples:
        return "not measured"
    if not p.in_budget:
        return "outside budget" + (" (frontier)" if id(p) in front else "")
    if any(t is p for t in rec.tied):
        return "tied (within noise)"
    if dropped.get(p.candidate.key(), "").startswith("dominated"):
        return "dominated"
    return "frontier" if id(p) in front else "dominated"


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _median(p: Point, key: str) -> float | None:
    vals = [r[key] for r in p.runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def rows(points: list[Point], rec: Recommendation, dropped: dict[str, str], labels: tuple[str, str | None]):
    """One row per candidate, the recommendation first, then by latency (unmeasured last)."""
    front = {id(p) for p in frontier(points)}
    order = sorted(points, key=lambda p: (rec.pick is not p, p.median is None, p.median or 0.0))
    out = []
    for p in order:
        f = p.fidelity
        out.append({"candidate": p.candidate.key(), "label": p.candidate.label(labels[0], labels[1] or "input"),
                    "lm_type": labels[0] if p.candidate.lm == "input" else p.candidate.lm,
                    "mmproj_type": (labels[1] if p.candidate.mmproj == "input" else p.candidate.mmproj),
                    "threads": p.candidate.threads, "flash_attn": p.candidate.flash_attn,
                    "kl": f.get("kl"), "top1": f.get("top1"), "image_cos": f.get("image_cos"),
                    "image_min_cos": f.get("image_min_cos"), "in_budget": p.in_budget,
                    "median_s": p.median, "samples_s": list(p.samples), "runs": len(p.samples),
                    **{f"{k}_median": _median(p, k) for k in ("total_s", "ttft_s", "eval_s", "ve_s", "peak_rss_mb")},
                    "status": status(p, front, rec, dropped), "why": p.failed or dropped.get(p.candidate.key(), "")})
    return out


def as_json(points, rec: Recommendation, outcome: SearchOutcome, budget: Budget, objective: str, device: str,
            protocol: str, labels, grid_runs: int, session: str, cached_runs: int) -> dict:
    def name(p: Point | None) -> str | None:
        return None if p is None else p.candidate.label(labels[0], labels[1] or "input")

    pick, runner = rec.pick, rec.runner_up
    faster = None
    if pick is not None and runner is not None:
        faster = name(pick if (pick.median or 0) <= (runner.median or 0) else runner)
    return {
        "device": device, "protocol": protocol, "objective": OBJECTIVES[objective], "budget": dict(budget.limits),
        "session": session, "label": f"tune-{session}", "noise": rec.noise,
        "recommendation": None if pick is None else {
            "candidate": pick.candidate.key(), "label": name(pick), "median_s": pick.median,
            "runner_up": name(runner), "faster": faster, "margin": rec.margin, "p_value": rec.p_value,
            "beyond_noise": rec.beyond_noise, "tied": [name(t) for t in rec.tied if t is not pick], "why": rec.why},
        "search": {"runs": outcome.runs, "cached_runs": cached_runs, "rounds": outcome.rounds,
                   "seconds": round(outcome.seconds, 1), "full_grid_runs": grid_runs, "stopped": outcome.stopped},
        "candidates": rows(points, rec, outcome.dropped, labels),
    }


def render_table(console, data: dict) -> None:
    from rich.table import Table

    name = OBJECTIVE_NAMES[next(k for k, v in OBJECTIVES.items() if v == data["objective"])]
    t = Table(title=f"mvlm tune: {data['protocol']} on {data['device']} (latency: {name}; budget: "
                    f"{', '.join(f'{k} {v:g}' for k, v in data['budget'].items()) or 'none'})")
    for col, just in (("candidate", "left"), ("KL", "right"), ("top-1", "right"), ("image cos", "right"),
                      (f"{name} s", "right"), ("runs", "right"), ("TTFT s", "right"), ("Eval s", "right"),
                      ("VE s", "right"), ("peak MB", "right"), ("", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in data["candidates"]:
        grey = r["status"] in ("dominated", "outside budget", "failed", "not measured")
        style = "dim" if grey else ("bold green" if r["status"] == "recommended" else "")
        t.add_row(r["label"], _fmt(r["kl"], ".4f"), _fmt(r["top1"], ".3f"), _fmt(r["image_cos"], ".5f"),
                  _fmt(r["median_s"], ".3f"), str(r["runs"]), _fmt(r["ttft_s_median"], ".3f"),
                  _fmt(r["eval_s_median"], ".3f"), _fmt(r["ve_s_median"], ".3f"), _fmt(r["peak_rss_mb_median"], ".0f"),
                  r["status"], style=style)
    console.print(t)


def summary_lines(data: dict) -> list[str]:
    s, rec = data["search"], data["recommendation"]
    made = s["runs"] + s.get("warmups", 0)
    lines = [f"{_n(made, 'run')} on the device ({s['runs']} measured, {s.get('warmups', 0)} warm-ups) in "
             f"{_n(s['rounds'], 'round')}, {s['seconds'] / 60:.1f} min"
             + (f", and {_n(s['cached_runs'], 'run')} read back from earlier tunes" if s["cached_runs"] else "")
             + f"; the full grid is {s['full_grid_runs']} runs (warm-ups included)"]
    unmeasured = [c["label"] for c in data["candidates"] if c["status"] == "not measured"]
    if unmeasured:
        lines.append(f"not measured: {len(unmeasured)} of {len(data['candidates'])} candidates; the recommendation is "
                     "among the measured ones only")
    if s["stopped"]:
        lines.append(f"stopped early: {s['stopped']}")
    if rec is None:
        failed = [c for c in data["candidates"] if c["status"] == "failed"]
        if failed and len(failed) == len(data["candidates"]):
            lines.append(f"no recommendation: every candidate failed; the first: {failed[0]['why']}")
        else:
            lines.append("no recommendation: no measured candidate is within the budget; loosen --budget or add types")
        return lines
    lines.append(f"recommended: {rec['label']}, {data['objective']} median {rec['median_s']:.3f} s")
    noise = f"the measured noise is {100 * data['noise']:.1f}%"
    if rec["why"] == "only":
        lines.append("why: the only measured candidate within the budget that no other one beats (faster and at least "
                     "as faithful)")
    elif rec["why"] == "fastest":
        lines.append(f"why: the fastest within the budget, {100 * rec['margin']:.1f}% ahead of {rec['runner_up']} "
                     f"(p = {rec['p_value']:.3g}; {noise}): beyond the noise")
    else:
        fewest = min(c["runs"] for c in data["candidates"] if c["label"] in (rec["label"], *rec["tied"]))
        more = ("more --repeat may separate them" if fewest >= 3 else
                f"with {fewest} run(s) the median gap against the noise decided (no test is possible): use --repeat "
                "3 or more")
        lines.append(f"why: within noise of {', '.join(rec['tied'])} ({rec['faster']}'s median was "
                     f"{100 * rec['margin']:.1f}% lower, p = {rec['p_value']:.3g}; {noise}): not a difference the runs "
                     f"can tell, so the most faithful of them is recommended; {more}")
    return lines


def _n(k: int, word: str) -> str:
    return f"{k} {word}" + ("" if k == 1 else "s")


def plot(data: dict, png: Path) -> None:
    """Latency (x) against each fidelity figure measured (one panel each): frontier points joined, dominated and
    out-of-budget points grey, the recommendation starred, the budget's limit dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in BUDGET_KEYS if any(r[k] is not None for r in data["candidates"])]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2), squeeze=False)
    measured = [r for r in data["candidates"] if r["median_s"] is not None]
    for ax, key in zip(axes[0], keys, strict=True):
        for r in measured:
            on = r["status"] in ("recommended", "frontier", "tied (within noise)")
            ax.scatter(r["median_s"], r[key], s=160 if r["status"] == "recommended" else 36,
                       marker="*" if r["status"] == "recommended" else "o",
                       color="tab:green" if r["status"] == "recommended" else ("tab:blue" if on else "0.7"), zorder=3)
            ax.annotate(r["label"], (r["median_s"], r[key]), fontsize=7, xytext=(4, 3), textcoords="offset points",
                        color="black" if on else "0.55")
        front = _panel_front(measured, key)
        ax.plot([r["median_s"] for r in front], [r[key] for r in front], color="tab:blue", lw=1, zorder=2,
                drawstyle="steps-post")
        if key in data["budget"]:
            ax.axhline(data["budget"][key], ls="--", color="tab:red", lw=1, label=f"budget {key}")
            ax.legend(fontsize=7)
        ax.set_xlabel(f"{data['objective']} (median, s)")
        ax.set_ylabel(key + (" (lower is better)" if BUDGET_KEYS[key][0] == "max" else " (higher is better)"))
        ax.grid(alpha=0.3)
    fig.suptitle(f"mvlm tune: {data['protocol']} on {data['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110, format="png")
    plt.close(fig)


def _panel_front(rows_: list[dict], key: str) -> list[dict]:
    """The frontier in one panel's two dimensions (latency, this figure): fastest first, each better in the figure
    than every faster one (the line joins these; the table's status is the frontier over every figure)."""
    better = (lambda a, b: a < b) if BUDGET_KEYS[key][0] == "max" else (lambda a, b: a > b)
    out: list[dict] = []
    for r in sorted((r for r in rows_ if r[key] is not None), key=lambda r: r["median_s"]):
        if not out or better(r[key], out[-1][key]):
            out.append(r)
    return out


def html_page(data: dict, png: Path) -> str:
    b64 = base64.b64encode(png.read_bytes()).decode()
    head = ["candidate", "KL", "top-1", "image cos", "median s", "runs", "status", "why"]
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
        r["label"], _fmt(r["kl"], ".4f"), _fmt(r["top1"], ".3f"), _fmt(r["image_cos"], ".5f"),
        _fmt(r["median_s"], ".3f"), r["runs"], r["status"], r["why"])) + "</tr>" for r in data["candidates"])
    notes = "".join(f"<p>{html.escape(line)}</p>" for line in summary_lines(data))
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>mvlm tune</title>\n<style>body{font-family:"
            "sans-serif} td,th{padding:2px 8px;text-align:left}</style></head><body>\n"
            f"<h1>mvlm tune: {html.escape(data['protocol'])} on {html.escape(data['device'])}</h1>\n"
            f"<img alt=\"latency/fidelity frontier\" src=\"data:image/png;base64,{b64}\">\n{notes}\n"
            "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + f"</tr>\n{body}</table>\n</body></html>\n")


def serve_line(device: str, lm: Path, mmproj: Path | None, c: Candidate) -> str:
    argv = ["mvlm", "serve", "--device", device, "--model", str(lm)]
    if mmproj is not None:
        argv += ["--mmproj", str(mmproj)]
    if c.threads is not None:
        argv += ["--threads", str(c.threads)]
    if c.flash_attn is not None:  # after `--`: llama-server's own option, passed on unchanged
        argv += ["--", "-fa", {1: "on", 0: "off", -1: "auto"}[c.flash_attn]]
    return shlex.join(argv)


def profile_snippet(device: str, c: Candidate, data: dict) -> str:
    rec = data["recommendation"]
    lines = [f"# mvlm tune {data['session']}: {rec['label']} on {device} ({data['protocol']}, "
             f"{data['objective']} median {rec['median_s']:.3f} s; budget "
             f"{', '.join(f'{k} {v:g}' for k, v in data['budget'].items()) or 'none'})"]
    if c.threads is not None:
        lines.append(f"threads = {c.threads}")
    if c.flash_attn is not None:
        lines.append(f"# flash attention {'on' if c.flash_attn == 1 else 'off'}: a run setting, not a profile field "
                     f"(mvlm bench --flash-attn {c.flash_attn}; mvlm serve ... -- -fa {'on' if c.flash_attn == 1 else 'off'})")
    if c.threads is None and c.flash_attn is None:
        lines.append("# the profile's own settings were the tuned ones: nothing to change")
    return "\n".join(lines) + "\n"
