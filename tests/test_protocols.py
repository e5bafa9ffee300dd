"""The imp (Imp Table 4) and dataset (Xmodel-VLM Table 6) protocols of `mvlm bench`, end to end on a tiny converted
MobileVLM V2 with the real host runtime (llama-mtmd-cli, llama-server), through the history into `mvlm report --paper`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from peers import small_gguf

MVLM = [sys.executable, "-m", "mvlm"]


def mvlm(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*MVLM, *map(str, args)], capture_output=True, text=True, errors="replace", timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def local_profile(tmp_path: Path, name: str = "protolocal") -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(f'name = "{name}"\ntransport = "local"\nworkdir = "{tmp_path / "device"}"\ntarget = "host"\n'
                 "threads = 2\n")
    return p


@pytest.fixture(scope="module")
def tiny_v2(tmp_path_factory, host_runtime) -> tuple[Path, Path, Path]:
    """(LM GGUF, mmproj GGUF, checkpoint dir) of a tiny random MobileVLM V2, converted to F32 by the real CLI."""
    d = tmp_path_factory.mktemp("protocols")
    ck, out = d / "ckpt", d / "out"
    subprocess.run([sys.executable, "-m", "mvlm_convert.tiny", str(ck), "--variant", "v2"], check=True,
                   capture_output=True, timeout=300)
    r = mvlm("convert", ck, "--outtype", "f32", "-o", out)
    assert r.returncode == 0, r.stderr[-2000:]
    lm = next(p for p in out.glob("*.gguf") if not p.name.startswith("mmproj-"))
    return lm, next(out.glob("mmproj-*.gguf")), ck


def _question_set(d: Path, n: int = 5) -> Path:
    """A few real PNGs (one used twice) and a LLaVA-format question file referencing them relatively."""
    from PIL import Image

    rng = np.random.default_rng(7)
    (d / "img").mkdir(parents=True)
    for i in range(3):
        Image.fromarray((rng.random((48 + 16 * i, 64, 3)) * 255).astype("uint8")).save(d / "img" / f"{i}.png")
    lines = [json.dumps({"question_id": f"q{i}", "image": f"img/{i % 3}.png",
                         "text": f"Question {i}: which shape is shown?\nA. circle\nB. square"}) for i in range(n)]
    f = d / "q.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def _median(xs):
    return float(np.median([x for x in xs if x is not None]))


# --------------------------------------------------------------------------------------------------- imp


@pytest.mark.slow
def test_imp_prompt_is_41_tokens_of_the_models_own_tokenizer(tiny_v2):
    """Counted again with the checkpoint's own SentencePiece model (not llama.cpp): 41 tokens, a prefix of the request."""
    import sentencepiece as spm

    from mvlm_bench.plan.imp_prompt import IMP_SOURCE, IMP_TEXT_TOKENS, imp_prompt

    lm, _, ck = tiny_v2
    text = imp_prompt(lm)
    sp = spm.SentencePieceProcessor(model_file=str(ck / "tokenizer.model"))
    assert len(sp.encode(text)) == IMP_TEXT_TOKENS == 41
    assert IMP_SOURCE.startswith(text) and len(text) < len(IMP_SOURCE)


