"""What `mvlm tune` chooses between: each :class:`Candidate` is one LM file type, one mmproj file type (or none), one
thread count and one flash-attention setting; the :class:`Budget` says how much fidelity a candidate may lose.

The file types are llama.cpp's labels (``Q4_K_S``, ``F16``); ``input`` stands for the input file itself, unchanged
(its own label is shown). Fidelity is measured against that input: the LM's mean KL divergence of the next-token
distributions and top-1 agreement, the mmproj's mean cosine of the image embeddings (mvlm_convert.quantize)."""

from __future__ import annotations

import dataclasses
import itertools
import math

from mvlm_core.errors import MvlmError

INPUT = "input"  # the input file as given (its own type: F16, F32, or already quantized)
DEFAULT_LM_TYPES = "q4_0,q4_k_s,q4_k_m,q5_k_m,q8_0"
DEFAULT_MMPROJ_TYPES = "input,q8_0"
# limit -> (direction, what it is): "max": the candidate's figure may not exceed it, "min": may not fall below it
BUDGET_KEYS = {"kl": ("max", "mean KL divergence of the LM's next-token distributions vs the input LM (nats)"),
               "top1": ("min", "top-1 agreement of the LM's next token with the input LM (0..1)"),
               "image_cos": ("min", "mean cosine of the image embeddings vs the input mmproj (0..1)")}
DEFAULT_BUDGET = "kl=0.05,image_cos=0.999"
OBJECTIVES = {"total": "total_s", "ttft": "ttft_s", "eval": "eval_s", "ve": "ve_s"}
OBJECTIVE_NAMES = {"total": "Total", "ttft": "time to first token", "eval": "Eval", "ve": "vision encoder"}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One configuration: ``lm``/``mmproj`` are file-type labels (upper case) or :data:`INPUT`; ``mmproj`` None for
    the lm protocol; ``threads``/``flash_attn`` None: the device profile's / llama.cpp's default."""

    lm: str
    mmproj: str | None = None
    threads: int | None = None
    flash_attn: int | None = None

    def key(self) -> str:
        """A stable text key (caches, JSON)."""
        return f"lm={self.lm};mmproj={self.mmproj or '-'};t={self.threads or '-'};fa={_fa(self.flash_attn)}"

    def label(self, input_lm: str = INPUT, input_mmproj: str = INPUT) -> str:
        """``Q4_K_S + mmproj F16 (input) · t4 · fa on`` (the input's own type, marked, in place of ``input``)."""
        lm = f"{input_lm} (input)" if self.lm == INPUT else self.lm
        mm = f"{input_mmproj} (input)" if self.mmproj == INPUT else self.mmproj
        text = lm if self.mmproj is None else f"{lm} + mmproj {mm}"
        if self.threads is not None:
            text += f" · t{self.threads}"
        if self.flash_attn is not None:
            text += f" · fa {_fa(self.flash_attn)}"
        return text


def _fa(v: int | None) -> str:
    return {None: "-", 1: "on", 0: "off", -1: "auto"}[v]


def parse_types(text: str, allowed: dict[str, float], option: str) -> list[str]:
    """A comma list of file types (``q4_k_s,q8_0``, ``input``) as upper-case labels, in the order given, once each."""
    out: list[str] = []
    for raw in text.split(","):
        t = raw.strip()
        if not t:
            continue
        label = INPUT if t.lower() == INPUT else t.upper()
        if label != INPUT and label not in allowed:
            raise MvlmError(f"{option}: unknown type {t!r}; choose from input, {', '.join(x.lower() for x in allowed)}")
        if label not in out:
            out.append(label)
    if not out:
        raise MvlmError(f"{option} is empty: give a comma list of types, e.g. {DEFAULT_LM_TYPES}")
    return out


def parse_ints(text: str | None, option: str, lo: int, hi: int) -> list[int | None]:
    """A comma list of whole numbers in [lo, hi]; None (not given): one value, the default."""
    if text is None:
        return [None]
    out: list[int | None] = []
    for raw in text.split(","):
        try:
            v = int(raw.strip())
        except ValueError:
            raise MvlmError(f"{option}: {raw.strip()!r} is not a whole number; give a comma list such as 2,4") from None
        if not lo <= v <= hi:
            raise MvlmError(f"{option}: {v} is out of range; give numbers from {lo} to {hi}")
        if v not in out:
            out.append(v)
    return out


def grid(lm_types: list[str], mmproj_types: list[str] | None, threads: list[int | None],
         flash_attn: list[int | None]) -> list[Candidate]:
    """Every combination (the full grid the search avoids measuring whole)."""
    mm: list[str | None] = list(mmproj_types) if mmproj_types else [None]
    return [Candidate(lm, m, t, fa) for lm, m, t, fa in itertools.product(lm_types, mm, threads, flash_attn)]


@dataclasses.dataclass(frozen=True)
class Budget:
    """Limits on the fidelity figures (absent: no limit on that figure)."""

    limits: tuple[tuple[str, float], ...] = ()

    def get(self, key: str) -> float | None:
        return dict(self.limits).get(key)

    def allows(self, fidelity: dict[str, float | None]) -> bool:
        """True when every limit holds; a figure that could not be measured (None) never passes its limit."""
        for key, limit in self.limits:
            v = fidelity.get(key)
            if v is None or not math.isfinite(v):
                return False
            if (BUDGET_KEYS[key][0] == "max" and v > limit) or (BUDGET_KEYS[key][0] == "min" and v < limit):
                return False
        return True

    def describe(self) -> str:
        return ", ".join(f"{k} {'<=' if BUDGET_KEYS[k][0] == 'max' else '>='} {v:g}" for k, v in self.limits) or "none"


def parse_budget(text: str) -> Budget:
    """``kl=0.05,top1=0.9,image_cos=0.999`` (``none``: no limit)."""
    if text.strip().lower() in ("", "none"):
        return Budget()
    limits: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        key = key.strip().lower()
        if not sep or key not in BUDGET_KEYS:
            raise MvlmError(f"--budget: {part.strip()!r} is not KEY=VALUE with KEY one of {', '.join(BUDGET_KEYS)} "
                            f"(e.g. {DEFAULT_BUDGET})")
        try:
            v = float(value)
        except ValueError:
            raise MvlmError(f"--budget {key}: {value.strip()!r} is not a number") from None
        if not math.isfinite(v) or v < 0 or (key != "kl" and v > 1):
            raise MvlmError(f"--budget {key}={value.strip()}: out of range ({BUDGET_KEYS[key][1]})")
        limits[key] = v
    return Budget(tuple(limits.items()))


def at_least_as_faithful(a: dict[str, float | None], b: dict[str, float | None]) -> bool:
    """True when ``a`` is as faithful as ``b`` or more in every figure both have (KL lower or equal; top-1 and cosine
    higher or equal). A figure one of them lacks does not decide."""
    for key, (direction, _) in BUDGET_KEYS.items():
        va, vb = a.get(key), b.get(key)
        if va is None or vb is None:
            continue
        if (direction == "max" and va > vb) or (direction == "min" and va < vb):
            return False
    return True
