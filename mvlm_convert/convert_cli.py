"""``mvlm convert``: one command from a released checkpoint to the LM GGUF and the mmproj GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from mvlm_core.console import console as make_console

console = make_console()


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def lm_notes(md: dict) -> str:
    """``phi2 2 layers, 4/4 heads, vocab 448``: the LM's llama.cpp architecture and shape, for any family's writer."""
    arch = md.get("arch", "?")
    n_head = md.get("n_head", "?")
    n_kv = md.get("n_head_kv", n_head)
    return f"{arch} {md.get('n_layer', '?')} layers, {n_head}/{n_kv} heads, vocab {md.get('vocab_size', '?')}"


FAMILY_LABELS = {"mobilevlm": "MobileVLM", "llava": "LLaVA-1.5", "xmodel": "Xmodel-VLM", "imp": "Imp"}


def _from_hub(checkpoint: str, outdir: Path | None, name: str | None) -> tuple[Path, Path | None, str | None]:
    """OWNER/NAME[@REV] with no such path here: the Hub's copy, through huggingface_hub's cache, written to the current
    directory (never into the cache) and named after the repository (the cache's directory is named by the commit)."""
    from mvlm_convert.hub import download, hub_reference

    ref = hub_reference(checkpoint)
    if ref is None:  # as typed: "./a/b" is a path, never a Hub id
        return Path(checkpoint), outdir, name
    return download(*ref), Path.cwd() if outdir is None else outdir, name or ref[0].split("/")[1]


def convert_cmd(
    checkpoint: str = typer.Argument(
        ...,
        help="Checkpoint directory as released on the HF hub (config.json, tokenizer and pytorch_model.bin / "
        "model.safetensors, single or sharded with an index), or its Hub id OWNER/NAME[@REVISION] (downloaded with "
        "huggingface_hub into its cache; $HF_TOKEN, $HF_HUB_OFFLINE apply; output then in the current directory). "
        "Supported: MobileVLM V1/V2, MobileLLaMA (text only), LLaVA-1.5 (liuhaotian and llava-hf layouts), "
        "Xmodel-VLM, Imp v1 (Phi-2) and Imp v1.5 (Qwen1.5, Phi-3).",
    ),
    outdir: Path | None = typer.Option(
        None, "--outdir", "-o", help="Directory for the two .gguf files (default: the checkpoint directory; for a Hub "
        "id, the current directory)."
    ),
    vision_tower: Path | None = typer.Option(
        None,
        "--vision-tower",
        help="Local vision-tower directory (HF transformers layout: CLIP, e.g. openai/clip-vit-large-patch14-336, or "
        "SigLIP for Imp). Needed for MobileVLM V1 / LLaVA-1.5 when mm_vision_tower in config.json is not a local path; "
        "overrides the checkpoint's own copy (MobileVLM V2, Xmodel-VLM, Imp).",
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
    """Convert CHECKPOINT to <Name>-<FTYPE>.gguf (language model) and mmproj-<Name>-<FTYPE>.gguf (vision tower +
    projector).

    Families: MobileVLM V1/V2 and MobileLLaMA, LLaVA-1.5 (liuhaotian and llava-hf), Xmodel-VLM, Imp v1 (Phi-2 +
    SigLIP) and Imp v1.5 (Qwen1.5 or Phi-3 + SigLIP). One pass, no intermediate files: tensors are read, converted
    and written one at a time (peak memory about one tensor). The mmproj holds every vision layer and makes llama.cpp
    stop at the layer the model uses. Both files are renamed into place together when both are complete: on failure
    or interruption nothing is left behind and earlier files of the same names stay as they were.
    """
    from mvlm_convert.config_check import check_checkpoint_dir

    checkpoint, outdir, name = _from_hub(checkpoint, outdir, name)
    check_checkpoint_dir(checkpoint)  # before torch is loaded: a mistyped path is answered at once
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
    family = FAMILY_LABELS.get(result.family, result.family)
    table = Table(
        title=f"{result.name}: {family} {result.variant} ({result.lm.metadata.get('arch', '?')} LM), {result.outtype}",
        caption=f"written to {outdir_shown}",
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
            notes = lm_notes(md)
        table.add_row(s.path.name, s.kind, str(s.n_tensors), _size(s.nbytes), dtypes, notes)
    console.print(table)
