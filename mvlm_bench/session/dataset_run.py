"""The ``dataset`` protocol's passes: one llama-server for the whole set (:mod:`mvlm_bench.session.server`), one
request per sample; each pass over the set is one record (see :mod:`mvlm_bench.plan.dataset` for the question file,
what is measured and how)."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from typing import Any

from mvlm_bench.plan.dataset import Sample, load_samples, pass_metrics
from mvlm_bench.records.record import Run
from mvlm_bench.records.timings import TimingRecord
from mvlm_bench.session.failures import Failure
from mvlm_bench.session.server import Server, open_append
from mvlm_bench.session.session import Prepared, Session
from mvlm_core.runtime import cache_root


def server_for(session: Session, prep: Prepared, log: Callable[[str], None], procs: list | None = None) -> Server:
    """llama-server from a prepared dataset configuration, its log in the cache."""
    import os
    import re

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", session.profile.name).strip("_")[:60] or "device"
    path = cache_root() / "logs" / f"dataset-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    with open_append(path, option="the dataset log") as logf:
        return Server(session.transport, prep.argv, prep.env, path, logf, prep.spec.timeout, session.profile.name, log,
                      procs=procs)


def warm_up(server: Server, prep: Prepared) -> Failure | None:
    """``--warmup`` unmeasured requests of the set's first sample."""
    spec = prep.spec
    sample = load_samples(spec.data)[0]
    for _ in range(spec.warmup):
        status, _, why = _ask(server.port, sample, spec.tokens(), spec.timeout)
        if status != 200:
            return _failure(-1, sample, status, why, server)
    return None


def run_pass(server: Server, prep: Prepared, rep: int, log: Callable[[str], None],
             on_sample: Callable[[int, int], None] | None = None) -> Run | Failure:
    """One pass over the set: its record (a Run), or the first sample's failure."""
    spec = prep.spec
    samples = load_samples(spec.data)
    n = len(samples)
    per: list[dict[str, Any]] = []
    t_first, started_at = time.monotonic(), time.time()
    last_note = t_first
    for i, s in enumerate(samples):
        if on_sample:
            on_sample(i, n)
        t0 = time.monotonic()
        status, obj, why = _ask(server.port, s, spec.tokens(), spec.timeout)
        t1 = time.monotonic()
        if status != 200 or obj is None:
            return _failure(rep, s, status, why, server)
        tm = obj.get("timings") if isinstance(obj.get("timings"), dict) else {}
        per.append({"question_id": s.question_id, "line": s.line, "latency_s": t1 - t0,
                    "prompt_n": tm.get("prompt_n"), "prompt_ms": tm.get("prompt_ms"),
                    "predicted_n": tm.get("predicted_n"), "predicted_ms": tm.get("predicted_ms"),
                    "cache_n": tm.get("cache_n")})
        if t1 - last_note >= 10.0 or i == n - 1:
            last_note = t1
            elapsed = t1 - t_first
            log(f"sample {i + 1}/{n}" + (f" of pass {rep + 1}/{spec.repeat}" if spec.repeat > 1 else "")
                + f": {elapsed / (i + 1):.2f} s/sample")
    return _pass_run(prep, per, time.monotonic() - t_first, server.ready_s, started_at)


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


def _failure(rep: int, s: Sample, status: int, why: str, server: Server) -> Failure:
    dead = server.dead()
    msg = f"sample {s.question_id} (line {s.line}) failed: " + (dead or f"HTTP {status}: {why}")
    from mvlm_bench.session.server import read_from

    tail = read_from(server.log_path, server.offset)
    return Failure(rep, msg, tail[-4000:], tail)


def _pass_run(prep: Prepared, per: list[dict[str, Any]], total_s: float, ready_s: float,
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
