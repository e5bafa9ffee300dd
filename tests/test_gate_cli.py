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
from peers import small_gguf

from mvlm_bench.history.database import History
from mvlm_bench.history.entries import Entry
from mvlm_bench.plan.spec import BenchSpec, Side
from mvlm_bench.records.record import RunContext

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



def _gate(db, cwd):
    """`mvlm compare label:main latest --fail-on-regression 5%` on the history ``db``."""
    return mvlm("compare", "label:main", "latest", "--db", db, "--fail-on-regression", "5%", cwd=cwd)

@pytest.mark.slow
def test_history_gate_fails_a_slowdown_beyond_the_noise(tmp_path):
    db = tmp_path / "h.sqlite"
    _history(db, [-0.02, -0.01, 0.0, 0.01, 0.02], candidate_slowdown=0.12, seed=1)
    r = _gate(db, tmp_path)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "performance regression" in r.stderr and "5 sessions" in r.stderr and "noise band" in r.stderr
    r = mvlm("compare", "label:main", "latest", "--db", db, "--fail-on-regression", "5%", "--json", cwd=tmp_path)
    assert r.returncode == 4
    gate = json.loads(r.stdout)["comparisons"][0]["gate"]
    ev = next(v for v in gate["history"] if v["key"] == "eval_tps")
    assert gate["mode"] == "history" and ev["verdict"] == "slower" and ev["n_sessions"] == 5
    assert ev["slowdown"] == pytest.approx(0.12, abs=0.02)


