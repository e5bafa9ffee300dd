"""Pictures of the benchmark history: one PNG per configuration (device, model, protocol and the settings in which
the stored entries differ: threads, GPU layers, ...), and one self-contained HTML page.

For people who would rather look than read: a slow drift over ten llama.cpp bumps is obvious on a line and invisible
in a pairwise table. Each panel shows one metric over the stored entries in order: every repetition as a dot, the
median as a line, so noise and trend are both visible. The HTML page embeds the PNGs (base64) and a table of the
entries, so it can be uploaded as a CI artifact and opened anywhere without a server.

matplotlib is imported only inside these functions (the CLI stays fast) and always with the Agg backend (no display).
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path

from mvlm_bench.history.entries import Entry
from mvlm_bench.records.columns import describe, differing, direction, keys, metric_name

# the column table's plot view: the headline speeds, load time and the peak RSS (a panel only where entries have it);
# temp_start_c / temp_end_c (the device's temperature) can be asked for by name (`mvlm history plot --metric`)
PLOT_METRICS = keys("plot")
# what a series is: one configuration; its build (llama.cpp commit) is what the x axis shows changing
_NOT_CONFIG = ("runtime",)


def _group(entries: Sequence[Entry]) -> dict[tuple[str, ...], list[Entry]]:
    """One series per configuration: device, model, protocol and every setting (threads, GPU layers, ...); two
    configurations are never drawn as one line."""
    shown = differing([e.context for e in entries], skip=("device", "model", "protocol", *_NOT_CONFIG))
    groups: dict[tuple[str, ...], list[Entry]] = {}
    for e in entries:
        c = e.context
        groups.setdefault((c.device, c.label(), c.protocol, _config(c, shown)), []).append(e)
    return groups


def _config(context, shown) -> str:
    """The settings that distinguish a series, those it has (a series without an A/B side says nothing of one)."""
    return " ".join(part for part in describe(context, shown).split(" ") if not part.endswith("=–"))


def _slug(*parts: str) -> str:
    s = "-".join(re.sub(r"[^A-Za-z0-9._]+", "_", p).strip("_") for p in parts if p)
    return s[:120] or "history"


def _tick(e: Entry) -> str:
    if e.label:
        return f"{e.id}\n{e.label[:12]}"
    if e.context.runtime_commit:
        return f"{e.id}\n{e.context.runtime_commit[:7]}"
    return str(e.id)


def _med(vals: Sequence[float]) -> float:
    s = sorted(vals)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2.0


def _write_atomic(path: Path, data: bytes) -> None:
    from mvlm_core.atomic import AtomicOutputs

    with AtomicOutputs() as out:
        out.path(path).write_bytes(data)
        out.commit()


def plot_group(entries: Sequence[Entry], out: Path, metrics: Sequence[str] = PLOT_METRICS,
               title: str = "") -> Path | None:
    """One PNG: a panel per metric that has values, x = entries in order, dots = repetitions, line = medians."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [m for m in metrics if any(v is not None for e in entries for v in e.samples.get(m, []))]
    if not present:
        return None
    fig, axes = plt.subplots(len(present), 1, figsize=(max(6.0, 0.6 * len(entries) + 3), 2.4 * len(present)),
                             sharex=True, squeeze=False)
    xs = list(range(len(entries)))
    for ax, m in zip(axes[:, 0], present, strict=True):
        name, unit = metric_name(m)
        meds = []
        for x, e in zip(xs, entries, strict=True):
            vals = [v for v in e.samples.get(m, []) if v is not None]
            ax.scatter([x] * len(vals), vals, s=12, color="tab:blue", alpha=0.55, zorder=3)
            meds.append(_med(vals) if vals else float("nan"))
        ax.plot(xs, meds, color="tab:orange", marker="o", ms=4, lw=1.5, zorder=2, label="median")
        better = {1: "higher is better", -1: "lower is better"}.get(direction(m), "")
        ax.set_ylabel(f"{name}\n({unit})", fontsize=8)
        ax.set_title(better, fontsize=7, loc="right", color="gray")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xticks(xs, [_tick(e) for e in entries], fontsize=7)
    axes[-1, 0].set_xlabel("entry (id, label or llama.cpp commit)")
    if title:  # wrapped to the figure's width, never clipped
        import textwrap

        fig.suptitle(textwrap.fill(title, width=int(fig.get_size_inches()[0] * 11)), fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _write_atomic(out, buf.getvalue())
    return out


def plot_history(entries: Sequence[Entry], out_dir: Path, metrics: Sequence[str] = PLOT_METRICS) -> list[Path]:
    """PNG per device/model/protocol plus ``index.html`` (PNGs embedded, entry table); returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sections = []
    for (device, model, protocol, config), es in _group(entries).items():
        title = f"{model} on {device} ({protocol})" + (f" {config}" if config else "")
        png = plot_group(es, out_dir / f"{_slug(device, model, protocol, config)}.png", metrics, title)
        if png is None:
            continue
        written.append(png)
        b64 = base64.b64encode(png.read_bytes()).decode("ascii")
        rows = []
        for e in es:
            meds = []
            for m in metrics:
                vals = [v for v in e.samples.get(m, []) if v is not None]
                meds.append(f"{_med(vals):.4g}" if vals else "–")
            cells = [str(e.id), e.created_at, e.label, e.project_commit[:10], e.context.runtime_commit[:10],
                     str(e.repetitions)] + meds
            rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        head = ["id", "time (UTC)", "label", "commit", "llama.cpp", "reps"] + [
            f"{metric_name(m)[0]} ({metric_name(m)[1]})" for m in metrics]
        sections.append(
            f"<h2>{html.escape(title)}</h2>\n<img alt=\"{html.escape(title)}\" src=\"data:image/png;base64,{b64}\">\n"
            "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>\n" + "\n".join(rows)
            + "</table>"
        )
    page = (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>mvlm benchmark history</title>\n"
        "<style>body{font-family:sans-serif;margin:2em}img{max-width:100%}table{border-collapse:collapse;"
        "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}</style></head><body>\n"
        "<h1>mvlm benchmark history</h1>\n<p>Medians per stored entry (dots: every repetition). "
        "Medians in the tables; metrics in tokens/s are better higher, seconds and ms lower.</p>\n"
        + ("\n".join(sections) if sections else "<p>No entries with plottable metrics.</p>")
        + "\n</body></html>\n"
    )
    index = out_dir / "index.html"
    _write_atomic(index, page.encode("utf-8"))
    written.append(index)
    _forget_stale(out_dir, written)
    return written


MANIFEST = ".mvlm-plots.json"


def _forget_stale(out_dir: Path, written: list[Path]) -> None:
    """Remove the PNGs an earlier plot into this directory wrote that this one did not (a configuration since deleted
    or filtered out), and only those: the directory's manifest names what mvlm wrote there."""
    import json

    manifest = out_dir / MANIFEST
    try:
        before = json.loads(manifest.read_text()) if manifest.is_file() else []
    except (OSError, ValueError):
        before = []
    now = {p.name for p in written}
    for name in before if isinstance(before, list) else []:
        if isinstance(name, str) and name.endswith(".png") and "/" not in name and name not in now:
            (out_dir / name).unlink(missing_ok=True)
    _write_atomic(manifest, json.dumps(sorted(now)).encode())
