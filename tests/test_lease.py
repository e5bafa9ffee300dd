"""Device leases (issue 15, item 2): two benches on one device never measure at the same time.

Real processes hold real leases: a lock file (flock) for a local or SQLite history, a PostgreSQL advisory lock on a
real server when the history is PostgreSQL. Two real `mvlm bench --device local` processes started together on the
real SmolLM2 GGUF must leave measured intervals (each repetition's t_start..t_end in their JSON reports) that do not
overlap; --lease-timeout expiry is one line and exit 75."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from peers import run_bench

from mvlm_bench.device.profiles import load_profile, profile_from_dict
from mvlm_bench.plan.spec import BenchSpec
from mvlm_bench.session import lease
from mvlm_core.errors import MvlmError

MVLM = [sys.executable, "-m", "mvlm"]
REPO = Path(__file__).resolve().parents[1]


def _holder(key: str, db: str | None = None, cache: Path | None = None) -> subprocess.Popen:
    """Another process holding the lease of ``key`` until killed; returns once it holds it. ``cache``: its own
    $MVLM_CACHE (its lock files elsewhere: another host, as far as the lock files can tell)."""
    code = textwrap.dedent(f"""
        import sys, time
        from mvlm_bench.session.lease import device_lease
        with device_lease({key!r}, {db!r}, timeout=30):
            print("held", flush=True)
            time.sleep(600)
    """)
    env = {**os.environ, "MVLM_CACHE": str(cache)} if cache is not None else None
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def _stop(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    p.send_signal(sig)
    p.wait(timeout=30)


def _own_cache(tmp_path: Path) -> Path:
    """An $MVLM_CACHE whose lease directory is this test's own (other benches on this machine use the real one);
    its runtime is the real host build."""
    from mvlm_core.runtime import cache_root

    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    (cache / "runtime").symlink_to(cache_root() / "runtime")
    return cache


def _profile(tmp_path: Path, name: str, **kw) -> Path:
    lines = [f'name = "{name}"', 'transport = "local"', f'workdir = "{tmp_path / name}"', 'target = "host"', "threads = 1"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in kw.items()]
    p = tmp_path / f"{name}.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


# --- identity -----------------------------------------------------------------------------------------------------
def test_device_key_is_where_the_device_is(tmp_path):
    local = load_profile(str(_profile(tmp_path, "a")))
    other_local = load_profile(str(REPO / "devices" / "qemu-arm64.toml"))
    assert lease.device_key(local) == lease.device_key(other_local)  # one CPU: one lease

    def ssh(address, **kw):
        return profile_from_dict({"transport": "ssh", "address": address, "workdir": "/tmp", "target": "host", **kw},
                                 where="test", default_name="b")

    assert lease.device_key(ssh("ssh://nvidia@Orin.local")) == lease.device_key(ssh("ssh://root@orin.local:22"))
    assert lease.device_key(ssh("ssh://nvidia@orin.local")) != lease.device_key(ssh("ssh://nvidia@orin.local:2222"))
    phone = profile_from_dict({"transport": "adb", "address": "R58M", "workdir": "/data/local/tmp", "target": "host"},
                              where="test", default_name="p")
    assert lease.device_key(phone) == "adb:R58M"
    assert lease.key_id("adb:R58M") == lease.key_id("adb:R58M") != lease.key_id("adb:R58N")
    assert -(2**63) <= lease.key_id("adb:R58M") < 2**63


@pytest.mark.slow
def test_bad_lease_timeout_is_one_line(smollm2_gguf):
    r = subprocess.run([*MVLM, "bench", "--device", "local", "-m", str(smollm2_gguf), "--lease-timeout", "-1"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "--lease-timeout -1 is out of range" in r.stderr
    with pytest.raises(MvlmError, match="--lease-timeout nan"):
        lease.check_timeout(float("nan"))


# --- lock file ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lock_file_lease_across_processes(monkeypatch, tmp_path):
    monkeypatch.setenv("MVLM_CACHE", str(tmp_path / "cache"))  # the lease files live in the cache
    key = f"test:{uuid.uuid4()}"
    p = _holder(key)
    try:
        with pytest.raises(MvlmError) as busy:
            with lease.device_lease(key, None, timeout=0):
                pytest.fail("acquired a lease another process holds")
        assert busy.value.exit_code == lease.EXIT_BUSY
        assert f"pid {p.pid}" in str(busy.value) and "--lease-timeout" in str(busy.value)
        heard: list[str] = []
        t0 = time.monotonic()
        with pytest.raises(MvlmError, match="still busy after 1 s"):
            with lease.device_lease(key, None, timeout=1.2, on_wait=heard.append):
                pass
        assert 1.2 <= time.monotonic() - t0 < 5
        assert heard and heard[0].startswith(f"waiting for device {key}: held by pid {p.pid} on ")
    finally:
        _stop(p)  # a crash (SIGKILL): the kernel releases the lock
    with lease.device_lease(key, None, timeout=0) as info:
        assert info["kind"] == "file" and info["waited_s"] < 1
        # while held, another process cannot take it either
        r = subprocess.run([sys.executable, "-c", f"from mvlm_bench.session.lease import device_lease\n"
                            f"with device_lease({key!r}, None, timeout=0): pass"], capture_output=True, text=True,
                           cwd=REPO, env={**os.environ, "MVLM_CACHE": str(tmp_path / "cache")}, timeout=60)
        assert r.returncode != 0 and f"pid {os.getpid()}" in r.stderr


@pytest.mark.slow
def test_waiter_gets_the_lease_when_the_holder_ends(monkeypatch, tmp_path):
    monkeypatch.setenv("MVLM_CACHE", str(tmp_path / "cache"))
    key = f"test:{uuid.uuid4()}"
    p = _holder(key)
    killer = subprocess.Popen([sys.executable, "-c", f"import os, time; time.sleep(1.0); os.kill({p.pid}, 9)"])
    t0 = time.monotonic()
    with lease.device_lease(key, None, timeout=20) as info:
        waited = time.monotonic() - t0
    killer.wait(timeout=30)
    p.wait(timeout=30)
    assert 0.8 < waited < 10 and info["waited_s"] > 0.8


# --- real benches ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_benches_never_measure_at_the_same_time(tmp_path, smollm2_gguf, host_runtime):
    """Two `mvlm bench` processes on two profiles of this machine (one device key), started together."""
    procs = []
    for name in ("one", "two"):
        prof = _profile(tmp_path, name)
        procs.append(subprocess.Popen(
            [*MVLM, "bench", "--device", str(prof), "-m", str(smollm2_gguf), "-n", "24", "--repeat", "3", "--warmup", "1",
             "--json-file", str(tmp_path / f"{name}.json")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "COLUMNS": "200"}))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    intervals = []
    for name in ("one", "two"):
        rec = json.loads((tmp_path / f"{name}.json").read_text())[0]
        intervals += [(r["t_start"], r["t_end"], name) for r in rec["runs"]]
    intervals.sort()
    assert len(intervals) == 6
    for (s1, e1, n1), (s2, e2, n2) in zip(intervals, intervals[1:], strict=False):
        assert e1 <= s2, f"{n1} [{s1:.3f}, {e1:.3f}] overlaps {n2} [{s2:.3f}, {e2:.3f}]"
    # one bench's runs all come before the other's: the lease covers the whole series (warm-up included)
    assert [n for *_, n in intervals] in (["one"] * 3 + ["two"] * 3, ["two"] * 3 + ["one"] * 3)
    # and the lease really was contended: the later one waited and said for whom
    assert any("waiting for device" in err or "waited" in err for _, err in outs), [e[-500:] for _, e in outs]


@pytest.mark.slow
def test_concurrent_raw_runs_do_overlap(tmp_path, smollm2_gguf, host_runtime):
    """The control: the same two commands started together without mvlm overlap (so the test above can fail)."""
    exe = Path(host_runtime) / "bin" / "llama-completion"
    argv = [str(exe), "-m", str(smollm2_gguf), "-p", "Step 1:", "-n", "24", "-no-cnv", "--temp", "0", "-t", "1"]
    env = {**os.environ, "LD_LIBRARY_PATH": str(Path(host_runtime) / "lib")}
    starts = [time.time()]
    a = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    starts.append(time.time())
    b = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    a.wait(timeout=120)
    end_a = time.time()
    b.wait(timeout=120)
    assert a.returncode == 0 and b.returncode == 0
    assert starts[1] < end_a  # b started before a ended


@pytest.mark.slow
def test_lease_timeout_expiry_is_one_line(tmp_path, smollm2_gguf, host_runtime):
    prof = _profile(tmp_path, "busy")
    key = lease.device_key(load_profile(str(prof)))
    with lease.device_lease(key, None, timeout=60):
        t0 = time.monotonic()
        r = subprocess.run([*MVLM, "bench", "--device", str(prof), "-m", str(smollm2_gguf), "-n", "8", "--repeat", "1",
                            "--lease-timeout", "1", "--json-file", str(tmp_path / "r.json")],
                           capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "COLUMNS": "300"})
        took = time.monotonic() - t0
    assert r.returncode == lease.EXIT_BUSY, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert f"device busy is still busy after 1 s (held by pid {os.getpid()} on " in lines[0]
    assert "nothing was measured" in lines[0]
    assert not (tmp_path / "r.json").exists() and took < 120


# --- PostgreSQL advisory lock (a real server: the `postgresql` fixture) -------------------------------------------
@pytest.mark.slow
def test_postgres_advisory_lease_across_processes(postgresql, monkeypatch, tmp_path):
    monkeypatch.setenv("MVLM_CACHE", str(tmp_path / "cache"))
    key = f"test:{uuid.uuid4()}"
    p = _holder(key, postgresql, cache=tmp_path / "other-host")  # its lock file is not this process's to see
    try:
        heard: list[str] = []
        with pytest.raises(MvlmError) as busy:
            with lease.device_lease(key, postgresql, timeout=1.0, on_wait=heard.append):
                pytest.fail("acquired an advisory lock another process holds")
        assert busy.value.exit_code == lease.EXIT_BUSY
        # the holder is named by its own session's application_name, read from pg_locks / pg_stat_activity
        assert f"held by mvlm bench pid {p.pid} on " in str(busy.value), str(busy.value)
        assert heard and f"pid {p.pid}" in heard[0]
    finally:
        _stop(p)  # a crash: its connection closes and the server drops its advisory lock
    with lease.device_lease(key, postgresql, timeout=10) as info:
        assert info["kind"] == "postgresql" and info["lock_id"] == lease.key_id(key)
        r = subprocess.run([sys.executable, "-c", f"from mvlm_bench.session.lease import device_lease\n"
                            f"with device_lease({key!r}, {postgresql!r}, timeout=0): pass"],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.returncode != 0 and f"pid {os.getpid()}" in r.stderr
    # released on exit: another process takes it at once
    r = subprocess.run([sys.executable, "-c", f"from mvlm_bench.session.lease import device_lease\n"
                        f"with device_lease({key!r}, {postgresql!r}, timeout=0) as i: print(i['kind'])"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "postgresql", r.stderr


def test_postgres_unreachable_is_one_line():
    with pytest.raises(MvlmError, match="cannot reach the PostgreSQL history to lease device x") as e:
        with lease.device_lease("x", "postgresql://nobody@127.0.0.1:1/none", timeout=0):
            pass
    assert e.value.exit_code == 3


@pytest.mark.slow
def test_bench_with_a_postgres_history_waits_for_its_advisory_lease(postgresql, tmp_path, smollm2_gguf, host_runtime,
                                                                    monkeypatch):
    """`mvlm bench` with $MVLM_HISTORY=postgresql://...: a held lease (here: this test's session, which on a local
    device takes the lock file and the advisory lock) stops it after --lease-timeout with one line naming the holder."""
    prof = _profile(tmp_path, "pgdev")
    key = lease.device_key(load_profile(str(prof)))
    env = {**os.environ, "COLUMNS": "300", "MVLM_HISTORY": postgresql, "MVLM_CACHE": str(_own_cache(tmp_path))}
    monkeypatch.setenv("MVLM_CACHE", env["MVLM_CACHE"])
    with lease.device_lease(key, postgresql, timeout=60):
        r = subprocess.run([*MVLM, "bench", "--device", str(prof), "-m", str(smollm2_gguf), "-n", "8", "--repeat", "1",
                            "--lease-timeout", "1"], capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert r.returncode == lease.EXIT_BUSY, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    # a local device: this session holds the lock file too (taken first), so that is the holder named
    assert len(lines) == 1 and f"held by pid {os.getpid()} on " in lines[0], lines
    # free again: the same command measures, leasing through PostgreSQL
    r = subprocess.run([*MVLM, "bench", "--device", str(prof), "-m", str(smollm2_gguf), "-n", "8", "--repeat", "1",
                        "--lease-timeout", "0", "--json"], capture_output=True, text=True, cwd=REPO, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["runs"][0]["t_start"] is not None


# --- a device on this machine: the lock file whatever the history (PostgreSQL: the advisory lock after it) ---------
def test_a_postgres_history_bench_takes_the_lock_file_too(postgresql, monkeypatch, tmp_path):
    """A PostgreSQL-history bench and a SQLite-history (or no-history) bench on the same device see each other, the
    device on this machine or remote."""
    monkeypatch.setenv("MVLM_CACHE", str(tmp_path / "cache"))
    key = lease.device_key(load_profile(str(_profile(tmp_path, "here"))))
    assert key.startswith("local:")
    with lease.device_lease(key, None, timeout=0):  # a bench with a SQLite history (or none) holds the device
        with pytest.raises(MvlmError) as busy:
            with lease.device_lease(key, postgresql, timeout=0):
                pytest.fail("a PostgreSQL-history bench did not see the lock file")
        assert busy.value.exit_code == lease.EXIT_BUSY and f"held by pid {os.getpid()} on " in str(busy.value)
    with lease.device_lease(key, postgresql, timeout=0) as info:  # and the other way round
        assert info["kind"] == "postgresql" and info["path"] == str(lease.lock_path(key))
        r = subprocess.run([sys.executable, "-c", f"from mvlm_bench.session.lease import device_lease\n"
                            f"with device_lease({key!r}, None, timeout=0): pass"],
                           capture_output=True, text=True, cwd=REPO, timeout=60, env={**os.environ})
        assert r.returncode != 0 and f"is busy (held by pid {os.getpid()}" in r.stderr, r.stderr
    # a remote device too: a bench here with a PostgreSQL history and one with none see each other (two benches
    # measured one ssh board at once when only the advisory lock was taken for it)
    board = "ssh:board.example"
    with lease.device_lease(board, None, timeout=0):
        with pytest.raises(MvlmError) as busy:
            with lease.device_lease(board, postgresql, timeout=0):
                pytest.fail("a PostgreSQL-history bench did not see the no-history bench on the ssh device")
        assert busy.value.exit_code == lease.EXIT_BUSY
    with lease.device_lease(board, postgresql, timeout=0) as info:
        assert info["kind"] == "postgresql" and info["path"] == str(lease.lock_path(board))
        r = subprocess.run([sys.executable, "-c", f"from mvlm_bench.session.lease import device_lease\n"
                            f"with device_lease({board!r}, None, timeout=0): pass"],
                           capture_output=True, text=True, cwd=REPO, timeout=60, env={**os.environ})
        assert r.returncode != 0 and f"is busy (held by pid {os.getpid()}" in r.stderr, r.stderr


@pytest.mark.slow
def test_bench_with_a_postgres_history_sees_a_held_lock_file(postgresql, tmp_path, smollm2_gguf, host_runtime):
    env = {**os.environ, "COLUMNS": "300", "MVLM_CACHE": str(_own_cache(tmp_path))}
    code = "from mvlm_bench.session.lease import device_lease, device_key\n" \
           "from mvlm_bench.device.profiles import load_profile\n" \
           "import time\nwith device_lease(device_key(load_profile('local')), None, timeout=0):\n" \
           "    print('held', flush=True)\n    time.sleep(600)\n"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        r = subprocess.run([*MVLM, "bench", "--device", "local", "-m", str(smollm2_gguf), "-n", "4", "--repeat", "1",
                            "--lease-timeout", "0", "--save", "--db", postgresql], capture_output=True, text=True,
                           cwd=tmp_path, timeout=300, env=env)
    finally:
        _stop(holder)
    assert r.returncode == lease.EXIT_BUSY, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and f"held by pid {holder.pid} on " in lines[0], r.stderr


@pytest.mark.parametrize("url", ["postgresql://mvlm:S3cretPW@[::1/mh", "postgresql://mvlm:S3cret PW@127.0.0.1:1/mh"])
def test_lease_errors_never_show_the_password(url, monkeypatch, tmp_path):
    monkeypatch.setenv("MVLM_CACHE", str(tmp_path / "cache"))
    for key in ("local:here", "ssh:board.example"):
        with pytest.raises(MvlmError, match="cannot reach the PostgreSQL history to lease device") as e:
            with lease.device_lease(key, url, timeout=0):
                pass
        assert "S3cret" not in str(e.value) and "***" in str(e.value), str(e.value)


@pytest.mark.slow
def test_the_confirming_remeasure_leases_through_the_bench_history(postgresql, sshd, tmp_path, smollm2_gguf,
                                                                   host_runtime, monkeypatch):
    """`mvlm bench --db postgresql://... --baseline ... --fail-on-regression`: the interleaved re-measure that confirms
    a history suspicion holds the device's lease in that PostgreSQL, as the measurement did. (It leased through
    $MVLM_HISTORY: a lab runner given --db re-measured a remote device while another runner held it.)"""
    from mvlm_bench.decide.verdict import Confirmer
    from mvlm_bench.history.entries import entries_from_runs

    monkeypatch.delenv("MVLM_HISTORY", raising=False)
    prof = sshd.profile(str(tmp_path / "remote"), target="host", threads=1)
    spec = BenchSpec("lm", smollm2_gguf, repeat=1, n_predict=4, threads=1)
    (entry,) = entries_from_runs(run_bench(prof, spec, lease_db=postgresql, lease_timeout=0).runs)
    said: list[str] = []
    remeasure = Confirmer(prof, spec, said.append, lease_db=postgresql, lease_timeout=0)(entry, entry)
    assert remeasure is not None, said  # its build and model are at hand
    with lease.device_lease(lease.device_key(prof), postgresql, timeout=0):  # another runner measures on it
        with pytest.raises(MvlmError) as busy:
            remeasure()
    assert busy.value.exit_code == lease.EXIT_BUSY, busy.value
    assert not any("candidate done" in s for s in said), said  # nothing was measured meanwhile


@pytest.mark.slow
def test_a_lease_lost_mid_measurement_keeps_nothing(postgresql, sshd, tmp_path, smollm2_gguf, host_runtime):
    """The PostgreSQL session holding a remote device's lease ends while the bench measures (the server restarted,
    the link dropped; here: pg_terminate_backend): the server has released the lock, another runner may have measured
    meanwhile, so the bench stops after the run in progress with one line (exit 3) and saves nothing."""
    import psycopg
    from peers import proc_table

    prof = sshd.profile_file(tmp_path / "box.toml", tmp_path / "remote")
    env = {k: v for k, v in os.environ.items() if k != "MVLM_HISTORY"} | {"COLUMNS": "300"}
    p = subprocess.Popen([*MVLM, "bench", "--device", str(prof), "-m", str(smollm2_gguf), "-n", "96", "--repeat", "3",
                          "--warmup", "0", "--save", "--db", postgresql, "--label", "lost"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and p.poll() is None:
            if any(name == "llama-completion"[:15] for _, name in proc_table().values()):
                break
            time.sleep(0.05)
        with psycopg.connect(postgresql, autocommit=True) as c:
            ended = c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE application_name LIKE 'mvlm bench pid %'").fetchall()
        assert ended == [(True,)], ended  # the one lease session
        out, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert p.returncode == 3 and len(errors) == 1, err[-3000:]
    assert "lease of device box was lost during the measurement" in errors[0] and "run again" in errors[0], errors
    assert "run 3/3 done" not in err  # stopped after the run in progress
    r = subprocess.run([*MVLM, "history", "--db", postgresql, "--json"], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=60)
    assert r.returncode != 0 or json.loads(r.stdout) == [], r.stdout + r.stderr  # nothing saved (no table or empty)


@pytest.mark.slow
def test_a_server_holds_the_device_shared_and_a_bench_waits_for_it(tmp_path, smollm2_gguf, host_runtime):
    """`mvlm serve` holds the device's lease for as long as it serves, shared with other servers: a second server
    starts beside it, a bench does not measure beside it (it waits, and here gives up in one line, exit 75). (A serve
    that pushed into a bench's work dir mid-measurement once made that bench report another model's numbers.)"""
    from peers import _free_port

    prof = _profile(tmp_path, "served")
    env = {**os.environ, "COLUMNS": "300"}
    servers = []
    try:
        for _ in range(2):
            p = subprocess.Popen([*MVLM, "serve", "--device", str(prof), "-m", str(smollm2_gguf), "--port",
                                  str(_free_port()), "--ctx-size", "512", "--threads", "1"], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
            servers.append(p)
            for line in p.stdout:
                if "Ctrl-C stops it" in line:
                    break
            assert p.poll() is None, "a second server must start beside the first"
        r = subprocess.run([*MVLM, "bench", "--device", str(prof), "-m", str(smollm2_gguf), "-n", "4", "--repeat", "1",
                            "--lease-timeout", "1", "--json-file", str(tmp_path / "r.json")],
                           capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode == lease.EXIT_BUSY and len(lines) == 1, r.stderr
        assert "device served is still busy after 1 s (held by pid" in lines[0] and "nothing was measured" in lines[0]
        assert not (tmp_path / "r.json").exists()
    finally:
        for p in servers:
            p.send_signal(signal.SIGINT)
        for p in servers:
            assert p.wait(timeout=60) == 0
