"""Transports end to end: local (with qemu as exec wrapper), ssh against a real sshd, adb through the real adb.

- ``local``: real processes on this machine; ``qemu-arm64`` runs a real static aarch64 binary under qemu-user.
- ``ssh``: a real OpenSSH ``sshd`` started by the fixture on 127.0.0.1 (free port, own host key, own authorized key,
  host-key checking ON through a known_hosts file that holds the generated host key). The dropped-connection test
  kills the server-side session processes in the middle of a push.
- ``adb``: Debian's real adb client and server against a test phone, a device daemon speaking the ADB wire protocol
  on 127.0.0.1 (tests/adb_device.py, the ``phones`` fixture); faults are made at the wire (the link dropped mid-push,
  AUTH refused, ENOSPC from the phone's full /data, a read-only workdir).
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from peers import _free_port

from mvlm_bench.device.profiles import DeviceProfile, profile_from_dict
from mvlm_bench.device.sync import MANIFEST_NAME, sync
from mvlm_bench.device.transports import make_transport
from mvlm_bench.device.transports.base import (
    AuthError,
    CommandFailed,
    CommandSignaled,
    CommandTimeout,
    ConnectionLostError,
    HostKeyError,
    UnreachableError,
)
from mvlm_bench.device.transports.local import LocalTransport
from mvlm_bench.device.transports.ssh import SshTransport
from mvlm_core.errors import MvlmError

NASTY = "we ird 'sq' \"dq\" $(touch {m}) ; touch {m} & `touch {m}` | x"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _local_profile(workdir: Path, **kw) -> DeviceProfile:
    data = {"transport": "local", "target": "host", "workdir": str(workdir), **kw}
    return profile_from_dict(data, where="test", default_name="test-local")


# ------------------------------------------------------------------------------------------------------------- local


def test_local_run_merges_output_env_cwd(tmp_path):
    t = LocalTransport(_local_profile(tmp_path, env={"PROFILE_VAR": "from-profile"}))
    r = t.run(
        ["sh", "-c", 'echo out; echo err >&2; echo "$PROFILE_VAR $EXTRA"; pwd'], timeout=10, env={"EXTRA": "x"}, cwd=str(tmp_path)
    )
    assert r.ok and r.returncode == 0 and r.signal is None and not r.timed_out
    assert r.output.splitlines() == ["out", "err", "from-profile x", str(tmp_path)]
    assert r.check() is r


@pytest.mark.slow
def test_local_timeout_kills_the_command(tmp_path):
    t = LocalTransport(_local_profile(tmp_path))
    start = time.monotonic()
    r = t.run(["sh", "-c", "echo started; sleep 30"], timeout=0.5)
    assert r.timed_out and r.returncode is None
    assert time.monotonic() - start < 5
    assert "started" in r.output  # output before the kill is kept
    with pytest.raises(CommandTimeout, match="timed out after"):
        r.check("llama-completion")


def test_local_signal_and_failure_are_typed(tmp_path):
    t = LocalTransport(_local_profile(tmp_path))
    r = t.run(["sh", "-c", "echo about to crash; kill -SEGV $$"], timeout=10)
    assert r.signal == 11 and not r.ok
    with pytest.raises(CommandSignaled, match="SIGSEGV") as e:
        r.check("llama-completion")
    assert "about to crash" in e.value.detail
    r = t.run(["sh", "-c", "echo bad; exit 3"], timeout=10)
    assert r.returncode == 3 and r.signal is None
    with pytest.raises(CommandFailed, match="status 3"):
        r.check()
    r = t.run([str(tmp_path / "no-such-binary")], timeout=10)
    assert r.returncode == 127 and "cannot execute" in r.output


def test_local_files(tmp_path):
    wd = tmp_path / "dev"
    t = LocalTransport(_local_profile(wd))
    t.mkdir(str(wd / "a" / "b"))
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * (1 << 20) + 5))
    seen = []
    t.push(src, str(wd / "a" / "b" / "x.bin"), progress=lambda d, n: seen.append((d, n)))
    assert seen[-1] == (src.stat().st_size, src.stat().st_size) and len(seen) == 4
    t.pull(str(wd / "a" / "b" / "x.bin"), tmp_path / "back.bin")
    assert _sha(tmp_path / "back.bin") == _sha(src)
    assert t.read_text(str(wd / "missing")) is None
    t.write_text(str(wd / "m.json"), "héllo\n")
    assert t.read_text(str(wd / "m.json")) == "héllo\n"
    assert t.file_sizes([str(wd / "m.json"), str(wd / "nope")]) == {str(wd / "m.json"): 7, str(wd / "nope"): None}
    assert abs(t.free_bytes(str(wd / "not" / "yet")) - shutil.disk_usage(tmp_path).free) < (64 << 20)
    t.rename(str(wd / "m.json"), str(wd / "n.json"))
    t.remove(str(wd / "n.json"))
    assert not (wd / "n.json").exists() and not (wd / "m.json").exists()
    assert sorted(os.listdir(wd)) == ["a"]  # no temp files left by write_text


def test_exec_wrapper_is_applied_once(tmp_path):
    # A wrapper that tags its output proves it ran, and ran once even when the caller already prefixed it.
    wrapper = tmp_path / "wrap"
    wrapper.write_text('#!/bin/sh\necho "wrapped:$1"\nexec "$@"\n')
    wrapper.chmod(0o755)
    t = LocalTransport(_local_profile(tmp_path, exec_wrapper=[str(wrapper)]))
    r = t.run(["echo", "hi"], timeout=10)
    assert r.output.splitlines() == ["wrapped:echo", "hi"]
    r = t.run([str(wrapper), "echo", "hi"], timeout=10)
    assert r.output.splitlines() == ["wrapped:echo", "hi"]


@pytest.mark.qemu
def test_qemu_arm64_profile_runs_a_real_aarch64_binary(tmp_path):
    from mvlm_bench.device.profiles import load_profile

    cc = shutil.which("aarch64-linux-gnu-gcc")
    if cc is None:
        pytest.skip("aarch64-linux-gnu-gcc (Debian gcc-aarch64-linux-gnu) is not installed: nothing to run under qemu")
    src = tmp_path / "hello.c"
    src.write_text(
        "#include <stdio.h>\n#include <signal.h>\nint main(int c, char **v) {\n"
        '  if (c > 1) raise(SIGABRT);\n  printf("hello from %d-bit\\n", (int)(8 * sizeof(void *)));\n'
        "  return 0;\n}\n"
    )
    exe = tmp_path / "hello"
    subprocess.run([cc, "-static", "-O1", "-o", str(exe), str(src)], check=True)
    profile = load_profile("qemu-arm64")
    assert profile.emulated and profile.exec_wrapper == ("qemu-aarch64-static",)
    t = make_transport(profile)
    t.check()
    r = t.run([str(exe)], timeout=60)
    assert r.ok and r.output.strip() == "hello from 64-bit"
    r = t.run([str(exe), "crash"], timeout=60)
    assert r.signal == 6  # qemu-user re-raises the guest's fatal signal
    # the same binary without the wrapper cannot run on x86: the wrapper is what makes the device work
    r2 = LocalTransport(_local_profile(tmp_path)).run([str(exe)], timeout=30)
    assert r2.returncode != 0


# ------------------------------------------------------------------------------------------------------------- ssh


@pytest.fixture
def ssh_t(sshd, tmp_path):
    t = make_transport(sshd.profile(str(tmp_path / "remote")))
    assert isinstance(t, SshTransport)
    yield t
    t.close()


@pytest.mark.slow
def test_ssh_run_output_env_cwd_signal(ssh_t, tmp_path):
    ssh_t.check()
    r = ssh_t.run(
        ["sh", "-c", 'echo out; echo err >&2; echo "$V"; pwd; exit 7'], timeout=20, env={"V": "a b $HOME"}, cwd=str(tmp_path)
    )
    assert r.returncode == 7 and not r.timed_out and r.signal is None
    assert r.output.splitlines() == ["out", "err", "a b $HOME", str(tmp_path)]
    r = ssh_t.run(["sh", "-c", "echo before; kill -SEGV $$"], timeout=20)
    assert r.signal == 11 and "before" in r.output
    with pytest.raises(CommandSignaled):
        r.check("llama-completion")
    r = ssh_t.run(["true"], timeout=20)
    assert r.ok


@pytest.mark.slow
def test_ssh_timeout_kills_the_remote_command(ssh_t):
    start = time.monotonic()
    r = ssh_t.run(["sleep", "37.25"], timeout=1)
    assert r.timed_out and time.monotonic() - start < 10
    time.sleep(0.5)
    left = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p) == ["sleep", "37.25"]]
    assert left == []  # the device-side watchdog killed it; a dropped local client alone would not


def _cmdline(pid: str) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


@pytest.mark.slow  # more than ~3 s here (fast lane: pytest -m 'not slow')
def test_ssh_push_pull_and_sync(ssh_t, tmp_path):
    wd = tmp_path / "remote"
    local = tmp_path / "local"
    local.mkdir()
    (local / "llama-completion").write_bytes(b"\x7fELF" + os.urandom(300_000))
    (local / "m.gguf").write_bytes(os.urandom(2_000_000))
    files = {"bin/llama-completion": local / "llama-completion", "models/m.gguf": local / "m.gguf"}
    cache = tmp_path / "hashes.json"
    seen = []
    res = sync(ssh_t, str(wd), files, progress=lambda d, n: seen.append((d, n)), hash_cache=cache)
    assert res.pushed_bytes == 2_300_004 and sorted(res.pushed_files) == sorted(files)
    assert seen[-1] == (2_300_004, 2_300_004)
    assert _sha(wd / "models" / "m.gguf") == _sha(local / "m.gguf")
    assert os.access(wd / "bin" / "llama-completion", os.X_OK)
    manifest = json.loads((wd / MANIFEST_NAME).read_text())["files"]
    assert manifest == {k: {"sha256": _sha(p), "size": p.stat().st_size} for k, p in files.items()}
    res2 = sync(ssh_t, str(wd), files, hash_cache=cache)
    assert res2.pushed_bytes == 0 and res2.pushed_files == [] and sorted(res2.skipped_files) == sorted(files)
    ssh_t.pull(str(wd / "models" / "m.gguf"), tmp_path / "back.gguf")
    assert _sha(tmp_path / "back.gguf") == _sha(local / "m.gguf")
    assert ssh_t.free_bytes(str(wd)) > 0
    assert ssh_t.workdir == str(wd)


@pytest.mark.slow
def test_ssh_home_relative_workdir(sshd, tmp_path):
    t = make_transport(sshd.profile("~/mvlm-test-workdir"))
    try:
        assert t.workdir == str(Path(pwd.getpwuid(os.getuid()).pw_dir) / "mvlm-test-workdir")
    finally:
        t.close()


def test_ssh_wrong_host_key_is_refused(sshd, tmp_path):
    other = (sshd.root / "other_key.pub").read_text().split()
    bad = tmp_path / "known_hosts"
    bad.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    t = make_transport(sshd.profile(str(tmp_path), known_hosts=bad))
    with pytest.raises(HostKeyError, match="host key verification failed") as e:
        t.check()
    assert "\n" not in str(e.value)
    t.close()


def test_ssh_unknown_host_key_is_refused(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    t = make_transport(sshd.profile(str(tmp_path), known_hosts=empty))
    with pytest.raises(HostKeyError):
        t.check()
    t.close()


def test_ssh_wrong_client_key_is_an_auth_failure(sshd, tmp_path):
    t = make_transport(sshd.profile(str(tmp_path), key="other_key"))
    with pytest.raises(AuthError, match="authentication failed") as e:
        t.check()
    assert not isinstance(e.value, HostKeyError)
    t.close()


def test_ssh_unreachable_port(sshd, tmp_path):
    t = make_transport(sshd.profile(str(tmp_path), port=_free_port()))
    with pytest.raises(UnreachableError, match="cannot connect.*Connection refused"):
        t.check()
    t.close()


@pytest.mark.slow  # more than ~3 s here (fast lane: pytest -m 'not slow')
def test_ssh_connection_dropped_mid_push_then_sync_recovers(sshd, ssh_t, tmp_path):
    wd = tmp_path / "remote"
    big = tmp_path / "big.gguf"
    big.write_bytes(os.urandom(48 << 20))
    small = tmp_path / "small.bin"
    small.write_bytes(b"small")
    files = {"models/small.bin": small, "models/big.gguf": big}
    cache = tmp_path / "hashes.json"
    sync(ssh_t, str(wd), {"models/small.bin": small}, hash_cache=cache)
    killed = []

    def pull_the_plug(done: int, total: int) -> None:
        if done >= (6 << 20) and not killed:
            killed.append(sshd.kill_sessions())

    with pytest.raises(ConnectionLostError, match="connection lost during push of big.gguf"):
        sync(ssh_t, str(wd), files, progress=pull_the_plug, hash_cache=cache)
    assert killed and killed[0] > 0
    assert not (wd / "models" / "big.gguf").exists()  # never a half file under the final name
    manifest = json.loads((wd / MANIFEST_NAME).read_text())["files"]
    assert set(manifest) == {"models/small.bin"}
    # reconnect (new master) and sync again: only the big file goes, the leftover .part is gone afterwards
    res = sync(ssh_t, str(wd), files, hash_cache=cache)
    assert res.pushed_files == ["models/big.gguf"] and res.pushed_bytes == big.stat().st_size
    assert _sha(wd / "models" / "big.gguf") == _sha(big)
    assert sorted(os.listdir(wd / "models")) == ["big.gguf", "small.bin"]
    manifest = json.loads((wd / MANIFEST_NAME).read_text())["files"]
    assert manifest["models/big.gguf"] == {"sha256": _sha(big), "size": big.stat().st_size}


@pytest.mark.slow
def test_ssh_no_injection_through_names(sshd, tmp_path):
    marker = tmp_path / "INJECTED"
    nasty = NASTY.format(m=marker)
    wd = tmp_path / f"work {nasty}"
    t = make_transport(sshd.profile(str(wd), env={"X": nasty}))
    try:
        src = tmp_path / "f.bin"
        src.write_bytes(b"payload")
        rel = f"models/{nasty}.gguf"
        res = sync(t, str(wd), {rel: src}, hash_cache=tmp_path / "h.json")
        assert res.pushed_files == [rel]
        assert (wd / "models" / f"{nasty}.gguf").read_bytes() == b"payload"
        r = t.run(["printf", "%s|%s", nasty, "$X"], timeout=20, cwd=str(wd))
        assert r.output == f"{nasty}|$X"
        r = t.run(["sh", "-c", 'printf %s "$X"'], timeout=20, cwd=str(wd))
        assert r.output == nasty
        assert t.read_text(str(wd / "models" / f"{nasty}.gguf")) == "payload"
        assert not marker.exists()
    finally:
        t.close()


# ------------------------------------------------------------------------------------------------------------- adb


def _adb_profile(serial: str, workdir: str = "/data/local/tmp/mvlm", **kw) -> DeviceProfile:
    data = {"transport": "adb", "address": serial, "target": "android-arm64", "workdir": workdir, "threads": 4, **kw}
    return profile_from_dict(data, where="test", default_name="test-adb")


def test_the_real_adb_reaches_the_test_phone(phones, adb_server):
    """Debian's adb client and server, a device daemon speaking the ADB wire protocol (tests/adb_device.py)."""
    phone = phones()
    out = subprocess.run(["adb", "devices"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("List of devices attached") and f"{phone.serial}\tdevice" in out
    assert os.path.realpath(shutil.which("adb")) == os.path.realpath(adb_server.adb)  # no double on PATH


@pytest.mark.slow
def test_adb_run_push_pull_sync(phones, tmp_path):
    phone = phones()
    t = make_transport(_adb_profile(phone.serial, env={"LD_LIBRARY_PATH": "/data/local/tmp/mvlm/lib"}))
    t.check()
    r = t.run(["sh", "-c", 'echo out; echo err >&2; echo "$LD_LIBRARY_PATH"; exit 5'], timeout=20)
    assert r.returncode == 5 and r.output.splitlines()[:2] == ["out", "err"]
    r = t.run(["sh", "-c", "kill -ABRT $$"], timeout=20)
    assert r.signal == 6
    src = tmp_path / "m.gguf"
    src.write_bytes(os.urandom(300_000))  # several 64 KiB sync DATA chunks
    exe = tmp_path / "llama-cli"
    exe.write_bytes(b"#!/bin/sh\necho ran\n")
    exe.chmod(0o755)
    files = {"models/m.gguf": src, "bin/llama-cli": exe}
    res = sync(t, t.workdir, files, hash_cache=tmp_path / "h.json")
    assert res.pushed_bytes == 300_000 + exe.stat().st_size
    wd = phone.root / "data/local/tmp/mvlm"
    assert _sha(wd / "models/m.gguf") == _sha(src) and os.access(wd / "bin/llama-cli", os.X_OK)
    assert t.run(["bin/llama-cli"], timeout=20, cwd=t.workdir).output.strip() == "ran"
    res = sync(t, t.workdir, files, hash_cache=tmp_path / "h.json")
    assert res.pushed_bytes == 0 and res.summary().startswith("pushed 0 bytes")
    t.pull("/data/local/tmp/mvlm/models/m.gguf", tmp_path / "back")
    assert _sha(tmp_path / "back") == _sha(src)
    assert t.free_bytes("/data/local/tmp/mvlm") > 0
    with pytest.raises(MvlmError, match="does not exist on the device"):
        t.pull("/data/local/tmp/mvlm/nothing-here", tmp_path / "none")


def test_adb_missing_and_unauthorized_device(phones):
    locked = phones("locked", state="unauthorized", auth=True)
    with pytest.raises(UnreachableError, match="adb NOPE: device not available.*not found"):
        make_transport(_adb_profile("NOPE")).check()
    with pytest.raises(AuthError, match="unauthorized.*Allow USB debugging"):
        make_transport(_adb_profile(locked.serial)).check()


@pytest.mark.parametrize("serial", ["127.0.0.1:5555\n", "-s", "R58M;touch x", ""])
def test_adb_serials_that_are_not_serials_are_refused_when_read(serial):
    with pytest.raises(MvlmError, match="address|serial"):
        _adb_profile(serial)


def test_adb_two_devices_and_no_serial_is_refused(phones):
    """The transport always names its device (`adb -s SERIAL`): with two phones attached, a profile without a serial
    is refused when it is read, never sent to whichever phone adb picks."""
    phones("a"), phones("b")
    with pytest.raises(MvlmError, match="address"):
        _adb_profile("")


@pytest.mark.slow
def test_adb_device_disappears_mid_push_then_sync_recovers(phones, adb_server, tmp_path):
    phone = phones()
    t = make_transport(_adb_profile(phone.serial))
    t.check()
    src = tmp_path / "m.gguf"
    src.write_bytes(os.urandom(500_000))
    files = {"models/m.gguf": src}
    phone.drop_after_sync_bytes = 100_000  # unplugged after 100 kB of the push reached the phone
    with pytest.raises(ConnectionLostError, match="device lost during push of m.gguf"):
        sync(t, t.workdir, files, hash_cache=tmp_path / "h.json")
    wd = phone.root / "data/local/tmp/mvlm"
    assert not (wd / "models" / "m.gguf").exists()  # only the private .part name can hold a partial copy
    with pytest.raises(UnreachableError, match="device not available"):
        t.check()
    phone.drop_after_sync_bytes = None
    phone.start()  # plugged back in, same serial
    adb_server.connect(phone)
    res = sync(t, t.workdir, files, hash_cache=tmp_path / "h.json")
    assert res.pushed_files == ["models/m.gguf"]
    assert _sha(wd / "models" / "m.gguf") == _sha(src)
    assert sorted(os.listdir(wd / "models")) == ["m.gguf"]
    assert json.loads((wd / MANIFEST_NAME).read_text())["files"]["models/m.gguf"]["sha256"] == _sha(src)


@pytest.mark.slow
def test_adb_full_data_and_read_only_workdir_are_one_line(phones, small_fs, tmp_path):
    """ENOSPC made by the device (its /data on a small tmpfs) and a workdir the phone will not write."""
    full = phones("full")
    t = make_transport(_adb_profile(full.serial))
    t.check()
    big = tmp_path / "big.gguf"
    big.write_bytes(os.urandom(3_000_000))
    shutil.rmtree(full.root / "data")
    (full.root / "data").symlink_to(small_fs(1_000_000))
    (full.root / "data/local/tmp").mkdir(parents=True)
    with pytest.raises(MvlmError, match="too full.*nothing was pushed"):  # df said so: refused before the push
        sync(t, t.workdir, {"models/big.gguf": big}, hash_cache=tmp_path / "h.json")
    # a phone whose df overstates what is free (reserved blocks, another app filling /data meanwhile): the push
    # itself meets ENOSPC on the device, and adbd's own text comes back in one line
    df = full.root / "system/bin/df"
    df.write_text("#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted'\n"
                  "echo '/dev/block/dm-5 99999999 1 99999998 1% /data'\n")
    df.chmod(0o755)
    with pytest.raises(MvlmError) as e:
        sync(t, t.workdir, {"models/big.gguf": big}, hash_cache=tmp_path / "h.json")
    assert "No space left on device" in str(e.value) and "\n" not in str(e.value).strip(), str(e.value)
    assert e.value.exit_code == 28 and not (full.root / "data/local/tmp/mvlm/models/big.gguf").exists()
    ro = phones("ro")
    ro.read_only = ["/data/local/tmp/mvlm"]
    t = make_transport(_adb_profile(ro.serial))
    with pytest.raises(MvlmError) as e:
        sync(t, t.workdir, {"models/big.gguf": big}, hash_cache=tmp_path / "h2.json")
    assert "Read-only file system" in str(e.value) and e.value.exit_code == 2


@pytest.mark.slow  # over ~0.9 s: the fast lane stays under 2 minutes
def test_adb_no_injection_through_names(phones, tmp_path):
    marker = tmp_path / "INJECTED"
    nasty = NASTY.format(m=marker)
    phone = phones()
    wd = f"/data/local/tmp/mvlm {nasty}"
    t = make_transport(_adb_profile(phone.serial, workdir=wd, env={"X": nasty}))
    src = tmp_path / "f.bin"
    src.write_bytes(b"payload")
    rel = f"models/{nasty}.gguf"
    sync(t, wd, {rel: src}, hash_cache=tmp_path / "h.json")
    assert (phone.root / wd.lstrip("/") / "models" / f"{nasty}.gguf").read_bytes() == b"payload"
    r = t.run(["printf", "%s|%s", nasty, "$X"], timeout=20, cwd=wd)
    assert r.output == f"{nasty}|$X"
    assert t.run(["sh", "-c", 'printf %s "$X"'], timeout=20).output == nasty
    assert not marker.exists()


def test_ssh_options_never_turn_host_key_checking_off(sshd, tmp_path):
    # The argv we hand to ssh: BatchMode on, StrictHostKeyChecking=yes with the pinned file, nothing saying "no".
    t = make_transport(sshd.profile(str(tmp_path)))
    argv = t._base_argv()
    t.close()
    assert "BatchMode=yes" in argv and "StrictHostKeyChecking=yes" in argv
    assert not any("StrictHostKeyChecking=no" in a or "accept-new" in a for a in argv)


def test_home_directory_lookup_ignores_login_shell_noise():
    """A login shell's rc files may print into the session (seen: "pyenv: cannot rehash: ..." from root's .bashrc over
    the real sshd); only mvlm's marked line is the home directory. The double replaces the narrowest seam, the
    raw shell call, with what such a device returns."""
    from mvlm_bench.device.transports.shell import ShellTransport

    class NoisyShellDouble(ShellTransport):
        def __init__(self, profile, noise: str):
            super().__init__(profile)
            self.noise = noise

        def _shell(self, script, timeout, what):
            home = "/home/dev" if "MVLM-HOME" in script else "?"
            return 0, f"{self.noise}MVLM-HOME:{home}\n", 0.01

        def push(self, *a, **k):
            raise NotImplementedError

        def pull(self, *a, **k):
            raise NotImplementedError

        def check(self):
            return None

    prof = profile_from_dict({"name": "noisy", "transport": "local", "workdir": "~/mvlm", "target": "host"},
                             where="test", default_name="noisy")
    t = NoisyShellDouble(prof, "pyenv: cannot rehash: /root/.pyenv/shims isn't writable\n")
    assert t.absolute("~/mvlm") == "/home/dev/mvlm"
    assert NoisyShellDouble(prof, "").absolute("~") == "/home/dev"
