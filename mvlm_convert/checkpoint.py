"""Streaming reader for HF checkpoints exactly as released: ``pytorch_model.bin`` / ``model.safetensors``, sharded or not.

Why streaming: a 1.7B bf16 checkpoint is 3.35 GB and the converter must stay under 1 GB of RSS. Tensors are therefore
read one at a time and their pages are given back as soon as the caller is done with them (``Checkpoint.release``):

- ``.bin`` files are opened with ``torch.load(weights_only=True, mmap=True)``. The mapping is private and read-only
  in practice, so after a tensor has been converted its pages are dropped with ``madvise(MADV_DONTNEED)``; otherwise
  every page ever touched would stay resident and count towards peak RSS.
- ``.safetensors`` headers are parsed here (8-byte length + JSON) so that names, shapes and dtypes are known without
  mapping the data; the data itself is read with ``safetensors.safe_open`` one tensor at a time, and the handle is
  closed right after, which unmaps what was touched.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import pickle
import re
import struct
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mvlm_convert.config_check import check_checkpoint_dir
from mvlm_core.errors import MvlmError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _madvise.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover - non-Linux
    _madvise = None


def _drop_pages(ptr: int, nbytes: int) -> None:
    """Give back the resident pages of a read-only private file mapping (they are re-read from disk if touched again).

    Only whole pages strictly inside [ptr, ptr+nbytes) are dropped, so memory that belongs to anything else is never
    affected.
    """
    if _madvise is None or nbytes <= 0:
        return
    start = (ptr + _PAGE - 1) // _PAGE * _PAGE
    end = (ptr + nbytes) // _PAGE * _PAGE
    if end > start:
        _madvise(start, end - start, _MADV_DONTNEED)


@dataclass
class _Entry:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Checkpoint:
    """A checkpoint directory: ``config`` (config.json) and lazily readable tensors by their HF names."""

    root: Path
    config: dict[str, Any]
    files: list[Path]
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _bin_state: dict[Path, tuple[dict[str, torch.Tensor], bool]] = field(default_factory=dict)
    _stored: dict[str, str] = field(default_factory=dict)  # canonical name -> name in the file (see ``renamed``)

    # --- metadata -------------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def file_of(self, name: str) -> Path:
        return self._entry(name).file

    def require(self, names: Iterable[str], what: str = "tensors") -> None:
        """MvlmError naming every missing tensor (so a damaged or mislabelled checkpoint is obvious)."""
        missing = [n for n in names if n not in self._entries]
        if missing:
            shown = ", ".join(missing[:6]) + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else "")
            raise MvlmError(f"{self.root}: missing {len(missing)} {what}: {shown}; is the checkpoint complete?")

    def renamed(self, rename: Callable[[str], str | None], config: dict[str, Any] | None = None) -> Checkpoint:
        """A view of the same files under canonical names (``rename`` returns None to hide a tensor).

        Lets a family whose release uses other key names (llava-hf's ``language_model.*``) reuse the writers,
        which speak the MobileVLM/LLaVA names; data is still read under the stored names.
        """
        view = Checkpoint(root=self.root, config=self.config if config is None else config, files=self.files)
        view._bin_state = self._bin_state
        for name, entry in self._entries.items():
            new = rename(name)
            if new is None:
                continue
            if new in view._entries:
                raise MvlmError(f"{self.root}: tensors {view._stored.get(new, new)} and {name} both map to {new}")
            view._entries[new] = entry
            view._stored[new] = self._stored.get(name, name)
        return view

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise MvlmError(f"{self.root}: missing tensor {name}; is the checkpoint complete?") from None

    # --- data -----------------------------------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """The tensor's data (for .bin a view into the file mapping; call ``release`` when done with it)."""
        entry = self._entry(name)
        stored = self._stored.get(name, name)
        if entry.file.suffix == ".safetensors":
            return _read_safetensor(entry.file, stored)
        tensors, _ = self._load_bin(entry.file)
        return tensors[stored]

    def release(self, name: str, tensor: torch.Tensor | None = None) -> None:
        """Drop the resident pages of a .bin tensor read through the file mapping; no-op for safetensors."""
        entry = self._entries.get(name)
        if entry is None or entry.file.suffix == ".safetensors":
            return
        state = self._bin_state.get(entry.file)
        if state is None or not state[1]:
            return  # not memory-mapped: the data lives in ordinary heap memory and must not be madvise'd
        t = state[0].get(self._stored.get(name, name)) if tensor is None else tensor
        if t is None:
            return
        _drop_pages(t.data_ptr(), t.numel() * t.element_size())

    def close(self) -> None:
        self._bin_state.clear()

    def _load_bin(self, path: Path) -> tuple[dict[str, torch.Tensor], bool]:
        state = self._bin_state.get(path)
        if state is None:
            state = _load_bin(path)
            self._bin_state[path] = state
        return state


def _load_bin(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """torch.load a .bin safely; (state dict, whether it is memory-mapped)."""
    if not path.is_file():
        raise MvlmError(f"missing weights file {path}; is the checkpoint complete?")
    with warnings.catch_warnings():  # torch's pickle-protocol warnings would break the one-line error
        warnings.simplefilter("ignore")
        try:
            sd = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
            mapped = True
        except RuntimeError as e:
            if "zipfile" in str(e) and "mmap" in str(e):
                # Legacy (pre-1.6) pickle format cannot be mapped; it has to be read whole.
                try:
                    sd = torch.load(path, weights_only=True, map_location="cpu")
                except Exception as e2:  # noqa: BLE001
                    raise _bin_error(path, e2) from e2
                mapped = False
            else:
                raise _bin_error(path, e) from e
        except Exception as e:  # noqa: BLE001 - pickle/zip errors come in many types
            raise _bin_error(path, e) from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise MvlmError(f"cannot read {path}: not a state dict of tensors")
    return sd, mapped


# What torch's weights_only unpickler says when a pickle asks for something other than tensors (a global such as
# os.system, a class, a reduce call, or an opcode it does not allow): the file carries code, which is never run.
_CODE_MARKERS = re.compile(r"unsupported global|GLOBAL |Unsupported class|reduce|Unsupported operand|not an allowed global",
                           re.IGNORECASE)


def _pickle_refusal_reason(e: BaseException) -> str | None:
    """What weights_only loading refused (``GLOBAL posix.system``, ``Unsupported operand 149``) when it refused a
    pickle for holding objects other than tensors, else None."""
    if not isinstance(e, pickle.UnpicklingError) or "Weights only load failed" not in str(e):
        return None
    text = str(e)
    m = re.search(r"GLOBAL\s+([\w.]+)", text)
    if m:
        return f"GLOBAL {m.group(1)}"
    for para in (p.strip() for p in text.split("\n")):
        if _CODE_MARKERS.search(para) and not para.startswith(("Weights only load failed", "Check the documentation")):
            return para.replace("WeightsUnpickler error:", "").strip()[:120].rstrip(".")
    return None


def _bin_error(path: Path, e: BaseException) -> MvlmError:
    """One line for a .bin that cannot be loaded: refused (it holds code) or truncated/corrupt."""
    reason = _pickle_refusal_reason(e)
    if reason is not None:
        return MvlmError(
            f"refused to load {path}: it contains code (pickled objects other than tensors: {reason}), which mvlm never "
            "runs; if you trust its source, load it yourself in a trusted environment and save the tensors with "
            "safetensors (safetensors.torch.save_file(state_dict, 'model.safetensors')), then convert that "
            "(a damaged download can look like this too: download it again)"
        )
    return MvlmError(f"cannot read {path}: truncated or corrupt ({_short(e)}): download it again")


def _short(e: BaseException) -> str:
    """The reader's own reason, first sentence of its first line (torch's zip reader goes on for lines of advice)."""
    s = str(e).strip().splitlines()
    first = s[0] if s else type(e).__name__
    if len(first) > 200:
        cut = first[:200]
        first = cut[: cut.rfind(". ") + 1] if ". " in cut else cut.rstrip() + "…"
    return first.rstrip(".")


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and validate a safetensors header without touching the data (clear error for damaged files)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 * 1024 * 1024):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        data_len = size - 8 - n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if not (0 <= begin <= end <= data_len):
                raise ValueError(f"tensor {name} lies beyond the end of the file (truncated?)")
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name} has unsupported dtype {info['dtype']}")
    except MvlmError:
        raise
    except OSError as e:
        raise MvlmError(f"cannot read {path}: {e.strerror or e}") from e
    except Exception as e:  # noqa: BLE001 - json / struct / key errors all mean "corrupt"
        raise MvlmError(f"cannot read {path}: corrupt safetensors header ({_short(e)})") from e
    return header


