"""One bounded reader for the header of a GGUF file, for every command's input checks (bench, serve, verify, quantize).

A GGUF header states counts and lengths (how many keys, how long a string, how many items an array has) before the
bytes they describe. A reader that believes them allocates what a 98-byte file claims (2^64 - 1 items) or spins for
minutes on a file of empty strings. This one checks every count and length against the bytes the file still has and
against sane limits before reading, refuses nested arrays (llama.cpp's reader refuses them too), and skips arrays of
numbers by seeking: its cost is bounded by the header's real size (a 49k-token vocabulary reads in milliseconds).
gguf-py's reader is only used on a file this one has accepted.

:func:`read_header` returns a :class:`Header` or raises :class:`GgufError` (what is wrong, in words);
:func:`check_gguf` makes that the one line a command prints (exit 2).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path

from mvlm_core.errors import MvlmError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_STRING = 1 << 24  # bytes: a chat template or a merges entry is far shorter
MAX_STRINGS_IN_ARRAY = 1 << 21  # tokenizer vocabularies have up to ~262k entries
MAX_KEYS = 1 << 16
MAX_TENSORS = 1 << 20
MAX_MMPROJ_STRINGS = 1 << 16  # an mmproj has no vocabulary: a long array of strings there is a crafted file
FLOAT_TYPES = (0, 1, 30)  # ggml F32, F16, BF16
# value type -> (struct format, bytes); 8 string, 9 array
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_STRING, _ARRAY = 8, 9


class GgufError(ValueError):
    """A header this reader refuses; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class Array:
    """An array value: its element type and how many elements (the elements themselves are not kept)."""

    element_type: int
    count: int


