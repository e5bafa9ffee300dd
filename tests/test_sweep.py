"""``mvlm bench`` sweeps (mvlm_bench/sweep.py): the cross product of --model x --threads x --n-gpu-layers x --ctx-size,
one record per configuration, --delay between runs and the --max-temp wait (docs/devices.md, 'Sweeps').

The sweep runs for real on the ``local`` device with the real SmolLM2 GGUF and the real host build; the thermal wait
reads a real directory tree of thermal_zone*/temp files that a background thread changes."""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from peers import small_gguf
from test_faults_bench import _one_line, mvlm
from test_faults_bench import local_profile as _local_profile

from mvlm_bench.device import thermal
from mvlm_bench.device.profiles import load_profile
from mvlm_bench.device.transports.local import LocalTransport
from mvlm_bench.plan.spec import BenchSpec
from mvlm_bench.plan.sweep import configurations, varying
from mvlm_bench.session.pacing import CoolingTimeout, Pacer
from mvlm_core.errors import MvlmError


def profile_file(tmp_path: Path, name: str = "sweeplocal") -> Path:
    return _local_profile(tmp_path, name)  # a local profile, workdir tmp_path/dev-NAME, 2 threads


def two_models(tmp_path: Path, gguf: Path) -> list[Path]:
    """The same real GGUF under two names: two models to the sweep (their records differ by model name)."""
    out = []
    for stem in ("alpha", "beta"):
        p = tmp_path / f"{stem}-Q4_1.gguf"
        p.write_bytes(Path(gguf).read_bytes())
        out.append(p)
    return out


@pytest.mark.slow
def test_sweep_runs_the_cross_product_one_record_per_configuration(tmp_path, smollm2_gguf, host_runtime):
    models = two_models(tmp_path, smollm2_gguf)
    threads, repeat, delay = [1, 2], 2, 0.4
    out, csv_out, md, db = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.md", tmp_path / "h.sqlite"
    r = mvlm("bench", "--device", profile_file(tmp_path), "-m", models[0], "-m", models[1], "-t", ",".join(map(str, threads)),
             "-n", 8, "--repeat", repeat, "--delay", delay, "--max-temp", 95, "--json-file", out, "--csv", csv_out,
             "--markdown", md, "--save", "--db", db)
    assert r.returncode == 0, r.stderr
    records = json.loads(out.read_text())
    want = list(itertools.product([m.stem for m in models], threads))
    assert [(rec["model"], rec["n_threads"]) for rec in records] == want
    for rec in records:
        assert rec["params"]["n_threads"] == rec["n_threads"] and rec["repetitions"] == repeat
        assert rec["params"]["n_predict"] == 8
    # one table, one row per configuration (the threads, since they vary, are a column of their own)
    assert r.stdout.count("Latency (medians over repetitions)") == 1 and "Threads" in r.stdout
    for stem, t in want:
        assert len(re.findall(rf"{re.escape(stem)}\s*│\s*{t}\s*│", r.stdout)) == 1, r.stdout
    # --delay: every run after the first starts at least `delay` after the previous one ended, across configurations
    runs = sorted((run["t_start"], run["t_end"]) for rec in records for run in rec["runs"])
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(runs)]
    assert len(gaps) == len(want) * repeat - 1 and min(gaps) >= delay, gaps
    # CSV: one row per repetition, each with its configuration's threads; Markdown: one row per configuration
    rows = list(csv.DictReader(io.StringIO(csv_out.read_text())))
    assert len(rows) == len(want) * repeat
    assert sorted({(row["model"], json.loads(row["params"])["n_threads"]) for row in rows}) == sorted(want)
    text = md.read_text()
    assert all(f"| {s} | {t} |" in text for s, t in want) and text.startswith("| Model | Threads |")
    # --save: each configuration is its own history entry
    with sqlite3.connect(db) as con:
        entries = con.execute("SELECT model, params FROM entry ORDER BY id").fetchall()
    assert [(m, json.loads(p)["n_threads"]) for m, p in entries] == want
    # the device's notes are said once for the sweep, not once per configuration
    if thermal.read_celsius(LocalTransport(load_profile(str(profile_file(tmp_path))))) is None:
        assert r.stderr.count("--max-temp cannot wait for it to cool") == 1, r.stderr
        assert r.stderr.count("has no readable thermal zone (/sys/class/thermal/thermal_zone*/temp): temperatures") == 1
    # the model files went to the device once each: the later configurations found them there
    assert r.stderr.count("already on the device") == len(want)


@pytest.mark.slow
@pytest.mark.parametrize("args, said", [
    (["--threads", "1,,2"], "--threads '1,,2' has an empty item"),
    (["--threads", "0"], "--threads 0 is out of range"),
    (["--threads", "1,x"], "'x' is not a whole number"),
    (["--threads", "2,2"], "names 2 twice"),
    (["--ctx-size", "10"], "--ctx-size 10 is out of range"),
    (["--ctx-size", "4096,10"], "--ctx-size 10 is out of range"),
    (["--n-gpu-layers", "0,-2"], "--n-gpu-layers -2 is out of range"),
    (["--delay", "-1"], "--delay -1.0 is out of range"),
    (["--max-temp", "0"], "--max-temp 0.0 is out of range"),
    (["-t", "1,2", "--against", "threads=4"], "--against compares one configuration, and this is a sweep of 2"),
    (["-t", "1,2", "--protocol", "dataset"], "runs the lm, vlm, imp, llama-bench protocols, not dataset"),
])
def test_bad_sweeps_are_refused_in_one_line(tmp_path, smollm2_gguf, args, said):
    r = mvlm("bench", "--device", profile_file(tmp_path), "--model", smollm2_gguf, "-n", 8, *args)
    line = _one_line(r.stderr)
    assert r.returncode == 2 and said in line, line
    assert not (tmp_path / "dev-sweeplocal").exists()  # nothing pushed


