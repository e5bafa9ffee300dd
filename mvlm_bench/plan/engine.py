"""llama.cpp's own settings, in llama-bench's vocabulary: the options ``mvlm bench`` takes as llama-bench does
(``-b``, ``-ub``, ``-fa``, ``-ctk``, ``-ctv``, ``-C/--cpu-mask``, ``--cpu-strict``, ``--poll``, ``--prio``), each a
comma list that sweeps (llama-bench's ``-b 256,512``), and what each becomes: an argument of every llama.cpp program a
protocol runs (llama-completion, llama-mtmd-cli, llama-server and llama-bench take them alike: flash attention and
the KV cache types change what the papers' protocols measure too), and a setting every record carries under
llama-bench's own field name and encoding (``n_batch``, ``flash_attn`` -1/0/1, ``cpu_strict`` true/false), so a
report's rows read like llama-bench's.

An option left out passes nothing: the program's own default runs, and the record says llama.cpp's default
(:data:`DEFAULTS`, what llama-bench reports for it).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from mvlm_core.errors import MvlmError

# ggml types llama.cpp accepts for the KV cache (common/arg.cpp's kv_cache_types)
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
_FA = {"on": 1, "1": 1, "off": 0, "0": 0, "auto": -1, "-1": -1}
_FA_ARG = {1: "on", 0: "off", -1: "auto"}
MAX_BATCH = 1 << 20


def _whole(lo: int, hi: int) -> Callable[[str], int]:
    def parse(item: str) -> int:
        try:
            v = int(item)
        except ValueError:
            raise ValueError(f"{item!r} is not a whole number (give {lo} to {hi})") from None
        if not lo <= v <= hi:
            raise ValueError(f"{v} is out of range (give {lo} to {hi})")
        return v

    return parse


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(item: str) -> str:
        if item.lower() not in choices:
            raise ValueError(f"{item!r} is not one of {', '.join(choices)}")
        return item.lower()

    return parse


def _flash_attn(item: str) -> int:
    if item.lower() not in _FA:
        raise ValueError(f"{item!r}: give on, off or auto (or llama-bench's 1, 0, -1)")
    return _FA[item.lower()]


def _mask(item: str) -> str:
    if not re.fullmatch(r"(0x)?[0-9a-fA-F]{1,64}", item):
        raise ValueError(f"{item!r} is not a CPU mask: give hexadecimal, e.g. 0xF for CPUs 0-3")
    return item.lower() if item.lower().startswith("0x") else "0x" + item.lower()


def _strict(item: str) -> bool:
    if item not in ("0", "1"):
        raise ValueError(f"{item!r}: give 0 or 1")
    return item == "1"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One llama.cpp setting: the spec's ``field``, its options as written, llama-bench's field name (``param``) and
    how a comma list item parses into llama-bench's encoding; ``arg`` gives the value as the programs take it."""

    field: str
    option: str
    short: str
    param: str
    parse: Callable[[str], Any]
    arg: Callable[[Any], str] = str
    sweeps: bool = True  # llama-bench takes a list (its --prio is one value for the whole run)
    help: str = ""  # `mvlm bench --help`


_SWEEPS = "; a comma list sweeps"
SETTINGS: tuple[Setting, ...] = (
    Setting("batch", "--batch-size", "-b", "n_batch", _whole(1, MAX_BATCH),
            help="Logical batch size (llama.cpp's default 2048)" + _SWEEPS + ". Reaches every program a protocol runs."),
    Setting("ubatch", "--ubatch-size", "-ub", "n_ubatch", _whole(1, MAX_BATCH),
            help="Physical batch size (default 512)" + _SWEEPS + "."),
    Setting("flash_attn", "--flash-attn", "-fa", "flash_attn", _flash_attn, _FA_ARG.__getitem__,
            help="Flash attention: on, off or auto (default auto)" + _SWEEPS + ". Reaches every program a protocol runs."),
    Setting("cache_type_k", "--cache-type-k", "-ctk", "type_k", _choice(KV_TYPES),
            help="KV cache type for K (f16, q8_0, q4_0, ...; default f16)" + _SWEEPS + "."),
    Setting("cache_type_v", "--cache-type-v", "-ctv", "type_v", _choice(KV_TYPES),
            help="KV cache type for V (default f16; a quantized V needs -fa on)" + _SWEEPS + "."),
    Setting("cpu_mask", "--cpu-mask", "-C", "cpu_mask", _mask,
            help="CPU affinity mask, hexadecimal (0xF: CPUs 0-3)" + _SWEEPS + "."),
    Setting("cpu_strict", "--cpu-strict", "", "cpu_strict", _strict, lambda v: "1" if v else "0",
            help="Strict CPU placement: 0 or 1" + _SWEEPS + "."),
    Setting("poll", "--poll", "", "poll", _whole(0, 100),
            help="Polling level while waiting for work, 0-100 (default 50)" + _SWEEPS + "."),
    Setting("prio", "--prio", "", "prio", _whole(-1, 3), sweeps=False,
            help="Process/thread priority: -1 low, 0 normal, 1 medium, 2 high, 3 realtime."),
)
BY_FIELD = {s.field: s for s in SETTINGS}
# what llama.cpp runs with when the option is left out, in llama-bench's encoding (its defaults; the history reads a
# setting that an older entry lacks as this)
DEFAULTS: dict[str, Any] = {"n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "type_k": "f16", "type_v": "f16",
                            "cpu_mask": "0x0", "cpu_strict": False, "poll": 50, "prio": 0}


