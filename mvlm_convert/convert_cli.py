"""``mvlm convert``: one command from a released checkpoint to the LM GGUF and the mmproj GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def convert_cmd(
    checkpoint: Path = typer.Argument(
        ...,
        help="Checkpoint directory as released on the HF hub (config.json, tokenizer.model and pytorch_model.bin / "
        "model.safetensors, single or sharded with an index). MobileVLM V1/V2 or MobileLLaMA.",
    ),
    outdir: Path | None = typer.Option(
        None, "--outdir", "-o", help="Directory for the two .gguf files (default: the checkpoint directory)."
    ),
    vision_tower: Path | None = typer.Option(
        None,
        "--vision-tower",
        help="Local CLIP directory (HF transformers layout, e.g. openai/clip-vit-large-patch14-336). Needed for V1 "
        "when mm_vision_tower in config.json is not a local path; overrides the checkpoint's own copy (V2).",
    ),
    outtype: str = typer.Option(
        "f16",
        "--outtype",
        help="f32 | f16 | bf16 | q8_0. Applies to 2-D weights of both files; norms/biases/embeddings stay f32 and "
        "conv kernels f16 (clip.cpp needs them so). For q4 and other k-quants use `mvlm quantize` on the f16 output.",
    ),
    name: str | None = typer.Option(
        None, "--name", help="Model name for the files and general.name (default: from _name_or_path or the dir name)."
    ),
    json_: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout instead of the table."),
) -> None:
    """Convert CHECKPOINT to <Name>-<FTYPE>.gguf (language model) and mmproj-<Name>-<FTYPE>.gguf (CLIP + projector).

    One pass, no intermediate files: tensors are read, converted and written one at a time (peak memory about one
    tensor). The mmproj holds every CLIP layer and makes llama.cpp stop at hidden_states[-2]; the LM carries
    MobileVLM's "v1" conversation format as tokenizer.chat_template. Nothing is left behind on failure.
    """
    from mvlm_convert.convert import convert

    result = convert(
        checkpoint,
        outdir if outdir is not None else checkpoint,
        outtype=outtype,
        name=name,
        vision_tower=vision_tower,
        progress=not json_,
    )
    if json_:
        print(json.dumps(result.to_json(), indent=2))
        return
    outdir_shown = result.lm.path.parent
    table = Table(
        title=f"{result.name}: {result.family} {result.variant}, {result.outtype}", caption=f"written to {outdir_shown}"
    )
    for col in ("file", "kind", "tensors", "size", "dtypes", "notes"):
        table.add_column(col, justify="right" if col in ("tensors", "size") else "left")
    for s in (result.lm, result.mmproj):
        if s is None:
            continue
        dtypes = ", ".join(f"{k.lower()}: {v}" for k, v in sorted(s.dtypes.items()))
        md = s.metadata
        if s.kind == "mmproj":
            notes = (
                f"{md['projector_type']}; CLIP {md['vision_layers_run']}/{md['vision_layers_in_file']} layers run; "
                f"from {md['vision_tower']}"
            )
        else:
            notes = f"llama {md['n_layer']} layers, {md['n_head']}/{md['n_head_kv']} heads, vocab {md['vocab_size']}"
        table.add_row(s.path.name, s.kind, str(s.n_tensors), _size(s.nbytes), dtypes, notes)
    console.print(table)
