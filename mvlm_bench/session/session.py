"""A session on one device: connect (check, probe, resolve the runtime target) -> lease -> prepare (push a side's
files, build its command line and its records' context) -> run one repetition -> one record.

Every bench (the papers' protocols, sweeps, A/B sessions, the dataset protocol, llama-bench), the confirming
re-measure of the regression gate and ``mvlm serve`` hold a device through this one class::

    with Session(profile, log=print) as s:
        with s.leased() as still_leased:
            prep = s.prepare(Side(spec))
            outcome = s.run(prep, 0, measured=True)       # a Run (the record) or a Failure
            still_leased()                                # raises when a shared lease was lost meanwhile

Nothing here asks which kind of transport it holds: what the device can do is ``transport.capabilities``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mvlm_bench.device import cpu_features, resources, thermal
from mvlm_bench.device.profiles import KNOWN_TARGETS, DeviceProfile
from mvlm_bench.device.sync import sha256_file, sync
from mvlm_bench.device.targets import emulated_here, resolve_target
from mvlm_bench.device.transports import make_transport
from mvlm_bench.plan import engine
from mvlm_bench.plan.plan import DEFAULT_LEASE_TIMEOUT_S
from mvlm_bench.plan.protocols import (
    artifacts,
    build_argv,
    prompt_of,
    protocol_params,
    tokens,
)
from mvlm_bench.plan.spec import BenchSpec, Side, device_settings
from mvlm_bench.records.log_facts import run_facts
from mvlm_bench.records.record import Run, RunContext
from mvlm_bench.records.timings import TimingRecord, parse_text
from mvlm_bench.session import lease as leasemod
from mvlm_bench.session.facts import COMMAND_LINE_DEFAULTS, build_version, device_cpu_info, gguf_facts
from mvlm_bench.session.failures import Failure, describe_failure
from mvlm_bench.session.live_tokens import LiveTokens
from mvlm_core import cpu_variants, exec_timer
from mvlm_core import runtime as rtmod
from mvlm_core.errors import MvlmError
from mvlm_core.filenames import precision_from_filename
from mvlm_core.gguf_header import precision_of

Log = Callable[[str], None]


@dataclasses.dataclass
class Prepared:
    """A side ready to run on the device: its command line and environment there, and its records' context."""

    side: Side
    argv: list[str]
    env: dict[str, str]
    ctx: RunContext
    pushed_bytes: int
    workdir: str
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)  # llama-bench fields known before the runs
    rss_notes: set[str] = dataclasses.field(default_factory=set)  # why a run's peak RSS is null (device.resources)
    timer: str | None = None  # mvlm-time on the device (mvlm_core.exec_timer); None: peak RSS is sampled

    @property
    def spec(self) -> BenchSpec:
        return self.side.spec


def connect(profile: DeviceProfile, log: Log):
    """Transport to the device, checked and probed; the profile with its target resolved from the probe."""
    if profile.target not in KNOWN_TARGETS:
        raise MvlmError(f"device {profile.name}: unknown target {profile.target!r}")
    transport = make_transport(profile)
    try:
        transport.check()
        info = transport.probe()
        resolved = resolve_target(profile, info)
    except BaseException:
        transport.close()
        raise
    if resolved.probe_target:
        log(f"{resolved.name} is {info.describe()}: using the {resolved.target} runtime")
    transport.profile = resolved
    return transport, resolved


