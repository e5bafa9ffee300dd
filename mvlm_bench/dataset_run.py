"""The ``dataset`` protocol's run: one llama-server for the whole set, one request per sample (see mvlm_bench.dataset
for the question file, what is measured and how).

Separate from mvlm_bench.bench, which builds the server's command line and pushes the files (``_prepare``): this
module uses mvlm_bench.serve's pieces, and serve uses bench's, so bench cannot call this one; `mvlm bench` does.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mvlm_bench import bench, serve
from mvlm_bench.dataset import Sample, check_device, load_samples, pass_metrics
from mvlm_bench.records import Run
from mvlm_bench.timings import TimingRecord
from mvlm_core.errors import MvlmError

EXIT_SERVER_FAILED = serve.EXIT_SERVER_FAILED


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server:
    """llama-server started from a prepared command line, on this machine or over ssh (+ a tunnel), until closed."""

    def __init__(self, transport, profile, argv: list[str], env: dict[str, str], log: Callable[[str], None],
                 timeout: float):
        self.transport, self.procs, self.pid = transport, [], None
        self.server: subprocess.Popen | None = None
        self.tunnel: subprocess.Popen | None = None
        self.local = profile.transport == "local"
        self.log_path, logf = serve.open_log(serve.ServeSpec(model=Path(argv[argv.index("-m") + 1]),
                                                             alias=f"dataset-{profile.name}"))
        t0 = time.monotonic()
        try:
            full = transport.wrapped(argv)
            log(f"starting llama-server on {profile.name} (log: {self.log_path})")
            if self.local:
                self.server = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                               env={**os.environ, **profile.env, **env}, start_new_session=True,
                                               preexec_fn=serve._die_with_parent)
            else:
                self.server = subprocess.Popen(transport.shell_argv(serve.remote_script(transport.workdir, full, env)),
                                               stdin=subprocess.PIPE, stdout=logf, stderr=subprocess.STDOUT,
                                               start_new_session=True, preexec_fn=serve._die_with_parent)
        except OSError as e:
            logf.close()
            raise MvlmError(f"cannot start llama-server: {e.strerror or e}; rebuild the runtime (`mvlm runtime build "
                            f"--target {profile.target}`)", exit_code=EXIT_SERVER_FAILED) from None
        logf.close()  # the child holds its own descriptor
        self.procs.append((self.server, f"llama-server on {profile.name}", self.log_path))
        try:
            port, self.pid = serve._wait_remote_port(self.server, self.log_path, self.procs, timeout)
            if not self.local:
                self.port = _free_port()
                tlog = self.log_path.with_name(self.log_path.name.removesuffix(".log") + "-tunnel.log")
                with open(tlog, "wb") as f:
                    self.tunnel = subprocess.Popen(transport.forward_argv(self.port, port), stdin=subprocess.DEVNULL,
                                                   stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                                   preexec_fn=serve._die_with_parent)
                self.procs.append((self.tunnel, f"the ssh tunnel to {profile.name}", tlog))
            else:
                self.port = port
            serve._wait_ready("127.0.0.1", self.port, self.procs, max(30.0, timeout - (time.monotonic() - t0)))
        except BaseException:
            self.close()
            raise
        self.ready_s = time.monotonic() - t0

    def dead(self) -> str | None:
        for proc, what, log in self.procs:
            if proc.poll() is not None:
                return f"{what} stopped ({serve._status(proc)}): {serve.failure_line(log)} (whole log: {log})"
        return None

    def close(self) -> None:
        if self.tunnel is not None:
            serve.stop_process(self.tunnel, grace=2.0)
            self.tunnel = None
        if self.server is not None:
            if self.local:
                serve.stop_process(self.server)
            else:
                serve._stop_remote(self.server, self.transport, self.pid)
            self.server = None


def _ask(port: int, sample: Sample, max_tokens: int, timeout: float) -> tuple[int, dict[str, Any] | None, str]:
    """One chat completion: (HTTP status, the JSON answer or None, the error text)."""
    body = {
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"file://{sample.device_name}"}},
            {"type": "text", "text": sample.text}]}],
        "max_tokens": max_tokens, "temperature": 0, "seed": 0, "cache_prompt": False, "stream": False,
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
    except (OSError, http.client.HTTPException) as e:
        return 0, None, f"no answer ({type(e).__name__}: {e})"
    finally:
        conn.close()
    try:
        obj = json.loads(data)
    except ValueError:
        return resp.status, None, data[:300].decode("utf-8", "replace")
    if resp.status != 200 or not isinstance(obj, dict):
        msg = obj.get("error", {}).get("message") if isinstance(obj, dict) and isinstance(obj.get("error"), dict) else obj
        return resp.status, None, str(msg)[:300]
    return resp.status, obj, ""


def run_dataset(
    profile,
    spec: bench.BenchSpec,
    log: Callable[[str], None] = lambda s: None,
    on_run: Callable[[int, int], None] | None = None,
    sync_progress=None,
    outputs: dict[str, Path] | None = None,
    lease_db: str | None = None,
    lease_timeout: float | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> bench.BenchResult:
    """``bench.run_bench`` for the dataset protocol: check (the question file before anything is pushed), connect,
    push the runtime, GGUFs and images (content-addressed), hold the device's lease, run the set."""
    import contextlib

    from mvlm_bench import lease as leasemod

    if spec.protocol != "dataset":
        raise MvlmError(f"run_dataset runs the dataset protocol, not {spec.protocol}")
    bench.validate_spec(spec)
    bench.check_inputs(spec)
    check_device(profile)
    timeout = leasemod.DEFAULT_TIMEOUT_S if lease_timeout is None else lease_timeout
    leasemod.check_timeout(timeout)
    transport, profile = bench._connect(profile, log)
    held = contextlib.ExitStack()
    try:
        still_leased = bench._hold_lease(held, profile, lease_db, timeout, on_wait, log)  # the push too (run_bench)
        prep = bench._prepare(transport, profile, bench.Side(spec), log, sync_progress, outputs)
        run_set(transport, prep, log, on_run)
        still_leased()  # a set measured while another bench could have shared the device is not kept
        held.close()
        bench._add_version(transport, prep)
        return prep.result
    finally:
        held.close()
        transport.close()


