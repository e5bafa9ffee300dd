"""On-device resources in every benchmark record (issue 15, item 4): the llama.cpp process's peak RSS and the device's
temperature before and after each repetition, with each repetition's start and end time.

The peak RSS is checked against an independent witness, GNU time's ``%M`` (the kernel's ru_maxrss of the same command
line, from wait4), on the real SmolLM2 GGUF: locally, over the real sshd, and under qemu-aarch64-static, directly and on a phone
behind the real adb (where both measure the emulator's process). Temperatures come from real files laid out like
/sys/class/thermal (this machine has no thermal zone: there the records must say null)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peers import run_bench

from mvlm_bench.device import resources, thermal
from mvlm_bench.device.profiles import load_profile, profile_from_dict
from mvlm_bench.device.transports import make_transport
from mvlm_bench.plan.spec import BenchSpec
from mvlm_bench.records.groups import aggregate
from mvlm_bench.views.exports import render_csv, report_records
from mvlm_bench.views.latency import render_markdown

REPO = Path(__file__).resolve().parents[1]
GNU_TIME = "/usr/bin/time"
needs_gnu_time = pytest.mark.skipif(not os.access(GNU_TIME, os.X_OK), reason="GNU time is not installed (apt-get install time)")
needs_qemu = pytest.mark.skipif(shutil.which("qemu-aarch64-static") is None,
                                reason="qemu-aarch64-static is not installed (apt-get install qemu-user-static)")
HOST_HAS_ZONES = bool(glob.glob("/sys/class/thermal/thermal_zone*/temp"))


def _local(tmp_path: Path, **extra):
    return profile_from_dict({"transport": "local", "workdir": str(tmp_path / "device"), "target": "host", "threads": 2,
                              **extra}, where="test", default_name="res-local")


def _gnu_time_mb(argv: list[str], env: dict[str, str]) -> float:
    """ru_maxrss of ``argv`` as GNU time reports it (kB), in MB (1e6 bytes)."""
    r = subprocess.run([GNU_TIME, "-f", "MAXRSS=%M", *argv], capture_output=True, text=True, timeout=600,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-2000:]
    kb = int(next(ln for ln in r.stderr.splitlines() if ln.startswith("MAXRSS=")).split("=", 1)[1])
    return kb * 1024 / 1e6


# --- the wrapper itself -------------------------------------------------------------------------------------------
def _wrapped(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", resources.WRAPPER, "mvlm-rss", str(tmp_path / "scratch"), *cmd],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
@needs_gnu_time
def test_wrapper_peak_rss_matches_gnu_time(tmp_path):
    """A process that holds ~150 MB for a second: the wrapper's VmHWM and GNU time's ru_maxrss agree within 3%."""
    cmd = [sys.executable, "-c", "import time; b = bytearray(150_000_000); time.sleep(1.0); print('done')"]
    r = _wrapped(cmd, tmp_path)
    assert r.returncode == 0, r.stderr
    out, mb = resources.split_marker(r.stdout + r.stderr)
    assert "done" in out and resources.RSS_MARKER not in out
    witness = _gnu_time_mb(cmd, {})
    assert mb is not None and witness > 150
    assert abs(mb - witness) / witness < 0.03, (mb, witness)
    assert not list(tmp_path.glob("scratch*"))  # the poller's file is gone


def test_wrapper_passes_status_and_signal_on(tmp_path):
    assert _wrapped(["sh", "-c", "exit 7"], tmp_path).returncode == 7
    assert _wrapped(["sh", "-c", "kill -SEGV $$"], tmp_path).returncode == -11  # as if unwrapped: killed by SIGSEGV
    r = _wrapped(["/nonexistent/binary"], tmp_path)
    assert r.returncode == 127
    assert resources.split_marker(r.stderr)[1] is None  # the forked shell's VmHWM is not the binary's: no reading


def test_wrapper_counts_only_the_binary_not_the_forked_shell(tmp_path):
    """Before the exec the background child is the wrapper's own shell: its VmHWM must never be reported as the
    binary's. A command that exits at once gets null (and the marker says why), never the shell's few kB."""
    for cmd in (["/bin/true"], ["/nonexistent/binary"]):
        r = _wrapped(cmd, tmp_path)
        assert f"{resources.RSS_MARKER}{resources.TOO_SHORT}\n" in r.stderr, r.stderr
        assert resources.split_marker(r.stderr)[1] is None


@pytest.mark.slow
@needs_gnu_time
def test_short_real_llama_runs_record_null_or_the_real_peak(tmp_path, smollm2_gguf, host_runtime):
    """Very short real runs of the runtime's llama-completion (``--version``: milliseconds; ``-n 1`` on SmolLM2: about
    a second's load): the recorded peak is either null with the note or within 5% of GNU time's ru_maxrss, never the
    forked shell's few kB (what a sample taken at fork time gave: 0.004 MB)."""
    binary = str(host_runtime / "bin" / "llama-completion")
    env = {"LD_LIBRARY_PATH": str(host_runtime / "lib")}
    t = make_transport(_local(tmp_path))
    t.mkdir(t.workdir)
    one_token = [binary, "-m", str(smollm2_gguf), "-p", "Hi", "-n", "1", "-t", "2", "-no-cnv"]
    witnesses: dict[str, float] = {}
    seen = []
    for argv in ([binary, "--version"], one_token, one_token, one_token):
        r, mb = resources.run_measured(t, argv, timeout=120, env=env)
        assert r.returncode == 0, r.output[-2000:]
        assert resources.RSS_MARKER not in r.output
        if argv[1] not in witnesses:
            witnesses[argv[1]] = _gnu_time_mb(argv, env)
        witness = witnesses[argv[1]]
        seen.append((argv[1], mb, witness, r.rss_note))
        if mb is None:
            assert r.rss_note == resources.TOO_SHORT_NOTE
        else:
            assert r.rss_note is None
            assert abs(mb - witness) / witness < 0.05, (argv, mb, witness)
    print(f"\nshort runs (arg, recorded MB, GNU time MB, note): {seen}")
    # a one-token run on a real model (~1 s) is long enough to be measured (null only when its last growth came in
    # the final few tens of ms, which a busy machine can make happen once)
    assert any(mb is not None for _, mb, _, _ in seen[1:]), seen


