"""The seed papers' latency tables as data (mvlm_bench.papers.tables) and `mvlm report --paper` (mvlm_bench.papers.beside).

The data is checked against values re-read by hand from the papers (cited per table below), against each paper's own
formula (the rows flagged inconsistent must be exactly the rows the formula rules out), and the report is checked on
a history filled through the real code path: real llama.cpp outputs (tests/data/llama-cpp-outputs, whose `# expected:`
lines a person read) rendered by `mvlm_bench.views.latency` as `mvlm bench --json` writes them, stored with `mvlm history
import`, read back with `mvlm history --json`; and (slow) a real `mvlm bench --device local --save` on SmolLM2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from mvlm_bench.papers import tables as pt
from mvlm_bench.records.groups import aggregate
from mvlm_bench.records.record import Run, RunContext
from mvlm_bench.records.timings import parse_text
from mvlm_bench.views.exports import render_json

OUTPUTS = Path(__file__).resolve().parent / "data" / "llama-cpp-outputs"


def _row(paper: str, table: str, model: str, device: str, quant: str = "", lm: str = "") -> pt.PaperRow:
    hits = [r for r in pt.all_rows() if (r.paper, r.table, r.model, r.device) == (paper, table, model, device)
            and (not quant or r.quantization == quant) and (not lm or r.lm == lm)]
    assert len(hits) == 1, (paper, table, model, device, quant, lm, hits)
    return hits[0]


def _printed(row: pt.PaperRow) -> dict[str, str]:
    return {m.key: m.printed for m in row.metrics}


# --- the data -----------------------------------------------------------------------------------------------------
def test_rows_match_values_reread_from_the_papers():
    # MobileVLM Table 5 (p. 8), MobileLLaMA 1.4B, Snapdragon 888, 4-bit: Size 0.7, Sample 3870, Eval_prompt 36.20,
    # Eval 28.32, Total 14.76
    r = _row("mobilevlm", "Table 5", "MobileLLaMA 1.4B", "Snapdragon 888", "4-bit")
    assert _printed(r) == {"size_gb": "0.7", "sample_tps": "3870", "prompt_tps": "36.20", "eval_tps": "28.32",
                           "total_s": "14.76"}
    assert (r.page, r.quant_type) == (8, "q4_k_s")  # caption: 4-bit = q4_k_s, 8-bit = q8_0
    # MobileVLM Table 5, OpenLLaMA 3B, Jetson Orin, 8-bit: 3.4 GB, 2382, 80.34, 29.97, 13.94
    r = _row("mobilevlm", "Table 5", "OpenLLaMA 3B", "Jetson Orin", "8-bit")
    assert [m.value for m in r.metrics] == [3.4, 2382, 80.34, 29.97, 13.94]
    assert r.quant_type == "q8_0"
    # MobileVLM Table 6 (p. 9), MobileVLM-336 / MobileLLaMA 1.4B, Jetson Orin: 1.40 GB, VE 3.32 ms/patch, 17712,
    # 667.69, 65.27, 5.14 s; the abstract's "21.5 tokens and 65.3 tokens per second" are this row's and the Snapdragon
    # row's Eval
    r = _row("mobilevlm", "Table 6", "MobileVLM-336", "Jetson Orin", lm="MobileLLaMA 1.4B")
    assert _printed(r) == {"size_gb": "1.40", "ve_ms_per_patch": "3.32", "sample_tps": "17712",
                           "prompt_tps": "667.69", "eval_tps": "65.27", "total_s": "5.14"}
    assert r.page == 9 and r.metric("ve_ms_per_patch").unit == "ms/patch"
    assert round(r.value("eval_tps"), 1) == 65.3
    sd = _row("mobilevlm", "Table 6", "MobileVLM-336", "Snapdragon 888", lm="MobileLLaMA 1.4B")
    assert round(sd.value("eval_tps"), 1) == 21.5
    # MobileVLM Table 6, LLaVA-v1.5-336 / Vicuna 7B generates 51 output tokens (caption); Snapdragon Total 329.89 s
    v7 = _row("mobilevlm", "Table 6", "LLaVA-v1.5-336", "Snapdragon 888", lm="Vicuna 7B")
    assert v7.tks_out == 51 and v7.metric("total_s").printed == "329.89"
    # MobileVLM V2 Table 5 (Jetson Orin, 4-bit): MobileVLM V2 1.7B Eval_avg 51.63 tokens/s, T_total 4.96 s
    r = _row("mobilevlm-v2", "Table 5", "MobileVLM V2 1.7B", "Jetson Orin")
    assert (r.metric("eval_avg").printed, r.metric("eval_avg").unit) == ("51.63", "tokens/s")
    assert (r.metric("total_s").name, r.metric("total_s").printed) == ("T_total", "4.96")
    # Imp Table 4: Imp-3B@196, Snapdragon 8Gen3, 4-bit: T_VE 2.10 s, S_prompt 15.64, S_gen 12.73 tokens/s, T_total
    # 22.72 s (the abstract's "about 13 tokens/s" on the 8Gen3)
    r = _row("imp", "Table 4", "Imp-3B@196", "Snapdragon 8Gen3", "4-bit")
    assert _printed(r) == {"size_gb": "2.3", "t_ve_s": "2.10", "s_prompt_tps": "15.64", "s_gen_tps": "12.73",
                           "t_total_s": "22.72"}
    assert round(r.value("s_gen_tps")) == 13
    # Imp Table 4: Imp-3B@384, Snapdragon 888, 4-bit: T_VE printed with one decimal, 16.9
    assert _row("imp", "Table 4", "Imp-3B@384", "Snapdragon 888", "4-bit").metric("t_ve_s").half_ulp == 0.05
    # Xmodel-VLM Table 6: MobileVLM-1.7B Samples 919.25 token/s, Total 579.88 s; Size printed "1.7B" (not GB)
    r = _row("xmodel", "Table 6", "MobileVLM-1.7B", "RTX 3090")
    assert _printed(r) == {"size": "1.7B", "samples_tps": "919.25", "total_s": "579.88"}
    assert r.metric("samples_tps").unit == "token/s" and r.value("size") is None


def test_every_latency_row_is_there_with_its_provenance():
    counts = {(t.paper, t.table): len(t.rows) for t in pt.TABLES}
    # MobileVLM T5: 4 LMs x 2 precisions x 2 devices; T6: 5 VLMs x 2 devices; V2 T5: 9 models; Imp T4: 3 models x
    # (16-bit on the 3090 + 8/4-bit on 3 devices); Xmodel T6: 3 models
    assert counts == {("mobilevlm", "Table 5"): 16, ("mobilevlm", "Table 6"): 10, ("mobilevlm-v2", "Table 5"): 9,
                      ("imp", "Table 4"): 21, ("xmodel", "Table 6"): 3}
    assert {r.device for r in pt.tables("imp")[0].rows} == {"RTX 3090", "Snapdragon 8Gen3", "Snapdragon 888"}
    for t in pt.TABLES:
        keys = [c.key for c in t.columns]
        for r in t.rows:
            assert (r.paper, r.table, r.page) == (t.paper, t.table, t.page)
            assert r.model and r.device and r.quantization
            assert [m.key for m in r.metrics] == keys and all(m.printed for m in r.metrics)
            assert r.where.startswith(pt.PAPER_SHORT[t.paper]) and t.table in r.where
            json.dumps(pt.row_record(r), allow_nan=False)  # every row renders as JSON


def test_flagged_rows_are_exactly_those_the_papers_own_formulas_rule_out():
    checked = {(r.paper, r.table, r.model, r.lm, r.device, r.quantization): pt.check_row(r) for r in pt.all_rows()}
    flagged = {k for k, r in zip(checked, pt.all_rows(), strict=True) if r.inconsistent}
    failing = {k for k, c in checked.items() if c.ok is False}
    assert failing == flagged
    # found by hand: MobileVLM Table 6's Snapdragon LLaVA-v1.5 with OpenLLaMA 3B / TinyLLaMA 1B (576 visual tokens
    # alone take longer than Total), MobileVLM V2's 3B row (256/8.38 != 30.80), and all 7 MobileVLM-3B@336 rows of
    # Imp Table 4 (576 image embeddings as the text says)
    assert sorted((k[0], k[2], k[3]) for k in flagged) == sorted(
        [("mobilevlm", "LLaVA-v1.5-336", "OpenLLaMA 3B"), ("mobilevlm", "LLaVA-v1.5-336", "TinyLLaMA 1B"),
         ("mobilevlm-v2", "MobileVLM V2 3B", "")] + [("imp", "MobileVLM-3B@336", "")] * 7)
    assert all(c.ok is None for k, c in checked.items() if k[0] == "xmodel")  # no formula in that paper
    assert all(c.ok is not None for k, c in checked.items() if k[0] != "xmodel")


def test_imp_mobilevlm_rows_fit_with_the_144_tokens_mobilevlm_emits():
    """The flag's explanation, recomputed without check_row: with 41 + 144 prompt tokens every MobileVLM-3B row of
    Imp Table 4 satisfies T_total >= T_VE + N_prompt/S_prompt + N_gen/S_gen at the printed rounding."""
    rows = [r for r in pt.tables("imp")[0].rows if r.model == "MobileVLM-3B@336"]
    assert len(rows) == 7
    for r in rows:
        m = {x.key: x for x in r.metrics}
        need = (m["t_ve_s"].value - m["t_ve_s"].half_ulp + (41 + 144) / (m["s_prompt_tps"].value + m["s_prompt_tps"].half_ulp)
                + 64 / (m["s_gen_tps"].value + m["s_gen_tps"].half_ulp))
        assert need <= m["t_total_s"].value + m["t_total_s"].half_ulp, r


def test_the_check_fails_a_row_the_formula_rules_out():
    good = _row("mobilevlm", "Table 5", "MobileLLaMA 1.4B", "Jetson Orin", "4-bit")
    assert pt.check_row(good).ok is True
    # 400 tokens at 66.79 tokens/s take 5.99 s: a Total of 5.00 s is impossible
    bad_metrics = tuple(dataclasses.replace(m, printed="5.00") if m.key == "total_s" else m for m in good.metrics)
    assert pt.check_row(dataclasses.replace(good, metrics=bad_metrics)).ok is False
    v2 = _row("mobilevlm-v2", "Table 5", "MobileVLM V2 1.7B", "Jetson Orin")
    assert pt.check_row(v2).ok is True
    off = tuple(dataclasses.replace(m, printed="52.00") if m.key == "eval_avg" else m for m in v2.metrics)
    assert pt.check_row(dataclasses.replace(v2, metrics=off)).ok is False


# --- the report -------------------------------------------------------------------------------------------------
def _mvlm(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ) | {"COLUMNS": "250"}
    env.pop("MVLM_HISTORY", None)
    return subprocess.run([sys.executable, "-m", "mvlm", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def _output(name: str) -> tuple[str, dict[str, float]]:
    """A real llama.cpp output without its header, and the numbers its `# expected:` line says (read by hand)."""
    path = next(OUTPUTS.glob(name))
    lines = path.read_text().splitlines(keepends=True)
    expected = {}
    for ln in lines:
        if ln.startswith("# expected:"):
            expected = {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)(?=[;\s]|$)", ln)}
    return "".join(x for x in lines if not x.startswith("# ")), expected


def _bench_json(path: Path, groups: list[tuple[RunContext, list[str]]]) -> None:
    """What `mvlm bench --json` writes (mvlm_bench.report.render_json) for runs parsed from real outputs."""
    runs = [Run(parse_text(text), ctx, ended_at=1_767_225_600.0 + i) for ctx, texts in groups for i, text in
            enumerate(texts)]
    path.write_text(render_json(aggregate(runs)))


def _history(db: Path, cwd: Path) -> dict[int, dict]:
    r = _mvlm("history", "--db", db, "--json", "--limit", 0, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return {e["id"]: e for e in json.loads(r.stdout)}


def _report(paper: str, db: Path, cwd: Path, *extra) -> dict:
    r = _mvlm("report", "--paper", paper, "--db", db, "--json", *extra, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _table(rep: dict, name: str) -> dict:
    return next(t for t in rep["tables"] if t["table"] == name)


@pytest.mark.slow
def test_report_puts_imported_lm_and_vlm_measurements_beside_mobilevlm_tables(tmp_path):
    sd888, sd_exp = _output("05_*")  # MobileVLM 1.7B, llava-cli, Snapdragon 888
    orin, orin_exp = _output("08_*")  # MobileVLM 1.7B, llava-cli, Jetson Orin (CUDA)
    lm, lm_exp = _output("19_*")  # llama-completion era output (common_perf_print)
    base = dict(model="MobileVLM-1.7B", precision="q4_k_s", size_bytes=1_400_000_000)
    report = tmp_path / "bench.json"
    _bench_json(report, [(RunContext(device="sd888", protocol="vlm", **base), [sd888]),
                         (RunContext(device="orin", protocol="vlm", **base), [orin]),
                         (RunContext(device="pc", protocol="lm", model="SmolLM2", precision="q4_1"), [lm, lm])])
    db = tmp_path / "h.sqlite"
    r = _mvlm("history", "import", report, "--db", db, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    stored = _history(db, tmp_path)
    assert len(stored) == 3

    rep = _report("mobilevlm", db, tmp_path)
    t6 = _table(rep, "Table 6")
    assert t6["page"] == 9 and t6["protocol"] == "vlm" and t6["fill_command"] is None
    assert len(t6["paper_rows"]) == 10 and all(p["source"] == "paper" and p["where"] == "MobileVLM Table 6, p. 9"
                                               for p in t6["paper_rows"])
    mine = {y["device"]: y for y in t6["your_rows"]}
    assert set(mine) == {"sd888", "orin"}
    for dev, exp in (("sd888", sd_exp), ("orin", orin_exp)):
        y = mine[dev]
        # the rates are llama.cpp's own, as a person read them from the output
        assert y["metrics"]["eval_tps"] == pytest.approx(exp["eval_tps"])
        assert y["metrics"]["prompt_tps"] == pytest.approx(exp["prompt_tps"])
        assert y["metrics"]["sample_tps"] == pytest.approx(exp["sample_tps"])
        assert y["metrics"]["ve_ms_per_patch"] == pytest.approx(exp["image_ms_per_patch"])
        assert y["metrics"]["size_gb"] == pytest.approx(1.4)
        # Total is what the history stored for that entry
        assert y["metrics"]["total_s"] == pytest.approx(stored[y["id"]]["samples"]["total_s"][0])
    t5 = _table(rep, "Table 5")
    assert [y["model"] for y in t5["your_rows"]] == ["SmolLM2"] and t5["fill_command"] is None
    y = t5["your_rows"][0]
    assert y["repetitions"] == 2 and y["metrics"]["eval_tps"] == pytest.approx(lm_exp["eval_tps"])
    assert y["metrics"]["prompt_tps"] == pytest.approx(lm_exp["prompt_tps"])
    assert y["metrics"]["size_gb"] is None  # the context gave no size

    v2 = _table(_report("mobilevlm-v2", db, tmp_path), "Table 5")  # Eval_avg comes from the vlm protocol
    for y in v2["your_rows"]:
        assert y["metrics"]["eval_avg"] == pytest.approx(stored[y["id"]]["samples"]["eval_avg"][0])
        assert y["metrics"]["avg_accuracy"] is None
    assert len(v2["your_rows"]) == 2

    only = _table(_report("mobilevlm", db, tmp_path, "--device", "orin"), "Table 6")
    assert [y["device"] for y in only["your_rows"]] == ["orin"]
    assert "--device orin" in _table(_report("mobilevlm", db, tmp_path, "--device", "orin"), "Table 5")["fill_command"]

    # the rich table: the paper's rows labelled with table and page, the user's beside them
    r = _mvlm("report", "--paper", "mobilevlm", "--db", db, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "paper Table 6 p. 9" in r.stdout and "yours id:" in r.stdout and "65.27" in r.stdout
    assert f"{orin_exp['eval_tps']:.2f}" in r.stdout
    assert "the paper is inconsistent here" in r.stdout


def _record(protocol: str, device: str, model: str, reps: list[dict[str, float]]) -> dict:
    """A report record as `mvlm bench --json` writes it, for a protocol whose runner stores these metric names."""
    return {"device": device, "model": model, "precision": "q4_k_s", "protocol": protocol, "model_size": 2_300_000_000,
            "params": {}, "runtime_patches": [], "test_time": "2026-01-02T03:04:05Z", "repetitions": len(reps),
            "runs": [{"repetition": i, "metrics": m, "timing": {}} for i, m in enumerate(reps)]}


@pytest.mark.slow
def test_report_reads_imp_and_dataset_entries_by_their_field_names(tmp_path):
    imp_reps = [{"n_prompt": 237, "n_gen": 64, "t_ve_s": ve, "s_prompt_tps": sp, "s_gen_tps": sg, "t_total_s": tt,
                 "t_other_s": 0.1, "load_s": 1.5}
                for ve, sp, sg, tt in ((2.2, 15.0, 12.0, 23.0), (2.0, 16.0, 13.0, 21.0), (2.4, 14.5, 12.5, 24.0))]
    ds_reps = [{"n_samples": 2017, "samples_tps": tps, "total_s": tot, "p50_s": 0.2, "p90_s": 0.4, "p99_s": 0.9}
               for tps, tot in ((400.0, 1400.0), (420.0, 1350.0))]
    f = tmp_path / "runs.json"
    f.write_text(json.dumps([_record("imp", "phone-8gen3", "Imp-3B@196", imp_reps),
                             _record("dataset", "rtx3090", "Xmodel-VLM", ds_reps)]))
    db = tmp_path / "h.sqlite"
    assert _mvlm("history", "import", f, "--db", db, cwd=tmp_path).returncode == 0

    imp = _table(_report("imp", db, tmp_path), "Table 4")
    (y,) = imp["your_rows"]
    for key in ("t_ve_s", "s_prompt_tps", "s_gen_tps", "t_total_s"):
        assert y["metrics"][key] == pytest.approx(statistics.median(r[key] for r in imp_reps))
    assert y["extra"] == {"n_prompt": 237, "n_gen": 64, "t_other_s": 0.1, "load_s": 1.5}
    assert y["metrics"]["size_gb"] == pytest.approx(2.3)
    assert len(imp["paper_rows"]) == 21 and imp["fill_command"] is None

    xm = _table(_report("xmodel", db, tmp_path), "Table 6")
    (y,) = xm["your_rows"]
    assert y["metrics"]["samples_tps"] == pytest.approx(410.0) and y["metrics"]["total_s"] == pytest.approx(1375.0)
    assert y["extra"] == {"n_samples": 2017, "p50_s": 0.2, "p90_s": 0.4, "p99_s": 0.9}
    r = _mvlm("report", "--paper", "imp", "--db", db, cwd=tmp_path)
    assert r.returncode == 0 and "yours id:1" in r.stdout and "Imp-3B@196" in r.stdout
    # counts print as whole numbers, times with their decimals
    for paper, where, counts, others in (("imp", "Table 4", ("237", "64"), ("0.100", "1.50")),
                                         ("xmodel", "Table 6", ("2017",), ("0.200", "0.900"))):
        mine = _rendered_row(_report(paper, db, tmp_path), where)
        assert all(c in mine for c in counts) and all(o in mine for o in others), mine
        assert not any(f"{c}.0" in cell for c in counts for cell in mine), mine


def _rendered_row(report: dict, where: str) -> list[str]:
    """The cells of your (first) row of one table as `mvlm report --paper` prints it."""
    from rich.console import Console

    from mvlm_bench.papers.beside import render

    table = next(x for x in render({**report, "tables": [_table(report, where)]}) if not isinstance(x, str))
    console = Console(record=True, width=1000)
    console.print(table)
    row = next(ln for ln in console.export_text().splitlines() if "yours id:" in ln)
    return [c.strip() for c in row.split("│") if c.strip()]


@pytest.mark.slow
def test_without_entries_the_paper_rows_and_the_command_that_fills_them(tmp_path):
    db = tmp_path / "none.sqlite"  # no history yet: still a report
    rep = _report("imp", db, tmp_path)
    t = _table(rep, "Table 4")
    assert t["your_rows"] == [] and len(t["paper_rows"]) == 21
    assert t["fill_command"].startswith("mvlm bench --device DEVICE --protocol imp ")
    assert "no benchmark history" in rep["db_note"] and not db.exists()  # nothing written
    r = _mvlm("report", "--paper", "xmodel", "--db", db, "--device", "rtx3090", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("No measurements of yours")]
    assert len(lines) == 1 and "mvlm bench --device rtx3090 --protocol dataset --data FILE.jsonl" in lines[0]


@pytest.mark.slow
def test_unknown_paper_and_bad_history_are_one_line_errors(tmp_path):
    r = _mvlm("report", "--paper", "llava", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["error: unknown paper 'llava': choose one of mobilevlm, mobilevlm-v2, "
                                             "imp, xmodel"]
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    r = _mvlm("report", "--paper", "imp", "--db", junk, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_report_after_a_real_local_bench(tmp_path, smollm2_gguf, host_runtime):
    db = tmp_path / "h.sqlite"
    r = _mvlm("bench", "--device", "local", "--model", smollm2_gguf, "-n", 16, "--threads", 1, "--repeat", 2,
              "--warmup", 0, "--save", "--db", db, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (entry,) = _history(db, tmp_path).values()
    rep = _report("mobilevlm", db, tmp_path)
    (y,) = _table(rep, "Table 5")["your_rows"]
    assert y["id"] == entry["id"] and y["repetitions"] == 2 and y["device"] == entry["device"]
    for key in ("sample_tps", "prompt_tps", "eval_tps", "total_s"):
        assert y["metrics"][key] == pytest.approx(statistics.median(entry["samples"][key]))
    assert y["metrics"]["size_gb"] == pytest.approx(smollm2_gguf.stat().st_size / 1e9)
    assert _table(rep, "Table 6")["fill_command"] is not None  # no vlm entry


@pytest.mark.slow
def test_fill_command_repeats_the_db_and_quotes_for_the_shell(tmp_path):
    """Following the suggested command must store where the report reads: its --db is the report's, shell-quoted."""
    import shlex

    db = tmp_path / "my dir" / "h's.sqlite"
    db.parent.mkdir()
    rep = _report("mobilevlm", db, tmp_path, "--device", "my phone; rm -rf x")
    for t in rep["tables"]:
        argv = shlex.split(t["fill_command"])
        assert argv[:3] == ["mvlm", "bench", "--device"] and argv[3] == "my phone; rm -rf x", argv
        assert argv[argv.index("--db") + 1] == str(db), argv
    r = _mvlm("report", "--paper", "mobilevlm", "--json", cwd=tmp_path)  # no --db given: none suggested
    assert r.returncode == 0 and all("--db" not in t["fill_command"] for t in json.loads(r.stdout)["tables"]), r.stderr


@pytest.mark.slow
def test_report_shows_control_characters_in_stored_text(tmp_path):
    lm, _ = _output("19_*")
    report = tmp_path / "bench.json"
    _bench_json(report, [(RunContext(device="pc\x1b]0;PWNED\x07", protocol="lm", model="SmolLM2"), [lm])])
    db = tmp_path / "h.sqlite"
    assert _mvlm("history", "import", report, "--db", db, "--label", "\x1b[2Jx", cwd=tmp_path).returncode == 0
    r = _mvlm("report", "--paper", "mobilevlm", "--db", db, cwd=tmp_path)
    assert r.returncode == 0 and "\x1b" not in r.stdout and "\x07" not in r.stdout, r.stdout
    assert "\\x1b[2Jx" in r.stdout and "\\x1b]0;PWNED\\x07" in r.stdout.replace("\n", "")