@pytest.mark.slow
def test_imp_bench_save_and_paper_report(tmp_path, tiny_v2):
    lm, mmproj, _ = tiny_v2
    db, js = tmp_path / "h.sqlite", tmp_path / "imp.json"
    r = mvlm("bench", "--device", local_profile(tmp_path), "--protocol", "imp", "--model", lm, "--mmproj", mmproj,
             "--repeat", 2, "--save", "--db", db, "--json-file", js, "--markdown", tmp_path / "imp.md")
    assert r.returncode == 0, r.stderr[-3000:]
    (rec,) = json.loads(js.read_text())
    assert rec["protocol"] == "imp" and rec["params"]["n_predict"] == 64 and rec["params"]["n_text"] == 41
    for run in rec["runs"]:
        m, t = run["metrics"], run["timing"]
        # -n 64 --ignore-eos: llama.cpp decoded 63 tokens after the first sampled one, whatever the random model says
        assert t["eval_runs"] == 63 and m["n_gen"] == 64
        assert m["n_prompt"] == t["prompt_tokens"] > t["image_tokens"] + 41  # text + template + image embeddings
        assert m["t_ve_s"] == pytest.approx(t["vision_encode_ms"] / 1000)
        assert m["s_gen_tps"] == pytest.approx(t["eval_tps"])
        lm_prompt_s = (t["prompt_eval_ms"] - t["vision_encode_ms"]) / 1000  # the encode sits inside prompt eval
        assert m["s_prompt_tps"] == pytest.approx(t["prompt_tokens"] / lm_prompt_s)
        assert m["t_total_s"] == pytest.approx(t["after_load_ms"] / 1000)
        # loading excluded: less than llama.cpp's own total (which holds the mmproj's loading) and the process's wall
        assert 0 < m["t_total_s"] < t["total_ms"] / 1000 < m["total_s"]
        parts = m["t_ve_s"] + m["n_prompt"] / m["s_prompt_tps"] + m["n_gen"] / m["s_gen_tps"]
        assert m["t_other_s"] == pytest.approx(m["t_total_s"] - parts)
        assert m["load_s"] == pytest.approx(t["load_ms"] / 1000)
    md = (tmp_path / "imp.md").read_text()
    assert md.startswith("| Model | Hardware | Precision | Size (GB) | T_VE (s) | S_prompt (tokens/s) | S_gen (tokens/s) "
                         "| T_total (s) |")

    p = mvlm("report", "--paper", "imp", "--db", db, "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    (table,) = json.loads(p.stdout)["tables"]
    (mine,) = table["your_rows"]
    assert table["fill_command"] is None and mine["repetitions"] == 2
    for key in ("t_ve_s", "s_prompt_tps", "s_gen_tps", "t_total_s"):
        assert mine["metrics"][key] == pytest.approx(_median(r["metrics"][key] for r in rec["runs"]))
    for key in ("n_prompt", "n_gen", "t_other_s", "load_s"):
        assert mine["extra"][key] == pytest.approx(_median(r["metrics"][key] for r in rec["runs"]))
    text = mvlm("report", "--paper", "imp", "--db", db)
    assert text.returncode == 0 and "yours id:1" in text.stdout and "not in this version" not in text.stdout


# --------------------------------------------------------------------------------------------------- dataset


@pytest.mark.slow
def test_dataset_whole_set_through_one_server(tmp_path, tiny_v2):
    lm, mmproj, _ = tiny_v2
    data = _question_set(tmp_path / "set")
    db, js = tmp_path / "h.sqlite", tmp_path / "ds.json"
    r = mvlm("bench", "--device", local_profile(tmp_path), "--protocol", "dataset", "--data", data, "--model", lm,
             "--mmproj", mmproj, "-n", 8, "--repeat", 1, "--warmup", 1, "--save", "--db", db, "--json-file", js)
    assert r.returncode == 0, r.stderr[-3000:]
    (rec,) = json.loads(js.read_text())
    (run,) = rec["runs"]
    per, m = run["per_sample"], run["metrics"]
    assert [s["question_id"] for s in per] == [f"q{i}" for i in range(5)] and m["n_samples"] == 5
    lat = [s["latency_s"] for s in per]
    for q in (50, 90, 99):
        assert m[f"p{q}_s"] == pytest.approx(float(np.percentile(lat, q)))
    assert all(0 < s["predicted_n"] <= 8 and s["cache_n"] == 0 for s in per)  # no sample reused another's prompt
    assert m["samples_tps"] == pytest.approx(sum(s["predicted_n"] for s in per) * 1000 / sum(s["predicted_ms"] for s in per))
    assert sum(lat) <= m["total_s"] < sum(lat) + 1.0  # the set's wall time: the requests, back to back
    assert m["load_s"] > 0 and rec["params"]["n_samples"] == 5 and rec["params"]["data"] == "q.jsonl"

    # one loaded model: the server's log holds one model load and one timing block per request (warm-up included)
    log = Path(re.search(r"\(log: (\S+?)\)", r.stderr.replace("\n", "")).group(1))
    text = log.read_text(errors="replace")
    assert len(re.findall(r"llama_model_loader: loaded meta data", text)) == 1
    assert len(re.findall(r"print_timing: .*total time", text)) == 5 + 1
    # the images went once each, under their content's name (q3, q4 reuse img/0.png and img/1.png)
    pushed = sorted(p.name for p in (tmp_path / "device" / "images" / "ds").iterdir())
    want = sorted(hashlib.sha256((data.parent / "img" / f"{i}.png").read_bytes()).hexdigest()[:16] + ".png"
                  for i in range(3))
    assert pushed == want

    p = mvlm("report", "--paper", "xmodel", "--db", db, "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    (table,) = json.loads(p.stdout)["tables"]
    (mine,) = table["your_rows"]
    assert mine["metrics"]["samples_tps"] == pytest.approx(m["samples_tps"])
    assert mine["metrics"]["total_s"] == pytest.approx(m["total_s"])
    assert mine["extra"]["n_samples"] == 5
    for q in (50, 90, 99):
        assert mine["extra"][f"p{q}_s"] == pytest.approx(m[f"p{q}_s"])


def _bad_sets(d: Path) -> list[tuple[str, Path, str]]:
    from PIL import Image

    d.mkdir()
    Image.new("RGB", (8, 8)).save(d / "ok.png")
    good = json.dumps({"question_id": 1, "image": "ok.png", "text": "What?"})
    second = json.dumps({"question_id": 2, "image": "ok.png", "text": "Why?"})
    (d / "badjson.jsonl").write_text(f"{good}\n{second}\n{{not json\n")
    (d / "noimage.jsonl").write_text(f"{good}\n" + json.dumps({"question_id": 2, "image": "gone.png", "text": "Q"}))
    (d / "empty.jsonl").write_text("\n  \n")
    (d / "textonly.jsonl").write_text(json.dumps({"question_id": 3, "text": "Q"}) + "\n")
    # a 50-million-character text (it once made the bench hang at 2.3 GB) and a question id used twice (1 and "1")
    (d / "huge.jsonl").write_text(f"{good}\n" + json.dumps({"question_id": 2, "image": "ok.png", "text": "x" * 50_000_000}))
    (d / "dup.jsonl").write_text(f"{good}\n{second}\n" + json.dumps({"question_id": "1", "image": "ok.png", "text": "Q"}))
    return [("missing file", d / "nope.jsonl", "does not exist"), ("bad JSON", d / "badjson.jsonl", "line 3 is not JSON"),
            ("missing image", d / "noimage.jsonl", "line 2 (question 2): image"),
            ("no samples", d / "empty.jsonl", "holds no samples"), ("no image key", d / "textonly.jsonl", "line 1"),
            ("huge line", d / "huge.jsonl", "line 2 is longer than 1 MiB"),
            ("duplicate id", d / "dup.jsonl", "line 3: question_id 1 is also line 1's")]


@pytest.mark.slow  # seven CLI runs (~6 s)
def test_dataset_bad_data_is_one_line_exit_2_nothing_pushed(tmp_path, smollm2_gguf):
    prof = local_profile(tmp_path)
    for what, f, needle in _bad_sets(tmp_path / "sets"):
        r = mvlm("bench", "--device", prof, "--protocol", "dataset", "--data", f, "--model", smollm2_gguf,
                 "--mmproj", smollm2_gguf, timeout=120)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2, (what, r.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (what, lines)
        assert "Traceback" not in r.stderr and str(f.name) in lines[0]
    assert not (tmp_path / "device").exists()  # nothing was pushed


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says width × height (one empty IDAT): what PIL sees on open, without the pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def test_question_file_checks_say_what_is_wrong(tmp_path):
    """Each check of the question file (load_samples, before anything is pushed) names the line and the actual
    problem; BOM and CRLF files (Windows editors) are read like any other."""
    from PIL import Image

    from mvlm_bench.plan.dataset import MAX_TEXT_CHARS, load_samples
    from mvlm_core.errors import MvlmError

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "fifo.png")
    _png_header_only(tmp_path / "bomb.png", 30000, 30000)

    def refused(lines: list[dict | str], name: str = "q.jsonl") -> str:
        f = tmp_path / name
        f.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
        with pytest.raises(MvlmError) as e:
            load_samples(f)
        msg = str(e.value)
        assert "\n" not in msg and "}}" not in msg and "{{" not in msg, msg
        return msg

    ok = {"question_id": 1, "image": "ok.png", "text": "What?"}
    assert "image " + str(tmp_path / "fifo.png") + " is a FIFO (named pipe), not a file" in refused(
        [{**ok, "image": "fifo.png"}], "a.jsonl")
    assert "is a character device, not a file" in refused([{**ok, "image": "/dev/zero"}], "b.jsonl")
    msg = refused([{**ok, "image": "bomb.png"}], "c.jsonl")
    assert "is too large (30000×30000 pixels" in msg and "not an image" not in msg, msg
    msg = refused([{**ok, "text": ["q"]}], "d.jsonl")
    assert '"text" must be a string (the question), not a JSON array' in msg, msg
    assert 'has no "text"' in refused([{"question_id": 1, "image": "ok.png"}], "e.jsonl")
    msg = refused([{**ok, "text": "y" * (MAX_TEXT_CHARS + 1)}], "f.jsonl")
    assert f"{MAX_TEXT_CHARS + 1:,} characters, over the limit of {MAX_TEXT_CHARS:,}" in msg, msg
    msg = refused([ok, "[1, 2]"], "g.jsonl")
    assert 'line 2 is a JSON array, not an object: write one {"question_id", "image", "text"} object per line' in msg
    msg = refused([ok, {**ok, "question_id": 2}, {**ok, "question_id": "1"}], "h.jsonl")
    assert "line 3: question_id 1 is also line 1's" in msg, msg
    # a text exactly at the limit passes
    f = tmp_path / "limit.jsonl"
    f.write_text(json.dumps({**ok, "text": "z" * MAX_TEXT_CHARS}) + "\n")
    assert len(load_samples(f)[0].text) == MAX_TEXT_CHARS

    # Windows: a UTF-8 BOM and CRLF line ends are fine, and give the same samples as the plain file
    rows = [ok, {**ok, "question_id": "q2", "text": "Which?\nA. x\nB. y"}]
    plain, win = tmp_path / "plain.jsonl", tmp_path / "win.jsonl"
    plain.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    win.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r) for r in rows).encode() + b"\r\n")
    got = load_samples(win)
    assert [(s.line, s.question_id, s.text, s.device_name) for s in got] == \
        [(s.line, s.question_id, s.text, s.device_name) for s in load_samples(plain)]
    assert [s.question_id for s in got] == ["1", "q2"]


