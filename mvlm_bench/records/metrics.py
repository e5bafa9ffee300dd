"""The papers' metrics of one record (one repetition): :func:`run_metrics` fills the columns of
:mod:`mvlm_bench.records.columns`.

The papers (MobileVLM Tables 5/6, MobileVLM V2 Table 5) report, per model and device: Sample, Eval_prompt and Eval in
tokens/s, Total in s (model loading included), VE (vision encoder) in ms per image patch, Eval_avg = Tks_out / Total
(V2), and explain Total as Load + Tks_in/Eval_prompt + Tks_out/Sample + Tks_out/Eval + Others. :func:`run_metrics`
computes those numbers per run; :mod:`mvlm_bench.records.groups` aggregates them over repetitions, once.

Tks_out is ``Run.tokens_out`` when the runner knows it (e.g. ``-n 256 --ignore-eos``), else the record's
``eval_runs`` (llama-completion decodes one token fewer than it generates; the report says when it fell back).

Total is the paper's: the whole inference, model loading included. The best witness is the process's wall time,
measured by the runner (``Run.wall_s``). Without it, Total is rebuilt from llama.cpp's own numbers, whose "total
time" excludes loading in most programs since mid 2023 (common_init's warm-up decode is followed by
``llama_perf_context_reset``, common/common.cpp:1451) but includes it in llava-cli and in 2023's early main; see
:func:`paper_total_s`. Every run says which rule it used (``total_source``).

When: ``Run.started_at`` / ``Run.ended_at`` are the unix times a repetition's process started and ended (per-run
metrics ``t_start`` / ``t_end``, so every JSON run, CSV row and history repetition says when it ran and overlaps can
be checked). Resources: ``peak_rss_mb`` (the llama.cpp process's VmHWM) and ``temp_start_c`` / ``temp_end_c`` (the
device's hottest thermal zone before and after the run) are per-run metrics too (null where unknown). Each JSON record
carries its group's measurement time like llama-bench: ``test_time`` (ISO 8601 UTC of the first repetition's start)
plus ``start_time`` / ``end_time`` (unix seconds); ``mvlm history import`` stores the record at that time.

Two protocols reproduce one paper table each and add that table's figures (the imp and dataset columns, null elsewhere):
``imp`` (Imp Table 4, loading excluded: :func:`imp_metrics`) and ``dataset`` (Xmodel-VLM Table 6: ``Run.extra`` holds
the whole set's n_samples, samples_tps and latency percentiles, ``Run.per_sample`` every sample; mvlm_bench.plan.dataset).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from mvlm_bench.records.columns import DATASET_KEYS, IMP_KEYS
from mvlm_bench.records.record import Run


def measured_between(runs: Sequence[Run]) -> tuple[float, float]:
    """(start, end) unix times of a group of repetitions: the first one's start (``Run.started_at``; else its end minus
    its Total, approximate over a link: llama.cpp's own total + load), and the last one's end."""
    starts = [r.started_at if r.started_at is not None else r.ended_at - (paper_total_s(r)[0] or 0.0) for r in runs]
    return min(starts), max(r.ended_at for r in runs)


def iso_utc(t: float) -> str:
    """A unix time as llama-bench writes its ``test_time``: ISO 8601 UTC, e.g. 2026-01-01T12:00:00Z."""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def paper_total_s(run: Run) -> tuple[float | None, str | None]:
    """The papers' Total (s, loading included) and the rule that produced it.

    1. ``device wall``: the process's wall time read on the device by ``mvlm-time`` (fork to exit); ``wall``: the
       wall clock here around the process, when it ran here and the helper did not.
    2. ``llama.cpp total + load``: llama.cpp's total started after loading. That is so in the llama_perf and
       common_perf_print eras (warm-up, then the perf counters are reset; only ``--no-warmup`` changes this), and
       in llama_print_timings output whose total barely exceeds sample + prompt eval + eval (less than half the load
       time left over: the loading cannot be inside).
    3. ``llama.cpp total``: the total already covers loading (llava-cli, recognised by its CLIP line; main in early
       2023; any other output where the total leaves room for the load time).
    """
    t = run.timing
    if run.wall_s is not None:
        return run.wall_s, "device wall" if run.facts.get("wall_source") == "device" else "wall"
    if t.total_ms is None:
        return None, None
    total = t.total_ms / 1000.0
    if t.load_ms is None:
        return total, "llama.cpp total"
    excludes_load = False
    if t.source_format in ("llama_perf", "common_perf_print"):
        excludes_load = True
    elif t.source_format == "llama_print_timings" and t.vision_ms_per_token is None:
        busy = sum(v for v in (t.sample_ms, t.prompt_eval_ms, t.eval_ms) if v is not None)
        excludes_load = t.total_ms - busy < 0.5 * t.load_ms
    if excludes_load:
        return total + t.load_ms / 1000.0, "llama.cpp total + load"
    return total, "llama.cpp total"


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def run_metrics(run: Run) -> dict[str, Any]:
    """The papers' numbers for one run (None where the timings lack what a metric needs).

    Decomposition terms follow the paper's formula literally (token counts divided by rates), so Other is
    whatever Total leaves over: tokenization, image preprocessing, printing. It goes negative when llama.cpp's
    load time overlaps the first prompt batch, as in llava-cli (no warm-up: load time is stamped after the
    first real decode, src/llama-context.cpp:795).
    """
    t = run.timing
    tks_in = t.prompt_tokens
    tks_out = run.tokens_out if run.tokens_out is not None else t.eval_runs
    total_s, total_source = paper_total_s(run)
    load_s = t.load_ms / 1000.0 if t.load_ms is not None else None
    prompt_s = _div(tks_in, t.prompt_tps)
    sample_s = _div(tks_out, t.sample_tps)
    eval_s = _div(tks_out, t.eval_tps)
    parts = (load_s, prompt_s, sample_s, eval_s)
    other_s = total_s - sum(parts) if total_s is not None and None not in parts else None  # type: ignore[arg-type]
    m = {
        "ve_ms_per_patch": t.vision_ms_per_token,
        "ve_ms": t.vision_encode_ms,
        "sample_tps": t.sample_tps,
        "prompt_tps": t.prompt_tps,
        "eval_tps": t.eval_tps,
        "total_s": total_s,
        "llama_total_s": t.total_ms / 1000.0 if t.total_ms is not None else None,
        "eval_avg": _div(tks_out, total_s),
        "tks_in": tks_in,
        "tks_out": tks_out,
        "load_s": load_s,
        "prompt_s": prompt_s,
        "sample_s": sample_s,
        "eval_s": eval_s,
        "other_s": other_s,
        "peak_rss_mb": run.peak_rss_mb,
        "temp_start_c": run.temp_start_c,
        "temp_end_c": run.temp_end_c,
        "t_start": run.started_at,
        "t_end": run.ended_at if run.started_at is not None else None,
    }
    m |= dict.fromkeys(IMP_KEYS + DATASET_KEYS)
    if run.context.protocol == "imp":
        m |= imp_metrics(run)
    m |= {k: v for k, v in run.extra.items() if k in m}
    test = run.context.params.get("test")
    if test:  # a llama-bench test: its rate under its own name too, as llama-bench's files have it (compare --metric)
        m[f"{test}_tps"] = _test_rate(str(test), t)
    m["tks_out_source"] = "runner" if run.tokens_out is not None else ("eval_runs" if tks_out is not None else None)
    m["total_source"] = total_source
    m["rss_source"] = run.facts.get("rss_source") if run.peak_rss_mb is not None else None  # wait4 (mvlm-time) | poll
    return m


def _test_rate(test: str, t) -> float | None:
    """llama-bench's avg_ts of one test: the prompt rate of a pp test, the generation rate of a tg test, and (prompt +
    generated tokens) / time of a pp+tg test."""
    if "+" not in test:
        return t.prompt_tps if test.startswith("pp") else t.eval_tps
    return _div(t.total_tokens, t.total_ms / 1000.0 if t.total_ms else None)


def imp_metrics(run: Run) -> dict[str, Any]:
    """Imp Table 4's figures of one llama-mtmd-cli run (model loading excluded):

    - T_VE: the image encode time (``ve_ms``: mtmd's "batch encoding done in X ms" / "image slice encoded in X ms").
    - N_prompt: llama.cpp's prompt eval count: the text tokens (chat template included) plus the image embeddings.
    - S_prompt: N_prompt / the LM's prompt time. llama.cpp's ``prompt eval time`` runs from the prompt's first decode
      to the next synchronisation (src/llama-context.cpp, ``synchronize``), and llama-mtmd-cli encodes the image in
      between (after decoding the template's text before the image, before decoding its embeddings), so the encode
      time is inside it: the LM's prompt time is ``prompt eval time - T_VE`` (when the former is the larger).
    - S_gen: llama.cpp's eval rate; N_gen: the tokens the runner asked for (``-n 64 --ignore-eos``), else the eval
      count.
    - T_total: from the end of loading (llama-mtmd-cli's ``main: loading model:`` line, printed once the LM and the
      mmproj are loaded) to its perf block, by the log's timestamps (``after_load_ms``; llama.cpp's own total time
      would include the mmproj's loading).
    - T_other = T_total - T_VE - N_prompt/S_prompt - N_gen/S_gen: reading and resizing the image, tokenizing,
      sampling, printing.
    """
    t = run.timing
    n_gen = run.tokens_out if run.tokens_out is not None else t.eval_runs
    t_ve = t.vision_encode_ms / 1000.0 if t.vision_encode_ms is not None else None
    t_total = t.after_load_ms / 1000.0 if t.after_load_ms is not None else None
    prompt_ms = t.prompt_eval_ms
    if prompt_ms is not None and t.vision_encode_ms is not None and prompt_ms > t.vision_encode_ms:
        prompt_ms -= t.vision_encode_ms
    s_prompt = _div(t.prompt_tokens, None if prompt_ms is None else prompt_ms / 1000.0)
    parts = (t_ve, _div(t.prompt_tokens, s_prompt), _div(n_gen, t.eval_tps))
    other = t_total - sum(parts) if t_total is not None and None not in parts else None  # type: ignore[arg-type]
    return {"t_ve_s": t_ve, "s_prompt_tps": s_prompt, "s_gen_tps": t.eval_tps, "t_total_s": t_total,
            "t_other_s": other, "n_prompt": t.prompt_tokens, "n_gen": n_gen}