@dataclasses.dataclass
class Header:
    """A GGUF's version, key-value section (strings, numbers and booleans kept; arrays as :class:`Array`), tensor infos
    (name, shape, ggml type, offset), where the tensor data starts, and the file's size."""

    version: int
    kv: dict[str, object]
    tensors: list[tuple[str, list[int], int, int]]
    data_start: int
    file_size: int

    @property
    def architecture(self) -> str:
        arch = self.kv.get("general.architecture")
        return arch if isinstance(arch, str) else ""

    @property
    def is_lm(self) -> bool:
        """A language model: a token embedding and a tokenizer."""
        return "token_embd.weight" in {t[0] for t in self.tensors} and "tokenizer.ggml.model" in self.kv

    def longest_string_array(self) -> int:
        return max((v.count for v in self.kv.values() if isinstance(v, Array) and v.element_type == _STRING), default=0)

    @property
    def has_chat_template(self) -> bool:
        return "tokenizer.chat_template" in self.kv

    def _sizes(self) -> list[tuple[int, int, int]] | None:
        """(offset, bytes, elements) of each tensor as llama.cpp's loader sizes it; None when a type is unknown here."""
        import gguf

        out = []
        for _, dims, ttype, offset in self.tensors:
            try:
                block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                return None
            count = 1
            for d in dims:
                count *= d
            out.append((offset, count // block * size, count))
        return out

    def tensor_bytes(self) -> tuple[int, int] | None:
        """(bytes, elements) of all tensors as llama.cpp's loader sums them; None when a tensor type is unknown here."""
        sizes = self._sizes()
        return None if sizes is None else (sum(b for _, b, _ in sizes), sum(n for _, _, n in sizes))

    def missing_bytes(self) -> int | None:
        """How many bytes the tensor data reaches past the end of the file (0: all there); None for an unknown type."""
        sizes = self._sizes()
        if not sizes:
            return None if sizes is None else 0
        return max(0, self.data_start + max(o + b for o, b, _ in sizes) - self.file_size)


class _Reader:
    """Reads the header sequentially, every length checked against the bytes left."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size

    def left(self) -> int:
        return self.size - self.f.tell()

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise GgufError(f"{what} claims {n} bytes, and the file has {max(self.left(), 0)} left (cut short?)")
        return self.f.read(n)

    def num(self, fmt: str, size: int, what: str):
        return struct.unpack(fmt, self.take(size, what))[0]

    def count(self, what: str, per_item: int, limit: int | None = None) -> int:
        """A count, refused when its items cannot fit in the bytes left or exceed ``limit``."""
        n = self.num("<Q", 8, what)
        if n * per_item > self.left():
            raise GgufError(f"{what} is {n}, more than the {max(self.left(), 0)} bytes left in the file can hold")
        if limit is not None and n > limit:
            raise GgufError(f"{what} is {n}, beyond any real model (at most {limit})")
        return n

    def string(self, what: str) -> str:
        n = self.num("<Q", 8, f"the length of {what}")
        if n > MAX_STRING:
            raise GgufError(f"{what} is {n} bytes long, beyond any real model (at most {MAX_STRING})")
        data = self.take(n, what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise GgufError(f"{what} is not UTF-8 text") from None

    def skip_strings(self, n: int, key: str) -> None:
        """Skip an array of ``n`` strings, reading it in 1 MiB chunks (a tokenizer's 49k entries: milliseconds)."""
        unpack = struct.Struct("<Q").unpack_from
        start = self.f.tell()
        end = start  # absolute position of the next string's length
        buf, base = b"", start  # buf holds the file's bytes from `base` on
        for k in range(n):
            i = end - base
            if i + 8 > len(buf):
                self.f.seek(end)
                buf, base, i = self.f.read(1 << 20), end, 0
                if len(buf) < 8:
                    raise GgufError(f"{key}[{k}] is cut short (the file ends inside the array)")
            length = unpack(buf, i)[0]
            if length > MAX_STRING:
                raise GgufError(f"{key}[{k}] is {length} bytes long, beyond any real model (at most {MAX_STRING})")
            end += 8 + length
            if end > self.size:
                raise GgufError(f"{key}[{k}] claims {length} bytes, past the end of the file (cut short?)")
        self.f.seek(end)

    def value(self, vtype: int, key: str, in_array: bool = False) -> object:
        if vtype in _SCALARS:
            fmt, size = _SCALARS[vtype]
            return self.num(fmt, size, f"the value of {key}")
        if vtype == _STRING:
            return self.string(f"the value of {key}")
        if vtype == _ARRAY:
            if in_array:
                raise GgufError(f"{key} is an array of arrays, which llama.cpp does not read")
            etype = self.num("<I", 4, f"the element type of {key}")
            if etype in _SCALARS:
                size = _SCALARS[etype][1]
                n = self.count(f"the length of the array {key}", size)
                self.f.seek(n * size, os.SEEK_CUR)
                return Array(etype, n)
            if etype == _STRING:
                n = self.count(f"the length of the array {key}", 8, MAX_STRINGS_IN_ARRAY)
                self.skip_strings(n, key)
                return Array(etype, n)
            if etype == _ARRAY:
                raise GgufError(f"{key} is an array of arrays, which llama.cpp does not read")
            raise GgufError(f"{key} is an array of unknown type {etype}")
        raise GgufError(f"{key} has an unknown value type {vtype}")


def read_header(path: str | Path) -> Header:
    """The header of a GGUF, read with every count checked; :class:`GgufError` (its reason) when refused, OSError when
    the file cannot be read."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, size)
        if r.take(4, "the magic") != MAGIC:
            raise GgufError("it does not start with 'GGUF'")
        version = r.num("<I", 4, "the version")
        if version not in VERSIONS:
            why = ("an early 2023 file" if version == 1 else
                   "a big-endian file" if version > 0xFFFF else "a newer format than this runtime's")
            raise GgufError(f"it is GGUF version {version} (this runtime reads versions 2 and 3; {why})")
        n_tensors = r.count("the number of tensors", 24, MAX_TENSORS)
        n_kv = r.count("the number of keys", 12, MAX_KEYS)
        kv: dict[str, object] = {}
        for i in range(n_kv):
            key = r.string(f"key {i}")
            if key in kv:
                raise GgufError(f"the key {key!r} appears twice (llama.cpp refuses a duplicate key)")
            kv[key] = r.value(r.num("<I", 4, f"the type of {key}"), key)
        tensors = []
        for i in range(n_tensors):
            name = r.string(f"the name of tensor {i}")
            n_dims = r.num("<I", 4, f"the dimensions of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GgufError(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS})")
            dims = [r.num("<Q", 8, f"a dimension of {name}") for _ in range(n_dims)]
            if any(d <= 0 or d >= 1 << 62 for d in dims):
                raise GgufError(f"tensor {name} has the shape {dims}")
            tensors.append((name, dims, r.num("<I", 4, f"the type of {name}"), r.num("<Q", 8, f"the offset of {name}")))
        align = kv.get("general.alignment", 32)
        if isinstance(align, bool) or not isinstance(align, int) or not 0 < align <= 1 << 16 or align & (align - 1):
            raise GgufError(f"general.alignment is {align!r} (it must be a power of two up to 65536)")
        data_start = -(-f.tell() // align) * align
    _check_tensor_infos(tensors, align)
    return Header(version, kv, tensors, data_start, size)


def _check_tensor_infos(tensors: list[tuple[str, list[int], int, int]], align: int) -> None:
    """What llama.cpp's GGUF loader (ggml/src/gguf.cpp) checks of the tensor infos before it loads anything: unique
    names, a ggml type it knows, rows a whole number of blocks, and each tensor's data where the previous one's ends
    (padded to the alignment)."""
    import gguf

    seen: set[str] = set()
    expected = 0
    for name, dims, ttype, offset in tensors:
        if name in seen:
            raise GgufError(f"the tensor {name!r} appears twice (llama.cpp refuses a duplicate tensor name)")
        seen.add(name)
        try:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise GgufError(f"tensor {name!r} has ggml type {ttype}, which llama.cpp does not know") from None
        if dims[0] % block:
            raise GgufError(f"tensor {name!r} has rows of {dims[0]} values, not a whole number of its type's blocks of "
                            f"{block}")
        if offset != expected:
            raise GgufError(f"tensor {name!r} has its data at offset {offset}, where llama.cpp expects {expected} (the "
                            "end of the tensor before it)")
        count = 1
        for d in dims:
            count *= d
        expected += -(-(count // block * size) // align) * align


def check_gguf(path: str | Path, option: str = "--model", kind: str | None = None) -> Header:
    """The header of a GGUF a command is given, or one line saying what is wrong with it (MvlmError, exit 2): not a
    file, not a GGUF, a header this runtime cannot read, tensor data cut short. ``option`` names where the path came
    from: ``--model`` reads "--model PATH ...", ``--against model=`` reads "--against model=PATH ...". ``kind``, when
    given, is what the file must be: ``lm`` (a token embedding and a tokenizer; an mmproj given instead is named as
    one) or ``mmproj`` (architecture clip)."""
    p = Path(path)
    said = f"{option}{p}" if option.endswith("=") else f"{option} {p}"
    if not p.exists():
        raise MvlmError(f"{said} does not exist: give the path of a .gguf file")
    if not p.is_file():
        raise MvlmError(f"{said} is not a file: give the path of a .gguf file")
    try:
        header = read_header(p)
    except OSError as e:
        raise MvlmError(f"{said} cannot be read ({e.strerror or e})") from None
    except GgufError as e:
        if "start with 'GGUF'" in str(e):
            raise MvlmError(f"{said} is not a GGUF file (it does not start with 'GGUF'): give a .gguf written by "
                            "mvlm convert or mvlm quantize") from None
        raise MvlmError(f"{said} is not a GGUF this runtime can load: {e}; convert it again") from None
    short = header.missing_bytes()
    if short:
        raise MvlmError(f"{said} is truncated: its tensor data ends {short} bytes past the end of the file "
                        f"({header.file_size} bytes): copy or convert it again")
    arch = header.kv.get("general.architecture")
    if arch is not None and not isinstance(arch, str):
        raise MvlmError(f"{said} has a general.architecture that is not text ({type(arch).__name__} {str(arch)[:40]}): "
                        "not a model llama.cpp can load; convert it again")
    if kind == "mmproj" and header.architecture != "clip":
        raise MvlmError(f"{said} is not an mmproj GGUF (architecture {header.architecture or 'unknown'!r}, not 'clip'): "
                        "give the mmproj-*.gguf written by mvlm convert")
    if header.architecture == "clip" and header.longest_string_array() > MAX_MMPROJ_STRINGS:
        raise MvlmError(f"{said} is an mmproj with an array of {header.longest_string_array()} strings (an mmproj has no "
                        "vocabulary): a damaged or crafted file; convert it again")
    if kind == "lm" and header.architecture == "clip":
        raise MvlmError(f"{said} is an mmproj (image encoder) GGUF, not a language model: pass it as --mmproj and give "
                        "the language-model GGUF (the one without 'mmproj-') as --model")
    if kind == "lm" and not header.is_lm:
        raise MvlmError(f"{said} is not a language-model GGUF (architecture {header.architecture or 'unknown'!r}, no "
                        "token embedding or tokenizer): give the LM GGUF written by mvlm convert")
    return header


def precision_of(path: str | Path) -> str:
    """The file type of a GGUF as reports call it (``q4_k_s``): the file's own ``general.file_type`` (what llama.cpp
    loads, and llama-bench's model_type says), else llama.cpp's file-name convention (``Name-Q4_K_S.gguf``), else
    ``unknown``."""
    from mvlm_core.filenames import precision_from_filename
    from mvlm_core.filetypes import TABLE

    named = precision_from_filename(Path(path).name)
    try:
        stored = read_header(path).kv.get("general.file_type")
    except (OSError, GgufError):
        return named
    if not isinstance(stored, int) or isinstance(stored, bool):
        return named
    return next((t.name for t in TABLE if int(t.file_type) == stored), named)
