"""The timing parser against real llama.cpp outputs of every era, plus malformed input.

Each file in tests/data/llama-cpp-outputs/ starts with ``# source:`` and ``# expected:`` lines written by a person
who read the output; the numbers to check come from that header, never from the parser.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from mvlm_bench.records.llama_bench_output import parse_llama_bench
from mvlm_bench.records.timings import FIELDS, TimingRecord, parse_file, parse_text

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = REPO / "tests" / "data" / "llama-cpp-outputs"  # where each came from: tests/data/README.md


def _output_files() -> list[Path]:
    if not OUTPUTS.is_dir():
        # Collected at import so that a missing folder fails loudly instead of silently testing nothing.
        return []
    return sorted(p for p in OUTPUTS.iterdir() if p.is_file())


OUTPUT_FILES = _output_files()


def test_reference_outputs_present():
    assert OUTPUTS.is_dir(), f"{OUTPUTS} is missing: the real llama.cpp outputs are part of the repository"
    assert len(OUTPUT_FILES) >= 31, f"expected the 31 reference outputs in {OUTPUTS}, found {len(OUTPUT_FILES)}"


def _split(path: Path) -> tuple[str, str]:
    """(expected header line, the verbatim output without the '# ' header lines)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    expected = ""
    i = 0
    while i < len(lines) and lines[i].startswith("# "):
        if lines[i].startswith("# expected:"):
            expected = lines[i][len("# expected:") :].strip()
        i += 1
    assert expected, f"{path.name} has no '# expected:' header"
    return expected, "".join(lines[i:])


_PAIR = re.compile(r"(\w+)=(\[[^\]]*\]|None\(derive [^)]*\)|\"[^\"]*\"|[^\s;,()]+)")

# header key → record field (common_perf_print's samplers_* is the sampler chain; its sampling_ms is wall time)
_DIRECT = {
    "load_ms": "load_ms",
    "sample_ms": "sample_ms",
    "sample_runs": "sample_runs",
    "sample_tps": "sample_tps",
    "sampling_runs": "sample_runs",
    "sampling_tps": "sample_tps",
    "samplers_ms": "sample_ms",
    "samplers_tokens": "sample_runs",
    "prompt_ms": "prompt_eval_ms",
    "prompt_tokens": "prompt_tokens",
    "prompt_tps": "prompt_tps",
    "eval_ms": "eval_ms",
    "eval_runs": "eval_runs",
    "eval_tps": "eval_tps",
    "total_ms": "total_ms",
    "total_tokens": "total_tokens",
    "image_encode_ms": "vision_encode_ms",
    "image_ms_per_patch": "vision_ms_per_token",
    "image_tokens": "image_tokens",
}
# "x_ms_per" keys: printed ms per token, checked against ms / count of the record
_PER = {
    "sample_ms_per": ("sample_ms", "sample_runs"),
    "sampling_ms_per": ("sample_ms", "sample_runs"),
    "prompt_ms_per_tok": ("prompt_eval_ms", "prompt_tokens"),
    "eval_ms_per": ("eval_ms", "eval_runs"),
}
_TEXT_FIELDS = [f for f in FIELDS if f not in ("vision_encode_ms", "vision_ms_per_token", "image_tokens")]


def _expected_pairs(expected: str) -> dict[str, str]:
    return {k: v for k, v in _PAIR.findall(expected)}


def _check_value(rec: TimingRecord, fld: str, raw: str, name: str) -> None:
    got = getattr(rec, fld)
    if raw == "None":
        assert got is None, f"{name}: {fld} should be absent, got {got!r}"
    elif raw.startswith("None(derive"):
        want = float(raw.split()[1].rstrip(")"))
        assert got == pytest.approx(want, abs=0.006), f"{name}: {fld} derived {got!r}, header says {want}"
    elif raw in ("inf", "nan"):
        assert got is None, f"{name}: {fld} printed as {raw} must be None, got {got!r}"
        assert any(fld in w for w in rec.warnings), f"{name}: no warning names {fld}: {rec.warnings}"
    else:
        want = float(raw)
        assert got is not None, f"{name}: {fld} missing, header says {raw}"
        assert got == pytest.approx(want, abs=1e-6), f"{name}: {fld}={got!r}, header says {raw}"
        if fld in ("sample_runs", "prompt_tokens", "eval_runs", "total_tokens", "image_tokens"):
            assert isinstance(got, int), f"{name}: {fld} should be an int, got {got!r}"