_RANGE = re.compile(r"(-?\d+)-(-?\d+)(?:([+*])(\d+))?")
MAX_RANGE = 1024


def expand(item: str) -> list[str]:
    """llama-bench's ranges: ``first-last`` (step 1), ``first-last+step``, ``first-last*mult``; anything else is
    itself. ValueError for a range that is empty or never ends."""
    m = _RANGE.fullmatch(item.strip())
    if m is None:
        return [item]
    first, last, op, step = int(m[1]), int(m[2]), m[3] or "+", int(m[4] or 1)
    if last < first or step < 1 or (op == "*" and (step < 2 or first < 1)):
        raise ValueError(f"{item!r} is not a range llama-bench reads (first-last, first-last+step, first-last*mult "
                         "with first <= last)")
    out, v = [], first
    while v <= last:
        out.append(str(v))
        if len(out) > MAX_RANGE:
            raise ValueError(f"{item!r} has more than {MAX_RANGE} values")
        v = v + step if op == "+" else v * step
    return out


def items_of(text: str) -> list[str]:
    """A comma list as llama-bench reads it (ranges expanded), items stripped."""
    return [x.strip() for raw in str(text).split(",") for x in (expand(raw.strip()) if raw.strip() else [""])]


def parse_values(s: Setting, text: str | None) -> list[Any]:
    """An option's comma list as values (``[None]`` when not given); one line naming the bad item otherwise."""
    if text is None:
        return [None]
    said = f"{s.short or s.option} {text}"
    try:
        items = items_of(text)
    except ValueError as e:
        raise MvlmError(f"{said}: {e}") from None
    if not s.sweeps and len(items) > 1:
        raise MvlmError(f"{said}: {s.option} takes one value (as llama-bench's)")
    out: list[Any] = []
    for item in items:
        if not item:
            raise MvlmError(f"{said} has an empty item: give values separated by commas")
        try:
            v = s.parse(item)
        except ValueError as e:
            raise MvlmError(f"{said}: {e}") from None
        if v in out:
            raise MvlmError(f"{said} names {item} twice: give each value once")
        out.append(v)
    return out


def argv(spec: Any) -> list[str]:
    """The settings a configuration sets, as arguments of any llama.cpp program (left out: the program's default)."""
    out: list[str] = []
    for s in SETTINGS:
        v = getattr(spec, s.field)
        if v is not None:
            out += [s.short or s.option, s.arg(v)]
    return out


def params(spec: Any) -> dict[str, Any]:
    """The settings every record of a configuration carries, by llama-bench's field names: the batch sizes always
    (llama.cpp's default when not set), the others when set."""
    out: dict[str, Any] = {"n_batch": DEFAULTS["n_batch"], "n_ubatch": DEFAULTS["n_ubatch"]}
    for s in SETTINGS:
        v = getattr(spec, s.field)
        if v is not None:
            out[s.param] = v
    return out


def check_settings(spec: Any) -> None:
    """Combinations llama.cpp would not run as asked: a micro-batch larger than the batch (clamped: a record would say
    a setting that did not run), a quantized V cache without flash attention (the context is not created)."""
    if spec.flash_attn == 0 and spec.cache_type_v not in (None, "f32", "f16", "bf16"):
        raise MvlmError(f"-ctv {spec.cache_type_v} with -fa off: llama.cpp needs flash attention for a quantized V "
                        "cache; give -fa on (or auto), or -ctv f16")
    b = spec.batch if spec.batch is not None else DEFAULTS["n_batch"]
    if spec.ubatch is not None and spec.ubatch > b:
        raise MvlmError(f"-ub {spec.ubatch} is larger than the batch size ({b}): llama.cpp would clamp it to {b}; give "
                        f"-ub at most -b")


# --- llama-bench's tests ------------------------------------------------------------------------------------------
MAX_TOKENS = 8192  # llama-bench's -p/-n/-pg on these small models (their contexts are 2048-4096)
MAX_DEPTH = 131072
MAX_TESTS = 1024  # tests one llama-bench run makes (each -p/-n/-pg at each -d)