# --- mvlm-time: the kernel's own figures, nothing running beside the binary ----------------------------------------
@pytest.fixture(scope="module")
def timer() -> Path:
    from mvlm_core import exec_timer

    built = exec_timer.build("host")
    assert built is not None, "no C compiler for mvlm-time (apt-get install gcc libc6-dev)"
    return built


@needs_gnu_time
def test_timer_peak_rss_is_wait4s_and_matches_gnu_time(timer):
    """~150 MB held for a second: mvlm-time's ru_maxrss (wait4) and GNU time's agree within 3%; its wall time too."""
    cmd = [sys.executable, "-c", "import time; b = bytearray(150_000_000); time.sleep(1.0); print('done')"]
    t0 = time.monotonic()
    r = subprocess.run([str(timer), *cmd], capture_output=True, text=True, timeout=60)
    outside = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    out, wall, mb, failed = resources.split_timer(r.stdout + r.stderr)
    assert "done" in out and "__MVLM" not in out and not failed
    witness = _gnu_time_mb(cmd, {})
    assert mb is not None and witness > 150 and abs(mb - witness) / witness < 0.03, (mb, witness)
    assert 1.0 < wall <= outside, (wall, outside)


def test_timer_passes_status_and_signal_on_and_says_when_it_cannot_exec(timer):
    assert subprocess.run([str(timer), "sh", "-c", "exit 7"], capture_output=True).returncode == 7
    r = subprocess.run([str(timer), "sh", "-c", "kill -SEGV $$"], capture_output=True, text=True)
    assert r.returncode == -11 and resources.split_timer(r.stderr)[2] is not None  # as if unwrapped; still measured
    r = subprocess.run([str(timer), "/nonexistent/binary"], capture_output=True, text=True)
    out, wall, mb, failed = resources.split_timer(r.stderr)
    assert r.returncode == 127 and failed and mb is None and "cannot run /nonexistent/binary" in out