def run_set(transport, prep: bench.Prepared, log: Callable[[str], None],
            on_run: Callable[[int, int], None] | None = None) -> None:
    """Start llama-server from ``prep`` (a prepared dataset spec), send every sample, fill ``prep.result``."""
    spec, result = prep.side.spec, prep.result
    samples = load_samples(spec.data)
    n = len(samples)
    max_tokens = spec.tokens()
    server = _Server(transport, prep.profile, prep.argv, prep.env, log, spec.timeout)
    try:
        log(f"llama-server ready in {server.ready_s:.1f} s (model loading; not measured); {n} samples x "
            f"{spec.repeat} pass(es)")
        for _ in range(spec.warmup):
            status, _, why = _ask(server.port, samples[0], max_tokens, spec.timeout)
            if status != 200:
                result.failures.append(_failure(-1, samples[0], status, why, server))
                return
        total = n * spec.repeat
        for rep in range(spec.repeat):
            per: list[dict[str, Any]] = []
            t_first = time.monotonic()
            started_at = time.time()
            last_note = t_first
            for i, s in enumerate(samples):
                if on_run:
                    on_run(rep * n + i, total)
                t0 = time.monotonic()
                status, obj, why = _ask(server.port, s, max_tokens, spec.timeout)
                t1 = time.monotonic()
                if status != 200 or obj is None:
                    result.failures.append(_failure(rep, s, status, why, server))
                    return
                tm = obj.get("timings") if isinstance(obj.get("timings"), dict) else {}
                per.append({"question_id": s.question_id, "line": s.line, "latency_s": t1 - t0,
                            "prompt_n": tm.get("prompt_n"), "prompt_ms": tm.get("prompt_ms"),
                            "predicted_n": tm.get("predicted_n"), "predicted_ms": tm.get("predicted_ms"),
                            "cache_n": tm.get("cache_n")})
                done = rep * n + i + 1
                if t1 - last_note >= 10.0 or i == n - 1:
                    last_note = t1
                    elapsed = t1 - t_first
                    eta = elapsed / (i + 1) * (total - done)
                    log(f"sample {i + 1}/{n}" + (f" of pass {rep + 1}/{spec.repeat}" if spec.repeat > 1 else "")
                        + f": {elapsed / (i + 1):.2f} s/sample, ETA {eta:.0f} s")
            total_s = time.monotonic() - t_first
            result.runs.append(_pass_run(prep, per, total_s, server.ready_s, started_at))
    finally:
        server.close()


def _failure(rep: int, s: Sample, status: int, why: str, server: _Server) -> bench.Failure:
    dead = server.dead()
    msg = f"sample {s.question_id} (line {s.line}) failed: " + (dead or f"HTTP {status}: {why}")
    try:
        tail = server.log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        tail = ""
    return bench.Failure(rep, msg, tail[-4000:], tail)


def _pass_run(prep: bench.Prepared, per: list[dict[str, Any]], total_s: float, ready_s: float,
              started_at: float) -> Run:
    """One pass over the set as a Run: the server's timings summed into a TimingRecord (prompt = prompt_n tokens in
    prompt_ms, eval = predicted_n in predicted_ms), the wall time as the Run's Total, the set's metrics as extra."""
    def total(key: str) -> float:
        return sum(float(s[key] or 0) for s in per)

    p_ms, p_n, g_ms, g_n = total("prompt_ms"), int(total("prompt_n")), total("predicted_ms"), int(total("predicted_n"))
    rec = TimingRecord(prompt_eval_ms=p_ms, prompt_tokens=p_n, prompt_tps=p_n * 1000.0 / p_ms if p_ms > 0 else None,
                     eval_ms=g_ms, eval_runs=g_n, eval_tps=g_n * 1000.0 / g_ms if g_ms > 0 else None,
                     total_ms=total_s * 1000.0, total_tokens=p_n + g_n, source_format="llama-server")
    extra = pass_metrics(per, total_s) | {"load_s": ready_s}
    return Run(rec, prep.ctx, tokens_out=g_n, wall_s=total_s, facts=dict(prep.facts), started_at=started_at,
                   ended_at=time.time(), extra=extra, per_sample=per)
