"""`mvlm tune`: the search's logic (scripted latencies: what successive halving keeps, drops and recommends), and the
whole command on real models and a real device (the tiny MobileVLM V2 and the real SmolLM2 on this machine, SmolLM2
on the emulated arm64 device): files made and cached, fidelity measured once, a second tune measuring nothing,
the budget excluding the fastest candidate, a tie within noise said as a tie, the history, --apply."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from mvlm_tune import space
from mvlm_tune.frontier import Point, dominates, frontier, noise, recommend
from mvlm_tune.search import search

REPO = Path(__file__).resolve().parents[1]
MVLM = [sys.executable, "-m", "mvlm"]


# --- the search, on scripted latencies -------------------------------------------------------------------------------
def _points(spec: dict[str, tuple[float, float]], budget: space.Budget) -> list[Point]:
    """``spec``: LM type -> (KL, true latency s)."""
    out = []
    for lm, (kl, _) in spec.items():
        fid = {"kl": kl, "top1": 1.0 - kl}
        out.append(Point(space.Candidate(lm), fid, in_budget=budget.allows(fid)))
    return out


def _measure(spec: dict[str, tuple[float, float]], jitter: float, seed: int = 1, log: list | None = None):
    """A measure that gives each candidate its true latency times (1 +- jitter), seeded: the search's input only."""
    rng = random.Random(seed)

    def measure(batch: list[Point]) -> None:
        for p in batch:
            p.samples.append(spec[p.candidate.lm][1] * (1 + rng.uniform(-jitter, jitter)))
            if log is not None:
                log.append(p.candidate.lm)

    return measure


GRID = {"F16": (0.0, 4.0), "Q8_0": (0.004, 2.6), "Q5_K_M": (0.02, 2.1), "Q4_K_M": (0.03, 2.0), "Q4_K_S": (0.035, 2.05),
        "Q4_0": (0.09, 1.7)}


def test_successive_halving_drops_the_dominated_and_finds_the_fastest_within_budget():
    budget = space.parse_budget("kl=0.05")
    points = _points(GRID, budget)
    order: list[str] = []
    out = search(points, _measure(GRID, 0.01, log=order), repeat=5)
    by = {p.candidate.lm: p for p in points}
    # every candidate once, then only the frontier within the budget: far fewer runs than the full grid (6 x 5)
    assert set(order[:6]) == set(GRID) and out.runs < 6 * 5
    assert len(by["F16"].samples) == 5  # the most faithful is on the frontier: repeated
    assert len(by["Q4_0"].samples) == 1 and "outside the fidelity budget" in out.dropped["lm=Q4_0;mmproj=-;t=-;fa=-"]
    # Q4_K_M is more faithful and 2.5% faster: within the prior noise (5%) after one run, beyond the measured noise
    # (the 2% floor, the runs' spread being 1%) once there are repeats: Q4_K_S leaves the running early
    assert len(by["Q4_K_S"].samples) < 5
    assert out.dropped["lm=Q4_K_S;mmproj=-;t=-;fa=-"].startswith("dominated beyond noise (2.0%) by lm=Q4_K_M")
    assert len(by["Q8_0"].samples) == 5 and len(by["Q4_K_M"].samples) == 5  # the frontier within the budget
    rec = recommend(points, noise(points))
    assert rec.pick is by["Q4_K_M"] and rec.runner_up is not None
    # Q4_0 is the fastest of all but outside the budget: never recommended, still on the frontier (the plot shows it)
    assert by["Q4_0"] in frontier(points)


def test_two_candidates_within_noise_are_a_tie_given_to_fidelity():
    spec = {"Q4_K_M": (0.03, 2.0), "Q4_0": (0.04, 2.0), "F16": (0.0, 4.0)}  # the same true latency
    points = _points(spec, space.parse_budget("kl=0.05"))
    search(points, _measure(spec, 0.03, seed=3), repeat=5)
    rec = recommend(points, noise(points))
    assert rec.why == "tie" and {p.candidate.lm for p in rec.tied} == {"Q4_K_M", "Q4_0"}
    assert rec.pick.candidate.lm == "Q4_K_M" and not rec.beyond_noise  # the more faithful one, not the luckier one