@pytest.mark.slow
def test_without_a_helper_the_peak_is_sampled_and_the_record_says_so(tmp_path, smollm2_gguf, host_runtime,
                                                                      monkeypatch):
    """A machine with no compiler for the device's mvlm-time (or a device that cannot run it): the shell poller, and
    ``rss_source: poll``; Total is then the wall clock around the process here (``total_source: wall``)."""
    from mvlm_core import exec_timer

    monkeypatch.setattr(exec_timer, "build", lambda target, ndk=None: None)
    res = run_bench(_local(tmp_path), BenchSpec("lm", smollm2_gguf, repeat=1, warmup=0, n_predict=8))
    run = _check_records(res, HOST_HAS_ZONES)[0]
    assert (run["rss_source"], run["total_source"]) == ("poll", "wall")


def test_split_marker():
    text = f"line 1\nline 2\n\n{resources.RSS_MARKER}2048\n"
    assert resources.split_marker(text) == ("line 1\nline 2\n", 2048 * 1024 / 1e6)
    assert resources.split_marker(f"x\n{resources.RSS_MARKER}-\n") == ("x", None)
    assert resources.split_marker(f"x\n{resources.RSS_MARKER}{resources.TOO_SHORT}\n") == ("x", None)
    assert resources.split_marker("no marker") == ("no marker", None)


# --- temperature ---------------------------------------------------------------------------------------------------
def _zones(root: Path, values: list[str]) -> Path:
    for i, v in enumerate(values):
        d = root / f"thermal_zone{i}"
        d.mkdir(parents=True)
        (d / "temp").write_text(v + "\n")
    (root / "cooling_device0").mkdir(parents=True, exist_ok=True)  # not a zone
    return root


def test_parse_zone_values():
    assert thermal.parse_zone_values(["41000", "52500\n", "38000"]) == 52.5
    assert thermal.parse_zone_values(["47"]) == 47.0  # an old driver in whole degrees
    assert thermal.parse_zone_values(["-274000", "garbage", ""]) is None  # placeholders and junk only
    assert thermal.parse_zone_values([]) is None


def test_read_celsius_local(tmp_path):
    t = make_transport(_local(tmp_path))
    assert thermal.read_celsius(t, str(_zones(tmp_path / "thermal", ["41000", "52500", "junk"]))) == 52.5
    assert thermal.read_celsius(t, str(tmp_path / "empty")) is None
    expected = thermal.parse_zone_values([Path(p).read_text() for p in glob.glob("/sys/class/thermal/thermal_zone*/temp")])
    assert thermal.read_celsius(t) == expected  # this machine's own zones (None when it has none)


@pytest.mark.slow
def test_read_celsius_over_ssh_and_adb(sshd, tmp_path, phones):
    root = _zones(tmp_path / "thermal", ["39000", "61250"])
    t = make_transport(sshd.profile(str(tmp_path / "remote"), target="host"))
    try:
        assert thermal.read_celsius(t, str(root)) == 61.25
        assert thermal.read_celsius(t, str(tmp_path / "none")) is None
    finally:
        t.close()
    phone = phones()  # its zone0 says 45000 (tests/adb_device.py); a hotter zone beside it
    _zones(phone.root / "sys/class/thermal/more", ["45500"])
    (phone.root / "sys/class/thermal/more/thermal_zone0").rename(phone.root / "sys/class/thermal/thermal_zone1")
    t = make_transport(profile_from_dict({"transport": "adb", "address": phone.serial, "workdir": "/data/local/tmp/mvlm",
                                          "target": "android-arm64"}, where="test", default_name="phone"))
    assert thermal.read_celsius(t) == 45.5  # read through `adb shell` from the phone's /sys/class/thermal