class Session:
    """One device held for a bench or a server: connected on ``with``, closed after (see the module docstring)."""

    def __init__(self, profile: DeviceProfile, log: Log = lambda s: None, lease_db: str | None = None,
                 lease_timeout: float = DEFAULT_LEASE_TIMEOUT_S, on_wait: Log | None = None):
        self.given, self.log = profile, log
        self.lease_db, self.lease_timeout, self.on_wait = lease_db, lease_timeout, on_wait
        self.transport: Any = None
        self.profile = profile
        self.cpu = cpu_features.CpuFeatures((), None)
        self.cpu_variant: str | None = None  # the build the device's CPU gets (mvlm_core.cpu_variants)

    def __enter__(self) -> Session:
        self.transport, self.profile = connect(self.given, self.log)
        try:  # the CPU's features, once, before anything is pushed: the build it gets, or one line refusing
            self.cpu = cpu_features.probe(self.transport, self.profile)
            self.cpu_variant, notes = cpu_features.choose(self.profile, self.cpu)
        except BaseException:
            self.close()
            raise
        for note in notes:
            self.log(note)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    @property
    def capabilities(self):
        return self.transport.capabilities

    @contextlib.contextmanager
    def leased(self, shared: bool = False) -> Iterator[Callable[[], None]]:
        """Hold the device's lease (:mod:`mvlm_bench.session.lease`) for the block; yields the check to call after
        each run: it raises (exit 3) when the lease was lost meanwhile (a PostgreSQL lease whose connection dropped:
        another bench may have measured at the same time). ``shared``: beside other servers, never beside a bench."""
        with leasemod.profile_lease(self.profile, self.lease_db, self.lease_timeout, self.on_wait, shared) as info:
            if info["waited_s"] >= 1:
                self.log(f"waited {info['waited_s']:.0f} s for device {self.profile.name} (another bench was measuring "
                         "on it)")
            yield info["check"]

    # --- files ------------------------------------------------------------------------------------------------------
    def runtime(self, side: Side | None = None) -> rtmod.Runtime:
        """The side's build: given, the build of its llama.cpp checkout, or the pinned one for the device's target, of
        the CPU variant the device's CPU gets; a build whose variant the CPU lacks is refused before any push."""
        target = self.profile.target
        if side is not None and side.runtime is not None:
            rt = side.runtime
        elif side is not None and side.llama_cpp is not None:
            try:
                rt = rtmod.find(target, llama_cpp=side.llama_cpp, cpu_variant=self.cpu_variant)
            except MvlmError as e:
                who = f"the {side.name}'s" if side.name else "the"
                raise MvlmError(f"{who} llama.cpp checkout {side.llama_cpp}: {e}") from None
        else:
            rt = self._pinned(target)
        self._check_cpu(rt)
        return rt

    def _pinned(self, target: str) -> rtmod.Runtime:
        """The pinned build of the chosen variant; unforced, the fastest built variant the CPU runs, and the command
        that builds the faster one said once. (The KleidiAI variants run only when asked for: docs/runtime.md.)"""
        want = self.cpu_variant
        ladder = [v for v in cpu_variants.ladder(target) if not cpu_variants.kleidiai_of(v)]
        tries = ladder[ladder.index(want):] if want in ladder and not self.profile.cpu_variant else [want]
        first: MvlmError | None = None
        for name in tries:
            try:
                rt = rtmod.find(target, cpu_variant=name)
            except MvlmError as e:
                first = first or e
                continue
            if name != want and not getattr(self, "_said_fallback", False):
                self._said_fallback = True
                self.log(f"{self.profile.name}'s CPU runs the {want} build, which is not built (`mvlm runtime build "
                         f"--target {target} --cpu-variant {want}`): using the {name} build")
            return rt
        raise MvlmError(f"no {target} runtime for device {self.profile.name}" + (f" (CPU variant {want})" if want else "")
                        + f": run `mvlm runtime build --target {target}" + (f" --cpu-variant {want}" if want else "")
                        + "` first") from first

    def _check_cpu(self, rt: rtmod.Runtime) -> None:
        """A build whose CPU variant needs what the device's CPU lacks: one line, before anything is pushed."""
        built_for = rt.manifest.get("target")
        wants = rtmod.recipe_target(rtmod.BuildOptions(target=self.profile.target))
        runs_here = {("linux-arm64", "android-arm64"), ("android-arm64", "linux-arm64"), ("host", "cuda")}
        if built_for and built_for != wants and (built_for, wants) not in runs_here:
            raise MvlmError(f"the runtime {rt.root} is a {built_for} build; device {self.profile.name} runs "
                            f"{self.profile.target} builds (`mvlm runtime path --target {self.profile.target}`; "
                            "nothing was pushed)")
        name = rtmod.variant_of(rt.manifest)
        if not name or not self.cpu.known or not cpu_variants.variants_for(self.profile.target):
            return
        try:
            variant = cpu_variants.get(self.profile.target, name)
        except MvlmError:
            return
        if cpu_variants.missing(variant, self.cpu.features):
            raise MvlmError(cpu_variants.refusal(self.profile.name, self.profile.target, variant,
                                                 list(self.cpu.features)) + f"; the build: {rt.root}")

    def push(self, files: dict[str, Path], subdir: str = "", sync_progress=None,
             outputs: dict[str, Path] | None = None) -> tuple[str, int]:
        """Push files (device-relative path -> local file; content-addressed: unchanged files stay) to the work dir
        (``subdir`` of it); (the device's directory, bytes pushed). ``outputs`` (option -> report path) are refused
        when one is a pushed file."""
        from mvlm_core.atomic import check_output_path

        for option, out in (outputs or {}).items():
            check_output_path(out, files.values(), option=option)
        workdir = self.transport.workdir.rstrip("/") + (f"/{subdir}" if subdir else "")
        self.log(f"syncing {len(files)} files to {self.profile.name}:{workdir}")
        sres = sync(self.transport, workdir, files, progress=sync_progress)
        for note in sres.notes:
            self.log(note)
        self.log(f"pushed {sres.pushed_bytes} bytes ({len(sres.pushed_files)} files), "
                 f"{len(sres.skipped_files)} already on the device")
        return workdir, sres.pushed_bytes

    def prepare(self, side: Side, sync_progress=None, outputs: dict[str, Path] | None = None) -> Prepared:
        """Find the side's build, push its files, and build its command line, environment and records' context."""
        spec = with_protocol_prompt(side.spec)
        rt = self.runtime(side)
        files, names = artifacts(rt, spec)
        timed = self.capabilities.peak_rss and spec.protocol in ("lm", "vlm", "imp")  # the runs Session.run measures
        helper = exec_timer.for_device(self.profile.target, emulated_here(self.profile)) if timed else None
        if helper is not None:
            files[f"bin/{exec_timer.NAME}"] = helper
        workdir, pushed = self.push(files, side.subdir, sync_progress, outputs)
        p = self.profile
        threads, ngl = device_settings(p, spec)
        argv = [*side.wrapper, *build_argv(spec, workdir, names, threads, ngl)]
        env = dict(p.env)
        if rt.lib.is_dir() and "LD_LIBRARY_PATH" not in env:
            env["LD_LIBRARY_PATH"] = f"{workdir}/lib"
        ctx = self._context(spec, side, rt, names, threads, ngl)
        facts: dict[str, Any] = {}
        if spec.protocol != "llama-bench":
            facts = {"build_commit": ctx.runtime_commit, **gguf_facts(spec.model), **COMMAND_LINE_DEFAULTS,
                     **engine.params(spec), "n_gpu_layers": ngl, "n_threads": threads}
        # the device's CPU, and the build's CPU variant as its manifest says: a run whose program prints llama.cpp's
        # system_info line replaces it with what that line says ran (records.log_facts); llama-bench prints none
        facts |= {"cpu_features": list(self.cpu.features) or None, "cpu_features_source": self.cpu.source,
                  "cpu_variant": rtmod.variant_of(rt.manifest), "cpu_variant_source": "build"}
        # the build's own --version, before the warm-up: never between measured runs
        exe = argv[len(side.wrapper)]  # the binary itself, past an A/B side's own wrapper
        facts |= build_version(self.transport, exe, env)
        timer = f"{workdir}/bin/{exec_timer.NAME}" if helper is not None else None
        if timer and not resources.timer_works(self.transport, timer, exe, env):
            self.log(f"{exec_timer.NAME} cannot start {Path(exe).name} on {p.name}: its peak RSS is sampled from "
                     "/proc instead (rss_source: poll)")
            timer = None
        return Prepared(side, argv, env, ctx, pushed, workdir, facts, timer=timer)

    def _context(self, spec: BenchSpec, side: Side, rt: rtmod.Runtime, names: dict[str, str], threads: int | None,
                 ngl: int) -> RunContext:
        """The context every record of this side carries: the device, files, build, protocol and every setting."""
        p = self.profile
        precision = precision_of(spec.model)
        named = precision_from_filename(spec.model.name)
        if named not in ("unknown", precision):
            self.log(f"{spec.model.name}: the name says {named}, the file holds {precision} (general.file_type): "
                     f"reported as {precision}")
        params: dict[str, Any] = {
            "n_threads": threads, "n_predict": tokens(spec), "n_gpu_layers": ngl, "ctx_size": spec.ctx_size,
            **engine.params(spec), "target": p.target, "emulated": p.emulated,
            "prompt": prompt_of(spec), "image": names.get("image"),
            "mmproj_precision": precision_of(spec.mmproj) if spec.mmproj else None,
        }
        params |= protocol_params(spec)
        variant = rtmod.variant_of(rt.manifest)
        if variant and variant != cpu_variants.DEFAULT.get(cpu_variants.arch_of_target(p.target) or ""):
            params["cpu_variant"] = variant  # a build other than the target's default: another configuration
        params["repetitions_planned"] = spec.repeat  # a report or entry with fewer was cut short (interrupted, failed)
        if side.name:
            params["ab_side"] = side.name
        manifest = rt.manifest
        return RunContext(
            device=p.name + (" (emulated)" if p.emulated else ""),
            model=spec.model.stem,  # the real name (history --model finds it); the A/B side is params["ab_side"]
            precision=precision, model_file=spec.model.name, model_sha256=sha256_file(spec.model),
            mmproj_file=spec.mmproj.name if spec.mmproj else "",
            mmproj_sha256=sha256_file(spec.mmproj) if spec.mmproj else "",
            size_bytes=spec.model.stat().st_size + (spec.mmproj.stat().st_size if spec.mmproj else 0),
            runtime_commit=str(manifest.get("commit")), runtime_patches=[x["name"] for x in manifest.get("patches", [])],
            protocol=spec.protocol, cpu_info=device_cpu_info(self.transport), params=params)

    # --- runs -------------------------------------------------------------------------------------------------------
    def run(self, prep: Prepared, index: int, measured: bool,
            on_tokens: Callable[[int, int], None] | None = None) -> Run | Failure | None:
        """One run of a prepared side: a measured run is its record (a Run), a warm-up None; a Failure on error.
        ``on_tokens(generated, expected)``: the live token count while it runs (:class:`LiveTokens`)."""
        spec, t = prep.spec, self.transport
        temp_start = thermal.read_celsius(t) if measured else None
        t_start = time.time()
        prompt = prep.ctx.params.get("prompt")  # as it runs (imp: the 41-token request)
        stream = {"on_output": LiveTokens(spec, on_tokens, str(prompt) if prompt else None).feed} if on_tokens else {}
        if t.capabilities.peak_rss:
            r, rss_mb = resources.run_measured(t, prep.argv, timeout=spec.timeout, env=prep.env, timer=prep.timer,
                                               **stream)
        else:
            r, rss_mb = t.run(prep.argv, timeout=spec.timeout, env=prep.env, **stream), None
        t_end = time.time()
        if measured and getattr(r, "rss_note", None):
            prep.rss_notes.add(r.rss_note)
        if r.returncode != 0 or r.timed_out:
            return Failure(index, describe_failure(r, spec.timeout), r.output[-4000:], r.output)
        if not measured:
            return None
        # the paper's Total: the process's wall time read on the device by mvlm-time; else the wall clock here when
        # the process ran here; over a link without the helper, the report rebuilds Total from llama.cpp's numbers
        wall, clock = getattr(r, "device_wall_s", None), "device"
        if wall is None and t.capabilities.wall_clock:
            wall, clock = r.duration_s, "here"
        sources = {"rss_source": getattr(r, "rss_source", None), "wall_source": clock if wall is not None else None}
        return Run(parse_text(r.output), prep.ctx, tokens_out=spec.tokens(), wall_s=wall,
                   facts={**prep.facts, **run_facts(r.output), **sources}, started_at=t_start, ended_at=t_end,
                   peak_rss_mb=rss_mb, temp_start_c=temp_start, temp_end_c=thermal.read_celsius(t))

    def run_llama_bench(self, prep: Prepared, index: int, measured: bool) -> list[Run] | Failure:
        """One llama-bench process (every test once, ``-r 1``): one record per test (its configuration's ``test``:
        pp64, tg128, ...), each carrying llama-bench's own fields; [] for a warm-up."""
        spec = prep.spec
        t_start = time.time()
        r = self.transport.run(prep.argv, timeout=spec.timeout, env=prep.env)
        t_end = time.time()
        if r.returncode != 0 or r.timed_out:
            return Failure(index, describe_failure(r, spec.timeout), r.output[-4000:], r.output)
        rows = _jsonl_rows(r.output)
        if not rows:
            return Failure(index, "llama-bench printed no result row", r.output[-4000:], r.output)
        return [llama_bench_run(row, prep, t_start, t_end) for row in rows] if measured else []

    def resource_notes(self, runs: list[Run], preps: list[Prepared]) -> list[str]:
        """What to say once when the device gave no peak RSS or no temperature (the records then hold null)."""
        if not runs:
            return []
        name, out = self.profile.name, []
        if all(r.temp_start_c is None and r.temp_end_c is None for r in runs):
            out.append(f"device {name} has no readable thermal zone (/sys/class/thermal/thermal_zone*/temp): "
                       "temperatures are null")
        if all(r.peak_rss_mb is None for r in runs):
            notes = sorted(n for p in preps for n in p.rss_notes)
            out.append(f"device {name}: the llama.cpp process {notes[0]}" if notes else
                       f"device {name} gave no peak RSS (no /proc/PID/status VmHWM): peak_rss_mb is null")
        return out