def test_a_clear_winner_is_beyond_noise():
    spec = {"Q4_K_M": (0.03, 1.0), "Q8_0": (0.004, 2.0)}
    points = _points(spec, space.parse_budget("kl=0.05"))
    search(points, _measure(spec, 0.01), repeat=5)
    rec = recommend(points, noise(points))
    # Q8_0 is more faithful, so it is not dominated: both get their 5 runs, and the gap is 100% >> the noise
    assert rec.pick.candidate.lm == "Q4_K_M" and rec.beyond_noise and rec.why == "fastest" and rec.p_value <= 0.05


def test_the_time_limit_cuts_the_search_and_says_so():
    points = _points(GRID, space.parse_budget("kl=0.05"))
    now = [0.0]

    def measure(batch):
        for p in batch:
            now[0] += GRID[p.candidate.lm][1]
            p.samples.append(GRID[p.candidate.lm][1])

    out = search(points, measure, repeat=5, time_limit=20.0, clock=lambda: now[0])
    assert now[0] <= 20.0 + 4.0  # one run first (what a run costs), then what fits by that estimate (4 s: F16)
    assert "time limit" in out.stopped and out.runs < 6 * 5


def test_a_failed_candidate_leaves_the_running_with_its_reason():
    points = _points(GRID, space.Budget())

    def measure(batch):
        for p in batch:
            if p.candidate.lm == "Q8_0":
                p.failed = "llama-completion was killed by signal 9"
            else:
                p.samples.append(GRID[p.candidate.lm][1])

    out = search(points, measure, repeat=3)
    assert out.dropped["lm=Q8_0;mmproj=-;t=-;fa=-"].startswith("failed: llama-completion was killed")
    assert recommend(points, noise(points)).pick.candidate.lm == "Q4_0"  # no budget: the fastest


def test_dominance_needs_fidelity_at_least_as_good():
    fast_bad = Point(space.Candidate("Q4_0"), {"kl": 0.1}, [1.0])
    slow_good = Point(space.Candidate("Q8_0"), {"kl": 0.01}, [2.0])
    assert not dominates(fast_bad, slow_good) and not dominates(slow_good, fast_bad)
    same_but_slower = Point(space.Candidate("Q4_0", threads=1), {"kl": 0.1}, [1.5])
    assert dominates(fast_bad, same_but_slower, 0.05) and not dominates(fast_bad, same_but_slower, 0.6)


@pytest.mark.parametrize(("text", "error"), [
    ("kl=abc", "not a number"), ("speed=1", "KEY=VALUE"), ("image_cos=2", "out of range"), ("kl", "KEY=VALUE")])
def test_bad_budgets_are_refused_in_one_line(text, error):
    with pytest.raises(Exception, match=error):
        space.parse_budget(text)


def test_budget_limits_both_ways():
    b = space.parse_budget("kl=0.05,image_cos=0.999")
    assert b.allows({"kl": 0.01, "image_cos": 0.9995}) and not b.allows({"kl": 0.06, "image_cos": 1.0})
    assert not b.allows({"kl": 0.01, "image_cos": 0.99}) and not b.allows({"kl": None, "image_cos": 1.0})


