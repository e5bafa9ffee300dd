"""The header of a GGUF file read directly (key-value strings and tensor names), for the one-line input checks of
`mvlm serve` and `mvlm bench`: which architecture, whether it is a language model, whether it has a chat template."""

from __future__ import annotations

from pathlib import Path

from mvlm_core.errors import MvlmError

_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_INTS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}  # value type -> struct format


def _read_header(path: Path) -> tuple[dict[str, object], list[tuple[str, list[int], int, int]], int]:
    """The key-value section (strings and integers kept, other values None), the tensor infos (name, shape, ggml type,
    offset) and where the tensor data starts, of a little-endian GGUF v2/v3, read directly: gguf-py's reader builds an
    array view per tokenizer entry (seconds for a 49k vocabulary)."""
    import struct

    def n(fmt: str) -> int:
        size = struct.calcsize(fmt)
        data = f.read(size)
        if len(data) != size:
            raise ValueError("truncated header")
        return struct.unpack(fmt, data)[0]

    def string() -> str:
        length = n("<Q")
        if length > 1 << 24:
            raise ValueError("implausible string length")
        data = f.read(length)
        if len(data) != length:
            raise ValueError("truncated header")
        return data.decode("utf-8", errors="replace")

    def skip(vtype: int) -> None:
        if vtype == _GGUF_STRING:
            f.seek(n("<Q"), 1)
        elif vtype in _GGUF_SCALAR:
            f.seek(_GGUF_SCALAR[vtype], 1)
        elif vtype == _GGUF_ARRAY:
            etype, count = n("<I"), n("<Q")
            if etype in _GGUF_SCALAR:
                f.seek(_GGUF_SCALAR[etype] * count, 1)
            else:
                for _ in range(count):
                    skip(etype)
        else:
            raise ValueError(f"unknown value type {vtype}")

    with open(path, "rb") as f:
        f.read(4)
        version = n("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (a big-endian or very old file)")
        n_tensors, n_kv = n("<Q"), n("<Q")
        kv: dict[str, object] = {}
        for _ in range(n_kv):
            key, vtype = string(), n("<I")
            if vtype == _GGUF_STRING:
                kv[key] = string()
            elif vtype in _GGUF_INTS:
                kv[key] = n(_GGUF_INTS[vtype])
            else:
                kv[key] = None
                skip(vtype)
        tensors = []
        for _ in range(n_tensors):
            name = string()
            dims = [n("<Q") for _ in range(n("<I"))]
            tensors.append((name, dims, n("<I"), n("<Q")))
        align = kv.get("general.alignment")
        align = align if isinstance(align, int) and align > 0 else 32
        data_start = -(-f.tell() // align) * align
    return kv, tensors, data_start


def _gguf_header(path: Path) -> tuple[dict[str, object], set[str]]:
    """The key-value section (strings and integers kept, other values None) and the tensor names of a GGUF."""
    kv, tensors, _ = _read_header(path)
    return kv, {t[0] for t in tensors}


def gguf_missing_bytes(path: Path) -> int | None:
    """How many bytes the tensor data of a GGUF reaches past the end of the file (0: all there), from the header:
    each tensor's shape, type and offset (gguf-py's block sizes per type) after the aligned start of the data. None
    when this reader cannot tell (a GGUF version or tensor type it does not know: llama.cpp will say); ValueError
    when the header itself is cut short or malformed."""
    import gguf

    try:
        _, tensors, data_start = _read_header(path)
    except ValueError as e:
        if "GGUF version" in str(e):
            return None
        raise
    end = 0
    for _, dims, ttype, offset in tensors:
        try:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            return None
        count = 1
        for d in dims:
            count *= d
        end = max(end, offset + count // block * size)
    return max(0, data_start + end - path.stat().st_size)


def gguf_kind(path: Path, option: str = "--model") -> tuple[str, bool, bool]:
    """(general.architecture, is a language model: token embedding + tokenizer, has a chat template) of a GGUF."""
    try:
        kv, names = _gguf_header(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise MvlmError(f"{option} {path} is a damaged GGUF ({e}): convert it again") from None
    arch = kv.get("general.architecture")
    arch = arch if isinstance(arch, str) else ""
    return arch, "token_embd.weight" in names and "tokenizer.ggml.model" in kv, "tokenizer.chat_template" in kv


def precision_of(path: Path) -> str:
    """The file type of a GGUF as reports call it (``q4_k_s``): the file's own ``general.file_type`` (what llama.cpp
    loads, and llama-bench's model_type says), else llama.cpp's file-name convention (``Name-Q4_K_S.gguf``), else
    ``unknown``."""
    from mvlm_core.filenames import precision_from_filename

    named = precision_from_filename(path.name)
    try:
        kv, _ = _gguf_header(path)
    except (OSError, ValueError, UnicodeDecodeError):
        return named
    stored = kv.get("general.file_type")
    if not isinstance(stored, int):
        return named
    from mvlm_core.filetypes import TABLE

    return next((t.name for t in TABLE if int(t.file_type) == stored), named)