# --- real benches ---------------------------------------------------------------------------------------------------
def _check_records(res, expect_temps: bool, notes: list[str] | None = None) -> list[dict]:
    assert not res.failures, res.failures
    recs = report_records(aggregate(res.runs))
    runs = recs[0]["runs"]
    for prev, cur in zip(runs, runs[1:], strict=False):
        assert prev["t_end"] <= cur["t_start"]
    for run in runs:
        assert run["t_start"] < run["t_end"]
        assert run["peak_rss_mb"] is not None and run["peak_rss_mb"] > 0, (run["rss_source"], notes)
        assert (run["temp_start_c"] is not None) == expect_temps and (run["temp_end_c"] is not None) == expect_temps
    assert recs[0]["metrics"]["peak_rss_mb"]["n"] == len(runs)
    csv_head = render_csv(aggregate(res.runs)).splitlines()[0].split(",")
    assert {"t_start", "t_end", "peak_rss_mb", "temp_start_c", "temp_end_c"} <= set(csv_head)
    return runs


@pytest.mark.slow
@needs_gnu_time
def test_local_bench_records_rss_and_times(tmp_path, smollm2_gguf, host_runtime):
    prof = _local(tmp_path)
    notes: list[str] = []
    res = run_bench(prof, BenchSpec("lm", smollm2_gguf, repeat=2, warmup=1, n_predict=8), log=notes.append)
    runs = _check_records(res, HOST_HAS_ZONES)
    assert any("no readable thermal zone" in n for n in notes) == (not HOST_HAS_ZONES)
    witness = _gnu_time_mb(res.outcome.commands[0], {"LD_LIBRARY_PATH": str(tmp_path / "device" / "lib")})
    rss = [r["peak_rss_mb"] for r in runs]
    print(f"\nlocal: peak RSS {rss} MB (GNU time: {witness:.1f} MB), temperatures "
          f"{[(r['temp_start_c'], r['temp_end_c']) for r in runs]}")
    assert all(abs(v - witness) / witness < 0.03 for v in rss), (rss, witness)
    assert smollm2_gguf.stat().st_size / 1e6 < witness  # the weights are resident
    # read by mvlm-time on the device: the kernel's ru_maxrss, and Total the process's wall time there
    assert {(r["rss_source"], r["total_source"]) for r in runs} == {("wait4", "device wall")}
    assert all(0 < r["metrics"]["total_s"] <= r["t_end"] - r["t_start"] for r in runs)
    md = render_markdown(aggregate(res.runs))
    assert "Peak RSS (MB)" in md
    # the history keeps them per repetition (the sample rows), next to the speed metrics
    from mvlm_bench.history.database import History
    from mvlm_bench.history.entries import entries_from_runs

    with History(tmp_path / "h.sqlite") as h:
        h.save_many(entries_from_runs(res.runs))
        stored = h.entries()[0].samples
    assert stored["peak_rss_mb"] == pytest.approx(rss)
    assert stored["t_start"] == pytest.approx([r["t_start"] for r in runs], abs=1e-3)
    assert stored["t_end"] == pytest.approx([r["t_end"] for r in runs], abs=1e-3)


@pytest.mark.slow
def test_ssh_bench_records_rss(sshd, tmp_path, smollm2_gguf, host_runtime):
    spec = BenchSpec("lm", smollm2_gguf, repeat=1, warmup=0, n_predict=8)
    local = _check_records(run_bench(_local(tmp_path), spec), HOST_HAS_ZONES)[0]["peak_rss_mb"]
    ssh_run = _check_records(run_bench(sshd.profile(str(tmp_path / "remote"), target="host", threads=2), spec),
                             HOST_HAS_ZONES)[0]
    over_ssh = ssh_run["peak_rss_mb"]
    print(f"\npeak RSS: local {local:.1f} MB, ssh {over_ssh:.1f} MB")
    # the same binary and model on the same machine: the same memory, whichever way it was started
    assert abs(over_ssh - local) / local < 0.03
    # over the link too, Total is the process's wall time read where it ran, not around the ssh session
    assert (ssh_run["rss_source"], ssh_run["total_source"]) == ("wait4", "device wall")