@pytest.mark.slow
def test_data_option_belongs_to_the_dataset_protocol(tmp_path, smollm2_gguf):
    r = mvlm("bench", "--device", local_profile(tmp_path), "--protocol", "vlm", "--data", tmp_path / "q.jsonl",
             "--model", smollm2_gguf, "--mmproj", smollm2_gguf, timeout=120)
    assert r.returncode == 2 and "--data is for the dataset protocol" in r.stderr
    r = mvlm("bench", "--device", local_profile(tmp_path), "--protocol", "dataset", "--model", smollm2_gguf,
             "--mmproj", smollm2_gguf, timeout=120)
    assert r.returncode == 2 and "needs --data FILE.jsonl" in r.stderr


def test_after_load_is_read_from_mtmd_timestamps():
    from mvlm_bench.records.timings import parse_text

    log = "\n".join([
        "0.00.012.000 I llama_context: constructing llama_context",
        "0.00.049.766 I main: loading model: /x/m.gguf",
        "0.00.056.703 I encoding mtmd batch, n_chunks = 1 (done = 1, total = 3)",
        "0.00.078.668 I mtmd batch encoding done in 22 ms",
        "0.00.107.479 I llama_perf_context_print:        load time =       9.10 ms",
        "0.00.107.482 I llama_perf_context_print: prompt eval time =      32.23 ms /   274 tokens (    0.12 ms per "
        "token,  8501.40 tokens per second)",
        "0.00.107.483 I llama_perf_context_print:        eval time =      18.43 ms /    63 runs   (    0.29 ms per "
        "token,  3418.71 tokens per second)",
        "0.01.107.559 I llama_perf_context_print:       total time =      85.95 ms /   337 tokens",
    ])
    rec = parse_text(log)
    assert rec.after_load_ms == pytest.approx(1107.559 - 49.766)  # 0 min 1 s 107.559 ms minus 0 min 0 s 49.766 ms
    assert parse_text(re.sub(r"^\S+ I ", "", log, flags=re.M)).after_load_ms is None  # no timestamps, no figure


