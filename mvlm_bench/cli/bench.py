"""``mvlm bench`` (run a protocol on a device) and ``mvlm bench parse``: options in, the pipeline called, results out.

The pipeline (docs/architecture.md): a plan (every option and input checked, nothing pushed yet) -> a session on the
device -> one record per repetition, emitted as it ends -> the sinks (the terminal table, --json-file, --jsonl,
--markdown, --csv, the history) -> the verdict (--baseline / --against with --fail-on-regression). A stop signal keeps
every finished repetition in every output: one line says so, exit 128 + the signal.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import typer

from mvlm_bench.plan import engine
from mvlm_core.console import console as make_console

app = typer.Typer(invoke_without_command=True)
console = make_console()
err = make_console(stderr=True)

_DEVICE = typer.Option("local", "--device", help="Profile name (devices/*.toml: orin, sd888, local, qemu-arm64, "
                                                       "...), ssh://user@host[:port] or adb:SERIAL.")
_PROTOCOL = typer.Option("lm", "--protocol", "-P", help="lm: text generation (400 tokens); vlm: image + question (256 "
                         "tokens); llama-bench: llama.cpp's pp/tg tests, a record per test; imp: Imp Table 4 (a "
                         "41-token request + the image, 64 tokens, loading excluded); dataset: a whole --data set "
                         "through one llama-server (Xmodel-VLM Table 6).")
_MODEL = typer.Option(None, "--model", "-m", help="The language-model GGUF; repeat it to sweep over models "
                                                  "(docs/devices.md, 'Sweeps').")
_MMPROJ = typer.Option(None, "--mmproj", help="The mmproj GGUF (vlm, imp and dataset protocols).")
_IMAGE = typer.Option(None, "--image", help="Image for the vlm and imp protocols (default: a built-in 336x336).")
_DATA = typer.Option(None, "--data", help="The dataset protocol's question file: JSONL, one {question_id, image, text} "
                                          "per line (LLaVA's eval format), image paths relative to the file.")
_REPEAT = typer.Option(5, "--repeat", "-r", help="Measured repetitions (after the warm-up; llama-bench's default).")
_WARMUP = typer.Option(1, "--warmup", help="Unmeasured warm-up runs.")
_N = typer.Option(None, "--n-predict", "-n", "--n-gen", help="Output tokens (default 400 lm, 256 vlm, 64 imp; dataset: "
                  "at most, default 128); llama-bench: its -n, a comma list of generation tests (default 128).")
_P = typer.Option(None, "--n-prompt", "-p", help="llama-bench: prompt-processing tests, a comma list of prompt sizes "
                  "(default 512; 0: none). The other protocols' prompt text is --prompt.")
_PG = typer.Option(None, "-pg", help="llama-bench: a prompt+generation test PP,TG (e.g. 512,128); repeat for more.")
_DEPTH = typer.Option(None, "--n-depth", "-d", help="llama-bench: context depths each test runs at, a comma list "
                      "(default 0).")
# llama.cpp's own settings, as llama-bench names them (mvlm_bench.plan.engine: one table, its help texts too)
_ENGINE = {e.field: typer.Option(None, e.option, *([e.short] if e.short else []), help=e.help) for e in engine.SETTINGS}
_OUTPUT = typer.Option(None, "--output", "-o", help="Print the results on stdout in this format, as llama-bench's -o: "
                       "json, jsonl, csv, md or sql (the table then goes to stderr).")
_THREADS = typer.Option(None, "--threads", "-t", help="CPU threads (default: the profile's); a comma list (1,2,4) "
                                                      "sweeps.")
_NGL = typer.Option(None, "--n-gpu-layers", "-ngl", help="Layers on the GPU (default: the profile's); a comma list "
                                                         "sweeps.")
_CTX = typer.Option(None, "--ctx-size", "-c", help="Context size in tokens (default 2048); a comma list sweeps.")
_DELAY = typer.Option(0.0, "--delay", help="Seconds to sleep before every run but the first (warm-up runs, repetitions "
                                           "and configurations alike), to let the device settle.")
_MAX_TEMP = typer.Option(None, "--max-temp", help="Before every run, wait until the device's hottest thermal zone reads "
                         "below this many degrees Celsius (a device without one is said once and not waited for).")
_MAX_TEMP_WAIT = typer.Option(1800.0, "--max-temp-wait", help="The longest --max-temp waits before one run, seconds; "
                              "then exit 3 (the repetitions measured so far are kept and reported).")
_TIMEOUT = typer.Option(900.0, "--timeout", help="Per-run time limit, seconds.")
_PROMPT = typer.Option(None, "--prompt", help="Override the protocol's prompt.")
# report and history paths are taken as text: a trailing slash ("--json-file dir/") is refused, not dropped
_JSON = typer.Option(False, "--json", help="Print the report as JSON on stdout (every llama-bench field, then mvlm's "
                                           "own; nothing else on stdout).")
_JSON_FILE = typer.Option(None, "--json-file", help="Write the report as JSON (every llama-bench field, then mvlm's "
                                                    "own) to this file, rewritten after every repetition.")
_JSONL = typer.Option(None, "--jsonl", help="Append one JSON line per repetition to this file (flushed to disk as each "
                                            "repetition ends; `mvlm history import` reads it).")
_MARKDOWN = typer.Option(None, "--markdown", help="Write the report as Markdown (papers' layout).")
_CSV = typer.Option(None, "--csv", help="Write one CSV row per repetition.")
_SAVE = typer.Option(False, "--save/--no-save", help="Store every repetition in the benchmark history as it ends.")
_DB = typer.Option(None, "--db", help="History: a SQLite file or a PostgreSQL URL (default $MVLM_HISTORY or "
                                      "./mvlm-history.sqlite; docs/lab.md).")
_LABEL = typer.Option("", "--label", help="Free-form label stored with the measurement (e.g. main, pr-42).")
_BASELINE = typer.Option(None, "--baseline", help="Compare with this history selector (latest, label:main, id:N, ...) "
                                                  "or `mvlm bench --json-file` file.")
_FAIL = typer.Option(None, "--fail-on-regression", help="With --baseline or --against: exit 4 when a gated metric is "
                                                        "slower by more than this (e.g. 5%) and the repetitions support "
                                                        "it (docs/ci.md).")
_VERBOSE = typer.Option(False, "--verbose", "-v", help="On a failed run, also print the tail of its output (the whole "
                                                       "output is always saved to a log file).")
_AGAINST = typer.Option(None, "--against", help="Interleaved A/B session: the baseline side differs from the command "
                        "line by KEY=VALUE (repeatable): model=FILE, mmproj=FILE, runtime=DIR (`mvlm runtime path`), "
                        "llama-cpp=DIR (a checkout built with `mvlm runtime build --llama-cpp DIR`), threads=N, "
                        "n-gpu-layers=N, ctx-size=N. --repeat is then the number of A/B pairs; --fail-on-regression "
                        "gates on the paired runs (docs/ci.md).")
_CPU_VARIANT = typer.Option(None, "--cpu-variant", help="Run this CPU variant of the device's build (arm64: armv8.0, "
                            "dotprod, i8mm, dotprod+kleidiai, i8mm+kleidiai; host: native, generic) instead of the "
                            "fastest its probed CPU runs; one the CPU lacks is refused before anything is pushed "
                            "(docs/devices.md).")
_ORDER = typer.Option("abba", "--order", help="A/B run order: abba (A B B A ..., cancels drift and order effects) or "
                                              "alternate (A B A B ...).")
_LEASE_TIMEOUT = typer.Option(3600.0, "--lease-timeout", help="Seconds to wait while another bench measures on the "
                              "same device (0: do not wait); then exit 75 with nothing measured. The lease is a "
                              "PostgreSQL advisory lock when the history (--db, $MVLM_HISTORY) is PostgreSQL, else a "
                              "lock file (docs/devices.md).")


@app.callback()
def bench_cmd(ctx: typer.Context, device: str = _DEVICE, protocol: str = _PROTOCOL, model: list[Path] | None = _MODEL,
              mmproj: Path | None = _MMPROJ, image: Path | None = _IMAGE, data: Path | None = _DATA,
              repeat: int = _REPEAT, warmup: int = _WARMUP, n_predict: list[str] | None = _N,
              threads: list[str] | None = _THREADS, n_gpu_layers: list[str] | None = _NGL,
              ctx_size: list[str] | None = _CTX, delay: float = _DELAY,
              max_temp: float | None = _MAX_TEMP, max_temp_wait: float = _MAX_TEMP_WAIT, timeout: float = _TIMEOUT,
              prompt: str | None = _PROMPT, json_flag: bool = _JSON, json_arg: str | None = _JSON_FILE,
              jsonl_arg: str | None = _JSONL, markdown_arg: str | None = _MARKDOWN, csv_arg: str | None = _CSV,
              save: bool = _SAVE, db_arg: str | None = _DB, label: str = _LABEL, baseline: str | None = _BASELINE,
              fail_on_regression: str | None = _FAIL, verbose: bool = _VERBOSE, against: list[str] | None = _AGAINST,
              order: str = _ORDER, lease_timeout: float = _LEASE_TIMEOUT, n_prompt: list[str] | None = _P,
              pg: list[str] | None = _PG, n_depth: list[str] | None = _DEPTH, batch: list[str] | None = _ENGINE["batch"],
              ubatch: list[str] | None = _ENGINE["ubatch"], flash_attn: list[str] | None = _ENGINE["flash_attn"],
              ctk: list[str] | None = _ENGINE["cache_type_k"], ctv: list[str] | None = _ENGINE["cache_type_v"],
              cpu_mask: list[str] | None = _ENGINE["cpu_mask"], cpu_strict: list[str] | None = _ENGINE["cpu_strict"],
              poll: list[str] | None = _ENGINE["poll"], prio: list[str] | None = _ENGINE["prio"],
              output: str | None = _OUTPUT, cpu_variant: str | None = _CPU_VARIANT) -> None:
    """Run the papers' latency protocols on a device and report Sample / Eval_prompt / Eval / Total (+ VE, Eval_avg).

    Pushes the runtime for the device's target and the model files (content-addressed: unchanged files are not pushed
    again), runs one warm-up and --repeat measured runs with -lv 4, parses llama.cpp's timing output, and hands every
    repetition to the outputs as it ends. Ctrl-C (or SIGTERM, SIGHUP) keeps every finished repetition in every output.
    Examples:

      mvlm bench --device local --model MobileVLM_V2-1.7B-Q4_K_S.gguf

      mvlm bench --device sd888 --protocol vlm --model M-Q4_K_S.gguf --mmproj mmproj-M-F16.gguf --json-file r.json

      mvlm bench --device orin --model new.gguf --against model=old.gguf --repeat 6 --fail-on-regression 5%

      mvlm bench --device sd888 -m A.gguf -m B.gguf --threads 2,4 --delay 10 --max-temp 45   (a sweep: 4 configurations)

      mvlm bench -P llama-bench -m M.gguf -p 512 -n 128 -pg 512,128 -t 4 -fa 0,1 -o md   (llama-bench's flags)
    """
    if ctx.invoked_subcommand is not None:
        return
    from mvlm_bench.plan.plan import Options

    def j(values: list[str] | None) -> str | None:  # given twice (-p 8 -p 16) is a list, as llama-bench takes it
        return ",".join(values) if values else None

    opts = Options(protocol=protocol, models=list(model or []), mmproj=mmproj, image=image, data=data, repeat=repeat,
                   warmup=warmup, n_predict=j(n_predict), threads=j(threads), n_gpu_layers=j(n_gpu_layers),
                   ctx_size=j(ctx_size),
                   timeout=timeout, prompt=prompt, against=list(against or []), order=order, delay=delay,
                   max_temp=max_temp, max_temp_wait=max_temp_wait, lease_db=db_arg, lease_timeout=lease_timeout,
                   compares="--baseline" if baseline else "--fail-on-regression" if fail_on_regression else "",
                   gates=bool(fail_on_regression), n_prompt=j(n_prompt), pg=list(pg or []), n_depth=j(n_depth),
                   engine_lists={"batch": j(batch), "ubatch": j(ubatch), "flash_attn": j(flash_attn),
                                 "cache_type_k": j(ctk), "cache_type_v": j(ctv), "cpu_mask": j(cpu_mask),
                                 "cpu_strict": j(cpu_strict), "poll": j(poll), "prio": j(prio)})
    outputs = {opt: p for opt, p in (("--json-file", json_arg), ("--jsonl", jsonl_arg), ("--markdown", markdown_arg),
                                      ("--csv", csv_arg)) if p is not None}  # "" is refused, not ignored
    from mvlm_core.stops import Stopped

    stdout_format = _stdout_format(output, json_flag)
    run = _Bench(device, opts, outputs, stdout_format, save, db_arg, label, baseline, fail_on_regression, verbose)
    run.cpu_variant = cpu_variant
    try:
        run.check()
    except Stopped as e:  # still reading the options and files: nothing was measured or written
        err.print(f"interrupted by {e.name} before anything was measured", highlight=False)
        raise typer.Exit(e.exit_code) from None
    run.measure()
    try:
        run.stops.resume()  # measure() held stop signals back since its end: one that came meanwhile is raised here
        run.finish()
    except Stopped as e:  # while reporting or comparing (a confirming re-measure): the measurement itself is kept
        kept = run.sinks.kept()
        when = "while comparing" if run.phase == "comparing" else "after the measurement"
        err.print(f"interrupted by {e.name} {when}; the measurement ({run.out.repetitions} of {run.out.planned} "
                  "repetitions) is " + (f"kept in {', '.join(kept)}" if kept else "shown above"), highlight=False,
                  soft_wrap=True)
        raise typer.Exit(e.exit_code) from None


class _Bench:
    """One ``mvlm bench``: checked, measured, reported, decided (the steps of the pipeline, in order)."""

    def __init__(self, device, opts, outputs, stdout_format, save, db_arg, label, baseline, fail_on_regression,
                 verbose):
        self.device, self.opts, self.outputs, self.stdout_format = device, opts, outputs, stdout_format
        self.json_flag = stdout_format is not None  # stdout holds the machine format and nothing else
        self.save, self.db_arg, self.label, self.baseline = save, db_arg, label, baseline
        self.fail_on_regression, self.verbose = fail_on_regression, verbose
        self.threshold: float | None = None
        self.bases: list = []
        self.interrupted = None
        self.cpu_variant: str | None = None
        self.phase = "checking"  # then measuring, reporting, comparing

    def check(self) -> None:
        """Everything that can be refused, refused before a device is touched or a run measured."""
        from mvlm_bench.decide.stats import parse_threshold
        from mvlm_bench.device.profiles import load_profile
        from mvlm_bench.history.entries import check_label
        from mvlm_bench.history.locations import cli_location
        from mvlm_bench.plan.plan import make_plan, plan_inputs
        from mvlm_core.errors import MvlmError

        check_label(self.label)
        self.db = cli_location(self.db_arg)
        if self.fail_on_regression:
            self.threshold = parse_threshold(self.fail_on_regression)
            if not self.baseline and not self.opts.against:
                raise MvlmError("--fail-on-regression needs --baseline SELECTOR (e.g. label:main or latest) or an "
                                "interleaved baseline (--against model=OLD.gguf, runtime=DIR, ...)")
        if self.opts.against and self.baseline:
            raise MvlmError("--against (an interleaved A/B session) and --baseline (a stored measurement) exclude each "
                            "other: give one")
        from mvlm_bench.device.cpu_features import with_cpu_variant

        self.profile = with_cpu_variant(load_profile(self.device), self.cpu_variant)
        self.plan = make_plan(self.profile, self.opts)
        if self.plan.same_sides:
            err.print("[yellow]note:[/] both sides of the A/B session are the same: an A/A session measures the noise")
        inputs = plan_inputs(self.plan)
        if self.baseline and _is_file(self.baseline):  # a file, read after the reports
            inputs.append(Path(self.baseline))
        if self.save or self.baseline:
            from mvlm_bench.history.errors import default_db_path
            from mvlm_core.atomic import check_output_path

            self.history_db = self.db or default_db_path()
            check_output_path(self.db_arg or self.history_db, [c.model for c in self.plan.configs], option="--db",
                              history=True)
            inputs.append(self.history_db)
        _check_reports(self.outputs, inputs)
        if self.baseline:  # a selector that names nothing stored, a damaged file, another setup: refused now
            from mvlm_bench.decide.verdict import check_baseline_setup, resolve
            from mvlm_bench.plan.plan import expected_setup

            if not _is_file(self.baseline):
                resolve(self.baseline, self.db)
            check_baseline_setup(self.baseline, self.db, expected_setup(self.plan, self.profile))

    def measure(self) -> None:
        """Run the plan; every record to every sink as it comes; a stop signal ends it, keeping what was measured."""
        from mvlm_bench.history.entries import project_commit
        from mvlm_bench.session.runners import Events, Outcome, run_plan
        from mvlm_bench.views.progress import BenchProgress
        from mvlm_core.stops import Stopped, StopSignals, installed

        self.project = project_commit() if (self.save or self.outputs) else ("", None)
        self.stops = installed() or StopSignals().install()
        self.sinks, self.history = _sinks(self.outputs, self.save, self.db, self.label, self.project, self.stops)
        self.out = Outcome()
        try:
            with BenchProgress(err, self.plan, self.profile.name) as prog:
                self.log = prog.log
                ev = Events(emit=self.sinks.emit, log=prog.log, on_step=prog.on_step, on_tokens=prog.token_hook(),
                            on_status=prog.on_status, on_wait=prog.on_wait, sync_progress=prog.sync_progress,
                            outputs={k: Path(v) for k, v in self.outputs.items()}, hold=self.stops.held)
                try:
                    run_plan(self.plan, ev, self.out)
                finally:
                    self.sinks.close()
        except Stopped as e:  # while running, or after the last run while the outputs were closed: all kept
            self.interrupted = e
            self.stops.begin()  # from here on a second signal only hastens the end
        self.stops.pause()  # a signal from here until finish() begins is raised there (finish resumes first)
        self.log = lambda m: err.print(f"[dim]{m}[/]", highlight=False)

    def finish(self) -> None:
        """Print the table (and --json), then say what happened: interrupted, failed, saved; then decide."""
        from mvlm_core.errors import MvlmError

        self.phase = "reporting"
        if self.profile.emulated:
            err.print("[yellow]note:[/] this device is emulated: its timings measure the emulator, not a device")
        self._print_results()
        kept = self.sinks.kept()
        sink_error = _sink_error(self.sinks, kept)
        if self.interrupted is not None:
            shown = "on stdout" if self.json_flag else "shown above"
            where = f"kept in {', '.join(kept)}" if kept else "nothing measured" if not self.out.repetitions else \
                f"{shown} (no output file was asked for)"
            err.print(f"interrupted by {self.interrupted.name} after {self.out.repetitions} of {self.out.planned} "
                      f"repetitions; {where}", highlight=False, soft_wrap=True)
            raise typer.Exit(self.interrupted.exit_code)
        if self.out.failure is not None:
            raise self._failure_error(kept, sink_error)
        if self.history is not None and self.history.ids and self.history.outcome is None:
            err.print(self.history.message(), highlight=False, soft_wrap=True)
        if self.plan.sides is not None or self.baseline:
            self.phase = "comparing"
        try:
            self._decide()
        except MvlmError as e:
            if sink_error is None:
                raise
            code = e.exit_code if e.exit_code == 4 else sink_error.exit_code  # a regression is what CI acts on
            raise MvlmError(f"{sink_error}; and {e}", exit_code=code) from None
        if sink_error is not None:
            raise sink_error
        if self.out.stopped:  # the device did not cool: what was measured is reported, then exit 3
            raise MvlmError(self.out.stopped, exit_code=3)

    def _print_results(self) -> None:
        from mvlm_bench.views.exports import render_format
        from mvlm_bench.views.latency import render_table

        groups = self.sinks.groups.all()
        out = err if self.json_flag else console  # --json: stdout holds the JSON and nothing else
        if groups:
            out.print(render_table(groups))
        if self.history is not None and self.history.outcome is not None and self.history.outcome.unsaved_json:
            print(self.history.outcome.unsaved_json, flush=True)  # the last place left for the runs: stdout
        if self.stdout_format and groups:
            sys.stdout.write(render_format(self.stdout_format, groups, self.label, self.project))
            sys.stdout.flush()

    def _failure_error(self, kept: list[str], sink_error):
        from mvlm_bench.session.failures import relevant_line
        from mvlm_core.errors import MvlmError

        who, f = self.out.failure
        protocol = self.plan.protocol
        which = "the warm-up run" if f.repetition < 0 else f"run {f.repetition + 1}"
        if protocol == "llama-bench":
            which = "the llama-bench warm-up run" if f.repetition < 0 else f"llama-bench run {f.repetition + 1}"
        if protocol == "dataset":
            which = "the warm-up request" if f.repetition < 0 else f"pass {f.repetition + 1} over the set"
        if who:
            which = f"the {who}'s {which.removeprefix('the ')}"
        logfile = _failure_log(self.profile.name, f.output or f.output_tail)
        where = f"full log: {logfile}" if logfile else "run with --verbose for its output"
        also = (f"; the {self.out.repetitions} repetition(s) measured before it were kept in {', '.join(kept)}"
                if kept and self.out.repetitions else "")
        also += f"; and {sink_error}" if sink_error is not None else ""
        tail = f.output_tail[-3000:].strip() or "(no output)"
        return MvlmError(f"{protocol} protocol on {self.profile.name}: {which} failed: {f.message}: "
                         f"{relevant_line(f.output or f.output_tail)} ({where}){also}", exit_code=3,
                         detail=tail if self.verbose else None)

    def _decide(self) -> None:
        """--against: the paired comparison of the A/B runs; --baseline: the stored baseline, gated (the confirming
        re-measure when the history flags a slowdown)."""
        from mvlm_bench.decide import gate, verdict
        from mvlm_bench.views.comparison import print_verdict

        groups = self.sinks.groups.all()
        if self.plan.sides is not None and groups:
            side = {g.context.params.get("ab_side"): g.runs for g in groups}
            n = min(len(side.get("baseline", [])), len(side.get("candidate", [])))  # complete pairs only
            v = verdict.judge_interleaved(side.get("baseline", [])[:n], side.get("candidate", [])[:n],
                                          self.out.order[: 2 * n], None, 0.05, self.threshold)
            print_verdict(v, console=err if self.json_flag else console, err=err)
        elif self.baseline and groups:
            cands = self._candidates(groups)
            bases = verdict.resolve(self.baseline, self.db) if _is_file(self.baseline) else \
                verdict.resolve(self.baseline, self.db, like=cands[0], exclude=tuple(e.id for e in cands if e.id))
            confirm = verdict.Confirmer(self.profile, self.plan.configs[0], self.log, lease_db=self.db_arg,
                                        lease_timeout=self.plan.lease_timeout) if self.threshold is not None else None
            v = verdict.judge_pairs(gate.pair_entries(bases, cands), None, 0.05, self.threshold, db=self.db,
                                    confirm=confirm)
            print_verdict(v, console=err if self.json_flag else console, err=err)
        else:
            return
        error = v.error()
        if error is not None:
            raise error

    def _candidates(self, groups) -> list:
        """This measurement as history entries: the stored ones (with their ids: never a baseline session of their
        own), else built from the groups."""
        from mvlm_bench.history.entries import entry_from_group

        if self.history is not None and self.history.entries:
            return list(self.history.entries.values())
        return [entry_from_group(g, self.label, self.project) for g in groups]


def _stdout_format(output: str | None, json_flag: bool) -> str | None:
    """What stdout carries: ``-o FORMAT`` (llama-bench's), ``--json`` (= ``-o json``), else None (the table)."""
    from mvlm_bench.views.exports import STDOUT_FORMATS
    from mvlm_core.errors import MvlmError

    if output is None:
        return "json" if json_flag else None
    fmt = output.strip().lower()
    if fmt not in STDOUT_FORMATS:
        raise MvlmError(f"-o {output}: choose one of {', '.join(STDOUT_FORMATS)} (llama-bench's formats)")
    if json_flag and fmt != "json":
        raise MvlmError(f"--json and -o {fmt} both ask for stdout: give one")
    return fmt


def _is_file(spec: str) -> bool:
    from mvlm_bench.decide.verdict import is_report_file

    return is_report_file(spec)


def _sinks(outputs: dict[str, str], save: bool, db, label: str, project, stops):
    """The bench's outputs: the report files asked for and the history (``--save``)."""
    from mvlm_bench.sinks.base import Sinks
    from mvlm_bench.sinks.files import JsonLinesFile, ReportFile
    from mvlm_bench.sinks.history_sink import HistorySink
    from mvlm_bench.views.exports import render_csv, render_json
    from mvlm_bench.views.latency import render_markdown

    renders = {"--json-file": lambda gs: render_json(gs, label, project), "--markdown": render_markdown,
               "--csv": render_csv}
    sinks: list = [JsonLinesFile(Path(p), opt, label, project) if opt == "--jsonl" else
                   ReportFile(Path(p), opt, renders[opt]) for opt, p in outputs.items()]
    history = HistorySink(db, label, project) if save else None
    if history is not None:
        sinks.append(history)
    return Sinks(sinks, stops), history


def _sink_error(sinks, kept: list[str]):
    """The outputs' failures (a report that could not be written, a history that did not take it) in one line, with
    where the measurement is kept all the same."""
    from mvlm_core.errors import MvlmError

    if not sinks.errors:
        return None
    msgs = [str(e) for _, e in sinks.errors]
    where = f" (the measurement is kept in {', '.join(kept)})" if kept else ""
    return MvlmError("; and ".join(msgs) + where, exit_code=sinks.errors[0][1].exit_code)


def _check_reports(outputs: dict[str, str], inputs: list[Path | None]) -> None:
    """Refuse, before anything is measured, report paths that would destroy an input (the model, ...), an existing
    GGUF, or each other, paths that are not regular files (a device, a FIFO, ``dir/``), and paths whose directory cannot
    be written. ``outputs`` holds the options' text (a trailing slash is seen there)."""
    from mvlm_bench.sinks.files import check_appendable
    from mvlm_core.atomic import check_output_path, check_writable
    from mvlm_core.errors import MvlmError

    seen: dict[Path, str] = {}
    for option, raw in outputs.items():
        out = check_output_path(raw, inputs, option=option)
        key = out.resolve()
        if key in seen:
            raise MvlmError(f"{option} {out} is also given to {seen[key]}: give each report its own file")
        seen[key] = option
        check_writable(out, option)
        if option == "--jsonl":
            check_appendable(out, option)


def _failure_log(device: str, output: str) -> Path | None:
    """The whole output of a failed run, kept in the cache (the error names the file); None if it cannot be written."""
    from mvlm_core.atomic import write_text
    from mvlm_core.errors import MvlmError
    from mvlm_core.runtime import cache_root

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", device).strip("_")[:60] or "device"
    path = cache_root() / "logs" / f"bench-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text(path, output)
    except (OSError, MvlmError):
        return None