@pytest.mark.slow
def test_history_gate_does_not_cry_wolf_inside_the_noise(tmp_path):
    # the within-session test calls this 7% drop "slower" (p ~ 0.004), but the baseline's own sessions swing by +-8%
    db = tmp_path / "h.sqlite"
    _history(db, [-0.08, -0.04, 0.0, 0.04, 0.08], candidate_slowdown=0.07, seed=2)
    within = mvlm("compare", "label:main", "latest", "--db", db, "--fail-on-regression", "5%", "--gate",
                  "within-session", cwd=tmp_path)
    assert within.returncode == 4, within.stderr  # the old behaviour, still there on request
    r = _gate(db, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "inside the baseline's noise band" in r.stderr and "gate passed" in r.stderr


@pytest.mark.slow
def test_history_gate_with_too_few_sessions_says_so_and_does_not_fail(tmp_path):
    db = tmp_path / "h.sqlite"
    _history(db, [0.0, 0.01], candidate_slowdown=0.30, seed=3)
    r = _gate(db, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 baseline session(s)" in r.stderr and "at least 3" in r.stderr


@pytest.mark.slow
def test_file_baseline_gates_within_session_and_warns(tmp_path):
    db = tmp_path / "h.sqlite"
    _history(db, [0.0], candidate_slowdown=0.2, seed=4)
    from mvlm_bench.history.entries import entries_to_records

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


def _save(db: Path, medians: list[tuple[str, str, float]], seed: int, n: int = 5, noise: float = 0.005) -> None:
    """Entries (label, build, level of Eval tokens/s), each with n repetitions of ``noise`` run noise."""
    rng = np.random.default_rng(seed)
    with History(db) as h:
        for label, runtime, level in medians:
            tps = [float(x) for x in level * np.exp(rng.normal(0, noise, n))]
            h.save(Entry(_ctx(runtime), {"eval_tps": tps, "prompt_tps": [t * 4 for t in tps],
                                         "total_s": [400 / t for t in tps]}, label=label))


@pytest.mark.slow  # over ~0.9 s: the fast lane stays under 2 minutes
def test_history_gate_uses_only_the_baseline_labels_sessions(tmp_path):
    """Regressed PR sessions of main's build (crafted, or a PR that did not change the build) must not widen main's
    noise band: with label:main the sessions are main's own, and a 50% regression fails."""
    db = tmp_path / "h.sqlite"
    main = [("main", "r0", 40.0 * (1 + e)) for e in (-0.01, 0.0, 0.01, 0.005)]
    prs = [(f"pr-{i}", "r0", level) for i, level in enumerate((20.0, 60.0, 15.0, 70.0))]  # same build, wild
    _save(db, main[:2] + prs + main[2:] + [("pr-9", "r1", 20.0)], seed=5)
    r = mvlm("compare", "label:main", "latest", "--db", db, "--fail-on-regression", "5%", "--json", cwd=tmp_path)
    assert r.returncode == 4, r.stdout + r.stderr
    ev = next(v for v in json.loads(r.stdout)["comparisons"][0]["gate"]["history"] if v["key"] == "eval_tps")
    assert ev["verdict"] == "slower" and ev["n_sessions"] == 4 and ev["band"] < 0.05
    r = _gate(db, tmp_path)
    assert r.returncode == 4 and "worse than the centre of 4 baseline session(s)" in r.stderr, r.stderr
    # the old rule (every session of the build) would have pooled the PR sessions: a band wider than the regression
    from mvlm_bench.decide import gate

    with History(db, create=False) as h:
        pooled = [e.samples["eval_tps"] for e in h.entries() if e.context.runtime_commit == "r0"]
    assert gate.noise_model("eval_tps", pooled).band > 0.5
    # an unlabelled baseline: its sessions are the unlabelled entries of its build
    db2 = tmp_path / "h2.sqlite"
    _save(db2, [("", "r0", 40.0), ("main", "r0", 20.0), ("", "r0", 40.2), ("", "r0", 39.9), ("pr", "r1", 20.0)], seed=6)
    r = mvlm("compare", "id:4", "latest", "--db", db2, "--fail-on-regression", "5%", "--json", cwd=tmp_path)
    ev = next(v for v in json.loads(r.stdout)["comparisons"][0]["gate"]["history"] if v["key"] == "eval_tps")
    assert r.returncode == 4 and ev["n_sessions"] == 3 and ev["verdict"] == "slower", r.stderr


@pytest.mark.slow  # over ~0.9 s: the fast lane stays under 2 minutes
def test_history_gate_does_not_flag_a_candidate_inside_the_baselines_own_range(tmp_path):
    """3 main sessions, one of them at 40.5; a candidate of the same build at 43.26 was failed 'beyond the noise band'
    because the MAD of 3 sessions ignores the extreme one. It lies inside what main itself did: suspected, not failed."""
    db = tmp_path / "h.sqlite"
    _save(db, [("main", "r0", 46.6), ("main", "r0", 46.9), ("main", "r0", 40.5), ("pr", "r0", 43.26)], seed=7,
          noise=0.0)
    from mvlm_bench.decide import gate

    nm = gate.noise_model("eval_tps", [[46.6] * 5, [46.9] * 5, [40.5] * 5])
    assert gate.NOISE_K * nm.sigma < 1 - 43.26 / 46.6 < nm.band  # the MAD band alone failed it
    r = _gate(db, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "inside the baseline's noise band" in r.stderr and "their worst session" in r.stderr
    assert "Eval 7.2% worse than the centre of 3 baseline session(s)" in r.stderr, r.stderr
    assert "gate passed" in r.stderr and "+" not in r.stderr.split("history: Eval")[1].split("\n")[0]
    # worse than every stored main session: fails
    _save(db, [("pr", "r0", 38.0)], seed=8, noise=0.0)
    r = _gate(db, tmp_path)
    assert r.returncode == 4 and "their worst session" in r.stderr, r.stdout + r.stderr
    # a faster candidate reads "better"
    _save(db, [("pr", "r0", 48.0)], seed=9, noise=0.0)
    r = _gate(db, tmp_path)
    assert r.returncode == 0 and "Eval 3.0% better than the centre" in r.stderr, r.stderr  # 48 / 46.6


@pytest.mark.slow
def test_gate_mode_without_a_threshold_is_refused(tmp_path):
    db = tmp_path / "h.sqlite"
    _history(db, [0.0, 0.01, -0.01], candidate_slowdown=0.3, seed=10)
    for mode in ("history", "within-session"):
        r = mvlm("compare", "label:main", "latest", "--db", db, "--gate", mode, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert f"--gate {mode} only decides with a threshold" in line and "--fail-on-regression" in line
    r = mvlm("compare", "label:main", "latest", "--db", db, "--gate", "sometimes", "--fail-on-regression", "5%",
             cwd=tmp_path)
    assert r.returncode == 2 and "choose one of auto, history, within-session" in r.stderr


@pytest.mark.parametrize("bare", ["1", "5", "1.5"])
def test_a_bare_threshold_is_refused_in_one_line(tmp_path, bare):
    db = tmp_path / "h.sqlite"
    _history(db, [0.0, 0.01, -0.01], candidate_slowdown=0.3, seed=11)
    r = mvlm("compare", "label:main", "latest", "--db", db, "--fail-on-regression", bare, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert f"write {bare}%" in line and "ambiguous" in line


def test_interleaved_tables_say_pair_speedup(tmp_path):
    """The A/B table's speedup is the median of the per-pair speedups, which can differ from the ratio of the medians
    shown beside it: the column says "Pair speedup" and the caption / Markdown note says what it is."""
    from rich.console import Console

    from mvlm_bench.decide import gate
    from mvlm_bench.decide import stats as compare
    from mvlm_bench.views.comparison import comparison_markdown, comparison_table

    base = [10.0, 20.0, 30.0, 40.0, 50.0]  # pair speedups 3, 0.9, 0.9, 1.5, 0.9: median 0.9
    cand = [30.0, 18.0, 27.0, 60.0, 45.0]
    comps = gate.compare_interleaved({"eval_tps": base}, {"eval_tps": cand})
    assert comps[0].speedup == pytest.approx(0.9) and np.median(cand) / np.median(base) == 1.0  # why the label
    con = Console(record=True, width=200)
    con.print(comparison_table(comps, "interleaved A/B"))
    text = con.export_text()
    assert "Pair speedup" in text and "median of the per-pair speedups" in text
    md = comparison_markdown(comps, "interleaved A/B")
    assert "| Pair speedup |" in md and "median of the per-pair speedups" in md
    two = compare.compare_samples({"eval_tps": base}, {"eval_tps": cand})  # two sessions: a plain "Speedup"
    con = Console(record=True, width=200)
    con.print(comparison_table(two, "two sessions"))
    assert "Pair speedup" not in con.export_text() and "| Speedup |" in comparison_markdown(two)


def _fake_gguf(p: Path) -> Path:
    return small_gguf(p)


@pytest.mark.slow
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
    assert "Pair speedup" in r.stdout and "median of the per-pair speedups" in " ".join(r.stdout.split())
    recs = json.loads(out.read_text())
    assert sorted(x["params"]["ab_side"] for x in recs) == ["baseline", "candidate"]
    assert all(x["repetitions"] == 5 for x in recs)
    # when it was measured (llama-bench's test_time, unix start/end); an import stores each side once, at that time
    assert all(x["test_time"].endswith("Z") and x["start_time"] <= x["end_time"] for x in recs)
    db = tmp_path / "imported.sqlite"
    for expect in ("imported 2 measurement(s)", "imported 0 measurement(s)"):
        imp = mvlm("history", "import", out, "--db", db, cwd=tmp_path)
        assert imp.returncode == 0 and expect in imp.stderr, imp.stderr
    with History(db, create=False) as h:
        assert sorted(e.created_at[:19] for e in h.entries()) == sorted(x["test_time"][:19] for x in recs)
    md = (tmp_path / "ab.md").read_text()  # one row per side, the side a column; the rows keep the real model name
    assert "| A/B side |" in md and f"| {smollm2_gguf.stem} | baseline |" in md and f"| {smollm2_gguf.stem} | candidate |" in md


@pytest.mark.slow
def test_ab_session_detects_a_real_slowdown(tmp_path, host_runtime, smollm2_gguf):
    from mvlm_bench.decide import gate
    from mvlm_bench.device.profiles import load_profile
    from mvlm_bench.history.entries import entries_from_runs
    from mvlm_bench.plan.against import interleave
    from mvlm_bench.plan.plan import Plan
    from mvlm_bench.session.runners import collect

    os.environ.pop("MVLM_DEVICES_DIR", None)
    prof = load_profile(str(_profile(tmp_path, "abdev") / "abdev.toml"))
    spec = BenchSpec("lm", smollm2_gguf, repeat=6, n_predict=24, threads=1)
    slow = (sys.executable, str(THROTTLE), "0.4", "--")  # the candidate is stopped 40% of the time
    ab = collect(Plan(prof, [spec], sides=(Side(spec, name="baseline"), Side(spec, wrapper=slow, name="candidate"))))
    assert ab.outcome.order == interleave(6, "abba") and not ab.failures
    b, c = entries_from_runs(ab.side("baseline")), entries_from_runs(ab.side("candidate"))
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
    # Stopping llama.cpp half the time makes a short phase noisy: measured here, Eval_prompt of the same build varies
    # 64-88 tok/s between runs (CV ~8%) under this throttle. docs/ci.md: the threshold must sit at ~2.5x the noise or
    # more, so this device is gated at 20%; the history still sees ~50% and asks for the re-measure.
    _profile(tmp_path, "lab1", wrapper=[sys.executable, str(THROTTLE), "0.5", "0.005", "--"])
    r = mvlm(*bench, "--repeat", 5, "--label", "pr", "--baseline", "label:main", "--fail-on-regression", "20%",
             cwd=tmp_path, env=env)
    # ... and the interleaved re-measure on the same (slow) device clears the build
    assert r.returncode == 0, r.stdout + r.stderr
    assert "re-measuring the baseline" in r.stderr and "did not confirm" in r.stderr
    assert "worse than the centre" in r.stderr  # the history did suspect it
    # the baseline's build is the build in use: re-measured from the same files, not pushed a second time
    assert "/ab/" not in r.stderr, r.stderr
    assert "interleaved re-measure" in r.stdout