def with_protocol_prompt(spec: BenchSpec) -> BenchSpec:
    """The spec as it runs: the imp protocol's request cut to 41 tokens of the model's tokenizer
    (:mod:`mvlm_bench.plan.imp_prompt`) unless --prompt gave one."""
    if spec.protocol == "imp" and spec.prompt is None:
        from mvlm_bench.plan.imp_prompt import imp_prompt

        return dataclasses.replace(spec, prompt=imp_prompt(spec.model))
    return spec


def _jsonl_rows(output: str) -> list[dict[str, Any]]:
    rows = []
    for line in output.splitlines():
        s = line.strip()
        if s.startswith("{") and '"avg_ts"' in s:
            try:
                obj = json.loads(s)
            except ValueError:
                continue
            if isinstance(obj, dict):
                rows.append(obj)
    return rows


_TEST_FIELDS = ("n_prompt", "n_gen", "n_depth", "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ns",
                "samples_ts")


def llama_bench_run(row: dict[str, Any], prep: Prepared, t_start: float, t_end: float) -> Run:
    """One llama-bench test row (one repetition) as a record: a pp test's rate is its Eval_prompt, a tg test's its
    Eval; its configuration says which test (``test``: pp64, tg128, pp64+tg128)."""
    n_p, n_g, n_d = int(row.get("n_prompt") or 0), int(row.get("n_gen") or 0), int(row.get("n_depth") or 0)
    ms = float(row["avg_ns"]) / 1e6 if isinstance(row.get("avg_ns"), int | float) else None
    rate = row.get("avg_ts") if isinstance(row.get("avg_ts"), int | float) else None
    rec = TimingRecord(source_format="llama-bench-jsonl")
    if n_p and not n_g:
        rec.prompt_tokens, rec.prompt_eval_ms, rec.prompt_tps = n_p, ms, rate
    elif n_g and not n_p:
        rec.eval_runs, rec.eval_ms, rec.eval_tps = n_g, ms, rate
    else:
        rec.prompt_tokens, rec.eval_runs, rec.total_ms, rec.total_tokens = n_p, n_g, ms, n_p + n_g
    params = {**prep.ctx.params, "test": engine.test_name(n_p, n_g, n_d), "n_prompt": n_p, "n_gen": n_g,
              "n_predict": n_g or None}
    if n_d:
        params["n_depth"] = n_d
    for k in ("n_batch", "n_ubatch", "n_threads"):  # llama-bench says what it used
        if isinstance(row.get(k), int):
            params[k] = row[k]
    ctx = dataclasses.replace(prep.ctx, params=params)
    facts = {k: v for k, v in prep.facts.items() if k.startswith("cpu_")}  # the device's CPU
    facts |= {k: v for k, v in row.items() if k not in _TEST_FIELDS}
    return Run(rec, ctx, tokens_out=n_g or None, facts=facts, started_at=t_start, ended_at=t_end)