def _read_safetensor(path: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            t = f.get_tensor(name)
        return t
    except Exception as e:  # noqa: BLE001
        raise MvlmError(f"cannot read tensor {name} from {path}: {_short(e)}") from e


def _inside(root: Path, p: Path) -> bool:
    """Whether ``p`` (after following symlinks) lies inside the checkpoint directory ``root``.

    The one exception is the Hugging Face cache layout: ``.../models--X/snapshots/<rev>/<file>`` are symlinks to
    ``../../blobs/<hash>``, so for a snapshot directory the repository's own ``blobs`` directory counts as inside.
    """
    real_root = root.resolve()
    target = p.resolve()
    if target.is_relative_to(real_root):
        return True
    if real_root.parent.name == "snapshots":
        return target.is_relative_to(real_root.parent.parent / "blobs")
    return False


def _shard_path(root: Path, index: Path, fname: object) -> Path:
    """A shard named by an index: a relative path inside the checkpoint directory (no ``..``, no absolute path,
    no symlink leading outside), else one clear error."""
    if not isinstance(fname, str) or not fname or "\x00" in fname:
        raise MvlmError(f"{index}: shard name {fname!r} is not a file name; the index is damaged")
    rel = Path(fname)
    if rel.is_absolute() or ".." in rel.parts or not _inside(root, root / rel):
        raise MvlmError(
            f"{index}: shard {fname!r} lies outside the checkpoint directory {root}; refusing to read it "
            "(shards must be files inside the checkpoint directory: fix or re-download the index)"
        )
    return root / rel


def _weight_files(root: Path) -> list[Path]:
    """Which weight files make up the checkpoint (safetensors preferred when a checkpoint ships both)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = root / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise ValueError("weight_map is not an object")
            except Exception as e:  # noqa: BLE001
                raise MvlmError(f"cannot read {index}: not a valid shard index ({_short(e)})") from e
            files = []
            for fname in weight_map.values():
                p = _shard_path(root, index, fname)
                if p not in files:
                    files.append(p)
            missing = [str(p.name) for p in files if not p.is_file()]
            if missing:
                raise MvlmError(f"{index} lists shards that are not there: {', '.join(missing)}")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (root / single).is_file():
            return [_checked_file(root, root / single)]
    others = sorted(p.name for p in root.glob("*.safetensors")) or sorted(p.name for p in root.glob("*.bin"))
    if len(others) == 1:
        return [_checked_file(root, root / others[0])]
    raise MvlmError(f"{root}: no weights found (expected pytorch_model.bin, model.safetensors or a *.index.json with shards)")


def _checked_file(root: Path, p: Path) -> Path:
    if not _inside(root, p):
        raise MvlmError(f"{p} is a symlink to {os.path.realpath(p)}, outside the checkpoint directory {root}; refusing to "
                        "read it (copy the real file into the checkpoint directory)")
    return p


def read_config(root: Path) -> dict[str, Any]:
    cfg = root / "config.json"
    if not cfg.is_file():
        raise MvlmError(f"{root}: no config.json; point at a checkpoint directory as released on the HF hub")
    try:
        config = json.loads(cfg.read_text())
    except Exception as e:  # noqa: BLE001
        raise MvlmError(f"cannot read {cfg}: {_short(e)}") from e
    if not isinstance(config, dict):
        raise MvlmError(f"cannot read {cfg}: not a JSON object")
    return config


def open_checkpoint(root: str | Path) -> Checkpoint:
    """Open a checkpoint directory; reads config and tensor metadata only (no tensor data)."""
    root = Path(root)
    check_checkpoint_dir(root)
    config = read_config(root)
    files = _weight_files(root)
    ckpt = Checkpoint(root=root, config=config, files=files)
    for path in files:
        if path.suffix == ".safetensors":
            for name, info in read_safetensors_header(path).items():
                if name == "__metadata__":
                    continue
                ckpt._entries[name] = _Entry(path, tuple(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]])
        else:
            tensors, _ = ckpt._load_bin(path)
            for name, t in tensors.items():
                ckpt._entries[name] = _Entry(path, tuple(t.shape), t.dtype)
    return ckpt