_TEXT_OUTPUTS = [p for p in OUTPUT_FILES if "llama-bench" not in p.name]
_BENCH_OUTPUTS = [p for p in OUTPUT_FILES if "llama-bench" in p.name]


@pytest.mark.parametrize("path", _TEXT_OUTPUTS, ids=lambda p: p.name[:2])
def test_text_output_matches_expected_header(path: Path):
    expected, body = _split(path)
    rec = parse_text(body)
    pairs = _expected_pairs(expected)
    name = path.name
    checked = 0

    common_era = "samplers_ms" in pairs
    for key, raw in pairs.items():
        if key == "sampling_ms" and not common_era:
            _check_value(rec, "sample_ms", raw, name)
            checked += 1
        elif key in _DIRECT:
            _check_value(rec, _DIRECT[key], raw, name)
            checked += 1
        elif key in _PER and raw not in ("None",):
            ms_f, n_f = _PER[key]
            assert getattr(rec, n_f), f"{name}: {n_f} missing"
            assert getattr(rec, ms_f) / getattr(rec, n_f) == pytest.approx(float(raw), abs=0.011), name
            checked += 1
        elif key == "encode_ms" and raw.startswith("["):  # mtmd batch encodes: the record holds their sum
            want = sum(float(x) for x in raw.strip("[]").split(","))
            assert rec.vision_encode_ms == pytest.approx(want), name
            checked += 1
        elif key == "image" and raw == "None":
            assert rec.vision_encode_ms is None and rec.image_tokens is None, name
        elif key == "sample" and raw == "None":
            assert rec.sample_ms is None and rec.sample_runs is None and rec.sample_tps is None, name
        elif key == "timings" and raw == "None":  # "all text timings=None"
            assert all(getattr(rec, f) is None for f in _TEXT_FIELDS), f"{name}: {rec}"
        elif key == "format":
            want = raw.split()[0]
            assert rec.source_format == want, f"{name}: format {rec.source_format!r}, header says {want!r}"
    assert checked >= 1, f"{name}: the expected header yielded nothing to check: {expected!r}"

    if common_era:  # derived sampler rate: samplers tokens over samplers time
        want = float(pairs["samplers_tokens"]) * 1000.0 / float(pairs["samplers_ms"])
        assert rec.sample_tps == pytest.approx(want, rel=1e-9), name
    if not any(k.startswith(("image", "encode")) for k in pairs):
        assert rec.vision_encode_ms is None and rec.image_tokens is None, f"{name}: no image lines expected"
    # Every field the record lacks is listed as missing, and only those.
    assert rec.missing == [f for f in FIELDS if getattr(rec, f) is None]


# (test kind, count, avg_ts, stddev_ts) as the headers spell them in their various ways
_BENCH_TRIPLE = re.compile(
    r"\b(pp|tg)\s?(\d+)\b\)?\s*(?:=|avg_ts=|,)?\s*(?:avg_ns=\d+\s+(?:stddev_ns=\d+\s+)?avg_ts=)?"
    r"(\d+\.\d+)\s*(?:±|sd=|stddev_ts=|,)\s*(\d+\.\d+)"
)
_BENCH_KEYS = {"ngl": "n_gpu_layers", "threads": "n_threads", "backend": "backends", "fa": "flash_attn",
               "mmap": "use_mmap", "model": "model_type", "n_ubatch": "n_ubatch", "n_threads": "n_threads",
               "type_k": "type_k", "build_commit": "build_commit", "build_number": "build_number"}  # fmt: skip


