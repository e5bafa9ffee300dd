"""A bench's plan: which configurations run on which device, how often, in which order — everything that can be
refused is refused here, before a device is touched or anything is pushed.

:func:`make_plan` takes the options as the user gave them (``mvlm bench``'s, the confirming re-measure's, a test's)
and returns a :class:`Plan`: one or more configurations (a sweep is their cross product), or the two sides of an
interleaved A/B session, with the pacing and the lease settings. The session layer runs it
(:func:`mvlm_bench.session.runners.run_plan`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from mvlm_bench.device.profiles import DeviceProfile
from mvlm_bench.plan.against import interleave, parse_against
from mvlm_bench.plan.engine import BenchTests, bench_tests
from mvlm_bench.plan.spec import BenchSpec, Side
from mvlm_bench.plan.sweep import check_pacing, configurations
from mvlm_core.errors import MvlmError

DEFAULT_LEASE_TIMEOUT_S = 3600.0
MAX_LEASE_TIMEOUT_S = 7 * 24 * 3600.0


@dataclasses.dataclass
class Plan:
    """What a bench runs: ``configs`` (one, or a sweep's cross product) or ``sides`` (an A/B session: the baseline
    and the candidate, ``configs[0]`` being the candidate's), the A/B ``order``, the pacing, and the lease."""

    profile: DeviceProfile
    configs: list[BenchSpec]
    sides: tuple[Side, Side] | None = None
    order: str = "abba"
    same_sides: bool = False  # an A/A session: both sides the same (it measures the noise)
    delay: float = 0.0
    max_temp: float | None = None
    max_temp_wait: float = 1800.0
    lease_db: str | None = None
    lease_timeout: float = DEFAULT_LEASE_TIMEOUT_S

    @property
    def protocol(self) -> str:
        return self.configs[0].protocol

    @property
    def kind(self) -> str:
        """``ab`` (interleaved sides), ``dataset`` (one server, passes over a set), ``llama-bench`` (a llama-bench
        process per repetition), ``configs`` (one process per repetition, configuration after configuration)."""
        if self.sides is not None:
            return "ab"
        return self.protocol if self.protocol in ("dataset", "llama-bench") else "configs"

    @property
    def repetitions(self) -> int:
        """The measured repetitions planned (an A/B session: both sides' runs)."""
        if self.sides is not None:
            return 2 * self.configs[0].repeat
        return sum(c.repeat for c in self.configs)

    @property
    def runs(self) -> int:
        """Every run planned, warm-ups included (the progress bar's total)."""
        if self.sides is not None:
            warm = max(s.spec.warmup for s in self.sides)
            return 2 * warm + 2 * self.configs[0].repeat
        return sum(c.warmup + c.repeat for c in self.configs)

    def ab_order(self) -> list[str]:
        """The A/B run order, warm-ups first (both sides', balanced), then the measured pairs."""
        assert self.sides is not None
        warm = max(s.spec.warmup for s in self.sides)
        return interleave(warm, "abba") + interleave(self.configs[0].repeat, self.order)


@dataclasses.dataclass
class Options:
    """The bench options as given (``None``: not given); lists are the sweep's comma lists as text."""

    protocol: str = "lm"
    models: Sequence[Path] = ()
    mmproj: Path | None = None
    image: Path | None = None
    data: Path | None = None
    repeat: int = 5
    warmup: int = 1
    n_predict: int | str | None = None  # llama-bench: a comma list of generation lengths
    threads: str | None = None
    n_gpu_layers: str | None = None
    ctx_size: str | None = None
    timeout: float = 900.0
    prompt: str | None = None
    against: Sequence[str] = ()
    order: str = "abba"
    delay: float = 0.0
    max_temp: float | None = None
    max_temp_wait: float = 1800.0
    lease_db: str | None = None
    lease_timeout: float = DEFAULT_LEASE_TIMEOUT_S
    compares: str = ""  # "--baseline" / "--fail-on-regression" when the bench compares (one configuration only)
    gates: bool = False  # --fail-on-regression: an A/B session must be able to reach p <= 0.05
    engine_lists: dict[str, str | None] = dataclasses.field(default_factory=dict)  # llama.cpp's settings (engine)
    n_prompt: str | None = None  # llama-bench's tests: -p, -pg, -d (and -n as a list)
    pg: Sequence[str] = ()
    n_depth: str | None = None


def make_plan(profile: DeviceProfile, o: Options) -> Plan:
    """Check every option and input (numbers, files, their combinations) and build the plan; one line otherwise."""
    if not o.models:
        raise MvlmError("no model given: pass --model FILE.gguf (see `mvlm bench --help`)")
    from mvlm_bench.plan.against import ORDERS
    from mvlm_bench.plan.protocols import PROTOCOLS

    if o.protocol not in PROTOCOLS:  # first: the other options are read as this protocol takes them
        raise MvlmError(f"unknown protocol {o.protocol!r}: choose one of {', '.join(PROTOCOLS)}")

    if o.order not in ORDERS:  # checked with or without --against: a typo is never silently ignored
        raise MvlmError(f"--order {o.order!r}: choose one of {', '.join(ORDERS)} (it orders an --against session)")
    if o.prompt is not None and not o.prompt.strip():
        raise MvlmError("--prompt is empty: give the text, or leave --prompt out for the protocol's own")
    if o.protocol == "llama-bench":  # llama-bench runs its own tests: these would be recorded but never used
        for option, value in (("--prompt", o.prompt), ("--image", o.image), ("--mmproj", o.mmproj),
                              ("--ctx-size", o.ctx_size)):
            if value is not None:
                raise MvlmError(f"{option} is not used by the llama-bench protocol (its tests are -p, -n, -pg and -d, "
                                "each with its own context): drop it, or bench with --protocol lm or vlm")
    n_predict, tests = _tokens_and_tests(o)
    spec = BenchSpec(protocol=o.protocol, model=Path(o.models[0]), mmproj=o.mmproj, image=o.image, repeat=o.repeat,
                     warmup=o.warmup, n_predict=n_predict, timeout=o.timeout, prompt=o.prompt, data=o.data, tests=tests)
    specs = configurations(spec, list(o.models), o.threads, o.n_gpu_layers, o.ctx_size,
                           {k: v for k, v in o.engine_lists.items() if v is not None})
    check_pacing(o.delay, o.max_temp, o.max_temp_wait)
    if len(specs) > 1 and (o.against or o.compares):
        which = "--against" if o.against else o.compares
        raise MvlmError(f"{which} compares one configuration, and this is a sweep of {len(specs)}: give one --model and "
                        "one value of --threads, --n-gpu-layers and --ctx-size, or drop " + which)
    check_timeout(o.lease_timeout)
    plan = Plan(profile, specs, order=o.order, delay=o.delay, max_temp=o.max_temp, max_temp_wait=o.max_temp_wait,
                lease_db=o.lease_db, lease_timeout=o.lease_timeout)
    if o.against:
        if specs[0].protocol in ("llama-bench", "dataset"):
            raise MvlmError("an interleaved A/B session runs the lm, vlm or imp protocol (llama-bench keeps its own "
                            "order; dataset runs a whole set through one server)")
        base, cand, plan.same_sides = parse_against(list(o.against), specs[0], o.order)
        plan.sides = (dataclasses.replace(base, name="baseline"), dataclasses.replace(cand, name="candidate"))
        if o.gates and 0.5 ** o.repeat > 0.05:  # the exact signed-rank test's smallest one-sided p: 1 / 2**n
            raise MvlmError(f"--fail-on-regression with {o.repeat} A/B pairs can never fire (the smallest p of "
                            f"{o.repeat} pairs is {0.5 ** o.repeat:.3g} > 0.05): use --repeat 5 or more")
    if specs[0].protocol == "dataset":
        from mvlm_bench.plan.dataset import check_device

        check_device(profile)
    return plan


def _tokens_and_tests(o: Options) -> tuple[int | None, BenchTests | None]:
    """``-n`` as the protocol takes it: llama-bench's tests (``-p``, ``-n``, ``-pg``, ``-d``, lists as llama-bench
    takes them), or every other protocol's one output length."""
    n = None if o.n_predict is None else str(o.n_predict).strip()
    if o.protocol == "llama-bench":
        tests = bench_tests(o.n_prompt, n, list(o.pg), o.n_depth)
        return (max(tests.gens) or None), tests
    for option, value in (("-p", o.n_prompt), ("-pg", list(o.pg) or None), ("-d", o.n_depth)):
        if value is not None:
            raise MvlmError(f"{option} shapes llama-bench's tests (--protocol llama-bench); the {o.protocol} "
                            "protocol's prompt text is --prompt, its output tokens -n")
    if n is None:
        return None, None
    try:
        return int(n), None
    except ValueError:
        raise MvlmError(f"-n {n}: give one whole number of output tokens (a list of lengths is llama-bench's: "
                        "--protocol llama-bench)") from None


def plan_inputs(plan: Plan) -> list[Path | None]:
    """Every file the plan reads (a report path may be none of them)."""
    out: list[Path | None] = [plan.profile.source]
    for c in plan.configs:
        out += [c.model, c.mmproj, c.image, c.data]
    for side in plan.sides or ():
        out += [side.spec.model, side.spec.mmproj]
    return out


def check_timeout(timeout: float) -> float:
    if not (isinstance(timeout, int | float) and 0 <= timeout <= MAX_LEASE_TIMEOUT_S and timeout == timeout):
        shown = f"{timeout:g}" if isinstance(timeout, int | float) else repr(timeout)
        raise MvlmError(f"--lease-timeout {shown} is out of range: give seconds from 0 (do not wait) to "
                        f"{MAX_LEASE_TIMEOUT_S:.0f}")
    return float(timeout)


def expected_setup(plan: Plan, profile) -> dict[str, object]:
    """What the history will hold about this plan's (first) configuration, as far as it is known before a run: the
    device, protocol, model hash and the settings mvlm decides (threads and GPU layers from the profile, tokens,
    context); for a baseline check before anything is measured."""
    from mvlm_bench.device.sync import sha256_file
    from mvlm_bench.plan.protocols import tokens
    from mvlm_bench.plan.spec import device_settings

    spec = plan.configs[0]
    threads, ngl = device_settings(profile, spec)
    out: dict[str, object] = {"device": profile.name + (" (emulated)" if profile.emulated else ""),
                              "protocol": spec.protocol, "model_sha256": sha256_file(spec.model), "n_threads": threads,
                              "n_gpu_layers": ngl, "ctx_size": spec.ctx_size}
    if spec.protocol != "llama-bench":  # its tests each have their own token counts
        out["n_predict"] = tokens(spec)
    return out
