"""config.json values checked before anything is written: type, range, and agreement with the weights.

A config value that contradicts the weights would give a GGUF llama.cpp cannot load (or one that loads and computes
garbage); a value of the wrong type would give a traceback. Every check here fails with one line that names the
field, its value and, where the weights tell, what they say, e.g.::

    config.json: intermediate_size = 400 but the weights say 352 (model.layers.0.mlp.gate_proj.weight is
    [352, 128], expected [400, 128]); fix config.json or use the weights it belongs to

``Fields`` reads typed values; ``Dim`` / ``check_shape`` compare a tensor's shape with what the config implies and
blame the config field a wrong dimension comes from; ``check_layer_count`` compares a layer count with the weights.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from mvlm_core.errors import MvlmError

REQUIRED: Any = object()
FIX = "fix config.json or use the weights it belongs to"


def show(value: Any) -> str:
    """A config value as it appears in JSON (``null``, ``"abc"``, ``0``)."""
    try:
        return json.dumps(value)[:60]
    except (TypeError, ValueError):
        return repr(value)[:60]


class Fields:
    """Typed access to a config dict; a bad value is one MvlmError naming the field, its value, and the weights' view.

    ``weights`` maps a field to what the weights say about it, as ``(value, evidence)``, e.g.
    ``{"hidden_size": (128, "model.embed_tokens.weight is [384, 128]")}``.
    """

    def __init__(self, config: dict[str, Any], what: str, *, source: str = "config.json",
                 weights: dict[str, tuple[int, str]] | None = None):
        self.config = config if isinstance(config, dict) else {}
        self.what = what
        self.source = source
        self.weights = weights or {}

    def _hint(self, key: str) -> str:
        if key in self.weights:
            val, evidence = self.weights[key]
            return f" (the weights say {val}: {evidence})"
        return ""

    def fail(self, key: str, value: Any, want: str) -> NoReturn:
        raise MvlmError(f"{self.source}: {key} = {show(value)} is not {want}{self._hint(key)}; fix {key} in "
                        f"{self.source} ({self.what})")

    def raw(self, *keys: str) -> tuple[str, Any]:
        """(the first key present with a non-null value, its value); (keys[0], None) if none is."""
        for k in keys:
            if self.config.get(k) is not None:
                return k, self.config[k]
        return keys[0], None

    def _missing(self, keys: Sequence[str], want: str) -> NoReturn:
        alts = " / ".join(repr(k) for k in keys)
        present = [k for k in keys if k in self.config]
        if present:  # present but null
            self.fail(present[0], None, want)
        raise MvlmError(f"{self.source} has no {alts}{self._hint(keys[0])}; cannot describe the {self.what}")

    def int(self, *keys: str, default: Any = REQUIRED, minimum: int | None = 1, maximum: int | None = None) -> int:
        key, v = self.raw(*keys)
        rng = _range_text(minimum, maximum)
        if v is None:
            if default is REQUIRED:
                self._missing(keys, f"an integer{rng}")
            return default
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(key, v, f"an integer{rng}")
        if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
            self.fail(key, v, f"an integer{rng}")
        return v

    def number(self, *keys: str, default: Any = REQUIRED, positive: bool = True, maximum: float | None = None,
               inclusive_max: bool = True) -> float:
        key, v = self.raw(*keys)
        want = "a positive number" if positive else "a number"
        if maximum is not None:
            want += f" {'<=' if inclusive_max else '<'} {maximum:g}"
        if v is None:
            if default is REQUIRED:
                self._missing(keys, want)
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(key, v, want)
        v = float(v)
        if positive and v <= 0:
            self.fail(key, v, want)
        if maximum is not None and (v > maximum or (not inclusive_max and v == maximum)):
            self.fail(key, v, want)
        return v

    def flag(self, key: str, default: bool) -> bool:
        v = self.config.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            self.fail(key, v, "true or false")
        return v

    def text(self, key: str, default: str, allowed: Iterable[str] | None = None) -> str:
        v = self.config.get(key)
        if v is None:
            return default
        allowed = list(allowed) if allowed is not None else None
        if not isinstance(v, str) or (allowed is not None and v not in allowed):
            self.fail(key, v, f"one of {', '.join(allowed)}" if allowed else "a string")
        return v

    def divides(self, key: str, value: int, by_key: str, by: int) -> None:
        """``value`` (of ``key``) must be a multiple of ``by`` (of ``by_key``)."""
        if value % by:
            raise MvlmError(f"{self.source}: {key} = {value} is not a multiple of {by_key} = {by}{self._hint(key)}; "
                            f"fix {self.source} ({self.what})")


def _range_text(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f" from {lo} to {hi}"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


@dataclass(frozen=True)
class Dim:
    """One expected dimension: ``size`` = value of config field ``key`` times ``unit`` (``key`` None: not from the
    config, e.g. a width read off another tensor). ``note`` explains a unit (``"32-wide heads"``)."""

    size: int
    key: str | None = None
    unit: int = 1
    note: str = ""


def check_shape(reader: Any, name: str, dims: Sequence[Dim | int], *, source: str = "config.json",
                what: str = "checkpoint") -> None:
    """The tensor ``name`` of ``reader`` must have exactly these dimensions; one line blaming the field otherwise."""
    want = [d if isinstance(d, Dim) else Dim(int(d)) for d in dims]
    shape = tuple(reader.shape(name))
    sizes = tuple(d.size for d in want)
    if shape == sizes:
        return
    shown = f"{name} is {list(shape)}, expected {list(sizes)}"
    if len(shape) == len(want):
        for got, d in zip(shape, want, strict=True):
            if got == d.size or d.key is None:
                continue
            value = d.size // d.unit
            implied = got // d.unit if got % d.unit == 0 else f"a width of {got} (not a whole multiple of {d.unit})"
            note = f" with {d.note}" if d.note else ""
            raise MvlmError(f"{source}: {d.key} = {value} but the weights say {implied} ({shown}{note}); {FIX}")
    raise MvlmError(f"{reader_root(reader)}: {shown}; the {what} tensors do not fit together (damaged or mixed "
                    "checkpoint?)")


def reader_root(reader: Any) -> str:
    return str(getattr(reader, "root", "checkpoint"))


def layer_ids(names: Iterable[str], pattern: str) -> set[int]:
    pat = re.compile(pattern)
    return {int(m.group(1)) for n in names if (m := pat.match(n))}


def check_layer_count(reader: Any, n_layer: int, pattern: str, *, key: str = "num_hidden_layers",
                      source: str = "config.json", label: str = "model.layers") -> None:
    """The layers present in the weights (by ``pattern``'s group 1) must be exactly 0 .. n_layer-1."""
    ids = layer_ids(reader.names(), pattern)
    count = max(ids) + 1 if ids else 0
    if count != n_layer:
        have = f"{label}.0 .. {label}.{count - 1}" if count else f"no {label}.* tensors"
        raise MvlmError(f"{source}: {key} = {n_layer} but the weights say {count} ({have}); {FIX}")
    gaps = sorted(set(range(count)) - ids)
    if gaps:
        raise MvlmError(f"{reader_root(reader)}: layer {label}.{gaps[0]} is missing from the weights "
                        f"(layers 0 .. {count - 1} expected); is the checkpoint complete?")


def weight_hints(reader: Any, *, embed: str = "model.embed_tokens.weight", ffn: tuple[str, int] | None = None,
                 layer_pattern: str = r"model\.layers\.(\d+)\.") -> dict[str, tuple[int, str]]:
    """What the weights say about hidden_size, vocab_size, intermediate_size and num_hidden_layers (for messages)."""
    out: dict[str, tuple[int, str]] = {}
    if reader is None:
        return out
    if embed in reader and len(reader.shape(embed)) == 2:
        rows, cols = reader.shape(embed)
        ev = f"{embed} is [{rows}, {cols}]"
        out["hidden_size"] = (cols, ev)
        out["n_embd"] = (cols, ev)
        out["vocab_size"] = (rows, ev)
    if ffn is not None and ffn[0] in reader and len(reader.shape(ffn[0])) == 2:
        shape = reader.shape(ffn[0])
        out["intermediate_size"] = (shape[0] // ffn[1], f"{ffn[0]} is {list(shape)}")
    ids = layer_ids(reader.names(), layer_pattern)
    if ids:
        out["num_hidden_layers"] = (max(ids) + 1, f"layers 0 .. {max(ids)} in the weights")
        out["n_layer"] = out["num_hidden_layers"]
    return out


def check_checkpoint_dir(root) -> None:
    """The checkpoint path names a directory (``mvlm convert`` says so before it loads torch for the weights)."""
    from pathlib import Path

    root = Path(root)
    if not root.is_dir():
        what = "not a directory" if root.exists() else "does not exist"
        raise MvlmError(f"{root}: {what}; give the checkpoint directory (config.json + weights)")
