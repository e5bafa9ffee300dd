"""Nothing measured is lost: real `mvlm bench` processes signalled at random moments, every output read back.

Real parts: the real llama.cpp host runtime, the real SmolLM2 GGUF and a tiny MobileVLM V2 converted by the real CLI,
real `mvlm bench` processes, real signals (SIGINT, SIGTERM, SIGHUP; SIGKILL), the real process table, a real SQLite
history. Moments are drawn from a seeded generator across the lm, vlm, llama-bench and dataset protocols, a sweep
and an interleaved A/B session, so warm-ups, pushes, runs, sink writes and the gaps between them are all hit.

After a stop signal: the exit status is 128 + the signal; one line says `interrupted by SIGX after N of M repetitions`
and where they are kept; every output holds the same records (JSON valid, JSON Lines one line a record, CSV one row a
record, the history one repetition row a record, and N repetitions in all); no llama.cpp process of the bench is
left; the device's lease is free. After SIGKILL: the JSON Lines file and the history differ by at most the repetition
in flight, and every line that is there is whole.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MVLM = [sys.executable, "-m", "mvlm"]
pytestmark = pytest.mark.slow
# (a signal while the command still starts up, before its options are read, is said as plain "interrupted by SIGX")
LINE = re.compile(r"interrupted by (SIG\w+)(?: after (\d+) of (\d+) repetitions; (.*)| before anything was measured)?$",
                  re.M)


@pytest.fixture(scope="module")
def tiny_v2(tmp_path_factory, host_runtime) -> tuple[Path, Path]:
    from mvlm_convert.convert import convert
    from mvlm_convert.families.mobilevlm import make_tiny_checkpoint

    d = tmp_path_factory.mktemp("interrupts")
    res = convert(make_tiny_checkpoint(d / "ckpt", variant="v2"), d / "out", outtype="f16", name="TinyV2", progress=False)
    return res.lm.path, res.mmproj.path


def _question_set(d: Path, n: int) -> Path:
    from PIL import Image

    (d / "img").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(d / "img" / "a.png")
    f = d / "q.jsonl"
    f.write_text("".join(json.dumps({"question_id": f"q{i}", "image": "img/a.png", "text": f"Question {i}?"}) + "\n"
                         for i in range(n)))
    return f


def _profile(d: Path) -> Path:
    p = d / "intr.toml"
    p.write_text(f'name = "intr"\ntransport = "local"\nworkdir = "{d / "dev"}"\ntarget = "host"\nthreads = 2\n')
    return p


def _cases(smollm2: Path, lm: Path, mmproj: Path, d: Path) -> dict[str, list[str]]:
    """Each case's `mvlm bench` arguments (about 3-8 s each on 2 cores, so a moment can land anywhere in it)."""
    data = _question_set(d / "set", 4)
    return {
        "lm": ["-m", smollm2, "-n", "48", "-r", "6"],
        "vlm": ["-P", "vlm", "-m", lm, "--mmproj", mmproj, "-n", "64", "-r", "8"],
        "llama-bench": ["-P", "llama-bench", "-m", smollm2, "-p", "64,128", "-n", "16", "-r", "4"],
        "dataset": ["-P", "dataset", "-m", lm, "--mmproj", mmproj, "--data", data, "-n", "16", "-r", "4"],
        "sweep": ["-m", smollm2, "-n", "32", "-r", "3", "-t", "1,2"],
        "ab": ["-m", smollm2, "-n", "32", "-r", "4", "--against", "threads=1"],
    }


def _bench_pids(workdir: Path) -> list[int]:
    """Processes still running whose command line names the device's work dir (llama.cpp and its wrapper)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes()
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(workdir).encode() in cmd and state != "Z":
            out.append(int(p.name))
    return out


def _outputs(d: Path) -> dict[str, object]:
    """What each output holds: JSON records' runs, JSON Lines lines, CSV rows, history repetition rows."""
    got: dict[str, object] = {}
    if (d / "o.json").exists():
        got["json"] = sum(len(r["runs"]) for r in json.loads((d / "o.json").read_text()))
    if (d / "o.jsonl").exists():
        lines = (d / "o.jsonl").read_text().splitlines()
        got["jsonl"] = len(lines)
        got["jsonl_whole"] = all(json.loads(x)["runs"] for x in lines)
    if (d / "o.csv").exists():
        got["csv"] = len(list(csv.DictReader(io.StringIO((d / "o.csv").read_text()))))
    got["md"] = (d / "o.md").exists()
    if (d / "h.sqlite").exists():
        with sqlite3.connect(d / "h.sqlite") as c:
            got["history"] = c.execute("SELECT COUNT(*) FROM repetition").fetchone()[0]
    else:
        got["history"] = 0
    return got


