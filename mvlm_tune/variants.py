"""The files a tune's candidates need, made once and kept by content, with each one's fidelity measured once.

Everything lives in ``<tune cache>/<first 16 hex of the input LM's sha256>[-<the mmproj's>]/`` (the tune cache:
``$MVLM_TUNE_CACHE``, else ``tune/`` in mvlm's cache): the quantized files under llama.cpp's names
(``Name-Q4_K_S.gguf``, ``mmproj-Name-Q8_0.gguf``, written by ``mvlm_convert.quantize.run``: llama-quantize for the
LM, gguf-py's reference quantizers for the mmproj, atomically)
and ``fidelity.json`` (each type's figures against the input). A second tune of the same input reads both back and
quantizes nothing. An input's hash is itself remembered by path, size, modification time and inode
(``hashes.json``), so a multi-GB input is read once, not per tune.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

from mvlm_core.cache import cache_root
from mvlm_core.errors import MvlmError
from mvlm_tune.space import INPUT

FIDELITY_FILE = "fidelity.json"
PERFECT_LM = {"kl": 0.0, "top1": 1.0}
PERFECT_MMPROJ = {"image_cos": 1.0, "image_min_cos": 1.0}


def tune_cache() -> Path:
    """``$MVLM_TUNE_CACHE``, else ``tune/`` in mvlm's cache (mvlm_core.cache)."""
    if os.environ.get("MVLM_TUNE_CACHE"):
        return Path(os.environ["MVLM_TUNE_CACHE"]).expanduser()
    return cache_root() / "tune"


HEX64 = re.compile(r"[0-9a-f]{64}")


def content_hash(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime, inode) so an unchanged multi-GB file is read once."""
    return content_hashes([path])[0]


def content_hashes(paths: list[Path]) -> list[str]:
    """sha256 of each file (see :func:`content_hash`); the index is read and written once for all of them. A
    remembered value that is not a sha256 (a hand-edited index) is computed again."""
    index = tune_cache() / "hashes.json"
    known = read_json(index)
    out, changed = [], False
    for path in (Path(p).resolve() for p in paths):
        st = path.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        entry = known.get(str(path))
        if isinstance(entry, dict) and entry.get("stamp") == stamp and HEX64.fullmatch(str(entry.get("sha256", ""))):
            out.append(str(entry["sha256"]))
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        known[str(path)] = {"stamp": stamp, "sha256": h.hexdigest()}
        out.append(h.hexdigest())
        changed = True
    if changed:
        write_json(index, known)
    return out


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict) -> None:
    """Written whole under a private name and renamed (a crash leaves the old file or the new one, never half)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, allow_nan=False), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MvlmError(f"cannot write the tune cache's {path} ({e.strerror or e}): remove it, or point "
                        "$MVLM_TUNE_CACHE at a writable directory") from None


@dataclasses.dataclass
class Variants:
    """The input files and where their variants live; ``files[(kind, type)]`` -> path, ``fidelity[(kind, type)]``
    -> figures (kind: ``lm`` or ``mmproj``; type: a label or :data:`INPUT`)."""

    lm: Path
    mmproj: Path | None
    dir: Path
    lm_label: str
    mmproj_label: str | None
    files: dict[tuple[str, str], Path] = dataclasses.field(default_factory=dict)
    fidelity: dict[tuple[str, str], dict[str, float | None]] = dataclasses.field(default_factory=dict)
    made: list[str] = dataclasses.field(default_factory=list)  # the files quantized by this tune (the rest: cached)

    def candidate_files(self, lm_type: str, mmproj_type: str | None) -> tuple[Path, Path | None]:
        return self.files[("lm", lm_type)], self.files[("mmproj", mmproj_type)] if mmproj_type else None

    def candidate_fidelity(self, lm_type: str, mmproj_type: str | None) -> dict[str, float | None]:
        f = dict(self.fidelity[("lm", lm_type)])
        if mmproj_type:
            f |= self.fidelity[("mmproj", mmproj_type)]
        return f