@pytest.mark.parametrize("path", _BENCH_OUTPUTS, ids=lambda p: p.name[:2])
def test_llama_bench_output_matches_expected_header(path: Path):
    expected, body = _split(path)
    rows = parse_llama_bench(body)
    triples = [(k, int(n), float(a), float(s)) for k, n, a, s in _BENCH_TRIPLE.findall(expected)]
    assert triples, f"{path.name}: no rows in the expected header"
    got = []
    for r in rows:
        kind = "pp" if r.get("n_prompt") and not r.get("n_gen") else "tg"
        got.append((kind, r["n_prompt"] if kind == "pp" else r["n_gen"], r["avg_ts"], r["stddev_ts"]))
    # md excerpts may be truncated in the header; every row the header lists is there, in order
    assert len(got) >= len(triples), f"{path.name}: {got} vs {triples}"
    for (k, n, a, s), (gk, gn, ga, gs) in zip(triples, got, strict=False):
        assert (k, n) == (gk, gn) and ga == pytest.approx(a) and gs == pytest.approx(s), path.name
    for key, raw in _expected_pairs(expected).items():
        field = _BENCH_KEYS.get(key)
        if field is None or field not in rows[-1]:
            continue
        want = raw.strip('"')
        assert str(rows[-1][field]).lower() == want.lower(), f"{path.name}: {field}={rows[-1][field]!r} vs {want}"
    # the record view holds the last configuration's pp/tg numbers
    rec = parse_text(body)
    assert rec.source_format.startswith("llama-bench-"), rec.source_format
    fmt = rec.source_format.removeprefix("llama-bench-")
    assert fmt in path.name, f"{path.name}: recognised as {rec.source_format}"


def test_llama_bench_json_record_fields():
    path = next(p for p in _BENCH_OUTPUTS if "_json_" in p.name)
    rows = parse_llama_bench(_split(path)[1])
    assert [r["n_prompt"] for r in rows] == [512, 0] and [r["n_gen"] for r in rows] == [0, 128]
    assert rows[0]["avg_ns"] == 72135640 and rows[0]["samples_ns"][0] == 74601900
    rec = parse_text(_split(path)[1])
    assert rec.prompt_tokens == 512 and rec.prompt_tps == pytest.approx(7100.002165)
    assert rec.prompt_eval_ms == pytest.approx(72.13564) and rec.eval_ms == pytest.approx(1076.76788)
    assert rec.eval_runs == 128 and rec.eval_tps == pytest.approx(118.881588)


def test_llama_bench_old_test_names_and_sizes():
    path = next(p for p in _BENCH_OUTPUTS if "old-pp-space" in p.name)
    rows = parse_llama_bench(_split(path)[1])
    assert rows[0]["test"] == "pp 512" and rows[0]["n_prompt"] == 512 and rows[0]["n_gen"] == 0
    assert rows[0]["model_size"] == round(4.43 * 1024**3) and rows[0]["model_n_params"] == round(7.72e9)
    assert [r["n_gpu_layers"] for r in rows] == [10, 10, 20, 20, 30, 30, 31]


# --- synthetic edge cases (built here from the formats in llama.cpp's source, not from the parser) -------------
PERF_BLOCK = """\
llama_perf_sampler_print:    sampling time =      {s:.2f} ms /   {sn} runs   (    0.10 ms per token,  1000.00 tokens per second)
llama_perf_context_print:        load time =     618.92 ms
llama_perf_context_print: prompt eval time =     927.17 ms /    49 tokens (   18.92 ms per token,    52.85 tokens per second)
llama_perf_context_print:        eval time =   {e:.2f} ms /   {en} runs   (   79.13 ms per token,    12.64 tokens per second)
llama_perf_context_print:       total time =   20699.49 ms /   227 tokens
"""  # noqa: E501


def test_several_blocks_last_complete_wins():
    a = PERF_BLOCK.format(s=10.0, sn=10, e=1000.0, en=12)
    b = PERF_BLOCK.format(s=20.0, sn=20, e=2000.0, en=24)
    truncated = "\n".join(PERF_BLOCK.format(s=30.0, sn=30, e=3000.0, en=36).splitlines()[:3])
    rec = parse_text(a + "some text\n" + b + truncated)
    assert rec.sample_ms == 20.0 and rec.eval_ms == 2000.0 and rec.eval_runs == 24
    assert any("incomplete" in w for w in rec.warnings)


def test_only_truncated_block_gives_partial_record():
    truncated = "\n".join(PERF_BLOCK.format(s=30.0, sn=30, e=3000.0, en=36).splitlines()[:3])
    rec = parse_text(truncated)
    assert rec.sample_ms == 30.0 and rec.load_ms == 618.92 and rec.prompt_tokens == 49
    assert rec.eval_ms is None and rec.total_ms is None and "total_ms" in rec.missing
    assert any("partial" in w for w in rec.warnings)