@pytest.mark.slow
def test_dataset_over_real_sshd_through_a_tunnel(sshd, tmp_path, tiny_v2):
    from peers import run_bench as run_dataset

    from mvlm_bench.plan.spec import BenchSpec

    lm, mmproj, _ = tiny_v2
    data = _question_set(tmp_path / "set", n=3)
    prof = sshd.profile(str(tmp_path / "remote"), target="host", threads=2)
    spec = BenchSpec("dataset", lm, mmproj=mmproj, data=data, repeat=1, warmup=0, n_predict=4)
    res = run_dataset(prof, spec)
    assert not res.failures, res.failures
    (run,) = res.runs
    assert run.extra["n_samples"] == 3 == len(run.per_sample) and run.wall_s == run.extra["total_s"]
    assert (tmp_path / "remote" / "images" / "ds").is_dir()
    assert run_dataset(prof, spec).outcome.pushed_bytes == 0  # the images (and everything else) are on the device already


def test_an_mmproj_named_like_the_model_gets_its_own_device_path(tmp_path):
    """Two directories, one file name (out/M-F16.gguf and mm/M-F16.gguf): one device path for both had the mmproj's
    push replace the model, and the run failed with "CLIP cannot be used as main model"."""
    from types import SimpleNamespace

    from mvlm_bench.plan.protocols import artifacts

    (tmp_path / "out").mkdir()
    (tmp_path / "mm").mkdir()
    lm, mm = small_gguf(tmp_path / "out" / "M-F16.gguf"), small_gguf(tmp_path / "mm" / "M-F16.gguf", "clip")
    rt = SimpleNamespace(exe=lambda b: lm, lib=tmp_path / "no-lib")
    spec = SimpleNamespace(protocol="vlm", model=lm, mmproj=mm, image=lm, data=None)
    files, names = artifacts(rt, spec)
    assert files["models/M-F16.gguf"] == lm and files["models/mmproj/M-F16.gguf"] == mm
    assert names["mmproj"] == "mmproj/M-F16.gguf"