def prepare(lm: Path, mmproj: Path | None, lm_types: list[str], mmproj_types: list[str] | None,
            allow_requantize: bool = False, image: Path | None = None,
            on_step: Callable[[str], None] = lambda s: None) -> Variants:
    """Every variant the candidates need, from the cache or made now, with its fidelity (module docstring)."""
    from mvlm_convert.quantize import read_header
    from mvlm_core.gguf_header import precision_of

    lm, mmproj = Path(lm), Path(mmproj) if mmproj else None
    on_step(f"hashing {lm.name}" + (f" and {mmproj.name}" if mmproj else ""))
    hashes = content_hashes([p for p in (lm, mmproj, image) if p is not None])
    key = hashes[0][:16] + (f"-{hashes[1][:16]}" if mmproj else "")
    picture = hashes[-1][:16] if image is not None else "builtin"  # the mmproj's figures are of this picture
    v = Variants(lm, mmproj, tune_cache() / key, precision_of(lm).upper(), precision_of(mmproj).upper() if mmproj else None)
    v.files[("lm", INPUT)], v.fidelity[("lm", INPUT)] = lm, dict(PERFECT_LM)
    if mmproj:
        v.files[("mmproj", INPUT)], v.fidelity[("mmproj", INPUT)] = mmproj, dict(PERFECT_MMPROJ)
    for kind, types, src in (("lm", lm_types, lm), ("mmproj", mmproj_types or [], mmproj)):
        if src is None:
            continue
        arch = read_header(src)[0]
        if (arch == "clip") != (kind == "mmproj"):
            raise MvlmError(f"{src} is {'an mmproj' if arch == 'clip' else 'a language model'} GGUF: give the "
                            f"{'language model' if kind == 'lm' else 'mmproj'} as {'the input' if kind == 'lm' else '--mmproj'}")
        fkey = functools.partial(_fidelity_key, kind, picture)
        known = read_json(v.dir / FIDELITY_FILE)
        todo = [t for t in types if t != INPUT and not (figures(kind, known.get(fkey(t))) and
                                                         (v.dir / _name(src, t)).is_file())]
        if todo:
            _make(v, kind, src, todo, allow_requantize, image, fkey, on_step)
            known = read_json(v.dir / FIDELITY_FILE)
        for t in types:
            if t != INPUT:
                v.files[(kind, t)] = v.dir / _name(src, t)
                got = figures(kind, known.get(fkey(t)))
                if got is None:
                    raise MvlmError(f"the tune cache's {v.dir / FIDELITY_FILE} lost the figures of {t}: remove "
                                    f"{v.dir} and run the tune again")
                v.fidelity[(kind, t)] = got
    return v


def _fidelity_key(kind: str, picture: str, qtype: str) -> str:
    """fidelity.json's key: the LM's figures are of the fixed text; the mmproj's of one picture (built-in or --image)."""
    return f"lm:{qtype}" if kind == "lm" else f"mmproj:{qtype}:{picture}"


# each figure's valid range (a cache file is read back, and may have been edited)
RANGES = {"kl": (0.0, math.inf), "top1": (0.0, 1.0), "image_cos": (-1.0, 1.0), "image_min_cos": (-1.0, 1.0)}
KEYS = {"lm": ("kl", "top1"), "mmproj": ("image_cos", "image_min_cos")}


def figures(kind: str, entry) -> dict[str, float | None] | None:
    """A cached fidelity entry when every figure is a finite number in its range (None: measure it again)."""
    if not isinstance(entry, dict):
        return None
    out: dict[str, float | None] = {}
    for k in KEYS[kind]:
        x = entry.get(k)
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            return None
        lo, hi = RANGES[k]
        if not lo <= x <= hi:
            return None
        out[k] = float(x)
    return out


def _name(src: Path, qtype: str) -> str:
    from mvlm_convert.quantize import output_name

    return output_name(src, qtype)


def _make(v: Variants, kind: str, src: Path, types: list[str], allow_requantize: bool, image: Path | None,
          fkey: Callable[[str], str], on_step: Callable[[str], None]) -> None:
    """Quantize ``src`` to ``types`` into the cache, with the quality figures, and record them."""
    from mvlm_convert import quantize

    on_step(f"quantizing {src.name} to {', '.join(t.lower() for t in types)} (each once; cached in {v.dir})")
    v.dir.mkdir(parents=True, exist_ok=True)
    results = quantize.run(src, ",".join(types), outdir=v.dir, allow_requantize=allow_requantize, quality=True,
                           lm_for_mmproj=v.lm if kind == "mmproj" else None, image=image)
    known = read_json(v.dir / FIDELITY_FILE)
    for r in results:
        if kind == "lm":
            known[fkey(r.type)] = {"kl": r.kl_div, "top1": r.top1_agree}
        else:
            known[fkey(r.type)] = {"image_cos": r.image_cos, "image_min_cos": r.image_min_cos}
        v.made.append(r.path.name)
    write_json(v.dir / FIDELITY_FILE, known)


def from_checkpoint(ckpt: Path, on_step: Callable[[str], None] = lambda s: None) -> tuple[Path, Path | None]:
    """A released checkpoint (a directory) converted once to f16 GGUFs (LM, and mmproj where it has a vision tower),
    kept in the tune cache by the checkpoint's content: (LM GGUF, mmproj GGUF or None)."""
    from mvlm_convert.convert import convert

    if not (Path(ckpt) / "config.json").is_file():
        raise MvlmError(f"{ckpt} is a directory without config.json: give a released checkpoint directory, or the "
                        "language-model .gguf file (and --mmproj FILE)")
    ckpt = Path(ckpt)
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and ".cache" not in p.relative_to(ckpt).parts)
    on_step(f"hashing the checkpoint {ckpt} ({len(files)} files)")
    digest = hashlib.sha256()
    for f, h in zip(files, content_hashes(files), strict=True):
        digest.update(f"{f.relative_to(ckpt)}\0{h}\n".encode())
    out = tune_cache() / f"checkpoint-{digest.hexdigest()[:16]}"
    done = read_json(out / "converted.json")
    if done and Path(done.get("lm", "")).is_file():
        return Path(done["lm"]), Path(done["mmproj"]) if done.get("mmproj") else None
    on_step(f"converting {ckpt} to f16 GGUFs (once; cached in {out})")
    res = convert(ckpt, out, outtype="f16", progress=False)
    mm = res.mmproj.path if res.mmproj is not None else None
    write_json(out / "converted.json", {"lm": str(res.lm.path), "mmproj": str(mm) if mm else None})
    return res.lm.path, mm

