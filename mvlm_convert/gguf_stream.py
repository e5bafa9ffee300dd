"""Write a GGUF file one tensor at a time.

gguf.GGUFWriter normally keeps every tensor in memory until ``write_tensors_to_file``. Here every tensor is first
*declared* (name, shape, type, byte size: all known from the checkpoint metadata), the header, key/values and tensor
infos are written, and then each tensor is produced, encoded and written in declaration order, and dropped. Peak
memory is therefore about one tensor, not one model.

The file is written under a temporary name in the output directory (``mvlm_core.atomic``:
``.<name>.<pid>.<random>.tmp``, created exclusively, never through a link) and renamed only when complete; when a
command writes several files (convert: LM + mmproj) the caller hands in the temporaries of one ``AtomicOutputs`` and
renames them all together. Any failure (including ENOSPC, Ctrl-C, SIGTERM) removes the temporaries and leaves an
earlier file of the same name untouched.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Protocol

import gguf
import numpy as np
import torch

from mvlm_core.atomic import AtomicOutputs, is_disk_full
from mvlm_core.errors import MvlmError
from mvlm_core.filetypes import FILE_TYPES, OUTTYPES, QT


@dataclass
class TensorPlan:
    """One output tensor: its GGUF name, logical shape (PyTorch order), type, and how to produce its values."""

    name: str
    shape: tuple[int, ...]
    qtype: QT
    produce: Callable[[], torch.Tensor]
    source: str = ""  # HF name(s), for the summary

    @property
    def nbytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        n = prod(self.shape)
        return n // block * type_size


@dataclass
class FileSummary:
    path: Path
    kind: str  # "language model" | "mmproj"
    n_tensors: int
    nbytes: int
    dtypes: dict[str, int] = field(default_factory=dict)  # GGML type name -> tensor count
    metadata: dict[str, object] = field(default_factory=dict)


class Progress(Protocol):
    """Receives progress while one file is written (the CLI draws a rich bar per file)."""

    def start(self, path: Path, total_bytes: int, n_tensors: int) -> None: ...

    def advance(self, plan: TensorPlan) -> None: ...


def add_lm_keys(
    w: gguf.GGUFWriter, name: str, outtype: str, *, context_length: int, hidden_size: int, ffn: int, n_layer: int,
    n_head: int, n_head_kv: int, rope_dims: int, rope_theta: float, vocab_size: int,
    rms_eps: float | None = None, norm_eps: float | None = None,
) -> None:
    """The hyper-parameter keys every language-model GGUF carries (one place for all LM writers)."""
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(context_length)
    w.add_embedding_length(hidden_size)
    w.add_feed_forward_length(ffn)
    w.add_block_count(n_layer)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    if rms_eps is not None:
        w.add_layer_norm_rms_eps(rms_eps)
    if norm_eps is not None:
        w.add_layer_norm_eps(norm_eps)
    w.add_rope_dimension_count(rope_dims)
    w.add_rope_freq_base(rope_theta)
    w.add_vocab_size(vocab_size)
    w.add_file_type(FILE_TYPES[outtype])
    if outtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def matrix_type(outtype: str, shape: tuple[int, ...]) -> QT:
    """Output type of a 2-D weight: the requested one, except q8_0 needs rows that are a multiple of 32 (then f16)."""
    qt = OUTTYPES[outtype]
    if qt == QT.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[QT.Q8_0][0] != 0:
        return QT.F16
    return qt


def encode(t: torch.Tensor, qtype: QT) -> np.ndarray:
    """Convert a tensor to the bytes GGUF stores for ``qtype`` (contiguous numpy array)."""
    t = t.detach()
    if qtype == QT.F32:
        return np.ascontiguousarray(t.to(torch.float32).numpy())
    if qtype == QT.F16:
        return np.ascontiguousarray(t.to(torch.float16).numpy())
    if qtype == QT.BF16:
        return np.ascontiguousarray(t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16))
    if qtype == QT.Q8_0:
        return gguf.quants.quantize(np.ascontiguousarray(t.to(torch.float32).numpy()), QT.Q8_0)
    raise ValueError(f"unsupported output type {qtype!r}")


def check_writable(outdir: Path) -> None:
    """One clear line if the output directory cannot be created or written."""
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MvlmError(f"cannot create output directory {outdir}: {e.strerror or e}") from e
    if not outdir.is_dir() or not os.access(outdir, os.W_OK | os.X_OK):
        raise MvlmError(f"output directory {outdir} is not writable; choose another with --outdir")


def write_gguf(
    final: Path,
    writer: gguf.GGUFWriter,
    plans: list[TensorPlan],
    *,
    kind: str,
    progress: Progress | None = None,
    release: Callable[[TensorPlan], None] | None = None,
    tmp: Path | None = None,
) -> FileSummary:
    """Declare all tensors, write header/KV/infos, then stream the tensors.

    With ``tmp`` the file is written there and left for the caller to rename (an ``AtomicOutputs`` commit);
    without it, it goes to a temporary name of its own and is renamed to ``final`` when complete.
    """
    if tmp is None:
        with AtomicOutputs() as out:
            summary = write_gguf(final, writer, plans, kind=kind, progress=progress, release=release,
                                 tmp=out.path(final))
            out.commit()
        return summary
    for p in plans:
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
    if progress is not None:
        progress.start(final, sum(p.nbytes for p in plans), len(plans))
    try:
        try:
            writer.write_header_to_file(path=tmp)
        except OSError as e:
            raise _write_error(final, e) from e
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in plans:
            arr = encode(p.produce(), p.qtype)
            if arr.nbytes != p.nbytes:
                raise RuntimeError(f"{p.name}: produced {arr.nbytes} bytes, declared {p.nbytes}")
            writer.write_tensor_data(arr)
            del arr
            if release is not None:
                release(p)
            if progress is not None:
                progress.advance(p)
        assert writer.fout is not None
        for f in writer.fout:
            f.flush()
        writer.close()
    except BaseException as e:
        try:
            writer.close()
        except OSError:
            pass  # flushing into a full disk fails again; the temporary file goes anyway
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(final, e) from e
        raise
    counts: dict[str, int] = {}
    for p in plans:
        counts[p.qtype.name] = counts.get(p.qtype.name, 0) + 1
    return FileSummary(path=final, kind=kind, n_tensors=len(plans), nbytes=tmp.stat().st_size, dtypes=counts)


def _write_error(final: Path, e: OSError) -> MvlmError:
    if is_disk_full(e):
        return MvlmError(f"disk full while writing {final}: free space and retry (no partial file left; earlier files "
                         "of the same names are untouched)", exit_code=28)  # 28: a full disk (docs/reliability.md)
    return MvlmError(f"cannot write {final}: {e.strerror or e} (no partial file left)")


@dataclass
class PreparedGGUF:
    """Everything needed to write one file, built and validated before any byte is written.

    Preparing both outputs first means bad input (missing tensor, wrong grid, bad tokenizer) is reported before
    either file exists.
    """

    writer: gguf.GGUFWriter
    plans: list[TensorPlan]
    kind: str
    metadata: dict[str, object]
    release: Callable[[TensorPlan], None] | None = None

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.plans)

    def write(self, final: Path, progress: Progress | None = None, tmp: Path | None = None) -> FileSummary:
        """Write to ``tmp`` (left for the caller's commit) or, without it, atomically to ``final``."""
        summary = write_gguf(final, self.writer, self.plans, kind=self.kind, progress=progress, release=self.release,
                             tmp=tmp)
        summary.metadata = dict(self.metadata)
        return summary