def _run(case: str, args: list, d: Path, sig: int, after: float) -> tuple[int, str, dict]:
    d.mkdir(parents=True)
    cmd = [*MVLM, "bench", "--device", _profile(d), *args, "--json-file", d / "o.json", "--jsonl", d / "o.jsonl",
           "--csv", d / "o.csv", "--markdown", d / "o.md", "--save", "--db", d / "h.sqlite"]
    p = subprocess.Popen([str(x) for x in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=d,
                         env={**os.environ, "COLUMNS": "200"})
    try:
        _, err = p.communicate(timeout=after)  # it may end on its own first
    except subprocess.TimeoutExpired:
        os.kill(p.pid, sig)
        _, err = p.communicate(timeout=120)
    return p.returncode, err, _outputs(d)


def _check_consistent(case: str, got: dict, records: int | None = None) -> None:
    counts = [got[k] for k in ("json", "jsonl", "csv") if k in got] + [got["history"]]
    assert len(set(counts)) == 1, (case, got)
    if records is not None:
        assert counts[0] == records, (case, got)
    assert got["md"] == bool(counts[0]), (case, got)
    assert got.get("jsonl_whole", True), (case, got)


def _calibrate(cases: dict[str, list[str]], d: Path) -> dict[str, float]:
    """Each case run once to its end (its outputs must agree too): how long it takes on this machine, so the moments
    below spread over its whole life (start-up, push, warm-up, every repetition, the last writes)."""
    took = {}
    for case, args in cases.items():
        t0 = time.monotonic()
        rc, err, got = _run(case, args, d / f"whole-{case}", signal.SIGTERM, 600)
        took[case] = time.monotonic() - t0
        assert rc == 0, (case, err[-2000:])
        _check_consistent(case, got)
    return took


def test_signals_at_random_moments_keep_every_finished_repetition(tmp_path, smollm2_gguf, tiny_v2):
    from mvlm_bench.session.lease import device_lease

    lm, mmproj = tiny_v2
    cases = _cases(smollm2_gguf, lm, mmproj, tmp_path)
    took = _calibrate(cases, tmp_path)
    rng = random.Random(20261206)
    moments = [(case, rng.choice((signal.SIGINT, signal.SIGTERM, signal.SIGHUP)), rng.uniform(0.05, 0.95) * took[case])
               for case in cases for _ in range(4)]
    assert len(moments) >= 20
    seen_some = 0
    for k, (case, sig, after) in enumerate(moments):
        d = tmp_path / f"{k:02d}-{case}"
        rc, err, got = _run(case, cases[case], d, sig, after)
        if rc == 0:  # it finished before the signal: everything kept, nothing to say
            _check_consistent(case, got)
            continue
        assert rc == 128 + sig, (case, after, err[-2000:])
        assert "Traceback" not in err, err[-3000:]
        m = LINE.search(err)
        assert m and m.group(1) == signal.Signals(sig).name, (case, after, err[-2000:])
        if m.group(2) is None:  # still reading the options and files: nothing measured, nothing written
            assert got == {"md": False, "history": 0}, (case, got)
            continue
        n, planned = int(m.group(2)), int(m.group(3))
        per_rep = 3 if case == "llama-bench" else 1  # a llama-bench repetition is a record per test
        _check_consistent(case, got, n * per_rep)
        assert n <= planned and ("kept in" in m.group(4)) == (n > 0), (case, m.group(0))
        seen_some += n > 0
        assert not _bench_pids(d / "dev"), (case, "a llama.cpp process outlived the bench")
        with device_lease(f"local:{os.uname().nodename}", None, timeout=0):  # the lease was released
            pass
    assert seen_some >= 8, seen_some  # the moments did land after finished repetitions, not only before the first


def test_sigkill_loses_at_most_the_repetition_in_flight(tmp_path, smollm2_gguf, tiny_v2):
    lm, mmproj = tiny_v2
    cases = _cases(smollm2_gguf, lm, mmproj, tmp_path)
    took = {"lm": 6.0, "vlm": 8.0, "sweep": 8.0, "ab": 8.0}  # about how long each takes here (the test above measures)
    rng = random.Random(7)
    for k, case in enumerate(("lm", "vlm", "sweep", "ab")):
        d = tmp_path / f"kill-{k}-{case}"
        rc, _, got = _run(case, cases[case], d, signal.SIGKILL, rng.uniform(0.4, 0.9) * took[case])
        assert rc in (0, -signal.SIGKILL), rc
        # each record is in the JSON Lines file (fsynced) and the history (committed) the moment it ends: at most the
        # one in flight differs, and every line there is whole
        lines = got.get("jsonl", 0)
        assert abs(lines - got["history"]) <= 1 and got.get("jsonl_whole", True), (case, got)
        if "json" in got:
            assert got["json"] in (lines, lines - 1), (case, got)  # valid JSON, whatever the moment
        for pid in _bench_pids(d / "dev"):  # the kernel's death signal reached the wrapper: nothing left running
            time.sleep(3)
            assert not Path(f"/proc/{pid}").exists() or pid not in _bench_pids(d / "dev"), (case, pid)
