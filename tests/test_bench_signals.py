"""A stopped `mvlm bench` leaves nothing running on its device, and a leased bench's model cannot be replaced under it.

Real parts: the real llama.cpp host runtime (``host_runtime``), the real SmolLM2 GGUF (``smollm2_gguf``), real `mvlm`
processes stopped with real signals, the real process table (tests/peers.py: proc_table).

1. SIGINT (Ctrl-C, exit 130), SIGTERM (exit 143) or SIGKILL of `mvlm bench --device <local>` while llama-completion
   runs: afterwards neither the resource wrapper (`sh`) nor llama-completion, nor anything else it started, is alive.
2. Two benches with same-named, different models on one device (one workdir), started together: the push happens
   under the device's lease, so the later bench's push comes after the earlier bench's last measured run, and the
   file left on the device is the later bench's model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peers import proc_table

REPO = Path(__file__).resolve().parents[1]
BINARY = "llama-completion"[:15]  # /proc/PID/stat's name: at most 15 characters
MVLM = [sys.executable, "-m", "mvlm"]


def _profile(tmp_path: Path, name: str, workdir: Path) -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(f'name = "{name}"\ntransport = "local"\nworkdir = "{workdir}"\ntarget = "host"\nthreads = 1\n')
    return p


def _start_bench(profile: Path, model: Path, n: int, repeat: int) -> subprocess.Popen:
    """`mvlm bench` on ``profile``, no warm-up, its stderr kept (for the exit checks)."""
    return subprocess.Popen([*MVLM, "bench", "--device", str(profile), "-m", str(model), "-n", str(n), "--repeat",
                             str(repeat), "--warmup", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "COLUMNS": "200"})


def _descendants(pid: int) -> dict[int, str]:
    table = proc_table()
    children: dict[int, list[int]] = {}
    for child, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(child)
    out, todo = {}, [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out[c] = table[c][1]
            todo.append(c)
    return out


def _alive(procs: dict[int, str]) -> dict[int, str]:
    """Those of ``procs`` still running (same pid and name; a zombie awaiting its reaper counts as gone)."""
    table = proc_table()
    out = {}
    for pid, name in procs.items():
        if table.get(pid, (0, None))[1] != name:
            continue
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out[pid] = name
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -signal.SIGKILL)])
def test_stopped_bench_leaves_no_process(tmp_path, smollm2_gguf, host_runtime, sig, status):
    p = _start_bench(_profile(tmp_path, "sigdev", tmp_path / "dev"), smollm2_gguf, n=1024, repeat=3)
    started: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            started = _descendants(p.pid)
            if BINARY in started.values():
                break
            time.sleep(0.05)
        assert BINARY in started.values(), f"the run never started: {p.poll()} {started}"
        time.sleep(0.5)  # generating now
        started = _descendants(p.pid)
        assert {"mvlm-time", "sh"} & set(started.values()), started  # the resource wrapper: mvlm-time (else sh)
        os.kill(p.pid, sig)
        _, err = p.communicate(timeout=60)
        assert p.returncode == status, err[-2000:]
        if sig != signal.SIGKILL:
            assert "Traceback" not in err
        left = _alive(started)
        # SIGKILL: the kernel's death signal reaches the wrapper (mvlm-time forwards it), which stops the binary. The
        # grace is far shorter than the run left (1024 tokens), so a process left running is still running when checked.
        until = time.monotonic() + 3
        while left and time.monotonic() < until:
            time.sleep(0.1)
            left = _alive(started)
        assert not left, f"left running after {signal.Signals(sig).name}: {left}"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        for pid in _alive({**started, **_descendants(p.pid)}):  # a failed test leaves nothing behind either
            os.kill(pid, signal.SIGKILL)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.slow
def test_same_named_model_is_not_replaced_during_a_leased_bench(tmp_path, smollm2_gguf, host_runtime):
    """Bench 'one' runs ``a/M.gguf``, bench 'two' runs ``b/M.gguf`` (the same weights plus 64 trailing bytes: another
    sha256, still a valid GGUF), on one device workdir, started together."""
    models = {}
    for name, sub, extra in (("one", "a", b""), ("two", "b", b"\0" * 64)):
        (tmp_path / sub).mkdir()
        models[name] = tmp_path / sub / "M.gguf"
        shutil.copyfile(smollm2_gguf, models[name])
        with open(models[name], "ab") as f:
            f.write(extra)
    assert _sha(models["one"]) != _sha(models["two"])
    workdir = tmp_path / "dev"
    procs = {}
    for name in ("one", "two"):
        procs[name] = subprocess.Popen(
            [*MVLM, "bench", "--device", str(_profile(tmp_path, name, workdir)), "-m", str(models[name]), "-n", "24",
             "--repeat", "3", "--warmup", "0", "--json-file", str(tmp_path / f"{name}.json")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "COLUMNS": "200"})
    for name, p in procs.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{name}: {err[-2000:]}"
    recs = {name: json.loads((tmp_path / f"{name}.json").read_text())[0] for name in procs}
    for name, rec in recs.items():
        assert rec["model_sha256"] == _sha(models[name])
    first, later = sorted(recs, key=lambda n: recs[n]["runs"][0]["t_start"])
    device_copy = workdir / "models" / "M.gguf"
    assert _sha(device_copy) == _sha(models[later])  # the later bench pushed its model over the earlier one's
    pushed_at = device_copy.stat().st_mtime
    last_end = max(r["t_end"] for r in recs[first]["runs"])
    first_start = min(r["t_start"] for r in recs[later]["runs"])
    assert last_end <= pushed_at <= first_start, (
        f"{later}'s push at {pushed_at:.3f} is not between {first}'s last run end {last_end:.3f} and its own first "
        f"run {first_start:.3f}")


def _device_runs(workdir: Path) -> dict[int, str]:
    """The llama.cpp processes running from ``workdir`` (the ssh device's processes are on this machine too)."""
    out = {}
    for pid, (_, name) in proc_table().items():
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if name == BINARY and exe.startswith(str(workdir)):
            out[pid] = name
    return out


@pytest.mark.slow
def test_stopped_bench_over_ssh_stops_the_run_on_the_device(sshd, tmp_path, smollm2_gguf, host_runtime):
    """Ctrl-C of `mvlm bench --device <ssh>`: the llama.cpp run on the device stops too, within seconds, not at the
    device-side watchdog's timeout (the closed session breaks the run's output pipe: its next token ends it)."""
    sig = signal.SIGINT
    remote = tmp_path / "remote"
    p = _start_bench(sshd.profile_file(tmp_path / "box.toml", remote), smollm2_gguf, n=1536, repeat=1)
    running: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and p.poll() is None and not running:
            running = _device_runs(remote)
            time.sleep(0.05)
        assert running, f"the run never started on the device: {p.poll()}"
        time.sleep(0.5)  # generating now
        os.kill(p.pid, sig)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 128 + sig, err[-2000:]
        until = time.monotonic() + 5  # 1536 tokens take far longer: still running then means never stopped
        while _alive(running) and time.monotonic() < until:
            time.sleep(0.1)
        assert not _alive(running), f"left running on the device after {signal.Signals(sig).name}"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        for pid in _alive({**running, **_device_runs(remote)}):
            os.kill(pid, signal.SIGKILL)
