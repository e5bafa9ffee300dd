"""Report arithmetic and renderings, checked against numbers computed here by hand."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import pytest
from rich.console import Console

from mvlm_bench.records.columns import METRIC_KEYS
from mvlm_bench.records.groups import aggregate
from mvlm_bench.records.metrics import run_metrics
from mvlm_bench.records.record import Run, RunContext
from mvlm_bench.records.timings import TimingRecord, parse_text
from mvlm_bench.views.exports import LLAMA_BENCH_FIELDS, render_csv, render_json
from mvlm_bench.views.latency import render_markdown, render_table

OUTPUTS = Path(__file__).resolve().parent / "data" / "llama-cpp-outputs"  # real llama.cpp outputs (data/README.md)


def _rec(**kw) -> TimingRecord:
    base = dict(
        load_ms=1000.0,
        sample_ms=10.0,
        sample_runs=100,
        sample_tps=10000.0,
        prompt_eval_ms=500.0,
        prompt_tokens=50,
        prompt_tps=100.0,
        eval_ms=2000.0,
        eval_runs=99,
        eval_tps=49.5,
        total_ms=4000.0,
        source_format="llama_perf",
    )
    base.update(kw)
    return TimingRecord(**base)


CTX = RunContext(
    device="Snapdragon 888",
    model="MobileLLaMA-1.4B",
    precision="q4_k_s",
    model_file="mobilellama-1.4b.q4_k_s.gguf",
    model_sha256="ab" * 32,
    size_bytes=700_000_000,
    runtime_commit="0c1e570",
    runtime_patches=["0001-clip-cls-first.patch"],
    protocol="lm",
    cpu_info="Kryo 680",
    params={"n_threads": 4, "n_predict": 100, "prompt": "Building a website can be done in 10 simple steps:\nStep 1:"},
)


def test_run_metrics_paper_decomposition():
    m = run_metrics(Run(_rec(), CTX, tokens_out=100))
    # llama_perf era: llama.cpp's total starts after loading, so the paper's Total is load + total = 1 s + 4 s
    total = 1.0 + 4.0
    # Total = Load + Tks_in/Eval_prompt + Tks_out/Sample + Tks_out/Eval + Other, in seconds
    load, prompt, sample, ev = 1.0, 50 / 100.0, 100 / 10000.0, 100 / 49.5
    assert m["total_s"] == pytest.approx(total) and m["total_source"] == "llama.cpp total + load"
    assert m["llama_total_s"] == pytest.approx(4.0)
    assert m["load_s"] == pytest.approx(load)
    assert m["prompt_s"] == pytest.approx(prompt)
    assert m["sample_s"] == pytest.approx(sample)
    assert m["eval_s"] == pytest.approx(ev)
    assert m["other_s"] == pytest.approx(total - load - prompt - sample - ev)
    assert m["eval_avg"] == pytest.approx(100 / total)
    assert (m["tks_in"], m["tks_out"], m["tks_out_source"]) == (50, 100, "runner")
    assert (m["sample_tps"], m["prompt_tps"], m["eval_tps"]) == (10000.0, 100.0, 49.5)


def test_wall_time_wins():
    m = run_metrics(Run(_rec(), CTX, tokens_out=100, wall_s=6.25))
    assert m["total_s"] == 6.25 and m["total_source"] == "wall" and m["eval_avg"] == pytest.approx(16.0)


def _reference_output(prefix: str) -> str:
    assert OUTPUTS.is_dir(), f"{OUTPUTS} missing: the real llama.cpp outputs are part of the repository"
    path = next(OUTPUTS.glob(prefix + "*"))
    return "".join(x for x in path.read_text().splitlines(keepends=True) if not x.startswith("# "))


@pytest.mark.parametrize("prefix", ["02_", "15_"])
def test_total_with_load_matches_the_shell_time_in_the_same_log(prefix: str):
    # These ggml-ci logs end with the shell's `time` of the whole process: an independent witness of Total.
    text = _reference_output(prefix)
    real = re.search(r"^real\s+(\d+)m([\d.]+)s", text, re.M)
    wall = int(real.group(1)) * 60 + float(real.group(2))
    m = run_metrics(Run(parse_text(text), CTX))
    assert m["total_source"] == "llama.cpp total + load"
    assert 0.9 * wall <= m["total_s"] <= wall  # the process also starts up and exits around llama.cpp's clock
    assert m["llama_total_s"] < 0.92 * wall  # llama.cpp's own total misses the loading


@pytest.mark.parametrize("prefix", ["01_", "05_", "08_"])
def test_total_already_including_load(prefix: str):
    rec = parse_text(_reference_output(prefix))
    m = run_metrics(Run(rec, CTX))
    assert m["total_source"] == "llama.cpp total" and m["total_s"] == pytest.approx(rec.total_ms / 1000)


def test_tks_out_falls_back_to_eval_runs_and_missing_parts_give_none():
    m = run_metrics(Run(_rec(sample_tps=None, sample_ms=None, sample_runs=None), CTX))
    assert m["tks_out"] == 99 and m["tks_out_source"] == "eval_runs"
    assert m["eval_s"] == pytest.approx(99 / 49.5)
    assert m["sample_s"] is None and m["other_s"] is None  # no Sample rate: the remainder is unknown, not zero
    assert m["eval_avg"] == pytest.approx(99 / 5.0)


def test_paper_eval_avg_matches_mobilevlm_v2_table5():
    # MobileVLM V2 Table 5: MobileVLM V2 1.7B, Total 4.96 s, 256 output tokens -> Eval_avg 51.63 (Total rounded)
    m = run_metrics(Run(_rec(), CTX, tokens_out=256, wall_s=4.96))
    assert m["eval_avg"] == pytest.approx(51.63, abs=0.05)


def test_vision_metrics_from_a_real_llava_output():
    text = (
        "encode_image_with_clip: image embedding created: 144 tokens\n"
        "encode_image_with_clip: image encoded in  2730.94 ms by CLIP (   18.96 ms per image patch)\n"
        "llama_print_timings:        load time =    5506.60 ms\n"
        "llama_print_timings:      sample time =       0.44 ms /    13 runs   (    0.03 ms per token, 29545.45 tokens "
        "per second)\n"
        "llama_print_timings: prompt eval time =    2031.58 ms /   190 tokens (   10.69 ms per token,    93.52 tokens "
        "per second)\n"
        "llama_print_timings:        eval time =     438.92 ms /    12 runs   (   36.58 ms per token,    27.34 tokens "
        "per second)\n"
        "llama_print_timings:       total time =    5990.25 ms /   202 tokens\n"
    )
    m = run_metrics(Run(parse_text(text), CTX, tokens_out=13))
    assert m["ve_ms_per_patch"] == 18.96 and m["ve_ms"] == 2730.94
    assert m["total_source"] == "llama.cpp total"  # llava-cli: no warm-up reset, its total covers loading
    assert m["prompt_s"] == pytest.approx(190 / 93.52)
    assert m["other_s"] == pytest.approx(5.99025 - 5.5066 - 190 / 93.52 - 13 / 29545.45 - 13 / 27.34)
    assert m["other_s"] < 0  # llama.cpp's load time overlaps the first prompt batch


def test_aggregate_median_min_max_stdev():
    runs = [Run(_rec(eval_tps=v), CTX, tokens_out=100, wall_s=t) for v, t in ((10.0, 5.0), (12.0, 4.0), (20.0, 6.0))]
    other = RunContext(device="Jetson Orin", model="MobileLLaMA-1.4B")
    runs.append(Run(_rec(), other, tokens_out=100))
    groups = aggregate(runs)
    assert [g.context.device for g in groups] == ["Snapdragon 888", "Jetson Orin"]
    a = groups[0].agg["eval_tps"]
    # by hand: mean 14, squared deviations 16 + 4 + 36 = 56, sample variance 28
    assert (a["median"], a["min"], a["max"], a["n"]) == (12.0, 10.0, 20.0, 3)
    assert a["stdev"] == pytest.approx(math.sqrt(28.0))
    assert groups[0].agg["total_s"]["median"] == pytest.approx(5.0)
    assert groups[0].agg["eval_avg"]["max"] == pytest.approx(100 / 4.0)
    assert groups[0].agg["eval_avg"]["min"] == pytest.approx(100 / 6.0)
    assert groups[1].agg["eval_tps"]["stdev"] is None and groups[1].agg["eval_tps"]["n"] == 1
    assert set(groups[0].agg) == set(METRIC_KEYS)


def test_markdown_layouts():
    lm = render_markdown(aggregate([Run(_rec(), CTX, tokens_out=100)] * 2))
    first = lm.splitlines()[0]
    assert first.startswith("| Model | Hardware | Precision | Size (GB) | Sample (tokens/s) | Eval_prompt (tokens/s)")
    assert "VE" not in first and "Eval_avg" in first
    row = lm.splitlines()[2]
    assert row.split("|")[1:-1] == [
        " MobileLLaMA-1.4B ", " Snapdragon 888 ", " q4_k_s ", " 0.70 ", " 10000 ", " 100.00 ", " 49.50 ", " 5.00 ",
        " 20.00 ",
    ]  # fmt: skip
    assert "Total = Load + Tks_in/Eval_prompt + Tks_out/Sample + Tks_out/Eval + Other" in lm
    assert "0c1e570 (0001-clip-cls-first.patch)" in lm and "ab" * 32 in lm
    vlm = render_markdown(aggregate([Run(_rec(vision_encode_ms=1440.0, vision_ms_per_token=10.0, image_tokens=144),
                                         CTX, 100)]))
    head = vlm.splitlines()[0]
    # the vlm layout has its precision too (a defect: it had none), and the image encode's total beside VE per patch
    assert "| Precision | Size (GB) | VE (ms/patch) | VE total (ms) | Sample (tokens/s) |" in head
    assert "| 10.00 | 1440 |" in vlm.splitlines()[2]


def test_csv_per_run_and_aggregated():
    runs = [Run(_rec(eval_tps=v), CTX, tokens_out=100) for v in (10.0, 30.0)]
    rows = list(csv.DictReader(io.StringIO(render_csv(aggregate(runs)))))
    assert [r["repetition"] for r in rows] == ["0", "1"]
    assert [float(r["eval_tps"]) for r in rows] == [10.0, 30.0]
    assert rows[0]["model_sha256"] == "ab" * 32 and rows[0]["build_commit"] == "0c1e570"
    assert float(rows[1]["eval_s"]) == pytest.approx(100 / 30.0)
    agg = list(csv.DictReader(io.StringIO(render_csv(aggregate(runs), aggregated=True))))
    assert len(agg) == 1 and agg[0]["repetitions"] == "2"
    assert float(agg[0]["eval_tps_median"]) == 20.0 and float(agg[0]["eval_tps_stdev"]) == pytest.approx(math.sqrt(200.0))


def test_json_llama_bench_compatible_fields():
    runs = [Run(_rec(prompt_eval_ms=p, eval_ms=e), CTX, tokens_out=100) for p, e in ((500.0, 2000.0), (400.0, 1600.0))]
    doc = json.loads(render_json(aggregate(runs)))
    assert isinstance(doc, list) and len(doc) == 1
    g = doc[0]
    assert (g["n_prompt"], g["n_gen"], g["test"]) == (50, 99, "pp50+tg99")
    assert g["model_filename"] == CTX.model_file and g["build_commit"] == "0c1e570" and g["n_threads"] == 4
    # the GGUF's own figures come from the run (Run.facts); mvlm's file size is file_size
    assert g["cpu_info"] == "Kryo 680" and g["model_size"] is None and g["file_size"] == 700_000_000
    assert list(g)[: len(LLAMA_BENCH_FIELDS)] == list(LLAMA_BENCH_FIELDS)  # every llama-bench field, in its order
    facts = {"model_size": 123, "model_n_params": 456, "model_type": "llama 1B Q4_K - Small", "n_batch": 2048}
    g2 = json.loads(render_json(aggregate([Run(r.timing, CTX, tokens_out=100, facts=facts) for r in runs])))[0]
    assert {k: g2[k] for k in facts} == facts and g2["file_size"] == 700_000_000
    # pp+tg decode rate per repetition: (50 + 99) tokens over prompt+eval ms
    ts = [149 * 1000 / 2500.0, 149 * 1000 / 2000.0]
    assert g["samples_ns"] == [2_500_000_000, 2_000_000_000]
    assert g["samples_ts"] == pytest.approx(ts)
    assert g["avg_ts"] == pytest.approx(sum(ts) / 2)
    assert g["stddev_ts"] == pytest.approx(abs(ts[0] - ts[1]) / math.sqrt(2))
    assert g["avg_ns"] == 2_250_000_000
    assert g["metrics"]["total_s"]["median"] == pytest.approx(5.0)
    assert g["runs"][1]["timing"]["prompt_eval_ms"] == 400.0 and g["repetitions"] == 2
    assert g["runtime_patches"] == ["0001-clip-cls-first.patch"] and g["model_sha256"] == "ab" * 32


def test_json_has_no_nan_even_with_inf_inputs():
    rec = parse_text(
        "llama_print_timings:        eval time =     0.00 ms /     1 runs   (    0.00 ms per token,      inf tokens "
        "per second)\nllama_print_timings:       total time =    10.00 ms\n"
    )
    out = render_json(aggregate([Run(rec, CTX)]))
    assert "NaN" not in out and "Infinity" not in out
    json.loads(out)


def test_rich_table():
    runs = [Run(_rec(eval_tps=v), CTX, tokens_out=100) for v in (10.0, 12.0, 20.0)]
    console = Console(record=True, width=250)
    console.print(render_table(aggregate(runs)))
    text = console.export_text()
    assert "MobileLLaMA-1.4B" in text and "12.00" in text and "10.00–20.00" in text
    assert render_markdown([]) == "_no runs_\n"


def test_a_configuration_whose_repetitions_spread_is_flagged_noisy_in_every_view():
    """Eval 30–1385 tok/s over five repetitions (a device that throttled in the middle) is not a plain median: the
    table, the Markdown and the JSON say it is noisy, with the coefficient of variation computed here independently."""
    import statistics

    from mvlm_bench.records.groups import NOISY_CV

    evals = (30.0, 45.0, 60.0, 1385.0, 50.0)
    spread = [Run(_rec(eval_tps=v), CTX, tokens_out=100, wall_s=5.0) for v in evals]
    steady = [Run(_rec(eval_tps=v), RunContext(device="Jetson Orin", model="M"), tokens_out=100, wall_s=5.0)
              for v in (49.0, 50.0, 51.0)]
    groups = aggregate(spread + steady)
    cv = statistics.stdev(evals) / statistics.median(evals)
    assert cv > NOISY_CV
    assert groups[0].noisy() == {"eval_tps": pytest.approx(cv, rel=1e-3)} and groups[1].noisy() == {}

    console = Console(width=300, record=True)
    console.print(render_table(groups))
    text = console.export_text()
    assert "Noisy" in text and f"Eval CV {100 * cv:.0f}%" in text
    md = render_markdown(groups)
    head, _, first, second = md.splitlines()[:4]
    assert head.endswith("| Noisy |") and f"Eval CV {100 * cv:.0f}%" in first and second.endswith("| – |")
    assert "**Noisy:**" in md
    recs = json.loads(render_json(groups))
    assert [r["noisy"] for r in recs] == [True, False]
    assert recs[0]["noisy_cv"] == {"eval_tps": pytest.approx(cv, rel=1e-3)}


def test_steady_repetitions_add_no_noisy_column():
    groups = aggregate([Run(_rec(eval_tps=v), CTX, tokens_out=100, wall_s=5.0) for v in (49.0, 50.0, 51.0)])
    assert "Noisy" not in render_markdown(groups)
    assert json.loads(render_json(groups))[0]["noisy"] is False