# --- the command, end to end -----------------------------------------------------------------------------------------
def mvlm(*args, cache: Path, timeout: float = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "MVLM_TUNE_CACHE": str(cache)}
    env.pop("MVLM_HISTORY", None)
    return subprocess.run([*MVLM, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny_v2(tmp_path_factory, host_runtime):
    from mvlm_convert.convert import convert
    from mvlm_convert.families.mobilevlm import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tune-tiny")
    res = convert(make_tiny_checkpoint(root / "ckpt", variant="v2", seed=0), root / "out", outtype="f32",
                  progress=False)
    return res.lm.path, res.mmproj.path


@pytest.mark.slow
def test_tune_the_tiny_mobilevlm_v2_on_this_machine(tiny_v2, tmp_path):
    lm, mm = tiny_v2
    cache, db = tmp_path / "cache", tmp_path / "h.sqlite"
    args = ("tune", lm, "--mmproj", mm, "--device", "local", "--lm-types", "input,q8_0,q4_0", "--mmproj-types",
            "input,q8_0", "--repeat", "3", "-n", "8", "--db", db, "--json", "--budget", "none")
    r = mvlm(*args, "--plot", tmp_path / "plot", cache=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(r.stdout)
    cands = {c["label"]: c for c in data["candidates"]}
    assert len(cands) == 6 and data["search"]["runs"] <= 6 * 3 and data["search"]["full_grid_runs"] == 6 * 4
    # fidelity measured against the inputs (gguf-py's reference quantizers for the mmproj, llama-quantize for the LM)
    both_inputs = cands["F32 (input) + mmproj F32 (input)"]
    assert both_inputs["kl"] == 0.0 and both_inputs["image_cos"] == 1.0
    assert cands["Q8_0 + mmproj Q8_0"]["kl"] < cands["Q4_0 + mmproj Q8_0"]["kl"]
    assert cands["Q8_0 + mmproj F32 (input)"]["image_cos"] == 1.0
    assert 0.99 < cands["Q4_0 + mmproj Q8_0"]["image_cos"] < 1.0
    (variants_dir,) = [d for d in cache.iterdir() if d.is_dir()]
    files = sorted(p.name for p in variants_dir.glob("*.gguf"))
    assert files == sorted([lm.name.replace("F32", "Q4_0"), lm.name.replace("F32", "Q8_0"),
                            mm.name.replace("F32", "Q8_0")])  # llama.cpp's names
    assert (tmp_path / "plot" / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in (tmp_path / "plot" / "tune.html").read_text()
    # every measured run is a normal history entry labelled with the session
    hist = mvlm("history", "--db", db, "--json", cache=cache)
    entries = json.loads(hist.stdout)
    assert {e["label"] for e in entries} == {data["label"]}
    assert sum(e["repetitions"] for e in entries) == data["search"]["runs"]
    # the budget now excludes the fastest measured candidate: a second tune quantizes and measures nothing new, and
    # recommends another one, showing the fastest as outside the budget
    fastest = min((c for c in data["candidates"] if c["median_s"] is not None), key=lambda c: c["median_s"])
    tighter = [f"kl={fastest['kl'] / 2:.6g}"] if fastest["kl"] else [f"image_cos={(1 + fastest['image_cos']) / 2:.9f}"]
    r2 = mvlm(*args[:-2], "--budget", *tighter, "--apply", tmp_path / "chosen", cache=cache)
    assert r2.returncode == 0, r2.stderr[-3000:]
    data2 = json.loads(r2.stdout)
    assert data2["search"]["runs"] == 0 and data2["search"]["cached_runs"] >= data["search"]["runs"]
    again = {c["label"]: c for c in data2["candidates"]}
    assert again[fastest["label"]]["status"].startswith("outside budget")
    pick = data2["recommendation"]
    assert pick["label"] != fastest["label"] and again[pick["label"]]["in_budget"]
    assert "quantizing" not in r2.stderr
    chosen = sorted(p.name for p in (tmp_path / "chosen").iterdir())
    assert "tune-profile.toml" in chosen and "tune-serve.sh" in chosen and any(n.endswith(".gguf") for n in chosen)


@pytest.mark.slow
def test_tune_smollm2_here_and_on_the_emulated_arm64_device(smollm2_gguf, tmp_path):
    """The real SmolLM2 (shipped as Q4_1: fidelity is measured against that file); the same types as each other
    and the input (input,q4_1) are the same computation: a tie the tool must call a tie, not pick by noise."""
    cache = tmp_path / "cache"
    r = mvlm("tune", smollm2_gguf, "--allow-requantize", "--lm-types", "input,q4_1", "--repeat", "5", "-n", "16",
             "--no-save", "--json", "--budget", "kl=0.02", cache=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(r.stdout)
    rows = {c["label"]: c for c in data["candidates"]}
    assert set(rows) == {"Q4_1 (input)", "Q4_1"} and rows["Q4_1 (input)"]["kl"] == 0.0 and rows["Q4_1"]["kl"] < 1e-3
    rec = data["recommendation"]
    assert rec["why"] == "tie" and rec["tied"] == list(set(rows) - {rec["label"]}) and not rec["beyond_noise"]
    assert all(c["runs"] == 5 for c in data["candidates"])  # neither beats the other: both run to the end
    profile = tmp_path / "qemu-arm64.toml"
    profile.write_text((REPO / "devices" / "qemu-arm64.toml").read_text().replace(
        "~/.cache/mvlm/device/qemu-arm64", str(tmp_path / "qdev")))
    q = mvlm("tune", smollm2_gguf, "--allow-requantize", "--lm-types", "input,q4_1", "--repeat", "2", "-n", "4",
             "--no-save", "--json", "--budget", "none", "--device", profile, cache=cache)
    assert q.returncode == 0, q.stderr[-3000:]
    qd = json.loads(q.stdout)
    assert qd["device"] == "qemu-arm64" and "quantizing" not in q.stderr  # the files made for the first tune
    assert all(c["runs"] >= 1 for c in qd["candidates"])


@pytest.mark.slow
def test_a_stop_signal_keeps_every_finished_run_and_the_next_tune_goes_on_from_them(tiny_v2, tmp_path):
    import signal
    import time

    lm, mm = tiny_v2
    cache, db = tmp_path / "cache", tmp_path / "h.sqlite"
    args = ["tune", lm, "--mmproj", mm, "--lm-types", "input,q8_0,q4_0", "--mmproj-types", "input,q8_0", "--repeat",
            "4", "-n", "8", "--db", db, "--budget", "none"]
    env = {**os.environ, "MVLM_TUNE_CACHE": str(cache)}
    env.pop("MVLM_HISTORY", None)
    proc = subprocess.Popen([*MVLM, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.monotonic() + 600
    kept = []
    while time.monotonic() < deadline and proc.poll() is None:
        kept = list(cache.glob("*/measurements.json"))
        if kept and sum(len(v) for v in json.loads(kept[0].read_text()).values()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted by SIGINT" in err and "Traceback" not in err, err[-3000:]
    cached = sum(len(v) for v in json.loads(kept[0].read_text()).values())
    hist = json.loads(mvlm("history", "--db", db, "--json", cache=cache).stdout)
    assert sum(e["repetitions"] for e in hist) == cached >= 3  # the history and the cache hold the same runs
    again = mvlm(*args, "--json", cache=cache)
    assert again.returncode == 0, again.stderr[-3000:]
    data = json.loads(again.stdout)
    assert data["search"]["cached_runs"] == cached and "quantizing" not in again.stderr


@pytest.mark.parametrize(("args", "says"), [
    (["--lm-types", "q4_x"], "--lm-types: unknown type 'q4_x'"),
    (["--budget", "kl=1,foo=2"], "--budget: 'foo=2' is not KEY=VALUE"),
    (["--protocol", "vlm"], "the vlm protocol needs --mmproj FILE"),
    (["--time-limit", "soon"], "--time-limit 'soon': give a duration"),
    (["--objective", "fast"], "--objective 'fast': choose one of"),
])
def test_bad_options_are_one_line_before_any_work(args, says, smollm2_gguf, tmp_path):
    r = mvlm("tune", smollm2_gguf, "--allow-requantize", *args, cache=tmp_path / "cache")
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and says in lines[0], r.stderr
    assert not (tmp_path / "cache").exists()  # nothing hashed, quantized or measured


@pytest.mark.slow
def test_an_mmproj_given_as_the_model_is_named(tiny_v2, tmp_path):
    lm, mm = tiny_v2
    r = mvlm("tune", mm, "--mmproj", lm, cache=tmp_path / "cache")
    assert r.returncode == 2 and "mmproj" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize(("option", "make", "says"), [
    ("--plot", "file", "--plot {p}: not a directory"),
    ("--apply", "file", "--apply {p}: not a directory"),
    ("--json-file", "dir", "--json-file"),
    ("--apply", "under-file", "--apply"),
])
def test_output_places_are_checked_before_any_work(option, make, says, smollm2_gguf, tmp_path):
    p = tmp_path / "x"
    if make == "file":
        p.write_text("keep me")
    elif make == "dir":
        p.mkdir()
    else:
        (tmp_path / "f").write_text("a file")
        p = tmp_path / "f" / "sub"
    r = mvlm("tune", smollm2_gguf, "--allow-requantize", option, p, cache=tmp_path / "cache")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and says.format(p=p) in lines[0], r.stderr
    assert not (tmp_path / "cache").exists()
    if make == "file":
        assert p.read_text() == "keep me"


@pytest.mark.slow
def test_same_named_model_and_mmproj_are_refused(tiny_v2, tmp_path):
    import shutil

    lm, mm = tiny_v2
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(lm, tmp_path / "a" / "model-F32.gguf")
    shutil.copy(mm, tmp_path / "b" / "model-F32.gguf")
    r = mvlm("tune", tmp_path / "a" / "model-F32.gguf", "--mmproj", tmp_path / "b" / "model-F32.gguf",
             cache=tmp_path / "cache")
    assert r.returncode == 2 and "same name" in r.stderr and "mmproj-model-F32.gguf" in r.stderr, r.stderr


@pytest.mark.slow
def test_checkpoints_under_a_cache_folder_are_told_apart(tmp_path):
    """Hugging Face keeps downloads under ~/.cache: a `.cache` in the checkpoint's own path must not hide its files."""
    from mvlm_convert.families.mobilevlm import make_tiny_checkpoint
    from mvlm_tune import variants

    os.environ["MVLM_TUNE_CACHE"] = str(tmp_path / "tc")
    try:
        a = variants.from_checkpoint(make_tiny_checkpoint(tmp_path / ".cache" / "v2", variant="v2", seed=0))
        b = variants.from_checkpoint(make_tiny_checkpoint(tmp_path / ".cache" / "v1", variant="v1", seed=0))
    finally:
        del os.environ["MVLM_TUNE_CACHE"]
    assert a[0].parent != b[0].parent and "V2" in a[0].name and "V2" not in b[0].name


@pytest.mark.slow
def test_a_damaged_cache_is_measured_again_not_believed(smollm2_gguf, tmp_path):
    cache = tmp_path / "cache"
    args = ("tune", smollm2_gguf, "--allow-requantize", "--lm-types", "input,q8_0", "--repeat", "3", "-n", "4",
            "--no-save", "--json", "--budget", "none")
    first = mvlm(*args, cache=cache)
    assert first.returncode == 0, first.stderr[-2000:]
    (d,) = [p for p in cache.iterdir() if p.is_dir()]
    (d / "fidelity.json").write_text(json.dumps({"lm:Q8_0": {"kl": -5, "top1": 7}}))
    meas = json.loads((d / "measurements.json").read_text())
    for runs in meas.values():
        runs[-1]["total_s"] = "fast" if len(runs) % 2 else float("nan")
    (d / "measurements.json").write_text(json.dumps(meas).replace('"NaN"', "NaN"))
    (cache / "hashes.json").write_text(json.dumps({str(smollm2_gguf.resolve()): {"stamp": "x", "sha256": "/tmp/out"}}))
    again = mvlm(*args, cache=cache)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-2000:]
    data = json.loads(again.stdout)
    q8 = next(c for c in data["candidates"] if c["label"] == "Q8_0")
    assert 0 <= q8["kl"] < 1 and 0 <= q8["top1"] <= 1  # quantized and measured again
    assert "quantizing" in again.stderr and data["search"]["runs"] >= 1  # the damaged runs were measured again
    assert not Path("/tmp/out").exists() and [p for p in cache.iterdir() if p.is_dir()] == [d]