@pytest.mark.slow
@pytest.mark.qemu
@needs_qemu
@needs_gnu_time
def test_qemu_bench_measures_the_emulator_process(tmp_path, smollm2_gguf, phones):
    """Under qemu-aarch64-static the wrapper reads the emulator's own process: GNU time on `qemu-aarch64-static
    llama-completion ...` agrees, and it is more than the weights alone."""
    from mvlm_core import runtime as rtmod

    try:
        rtmod.find("linux-arm64")
    except Exception:
        pytest.skip("no linux-arm64 runtime built (mvlm runtime build --target linux-arm64; tests/test_arm64.py builds it)")
    text = (REPO / "devices" / "qemu-arm64.toml").read_text().replace("~/.cache/mvlm/device/qemu-arm64",
                                                                        str(tmp_path / "qdev"))
    (tmp_path / "qemu-arm64.toml").write_text(text)
    prof = load_profile(str(tmp_path / "qemu-arm64.toml"))
    res = run_bench(prof, BenchSpec("lm", smollm2_gguf, repeat=1, warmup=0, n_predict=4))
    run = _check_records(res, HOST_HAS_ZONES)[0]
    witness = _gnu_time_mb(["qemu-aarch64-static", *res.outcome.commands[0]], {})
    print(f"\nqemu-arm64: peak RSS {run['peak_rss_mb']:.1f} MB (GNU time on qemu: {witness:.1f} MB)")
    assert abs(run["peak_rss_mb"] - witness) / witness < 0.03
    assert (run["rss_source"], run["total_source"]) == ("wait4", "device wall")  # this machine's helper times qemu
    assert run["peak_rss_mb"] > smollm2_gguf.stat().st_size / 1e6
    assert json.dumps(report_records(aggregate(res.runs)))  # serialisable as the JSON report
    # the same arm64 binary on a phone over adb (the test phone runs it through the same emulator): the same memory,
    # read on the phone by the wrapper through `adb shell`, and the phone's temperature beside it
    # The phone's peak is sampled (below), and a sample counts once it held for two more polls (0.5 s): 16 tokens
    # keep the emulated run past its last page-in long enough on a loaded machine (4 were not, once, in CI)
    phone = phones()
    notes: list[str] = []
    over_adb = run_bench(profile_from_dict({"transport": "adb", "address": phone.serial, "target": "android-arm64",
                                            "threads": 2}, where="test", default_name="phone"),
                         BenchSpec("lm", smollm2_gguf, repeat=1, warmup=0, n_predict=16), log=notes.append)
    adb_run = _check_records(over_adb, True, notes)[0]
    print(f"adb phone: peak RSS {adb_run['peak_rss_mb']:.1f} MB ({adb_run['rss_source']}), {adb_run['temp_start_c']} C")
    assert abs(adb_run["peak_rss_mb"] - witness) / witness < 0.05 and adb_run["temp_start_c"] == 45.0
    # the test phone runs aarch64 through qemu without binfmt: the arm64 mvlm-time cannot start its child there, so
    # the peak is sampled, and the record says so (a real phone runs the helper)
    assert adb_run["rss_source"] == "poll"


def test_the_null_rss_note_says_why():
    """A run too short to sample says so once; a device without /proc says that instead (Session.resource_notes)."""
    from types import SimpleNamespace

    from mvlm_bench.session.session import Session

    run = SimpleNamespace(peak_rss_mb=None, temp_start_c=20.0, temp_end_c=21.0)

    def notes(rss_notes: set[str]) -> list[str]:
        session = Session(profile_from_dict({"transport": "local", "target": "host"}, where="t", default_name="d"))
        return session.resource_notes([run, run], [SimpleNamespace(rss_notes=rss_notes)])

    assert notes({resources.TOO_SHORT_NOTE}) == [f"device d: the llama.cpp process {resources.TOO_SHORT_NOTE}"]
    assert notes(set()) == ["device d gave no peak RSS (no /proc/PID/status VmHWM): peak_rss_mb is null"]
