"""An interleaved A/B session's plan: the baseline side (the command line changed by ``--against KEY=VALUE``) and
the candidate (the command line), run in a balanced order (A B B A A B B A ...: :func:`interleave`) on one device, so
drift hits both alike (docs/ci.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mvlm_bench.plan.spec import BenchSpec, Side, check_inputs, validate_spec
from mvlm_core import runtime as rtmod
from mvlm_core.errors import MvlmError

ORDERS = ("abba", "alternate")


def interleave(n_pairs: int, order: str = "abba") -> list[str]:
    """The run order of an A/B session: ``abba`` = A B B A A B B A … (balanced), ``alternate`` = A B A B …

    Each consecutive two runs form one pair (one A and one B), so pair ``i`` is ``order[2i:2i+2]``.
    """
    if n_pairs < 0:
        raise ValueError("n_pairs must be >= 0")
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}: choose one of {', '.join(ORDERS)}")
    out: list[str] = []
    for i in range(n_pairs):
        out += ["B", "A"] if order == "abba" and i % 2 == 1 else ["A", "B"]
    return out


AGAINST_KEYS = ("model", "mmproj", "runtime", "llama-cpp", "threads", "n-gpu-layers", "ctx-size")


def parse_against(items: list[str], spec: BenchSpec, order: str) -> tuple[Side, Side, bool]:
    """``--against KEY=VALUE ...`` -> (baseline Side, candidate Side, same): the baseline is the command line changed by
    the given keys; ``same``: both sides are the same (an A/A session measures the noise). One line naming the bad
    item otherwise."""
    if order not in ORDERS:
        raise MvlmError(f"--order {order!r}: choose one of {', '.join(ORDERS)}")
    changes: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lower().replace("_", "-")
        if not sep or not value.strip():
            raise MvlmError(f"--against {item!r}: write KEY=VALUE, with KEY one of {', '.join(AGAINST_KEYS)}")
        if key not in AGAINST_KEYS:
            raise MvlmError(f"--against {item!r}: unknown key {key!r}; choose from {', '.join(AGAINST_KEYS)}")
        if key in changes:
            raise MvlmError(f"--against {key}= is given twice")
        changes[key] = value.strip()
    if "runtime" in changes and "llama-cpp" in changes:
        raise MvlmError("--against runtime= and llama-cpp= both name the baseline's build: give one")
    if "llama-cpp" in changes:  # before anything else: one line when the directory is no llama.cpp checkout
        raw = changes["llama-cpp"]
        d = Path(raw).expanduser()
        if not d.is_dir():
            raise MvlmError(f"--against llama-cpp={raw}: {d} is not a directory: give a llama.cpp checkout built with "
                            "`mvlm runtime build --target TARGET --llama-cpp DIR`")
        if not (d / "CMakeLists.txt").is_file() or not (d / "ggml").is_dir():
            raise MvlmError(f"--against llama-cpp={raw}: {d} is not a llama.cpp checkout (it needs CMakeLists.txt and "
                            "ggml/): give the directory of a llama.cpp source tree built with "
                            "`mvlm runtime build --target TARGET --llama-cpp DIR`")
    base_spec = spec
    ints = {"threads": "threads", "n-gpu-layers": "n_gpu_layers", "ctx-size": "ctx_size"}
    for key, field_name in ints.items():
        if key in changes:
            try:
                v = int(changes[key])
            except ValueError:
                raise MvlmError(f"--against {key}={changes[key]!r}: not a whole number") from None
            base_spec = dataclasses.replace(base_spec, **{field_name: v})
    for key in ("model", "mmproj"):
        if key in changes:
            base_spec = dataclasses.replace(base_spec, **{key: Path(changes[key]).expanduser()})
    runtime = None
    if "runtime" in changes:
        try:
            runtime = rtmod.runtime_from_dir(Path(changes["runtime"]))
        except MvlmError as e:
            raise MvlmError(f"--against runtime={changes['runtime']}: {e}") from None
    llama_cpp = Path(changes["llama-cpp"]).expanduser() if "llama-cpp" in changes else None
    validate_spec(base_spec, against=set(changes))  # errors name `--against threads=0`, as the user wrote it
    check_inputs(base_spec, against=set(changes))
    same = base_spec == spec and runtime is None and llama_cpp is None
    return Side(base_spec, runtime=runtime, llama_cpp=llama_cpp), Side(spec), same
