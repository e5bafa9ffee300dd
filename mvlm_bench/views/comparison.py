"""Comparisons and gate verdicts (:mod:`mvlm_bench.decide.verdict`) as a rich table, Markdown and plain lines; the
metrics' names and units come from the column table."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from mvlm_bench.decide.stats import MetricComparison, compare_number
from mvlm_core.terminal import visible

PAIR_SPEEDUP_NOTE = ("Pair speedup: the median of the per-pair speedups (candidate vs baseline within each A/B pair), "
                     "so it need not equal the ratio of the two medians beside it")


def _p(c: MetricComparison) -> float | None:
    p = {"slower": c.p_slower, "faster": c.p_faster}.get(c.verdict)
    if p is None and c.p_slower is not None and c.p_faster is not None:
        p = min(c.p_slower, c.p_faster)
    return p


def comparison_table(comps: Sequence[MetricComparison], title: str) -> Table:
    """The comparison as a table. For an interleaved session the speedup column is "Pair speedup": the median of
    the per-pair speedups (the caption says so), which need not equal the ratio of the two medians beside it."""
    paired = bool(comps) and all(c.paired for c in comps)
    t = Table(title=visible(title, markup=True), caption=PAIR_SPEEDUP_NOTE if paired else None)
    for col in ("Metric", "Baseline", "Candidate", "Pair speedup" if paired else "Speedup", "95% CI", "p", "Verdict"):
        t.add_column(col, justify="left" if col in ("Metric", "Verdict") else "right", overflow="fold")
    for c in comps:
        p = _p(c)
        style = {"slower": "bold red", "faster": "bold green"}.get(c.verdict, "")
        verdict = f"[{style}]{c.verdict}[/]" if style else c.verdict
        t.add_row(visible(f"{c.name} ({c.unit})", markup=True),
                  f"{compare_number(c.baseline_median)} [dim]n={c.n_baseline}[/]",
                  f"{compare_number(c.candidate_median)} [dim]n={c.n_candidate}[/]",
                  "–" if c.speedup is None else f"{c.speedup:.3f}",
                  "–" if c.ci_low is None else f"{c.ci_low:.3f}–{c.ci_high:.3f}",
                  "–" if p is None else f"{p:.3g}", verdict + (f" [dim]({visible(c.note, markup=True)})[/]" if c.note else ""))
    return t


def comparison_markdown(comparisons: Sequence[MetricComparison], title: str = "") -> str:
    """A Markdown table (job summaries, PR comments): metric, medians, speedup, 95% CI, p, verdict. For an interleaved
    session the speedup column is "Pair speedup" (the median of the per-pair speedups), said under the table."""
    paired = bool(comparisons) and all(c.paired for c in comparisons)
    lines = [f"### {title}", ""] if title else []
    lines.append(f"| Metric | Baseline | Candidate | {'Pair speedup' if paired else 'Speedup'} | 95% CI | p | Verdict |")
    lines.append("| --- | ---: | ---: | ---: | :---: | ---: | --- |")
    for c in comparisons:
        sp = "–" if c.speedup is None else f"{c.speedup:.3f}"
        ci = "–" if c.ci_low is None else f"{c.ci_low:.3f}–{c.ci_high:.3f}"
        p = _p(c)
        mark = {"slower": "🔴 slower", "faster": "🟢 faster"}.get(c.verdict, c.verdict)
        lines.append(f"| {c.name} ({c.unit}) | {compare_number(c.baseline_median)} (n={c.n_baseline}) | "
                     f"{compare_number(c.candidate_median)} (n={c.n_candidate}) | {sp} | {ci} | "
                     f"{'–' if p is None else f'{p:.3g}'} | {mark}{f' ({c.note})' if c.note else ''} |")
    if paired:
        lines += ["", f"_{PAIR_SPEEDUP_NOTE}._"]
    return "\n".join(lines) + "\n"


def change_words(slowdown: float) -> str:
    """A slowdown fraction as words: 0.255 -> '25.5% worse', -0.031 -> '3.1% better'."""
    if round(slowdown, 3) == 0:
        return "no different"
    return f"{abs(slowdown):.1%} {'worse' if slowdown > 0 else 'better'}"


def _gate_lines(d) -> list[str]:
    """The gate's own lines (stderr): what the history said of each gated metric, then its warnings."""
    out = []
    for v in d.history:
        if v.verdict in ("slower", "suspected", "no change") and v.center is not None and v.slowdown is not None:
            out.append(f"[dim]history: {visible(v.name, markup=True)} {change_words(v.slowdown)} than the centre of "
                       f"{v.n_sessions} baseline session(s) (noise band ±{v.band:.1%}): {v.verdict}[/]")
    out += [f"[yellow]warning:[/] {visible(w, markup=True)}" for w in d.warnings]
    return out


def print_verdict(v, console, err) -> None:
    """A verdict (:class:`mvlm_bench.decide.verdict.Verdict`) on the terminal: each pair's comparison table (and the
    confirming re-measure's) on ``console``, setup differences, the gate's lines and its outcome on ``err``. A
    regression is the caller's to raise (``v.error()``)."""
    from mvlm_bench.decide.verdict import interleaved_title

    for p in v.pairs:
        title = interleaved_title(v) if v.mode == "interleaved" else p.title
        console.print(comparison_table(p.comparisons, title))
        if p.decision is not None and p.decision.interleaved and v.mode != "interleaved":
            console.print(comparison_table(p.decision.interleaved, "interleaved re-measure (A/B pairs)"))
        if p.setup_differences and v.mode != "interleaved":
            err.print("[yellow]warning:[/] the two measurements differ in setup: "
                      + visible("; ".join(p.setup_differences), markup=True), highlight=False)
        lines = _gate_lines(p.decision) if p.decision is not None else \
            [f"[yellow]warning:[/] {visible(w, markup=True)}" for w in p.warnings]
        for line in lines:
            err.print(line, highlight=False)
    if v.threshold is None or v.regressions:
        return
    if v.pairs and not v.judged:
        err.print("[yellow]gate not applied[/]: no gated metric could be judged (see the warnings above)")
    elif v.mode == "interleaved":
        err.print(f"[green]gate passed[/]: no gated metric is slower by more than {v.threshold:.1%} in the A/B pairs")
    else:
        err.print(f"[green]gate passed[/]: no gated metric is slower by more than {v.threshold:.1%} beyond its noise")


def verdict_markdown(v) -> str:
    """The verdict as Markdown (``mvlm compare --markdown``): each pair's table, a re-measure's, setup differences, and
    the gate's outcome."""
    md = []
    for p in v.pairs:
        md.append(comparison_markdown(p.comparisons, p.title))
        if p.decision is not None and p.decision.interleaved:
            md.append(comparison_markdown(p.decision.interleaved, "interleaved re-measure (A/B)"))
        if p.setup_differences:
            md.append("Setups differ: " + "; ".join(p.setup_differences) + "\n")
    if v.threshold is not None:
        md.append(f"\n**Gate** ({v.threshold:.1%} on {', '.join(v.gated)}): "
                  + ("regression: " + "; ".join(v.regressions) if v.regressions else "passed") + "\n")
    return "\n".join(md)
