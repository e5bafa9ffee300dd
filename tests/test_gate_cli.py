"""The regression gate through the CLI: history mode (noise from the baseline's sessions), interleaved A/B sessions,
and the A/B re-measure that confirms (or clears) what the history suspects. Real SQLite histories; the slow tests run
the real llama.cpp runtime on the real SmolLM2, slowed for real by benchmarks/throttle.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mvlm_bench.history import Entry, History
from mvlm_bench.records import RunContext

REPO = Path(__file__).resolve().parents[1]
THROTTLE = REPO / "benchmarks" / "throttle.py"


def mvlm(*args, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    e = dict(os.environ) | {"COLUMNS": "200"} | (env or {})
    e.pop("MVLM_HISTORY", None)
    return subprocess.run([sys.executable, "-m", "mvlm", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, errors="replace", env=e, timeout=timeout)


def _ctx(runtime: str) -> RunContext:
    return RunContext(device="orin", model="MobileVLM-1.7B", precision="q4_k_s", model_file="m.gguf",
                      model_sha256="ab" * 32, runtime_commit=runtime, runtime_patches=["0001-clip-cls-first"],
                      protocol="lm", params={"n_threads": 4, "n_predict": 400, "n_gpu_layers": 0, "ctx_size": 2048})


def _history(db: Path, session_offsets: list[float], candidate_slowdown: float, seed: int, n: int = 5) -> None:
    """Baseline sessions of build r0 (each shifted by its offset: session-to-session drift, plus 1% run noise), then
    one candidate session of build r1, slower by ``candidate_slowdown``."""
    rng = np.random.default_rng(seed)

    def session(level: float) -> dict:
        tps = [float(x) for x in 40.0 * level * np.exp(rng.normal(0, 0.01, n))]
        return {"eval_tps": tps, "prompt_tps": [t * 4 for t in tps], "total_s": [400 / t for t in tps]}

    with History(db) as h:
        for off in session_offsets:
            h.save(Entry(_ctx("r0"), session(1 + off), label="main"))
        h.save(Entry(_ctx("r1"), session(1 - candidate_slowdown), label="pr"))


def test_history_gate_fails_a_slowdown_beyond_the_noise(tmp_path):
    db = tmp_path / "h.sqlite"
    _history(db, [-0.02, -0.01, 0.0, 0.01, 0.02], candidate_slowdown=0.12, seed=1)
    r = mvlm("compare", "label:main", "latest", "--db", db, "--fail-on-regression", "5%", cwd=tmp_path)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "performance regression" in r.stderr and "5 sessions" in r.stderr and "noise band" in r.stderr
    r = mvlm("compare", "label:main", "latest", "--db", db, "--fail-on-regression", "5%", "--json", cwd=tmp_path)
    assert r.returncode == 4
    gate = json.loads(r.stdout)["comparisons"][0]["gate"]
    ev = next(v for v in gate["history"] if v["key"] == "eval_tps")
    assert gate["mode"] == "history" and ev["verdict"] == "slower" and ev["n_sessions"] == 5
    assert ev["slowdown"] == pytest.approx(0.12, abs=0.02)


def test_history_gate_does_not_cry_wolf_inside_the_noise(tmp_path):
    # the within-session test calls this 7% drop "slower" (p ~ 0.004), but the baseline's own sessions swing by +-8%
    db = tmp_path / "h.sqlite"
    _history(db, [-0.08, -0.04, 0.0, 0.04, 0.08], candidate_slowdown=0.07, seed=2)
    within = mvlm("compare", "label:main", "latest", "--db", db, "--fail-on-regression", "5%", "--gate",
                  "within-session", cwd=tmp_path)
    assert within.returncode == 4, within.stderr  # the old behaviour, still there on request
    r = mvlm("compare", "label:main", "latest", "--db", db, "--fail-on-regression", "5%", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "inside the baseline's noise band" in r.stderr and "gate passed" in r.stderr


def test_history_gate_with_too_few_sessions_says_so_and_does_not_fail(tmp_path):
    db = tmp_path / "h.sqlite"
    _history(db, [0.0, 0.01], candidate_slowdown=0.30, seed=3)
    r = mvlm("compare", "label:main", "latest", "--db", db, "--fail-on-regression", "5%", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 baseline session(s)" in r.stderr and "at least 3" in r.stderr


def test_file_baseline_gates_within_session_and_warns(tmp_path):
    db = tmp_path / "h.sqlite"
    _history(db, [0.0], candidate_slowdown=0.2, seed=4)
    from mvlm_bench.history import entries_to_records

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    with History(db, create=False) as h:
        es = h.entries()
    assert len(es) == 2
    a.write_text(json.dumps(entries_to_records([es[0]])))
    b.write_text(json.dumps(entries_to_records([es[-1]])))
    r = mvlm("compare", a, b, "--fail-on-regression", "5%", cwd=tmp_path)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "session-to-session noise is unknown" in r.stderr
    r = mvlm("compare", a, b, "--fail-on-regression", "5%", "--gate", "history", cwd=tmp_path)
    assert r.returncode == 2 and "needs a baseline stored in the history" in r.stderr


def _fake_gguf(p: Path) -> Path:
    p.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + os.urandom(2000))
    return p


@pytest.mark.parametrize("args,msg", [
    (["--against", "modle=x.gguf"], "unknown key 'modle'"),
    (["--against", "threads"], "write KEY=VALUE"),
    (["--against", "threads=two"], "not a whole number"),
    (["--against", "threads=1", "--baseline", "latest"], "exclude each other"),
    (["--against", "threads=1", "--fail-on-regression", "5%", "--repeat", "3"], "can never fire"),
    (["--against", "threads=1", "--order", "random"], "--order 'random'"),
    (["--against", "model=missing.gguf"], "missing.gguf"),
])
def test_ab_options_are_refused_in_one_line(tmp_path, args, msg):
    m = _fake_gguf(tmp_path / "m-Q4_0.gguf")
    r = mvlm("bench", "--device", "local", "--model", m, *args, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1


# --- the real thing ------------------------------------------------------------------------------------------------


def _profile(tmp_path: Path, name: str, wrapper: list[str] | None = None) -> Path:
    d = tmp_path / "profiles"
    d.mkdir(exist_ok=True)
    p = d / f"{name}.toml"
    lines = [f'name = "{name}"', 'transport = "local"', f'workdir = "{tmp_path / "device"}"', 'target = "host"',
             "threads = 1"]
    if wrapper:
        lines.append(f"exec_wrapper = {json.dumps(wrapper)}")
    p.write_text("\n".join(lines) + "\n")
    return d


@pytest.mark.slow
def test_ab_session_through_the_cli_records_both_sides(tmp_path, host_runtime, smollm2_gguf):
    out = tmp_path / "ab.json"
    r = mvlm("bench", "--device", "local", "--model", smollm2_gguf, "-n", 16, "--threads", 1, "--repeat", 5,
             "--against", "threads=1", "--fail-on-regression", "50%", "--json", out, "--markdown", tmp_path / "ab.md",
             cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "A/A session measures the noise" in r.stderr and "gate passed" in r.stderr
    assert "interleaved A/B" in r.stdout and "order ABBAABBAAB" in r.stdout
    recs = json.loads(out.read_text())
    assert sorted(x["params"]["ab_side"] for x in recs) == ["baseline", "candidate"]
    assert all(x["repetitions"] == 5 for x in recs)
    assert "(baseline)" in (tmp_path / "ab.md").read_text()


@pytest.mark.slow
def test_ab_session_detects_a_real_slowdown(tmp_path, host_runtime, smollm2_gguf):
    from mvlm_bench import bench, gate
    from mvlm_bench.devices import load_profile
    from mvlm_bench.history import entries_from_runs

    os.environ.pop("MVLM_DEVICES_DIR", None)
    prof = load_profile(str(_profile(tmp_path, "abdev") / "abdev.toml"))
    spec = bench.BenchSpec("lm", smollm2_gguf, repeat=6, n_predict=24, threads=1)
    slow = (sys.executable, str(THROTTLE), "0.4", "--")  # the candidate is stopped 40% of the time
    ab = bench.run_ab(prof, bench.Side(spec), bench.Side(spec, wrapper=slow))
    assert ab.order == gate.interleave(6, "abba") and not ab.failures
    b, c = entries_from_runs(ab.baseline.runs), entries_from_runs(ab.candidate.runs)
    comps = {m.key: m for m in gate.compare_interleaved(b[0].samples, c[0].samples)}
    assert comps["eval_tps"].verdict == "slower" and comps["eval_tps"].test == "signed-rank (paired)"
    assert 0.15 < comps["eval_tps"].slowdown < 0.7
    assert gate.decide_interleaved(list(comps.values()), 0.05).failed


@pytest.mark.slow
def test_history_suspicion_is_cleared_by_the_ab_remeasure_when_the_device_not_the_build_got_slower(
        tmp_path, host_runtime, smollm2_gguf):
    db = tmp_path / "h.sqlite"
    env = {"MVLM_DEVICES_DIR": str(_profile(tmp_path, "lab1"))}
    bench = ["bench", "--device", "lab1", "--model", smollm2_gguf, "-n", 16, "--save", "--db", db]
    for _ in range(3):
        r = mvlm(*bench, "--repeat", 3, "--label", "main", cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
    # the device itself slows down (a throttled neighbour), the build is the same: history sees a slowdown ...
    _profile(tmp_path, "lab1", wrapper=[sys.executable, str(THROTTLE), "0.5", "--"])
    r = mvlm(*bench, "--repeat", 5, "--label", "pr", "--baseline", "label:main", "--fail-on-regression", "5%",
             cwd=tmp_path, env=env)
    # ... and the interleaved re-measure on the same (slow) device clears the build
    assert r.returncode == 0, r.stdout + r.stderr
    assert "re-measuring the baseline" in r.stderr and "did not confirm" in r.stderr
    assert "interleaved re-measure" in r.stdout