@dataclasses.dataclass(frozen=True)
class BenchTests:
    """What ``--protocol llama-bench`` measures, as llama-bench's own options: ``-p`` prompt sizes, ``-n`` generation
    lengths, ``-pg`` prompt+generation pairs, ``-d`` context depths (each test runs at each depth). Defaults:
    llama-bench's (``-p 512 -n 128``)."""

    prompts: tuple[int, ...] = (512,)
    gens: tuple[int, ...] = (128,)
    pg: tuple[tuple[int, int], ...] = ()
    depths: tuple[int, ...] = (0,)

    def argv(self) -> list[str]:
        out = ["-p", ",".join(map(str, self.prompts)), "-n", ",".join(map(str, self.gens))]
        for p, g in self.pg:
            out += ["-pg", f"{p},{g}"]
        return out + ["-d", ",".join(map(str, self.depths))]

    def count(self) -> int:
        """The result rows one llama-bench run prints (a 0 size is no test, as in llama-bench)."""
        per_depth = sum(1 for p in self.prompts if p) + sum(1 for g in self.gens if g) + len(self.pg)
        return per_depth * len(self.depths)


def _ints(option: str, text: str, lo: int, hi: int) -> tuple[int, ...]:
    parse = _whole(lo, hi)
    try:
        items = items_of(text)
    except ValueError as e:
        raise MvlmError(f"{option} {text}: {e}") from None
    out = []
    for item in items:
        try:
            out.append(parse(item))
        except ValueError as e:
            raise MvlmError(f"{option} {text}: {e}") from None
    if len(set(out)) != len(out):
        raise MvlmError(f"{option} {text} names a value twice: give each once")
    return tuple(out)


def bench_tests(prompts: str | None, gens: str | int | None, pg: list[str] | None, depths: str | None) -> BenchTests:
    """llama-bench's test options as given (text; None: llama-bench's default), checked."""
    t = BenchTests()
    if prompts is not None:
        t = dataclasses.replace(t, prompts=_ints("-p", prompts, 0, MAX_TOKENS))
    if gens is not None:
        t = dataclasses.replace(t, gens=_ints("-n", str(gens), 0, MAX_TOKENS))
    pairs = []
    for item in pg or []:
        m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", item)
        if m is None or not (1 <= int(m[1]) <= MAX_TOKENS and 1 <= int(m[2]) <= MAX_TOKENS):
            raise MvlmError(f"-pg {item}: give one prompt+generation pair as PP,TG (e.g. -pg 512,128; repeat -pg for "
                            f"more), each from 1 to {MAX_TOKENS}")
        pairs.append((int(m[1]), int(m[2])))
    if len(set(pairs)) != len(pairs):
        raise MvlmError(f"-pg {','.join(map(str, pairs[0]))} ...: a prompt+generation test is given twice: give each once")
    if pairs:
        t = dataclasses.replace(t, pg=tuple(pairs))
    if depths is not None:
        t = dataclasses.replace(t, depths=_ints("-d", depths, 0, MAX_DEPTH))
    if not t.count():
        raise MvlmError("llama-bench has no test to run: every -p and -n is 0 and no -pg is given")
    if t.count() > MAX_TESTS:
        raise MvlmError(f"-p, -n, -pg and -d make {t.count()} llama-bench tests per repetition (more than {MAX_TESTS}): "
                        "give shorter lists")
    return t


def test_name(n_prompt: int, n_gen: int, n_depth: int = 0) -> str:
    """llama-bench's test name as a key: ``pp512``, ``tg128``, ``pp512+tg128``, ``@d1024`` appended at a depth."""
    name = (f"pp{n_prompt}" if n_prompt else "") + ("+" if n_prompt and n_gen else "") + (f"tg{n_gen}" if n_gen else "")
    return name + (f"@d{n_depth}" if n_depth else "")


# llama-bench's options that mvlm bench does not offer (llama.cpp runs at their defaults), with what to do instead.
NOT_OFFERED = {
    ("-nkvo", "--no-kv-offload", "-sm", "--split-mode", "-mg", "--main-gpu", "-ts", "--tensor-split", "-dev",
     "--list-devices", "-nopo", "--no-op-offload", "--no-host", "-ncmoe", "--n-cpu-moe", "-rpc", "--rpc"):
        "multi-GPU and offload placement are not set by mvlm (the devices it measures have one CPU or one GPU; "
        "-ngl places layers)",
    ("-mmp", "--mmap", "-lm", "--load-mode", "-lzm", "--lazy-mode", "--repack", "--numa", "-embd", "--embeddings",
     "-fitt", "--fit-target", "-fitc", "--fit-ctx"): "llama.cpp runs at its default for it",
    ("-hff", "--hf-file", "-hft", "--hf-token", "--offline"): "give the GGUF itself with -m (mvlm convert takes Hub ids)",
    ("-oe", "--output-err"): "mvlm prints its progress and errors on stderr; -o picks stdout's format",
    ("--no-warmup",): "use --warmup 0", ("--progress",): "mvlm shows its progress itself",
}


def not_offered(argv: list[str]) -> str | None:
    """The line refusing the first llama-bench option in ``mvlm bench ARGV`` that mvlm does not take (so that
    ``-nkvo 1`` is not read as ``-n kvo``), or None."""
    for arg in argv:
        if arg == "--":
            return None
        name = arg.split("=", 1)[0]
        for names, instead in NOT_OFFERED.items():
            if name in names:
                return f"{name} is llama-bench's, and mvlm bench does not offer it: {instead}"
    return None
