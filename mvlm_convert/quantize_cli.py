"""``mvlm quantize``: llama.cpp's own quantizer, one output per type, and a size/quality table."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mvlm_core.console import console as make_console

console = make_console()
err = make_console(stderr=True)


def quantize_cmd(
    model: Path = typer.Argument(..., help="Input GGUF (f16/f32/bf16): a language model or an mmproj (arch clip)."),
    types: str = typer.Option(
        "q4_k_s", "--type", "-q",
        help="Comma list. LM: q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k_s/m/l q4_k_s q4_k_m q5_k_s q5_k_m q6_k iq4_nl iq4_xs "
             "f16 bf16 f32. mmproj: q8_0 q5_1 q5_0 q4_1 q4_0 f16.",
    ),
    outdir: Path | None = typer.Option(None, "--outdir", "-o", help="Where to write (default: next to the input)."),
    threads: int | None = typer.Option(None, "--threads", "-t", help="Quantizer threads (default: all cores)."),
    allow_requantize: bool = typer.Option(False, "--allow-requantize", help="Accept an already-quantized input."),
    quality: bool = typer.Option(True, "--quality/--no-quality",
                                 help="Measure KL divergence / top-1 agreement (LM) or image-embedding cosine (mmproj) "
                                      "against the input."),
    lm: Path | None = typer.Option(None, "--lm", help="For an mmproj: the LM GGUF it pairs with (needed to measure cosine)."),
    image: Path | None = typer.Option(None, "--image", help="For an mmproj: the image for the cosine figure."),
    json_: bool = typer.Option(False, "--json", help="Print the results as JSON instead of a table."),
) -> None:
    """Quantize MODEL to each --type with the pinned llama.cpp (llama-quantize for LMs), named by llama.cpp convention.

    The table shows file size, bits per weight, time and a quality figure measured against the input on a fixed text:
    mean KL divergence of next-token distributions and top-1 agreement (LM), image-embedding cosine (mmproj).
    All outputs are renamed into place together when all are done: on failure or interruption nothing is left
    behind and earlier files of the same names stay as they were. An input llama.cpp cannot load is refused.
    """
    from mvlm_convert import quantize as q

    # no bar when stderr is not a terminal: a log has no use for one, and rich would leave an empty line before errors
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=json_ or not err.is_terminal) as prog:

        def on_start(t: str):
            task = prog.add_task(f"{model.name} -> {t}", total=None)
            return lambda done, total: prog.update(task, completed=done, total=total)

        quality_task: list = []

        def on_quality(done: int, total: int, what: str) -> None:  # models evaluated so far / input + each output
            if not quality_task:
                quality_task.append(prog.add_task("quality", total=total))
            prog.update(quality_task[0], completed=done, total=total, description=f"quality: {what}")

        results = q.run(model, types, outdir=outdir, threads=threads, allow_requantize=allow_requantize,
                        quality=quality, lm_for_mmproj=lm, image=image, on_start=on_start, on_quality=on_quality)
    if json_:
        print(json.dumps([r.as_dict() for r in results], indent=2))
        return
    table = Table(title=f"Quantized {model.name}")
    for col in ("type", "file", "size", "bpw", "time (s)"):
        table.add_column(col, justify="right" if col not in ("type", "file") else "left")
    kind = results[0].kind if results else "lm"
    if kind == "lm":
        table.add_column("KL div (nats)", justify="right")
        table.add_column("top-1 agree", justify="right")
    else:
        table.add_column("image cos (mean/min)", justify="right")
    for r in results:
        row = [r.type.lower(), r.path.name, f"{r.size_bytes / 1e6:.1f} MB", f"{r.bits_per_weight:.2f}", f"{r.seconds:.2f}"]
        if kind == "lm":
            row += ["-" if r.kl_div is None else f"{r.kl_div:.5f}",
                    "-" if r.top1_agree is None else f"{100 * r.top1_agree:.1f}%"]
        else:
            row += ["-" if r.image_cos is None else f"{r.image_cos:.5f} / {r.image_min_cos:.5f}"]
        table.add_row(*row)
    console.print(table)
    if kind != "lm" and any(r.image_cos is None for r in results):
        why = ("--no-quality was given" if not quality else
               "an mmproj's cosine is measured through the language model it pairs with: add --lm LM.gguf" if lm is None
               else "the quality run did not give a figure")
        err.print(f"image cos '-': not measured ({why})", highlight=False, markup=False, soft_wrap=True)