def test_only_a_sampler_line():
    rec = parse_text("llama_perf_sampler_print:    samplers time =       2.50 ms /    20 runs\n")
    assert rec.sample_ms == 2.5 and rec.sample_runs == 20
    assert rec.sample_tps == pytest.approx(8000.0)  # derived: 20 runs / 2.5 ms
    assert rec.source_format == "llama_perf"
    assert set(rec.missing) == set(FIELDS) - {"sample_ms", "sample_runs", "sample_tps"}


@pytest.mark.parametrize(
    "data",
    [
        "",
        "   \n\n",
        b"",
        bytes(range(256)) * 40,
        b"\x00\xff\xfe\x00llama_perf_context_print: load time = \xff\xfe ms\x00",
        "llama_print_timings:        load time = ",
        "llama_print_timings: eval time = abc ms / x runs",
        "| model | t/s | test |\n| --- |\n| x | nope | tg |",
        '[{"avg_ts": ',
        '{"msg": 5}',
    ],
)
def test_garbage_never_raises(data):
    rec = parse_text(data)
    assert isinstance(rec, TimingRecord)
    assert rec.missing == [f for f in FIELDS if getattr(rec, f) is None]
    assert isinstance(parse_llama_bench(data), list)


def test_binary_garbage_reports_nothing_found():
    rec = parse_text(bytes(range(256)) * 40)
    assert not rec.found_anything and rec.missing == list(FIELDS) and rec.warnings


def test_ansi_prefix_decimal_comma_and_glued_text():
    text = (
        "\x1b[34m0.01.106.055\x1b[0m \x1b[32mI \x1b[0mcommon_perf_print:    sampling time =       7,45 ms\n"
        "0.01.106.056 I common_perf_print:    samplers time =       2,63 ms /    17 tokens\n"
        "0.01.106.057 I common_perf_print:        load time =    4924,25 ms\n"
        "and the answer is 42.0.01.106.058 I common_perf_print: prompt eval time =     487,36 ms /     9 tokens "
        "(   54,15 ms per token,    18,47 tokens per second)\n"
        "0.01.106.059 I common_perf_print:        eval time =    1992,43 ms /     7 runs   "
        "(  284,63 ms per token,     3,51 tokens per second)\n"
        "0.01.106.060 I common_perf_print:       total time =    2733,40 ms /    16 tokens\n"
    )
    rec = parse_text(text)
    assert rec.source_format == "common_perf_print"
    assert (rec.sample_ms, rec.sample_runs) == (2.63, 17)
    assert (rec.load_ms, rec.prompt_eval_ms, rec.prompt_tokens, rec.prompt_tps) == (4924.25, 487.36, 9, 18.47)
    assert (rec.eval_ms, rec.eval_runs, rec.eval_tps, rec.total_ms, rec.total_tokens) == (1992.43, 7, 3.51, 2733.4, 16)


def test_jsonl_log_lines_and_crlf():
    lines = [
        '{"type": "log", "time": 1, "level": "I", "msg": "llama_perf_context_print:        load time =  10.00 ms\\n"}',
        '{"type": "log", "time": 2, "level": "I", "msg": "llama_perf_context_print: prompt eval time =  20.00 ms /'
        '     4 tokens (    5.00 ms per token,   200.00 tokens per second)\\n"}',
        "llama_perf_context_print:        eval time =      30.00 ms /     3 runs   (   10.00 ms per token,"
        "   100.00 tokens per second)",
        "llama_perf_context_print:       total time =      70.00 ms /     7 tokens",
    ]
    rec = parse_text("\r\n".join(lines))
    assert (rec.load_ms, rec.prompt_tokens, rec.eval_runs, rec.total_ms) == (10.0, 4, 3, 70.0)


