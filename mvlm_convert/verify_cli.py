"""``mvlm verify``: prove the GGUFs compute what the PyTorch checkpoint computes (table or --json; exit 1 on FAIL)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mvlm_convert.verify_limits import DEFAULT_IMAGE_THRESHOLD, DEFAULT_LOGITS_THRESHOLD
from mvlm_core.console import console as make_console
from mvlm_core.errors import MvlmError
from mvlm_core.runtime import VERIFY_RUNTIMES


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3e}" if (v != 0 and abs(v) < 1e-2) else f"{v:.6g}"
    return str(v)


def render(result: dict, console: Console) -> None:
    """Figures with PASS/FAIL per gated line; informational lines have no verdict."""
    table = Table(title=f"mvlm verify ({result['runtime']} runtime)", show_lines=False)
    table.add_column("check")
    table.add_column("value", justify="right")
    table.add_column("threshold", justify="right")
    table.add_column("verdict")

    def gated(label: str, value, thr: float) -> None:
        ok = value is not None and value <= thr
        table.add_row(label, _fmt(value), f"≤ {thr:g}", "[green]PASS[/]" if ok else "[bold red]FAIL[/]")

    def info(label: str, key: str, digits: int | None = None) -> None:
        if key in result:
            v = result[key]
            text = f"{v:.{digits}f}" if digits is not None and isinstance(v, float) else _fmt(v)
            table.add_row(label, text, "", "")

    gated("logits relative L2 error", result.get("logits_rel_err"), result["logits_threshold"])
    info("logits max |diff|", "logits_max_abs")
    info("top-1 agreement", "top1_agree")
    info("text tokens", "n_text_tokens")
    info("KV cache type", "kv_cache")
    if result.get("mmproj"):
        gated("image embedding relative L2 error", result.get("image_rel_err"), result["image_threshold"])
        info("image min cosine (per token)", "image_min_cos", 8)
        info("image mean cosine", "image_mean_cos", 8)
        info("image tokens (reference)", "n_image_tokens_ref")
        info("image tokens (llama.cpp)", "n_image_tokens_llama")
        if "image_mean_match" in result:
            both = bool(result["image_mean_match"] and result.get("image_std_match"))
            table.add_row("image mean/std match mmproj", _fmt(both), "", "" if both else "[bold red]FAIL[/]")
        info("multimodal last-logits rel. error", "mm_last_logits_rel_err")
        info("multimodal last top-1 agrees", "mm_last_top1_agree")
    console.print(table)
    for p in result.get("problems", []):
        console.print(f"[bold red]problem:[/] {p}", highlight=False)
    verdict = "[bold green]PASS[/]" if result["passed"] else "[bold red]FAIL[/]"
    console.print(f"{verdict}  ({result.get('seconds', 0)} s)")


def verify_cmd(
    checkpoint: Annotated[str, typer.Argument(help="The HF checkpoint directory the GGUFs were converted from, or "
                                                    "its Hub id OWNER/NAME[@REV] (as mvlm convert takes it).",
                                               show_default=False)],
    gguf: Annotated[Path, typer.Option("--gguf", help="Language-model GGUF written by `mvlm convert`.",
                                       show_default=False)],
    mmproj: Annotated[Path | None, typer.Option("--mmproj", help="mmproj GGUF (vision encoder + projector); "
                                                "omit for a text-only model (MobileLLaMA).")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Image to embed; padded to a square with the CLIP "
                                               "mean colour and resized to 336 (MobileVLM's 'pad'), then the same "
                                               "pixels go to both sides. Default: a synthetic picture.")] = None,
    vision_tower: Annotated[Path | None, typer.Option("--vision-tower", help="CLIP directory for V1 checkpoints "
                                                      "whose weights carry no vision-tower copy.")] = None,
    image_threshold: Annotated[float, typer.Option("--image-threshold", help="Max relative L2 error of the "
                                                   "image-embedding matrix.")] = DEFAULT_IMAGE_THRESHOLD,
    logits_threshold: Annotated[float, typer.Option("--logits-threshold", help="Max relative L2 error of the "
                                                    "logits on the fixed prompt.")] = DEFAULT_LOGITS_THRESHOLD,
    runtime: Annotated[str, typer.Option("--runtime", help=f"llama.cpp runtime to test: {', '.join(VERIFY_RUNTIMES)}. "
                                         "host: the host build through llama-cpp-python; host-bin, linux-arm64, "
                                         "android-arm64: that build's mvlm-dump tool as a process (arm64 through "
                                         "qemu-aarch64-static on other CPUs); cuda: the cuda build through "
                                         "llama-cpp-python, every layer and the mmproj on the GPU.")]
    = "host",
    kv_cache: Annotated[str, typer.Option("--kv-cache", help="llama.cpp KV-cache type for the logits check: f32 "
                                          "isolates the GGUF; f16 is llama.cpp's default at run time.")] = "f32",
    json_: Annotated[bool, typer.Option("--json", help="Print the figures as one JSON object.")] = False,
) -> None:
    """Run the independent PyTorch reference and llama.cpp on the same image and tokens; exit 1 above thresholds."""
    from mvlm_convert.hub import hub_reference

    ref = hub_reference(checkpoint)  # as typed: "./a/b" is a path, never a Hub id
    if ref is not None:  # OWNER/NAME[@REV], as mvlm convert takes it: the Hub's copy in huggingface_hub's cache
        from mvlm_convert.hub import download

        checkpoint = download(*ref)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise MvlmError(f"checkpoint directory not found: {checkpoint}")
    for option, value in (("--image-threshold", image_threshold), ("--logits-threshold", logits_threshold)):
        if not (math.isfinite(value) and 0 < value <= 1e6):  # NaN would pass every check; 0 or less, none
            raise MvlmError(f"{option} {value:g} is not a threshold: give a relative error above 0 (e.g. 0.01)")
    from mvlm_convert.verify import verify
    from mvlm_core.images import check_image_file

    if image is not None:
        check_image_file(image)
    result = verify(checkpoint, gguf, mmproj, image=image, vision_tower=vision_tower, runtime=runtime,
                    image_threshold=image_threshold, logits_threshold=logits_threshold, kv_cache=kv_cache)
    if json_:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        render(result, make_console())
    if not result["passed"]:
        raise typer.Exit(1)