def test_the_same_model_twice_is_refused(tmp_path, smollm2_gguf):
    with pytest.raises(MvlmError, match="given twice"):
        configurations(BenchSpec("lm", Path(smollm2_gguf)), [smollm2_gguf, smollm2_gguf])


def test_configurations_cover_the_cross_product_in_order(smollm2_gguf):
    specs = configurations(BenchSpec("lm", Path(smollm2_gguf), n_predict=8), [smollm2_gguf], "1,2,4", "0,1",
                                 "512,1024")
    assert [(s.threads, s.n_gpu_layers, s.ctx_size) for s in specs] == list(itertools.product([1, 2, 4], [0, 1],
                                                                                             [512, 1024]))
    assert varying(specs) == ["threads", "n_gpu_layers", "ctx_size"]
    one = configurations(BenchSpec("lm", Path(smollm2_gguf)), [smollm2_gguf])
    assert len(one) == 1 and one[0].threads is None and one[0].ctx_size == 2048  # unchanged single configuration


# ------------------------------------------------------------------------------------------------ --max-temp


def zones(root: Path, *millideg: int) -> list[Path]:
    files = []
    for i, v in enumerate(millideg):
        d = root / f"thermal_zone{i}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "temp").write_text(f"{v}\n")
        files.append(d / "temp")
    return files


@pytest.fixture
def local(tmp_path):
    return LocalTransport(load_profile(str(profile_file(tmp_path))))


@pytest.mark.slow
def test_max_temp_waits_until_the_hottest_zone_cools(tmp_path, local):
    root = tmp_path / "thermal"
    hot, _ = zones(root, 71500, 30000)  # the hottest zone decides, not the coolest
    statuses: list[str] = []
    pacer = Pacer(max_temp=45, max_temp_wait=30, poll_s=0.05, root=str(root), on_status=statuses.append)
    cool_after = 0.6

    def cool() -> None:
        time.sleep(cool_after)
        hot.write_text("44000\n")

    threading.Thread(target=cool, daemon=True).start()
    t0 = time.monotonic()
    pacer(local, 0, 1)
    waited = time.monotonic() - t0
    assert waited >= cool_after
    assert statuses and statuses[0].startswith("cooling: 71.5 °C ≥ 45 °C"), statuses
    assert thermal.read_celsius(local, str(root)) == 44.0 < 45  # what it saw when it let the run start


@pytest.mark.slow
def test_max_temp_gives_up_after_max_temp_wait(tmp_path, local):
    root = tmp_path / "thermal"
    zones(root, 80000)
    pacer = Pacer(max_temp=45, max_temp_wait=0.4, poll_s=0.05, root=str(root))
    t0 = time.monotonic()
    with pytest.raises(CoolingTimeout) as e:
        pacer(local)
    assert 0.4 <= time.monotonic() - t0 < 5
    assert e.value.exit_code == 3 and "stayed at 80.0 °C" in str(e.value) and "--max-temp-wait" in str(e.value)


def test_no_thermal_zone_is_said_once_and_not_waited_for(tmp_path, local):
    root = tmp_path / "empty"
    root.mkdir()
    said: list[str] = []
    pacer = Pacer(max_temp=45, max_temp_wait=60, poll_s=5, root=str(root), log=said.append)
    t0 = time.monotonic()
    for i in range(3):
        pacer(local, i, 3)
    assert time.monotonic() - t0 < 1
    assert len(said) == 1 and "has no readable thermal zone" in said[0]


@pytest.mark.slow
def test_delay_sleeps_before_every_run_but_the_first(local):
    pacer = Pacer(delay=0.3)
    t0 = time.monotonic()
    stamps = []
    for i in range(3):
        pacer(local, i, 3)
        stamps.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert stamps[0] - t0 < 0.3 and all(g >= 0.3 for g in gaps), (stamps[0] - t0, gaps)


@pytest.mark.slow
def test_a_failed_configuration_does_not_cost_the_completed_ones_with_save(tmp_path, smollm2_gguf, host_runtime):
    """The second model's header is garbage llama.cpp refuses only when it loads it: its run fails; --save still stores
    the configuration that completed before it, and the error says so. (A model cut short, a whole header with half
    its tensor data, is refused with every other input before the first configuration runs.)"""
    good, bad = two_models(tmp_path, smollm2_gguf)
    db = tmp_path / "h.sqlite"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    r = mvlm("bench", "--device", profile_file(tmp_path), "-m", good, "-m", bad, "-n", 8, "--repeat", 1, "--warmup", 0,
             "--save", "--db", db)
    assert r.returncode == 2 and f"--model {bad} is truncated" in r.stderr and "run 1/" not in r.stderr, r.stderr
    assert not db.exists()
    small_gguf(bad)  # a whole header that llama.cpp cannot load
    r = mvlm("bench", "--device", profile_file(tmp_path), "-m", good, "-m", bad, "-n", 8, "--repeat", 1, "--warmup", 0,
             "--save", "--db", db)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 3 and len(errors) == 1, r.stderr
    assert "exited with status 1" in errors[0] and "the 1 repetition(s) measured before it were kept in the history" in errors[0]
    with sqlite3.connect(db) as con:
        assert [m for (m,) in con.execute("SELECT model FROM entry")] == [good.stem]
