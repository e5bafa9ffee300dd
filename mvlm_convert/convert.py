"""``convert``: a released checkpoint directory -> ``<Name>-<FTYPE>.gguf`` + ``mmproj-<Name>-<FTYPE>.gguf``.

One pass, no intermediate files. Both outputs are planned and validated before anything is written (bad input
fails with nothing on disk). Each file is streamed tensor by tensor to a temporary name (``.<final>.<pid>.<random>.tmp``,
``mvlm_core.atomic.AtomicOutputs``) and both are renamed together only when both are complete: a failed or
interrupted run (disk full, Ctrl-C, SIGTERM) removes its temporaries and leaves files from an earlier run exactly
as they were.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mvlm_convert.checkpoint import open_checkpoint
from mvlm_convert.families import detect_family
from mvlm_convert.gguf_stream import FileSummary, PreparedGGUF, Progress, TensorPlan, check_writable
from mvlm_convert.mmproj_gguf import prepare_mmproj_gguf
from mvlm_core.atomic import AtomicOutputs
from mvlm_core.errors import MvlmError
from mvlm_core.filetypes import FTYPE_LABELS, OUTTYPES


@dataclass
class ConvertResult:
    """What ``convert`` wrote (``mmproj`` is None for a text-only MobileLLaMA)."""

    name: str
    family: str
    variant: str
    outtype: str
    lm: FileSummary
    mmproj: FileSummary | None
    files: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def fs(s: FileSummary | None) -> dict[str, Any] | None:
            if s is None:
                return None
            d = asdict(s)
            d["path"] = str(s.path)
            return d

        return {
            "name": self.name,
            "family": self.family,
            "variant": self.variant,
            "outtype": self.outtype,
            "lm": fs(self.lm),
            "mmproj": fs(self.mmproj),
            "files": [str(p) for p in self.files],
        }


def model_name(config: dict[str, Any], checkpoint_dir: Path) -> str:
    """llama.cpp-style model name: last part of ``_name_or_path`` (e.g. ``MobileVLM_V2-1.7B``) else the dir name."""
    raw = str(config.get("_name_or_path") or "").rstrip("/")
    cand = raw.split("/")[-1] if raw else ""
    if not cand or cand in (".", "..") or cand.startswith("tmp"):
        cand = checkpoint_dir.resolve().name
    return sanitize_name(cand)


def sanitize_name(name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    if not clean:
        raise MvlmError(f"--name {name!r} has no usable characters (letters, digits, '.', '_', '-')")
    return clean


def output_paths(outdir: Path, name: str, outtype: str) -> tuple[Path, Path]:
    from mvlm_core.filenames import check_name_length

    label = FTYPE_LABELS[outtype]
    check_name_length(f"mmproj-{name}-{label}.gguf", "the output file name")  # before --outdir is made
    return outdir / f"{name}-{label}.gguf", outdir / f"mmproj-{name}-{label}.gguf"


class _RichProgress:
    """A rich progress bar per output file (on stderr, so ``--json`` stdout stays clean)."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        from mvlm_core.console import console as make_console

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            console=make_console(stderr=True),
            transient=False,
        )
        self._task: Any = None

    def __enter__(self) -> _RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def start(self, path: Path, total_bytes: int, n_tensors: int) -> None:
        self._task = self._progress.add_task(f"{path.name} ({n_tensors} tensors)", total=total_bytes)

    def advance(self, plan: TensorPlan) -> None:
        self._progress.advance(self._task, plan.nbytes)


def convert(
    checkpoint_dir: str | Path,
    outdir: str | Path,
    outtype: str = "f16",
    name: str | None = None,
    vision_tower: str | Path | None = None,
    progress: bool | Progress = True,
) -> ConvertResult:
    """Convert a checkpoint of any registered family (mvlm_convert.families); see the module docstring."""
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise MvlmError(f"--outtype {outtype!r} is not supported; choose one of {', '.join(OUTTYPES)}")
    checkpoint_dir = Path(checkpoint_dir)
    outdir = Path(outdir)
    vt = Path(vision_tower) if vision_tower is not None else None
    if vt is not None and not vt.is_dir():
        raise MvlmError(f"--vision-tower {vt}: not a directory")

    ckpt = open_checkpoint(checkpoint_dir)
    info = detect_family(ckpt.config)
    ckpt = info.impl.normalize(ckpt)  # e.g. llava-hf names -> the LLaVA/MobileVLM names the writers use
    the_name = sanitize_name(name) if name else model_name(ckpt.config, checkpoint_dir)
    lm_path, mmproj_path = output_paths(outdir, the_name, outtype)

    prepared: list[tuple[Path, PreparedGGUF]] = []
    if info.projector is not None:
        # Vision side first: its failures (no tower, wrong grid, missing projector tensors) are the likely ones.
        mm = prepare_mmproj_gguf(ckpt, info, outtype, the_name, vt)
    lm = info.impl.lm_writer(ckpt, outtype, the_name)  # the family's LM writer (LLaMA unless it brings one)
    prepared.append((lm_path, lm))
    if info.projector is not None:
        prepared.append((mmproj_path, mm))
    check_writable(outdir)
    for path, _ in prepared:
        if path.is_dir():
            raise MvlmError(f"{path} is a directory; it is in the way of the output file: move it or choose another --outdir")

    summaries: list[FileSummary] = []
    bar: Any = _RichProgress() if progress is True else (progress or None)
    try:
        with AtomicOutputs() as out:
            if isinstance(bar, _RichProgress):
                bar.__enter__()
            for path, prep in prepared:
                summaries.append(prep.write(path, bar, tmp=out.path(path)))
            if isinstance(bar, _RichProgress):
                bar.__exit__(None, None, None)
                bar = None
            written = out.commit()
    finally:
        if isinstance(bar, _RichProgress):
            bar.__exit__(None, None, None)
        ckpt.close()
    return ConvertResult(
        name=the_name,
        family=info.family,
        variant=info.variant,
        outtype=outtype,
        lm=summaries[0],
        mmproj=summaries[1] if len(summaries) > 1 else None,
        files=written,
    )