def test_utf16_file_and_unreadable_file(tmp_path: Path):
    text = "llama_perf_context_print:       total time =      70.00 ms /     7 tokens\n"
    p = tmp_path / "ps.log"
    p.write_bytes(text.encode("utf-16"))  # with BOM, as PowerShell's '>' writes it
    assert parse_file(p).total_ms == 70.0
    from mvlm_core.errors import MvlmError

    with pytest.raises(MvlmError, match="does not exist"):
        parse_file(tmp_path / "nope.log")
    with pytest.raises(MvlmError, match="directory"):
        parse_file(tmp_path)


def test_msvc_infinity_and_nan():
    text = (
        "llama_print_timings:        eval time =     0.00 ms /     1 runs   (    0.00 ms per token,   1.#INF tokens "
        "per second)\nllama_print_timings:       total time =  10.00 ms\n"
        "llama_print_timings: prompt eval time =     0.00 ms /     0 tokens (     -nan ms per token,     -nan tokens "
        "per second)\n"
    )
    rec = parse_text(text)
    assert rec.eval_ms == 0.0 and rec.eval_tps is None and rec.prompt_tps is None and rec.total_ms == 10.0
    assert all(v is None or math.isfinite(v) for v in (getattr(rec, f) for f in FIELDS))


def test_mtmd_lines_after_perf_block_still_count():
    # mid-2025 mtmd-helper printed to buffered stdout: its lines can land after the stderr perf block
    perf = PERF_BLOCK.format(s=1.0, sn=5, e=100.0, en=4)
    tail = "image slice encoded in 500 ms\ndecoding image batch 1/2, n_tokens_batch = 100\n"
    tail += "decoding image batch 2/2, n_tokens_batch = 44\nimage decoded (batch 2/2) in 30 ms\n"
    rec = parse_text(perf + tail)
    assert rec.vision_encode_ms == 500.0 and rec.image_tokens == 144
    assert rec.vision_ms_per_token == pytest.approx(500.0 / 144)


def test_main_march_2023_predict_line():
    text = (
        "main:     load time =  1234.56 ms\nmain:   sample time =    12.00 ms\n"
        "main:  predict time =  2046.39 ms / 41.76 ms per token\nmain:    total time =  3500.00 ms\n"
    )
    rec = parse_text(text)
    assert rec.source_format == "main"
    assert (rec.load_ms, rec.sample_ms, rec.eval_ms, rec.total_ms) == (1234.56, 12.0, 2046.39, 3500.0)
    assert rec.eval_runs is None and rec.eval_tps is None  # no count printed: nothing derived


def test_llama_bench_csv_with_stderr_noise():
    header = "build_commit,build_number,model_filename,model_type,n_threads,n_prompt,n_gen,avg_ns,stddev_ns,avg_ts,stddev_ts"
    rows = [
        '"0c1e570","1","m.gguf","llama ?B Q4_1","2","16","0","1000000","0","16000.000000","0.000000"',
        '"0c1e570","1","m.gguf","llama ?B Q4_1","2","0","8","80000000","1000","100.000000","1.500000"',
    ]
    text = "load_backend: loaded CPU backend\n" + header + "\n" + "\n".join(rows) + "\nllama_memory_breakdown: x\n"
    got = parse_llama_bench(text)
    assert [(r["n_prompt"], r["n_gen"], r["avg_ts"]) for r in got] == [(16, 0, 16000.0), (0, 8, 100.0)]
    assert got[0]["model_type"] == "llama ?B Q4_1" and got[0]["n_threads"] == 2
    rec = parse_text(text)
    assert rec.source_format == "llama-bench-csv"
    assert (rec.prompt_tokens, rec.prompt_eval_ms, rec.eval_runs, rec.eval_ms) == (16, 1.0, 8, 80.0)


def test_llama_bench_md_rows_without_a_rate_are_dropped():
    text = "| model | test | t/s |\n| --- | --- | --- |\n| model | test | t/s |\n| x | tg8 | n/a |\n"
    assert parse_llama_bench(text) == []
    good = text + "| x | tg8 | 5.00 ± 0.10 |\n\nbuild: abc123 (42)\n"
    assert parse_llama_bench(good) == [
        {"model_type": "x", "test": "tg8", "n_prompt": 0, "n_gen": 8, "n_depth": 0, "avg_ts": 5.0, "stddev_ts": 0.1,
         "build_commit": "abc123", "build_number": 42}
    ]  # fmt: skip
