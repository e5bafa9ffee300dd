"""The adb TEST PEER (tests/adb_device.py) proven with Debian's REAL adb client and server (adb 1.0.41 / 29.0.6).

Every test runs ``adb -s 127.0.0.1:PORT ...`` against a real adb server on a private port; the texts asserted on
are the ones real adb prints for each fault (recorded in the comments).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from adb_device import AdbDevice, AdbServer

needs_arm64 = pytest.mark.skipif(
    shutil.which("qemu-aarch64-static") is None or shutil.which("aarch64-linux-gnu-gcc") is None,
    reason="needs qemu-aarch64-static and aarch64-linux-gnu-gcc (apt-get install qemu-user-static gcc-aarch64-linux-gnu)",
)


@pytest.fixture
def phone(adb_server, tmp_path):
    with AdbDevice(tmp_path / "phone") as device:
        adb_server.connect(device)
        yield device
    assert not peer_threads()  # stop() waited for every thread of the peer


def adb(server: AdbServer, device: AdbDevice, *args: str, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("text", True)
    return server.run(*args, serial=device.serial, **kwargs)


def peer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("adb-peer")]


def wait_for_state(server: AdbServer, device: AdbDevice, state: str | None, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (now := server.state(device.serial)) != state:
        assert time.monotonic() < deadline, f"{device.serial} stays {now!r}, not {state!r}"
        time.sleep(0.02)


def test_devices_lists_the_phone_with_its_product_and_model(adb_server, phone):
    r = adb_server.run("devices", "-l", text=True)
    line = next(x for x in r.stdout.splitlines() if x.startswith(phone.serial))
    # adb turns the model's "-" into "_"
    assert line.split()[1:5] == ["device", "product:mvlm_test", "model:mvlm_test_phone", "device:mvlm_test"]
    assert adb(adb_server, phone, "get-state").stdout.strip() == "device"


def test_shell_v2_carries_exit_status_and_separate_stderr(adb_server, phone):
    assert adb(adb_server, phone, "shell", "echo", "hi").stdout == "hi\n"
    r = adb(adb_server, phone, "shell", "exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, "", "")
    r = adb(adb_server, phone, "shell", "echo out; echo err >&2; exit 4")
    assert (r.returncode, r.stdout, r.stderr) == (4, "out\n", "err\n")
    assert adb(adb_server, phone, "shell", "kill -9 $$").returncode == 128 + 9


def test_shell_v1_and_exec_merge_stderr_and_have_no_exit_status(adb_server, phone):
    # `adb shell -x` asks for the v1 service ("shell:CMD"); exec-out for "exec:CMD": one raw stream, status lost.
    for args in (["shell", "-x"], ["exec-out"]):
        r = adb(adb_server, phone, *args, "echo out; echo err >&2; exit 3")
        assert (r.returncode, r.stdout, r.stderr) == (0, "out\nerr\n", "")


def test_shell_stdin_reaches_the_command(adb_server, phone):
    r = adb(adb_server, phone, "shell", "cat; echo done", input="line one\nline two\n")
    assert (r.returncode, r.stdout) == (0, "line one\nline two\ndone\n")
    r = adb(adb_server, phone, "shell", input="echo from a script on stdin; exit 5\n")  # "shell,v2,raw:" + stdin
    assert (r.returncode, r.stdout) == (5, "from a script on stdin\n")


def test_shell_arguments_are_joined_with_spaces_as_adb_does(adb_server, phone):
    assert adb(adb_server, phone, "shell", "echo", "a  b").stdout == "a b\n"  # the device's sh splits "a  b"
    assert adb(adb_server, phone, "shell", 'echo "a  b"').stdout == "a  b\n"
    assert adb(adb_server, phone, "shell", "echo 'it''s' \"$((6*7))\"").stdout == "its 42\n"


def test_getprop_one_property_and_all(adb_server, phone):
    assert adb(adb_server, phone, "shell", "getprop", "ro.product.cpu.abi").stdout == "arm64-v8a\n"
    assert adb(adb_server, phone, "shell", "getprop", "no.such.prop").stdout == "\n"
    listing = adb(adb_server, phone, "shell", "getprop").stdout.splitlines()
    assert "[ro.product.cpu.abi]: [arm64-v8a]" in listing
    assert "[ro.build.version.sdk]: [34]" in listing
    assert all(x.startswith("[") and "]: [" in x and x.endswith("]") for x in listing)


def test_props_and_device_files_like_a_phone(adb_server, tmp_path):
    with AdbDevice(tmp_path / "p", props={"ro.product.model": "Pixel 8", "ro.soc.model": "Tensor G3"}) as dev:
        adb_server.connect(dev)
        assert "model:Pixel_8" in adb_server.run("devices", "-l", text=True).stdout
        assert adb(adb_server, dev, "shell", "getprop ro.soc.model").stdout == "Tensor G3\n"
        r = adb(adb_server, dev, "shell", "cat /sys/class/thermal/thermal_zone0/type /sys/class/thermal/thermal_zone0/temp")
        assert r.stdout == "cpu-0-0\n45000\n"
        r = adb(adb_server, dev, "shell", 'uname -sm; cd /data/local/tmp && test "$HOME" = "$(pwd)" && echo home')
        assert r.stdout == "Linux aarch64\nhome\n"


@pytest.mark.slow
def test_push_and_pull_a_large_file_byte_identical(adb_server, phone, tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(3 * 1024 * 1024 + 12345))  # 48+ sync DATA chunks of 64 KiB, WRTEs of 256 KiB
    r = adb(adb_server, phone, "push", str(blob), "/data/local/tmp/blob.bin")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 file pushed" in r.stdout
    assert (phone.root / "data/local/tmp/blob.bin").read_bytes() == blob.read_bytes()
    r = adb(adb_server, phone, "pull", "/data/local/tmp/blob.bin", str(tmp_path / "back.bin"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "back.bin").read_bytes() == blob.read_bytes()
    r = adb(adb_server, phone, "exec-out", "cat /data/local/tmp/blob.bin", text=False)
    assert r.returncode == 0 and r.stdout == blob.read_bytes()


@pytest.mark.slow
def test_push_a_directory_then_list_it(adb_server, phone, tmp_path):
    src = tmp_path / "bundle"
    (src / "lib").mkdir(parents=True)
    (src / "run.sh").write_text("echo bundle\n")
    (src / "lib" / "libx.so").write_bytes(b"\x7fELF not really")
    r = adb(adb_server, phone, "push", str(src), "/data/local/tmp/")
    assert r.returncode == 0 and "2 files pushed" in r.stdout, r.stdout + r.stderr
    r = adb(adb_server, phone, "shell", "ls -l /data/local/tmp/bundle/run.sh && sh /data/local/tmp/bundle/run.sh")
    assert r.returncode == 0 and r.stdout.endswith("bundle/run.sh\nbundle\n")
    assert (phone.root / "data/local/tmp/bundle/lib/libx.so").read_bytes() == b"\x7fELF not really"
    r = adb(adb_server, phone, "pull", "/data/local/tmp/bundle", str(tmp_path / "pulled"))
    assert r.returncode == 0 and (tmp_path / "pulled/lib/libx.so").read_bytes() == b"\x7fELF not really"


@pytest.mark.slow
def test_pushed_mode_as_adbd_sets_it(adb_server, phone, tmp_path):
    exe, data = tmp_path / "tool", tmp_path / "notes.txt"
    exe.write_text("#!/bin/sh\necho tool ran \"$@\"\n")
    data.write_text("x")
    exe.chmod(0o755)
    data.chmod(0o644)
    for f in (exe, data):
        assert adb(adb_server, phone, "push", str(f), "/data/local/tmp/").returncode == 0
    # SEND "path,33261": adbd copies the user bits to group and other (0755 -> 0777, 0644 -> 0666)
    r = adb(adb_server, phone, "shell", "ls -l /data/local/tmp/tool /data/local/tmp/notes.txt")
    assert [x.split()[0] for x in r.stdout.splitlines()] == ["-rw-rw-rw-", "-rwxrwxrwx"]
    assert adb(adb_server, phone, "shell", "/data/local/tmp/tool a 'b c'").stdout == "tool ran a b c\n"


def test_pull_of_a_missing_file_fails_with_adbs_text(adb_server, phone, tmp_path):
    r = adb(adb_server, phone, "pull", "/data/local/tmp/nope", str(tmp_path / "nope"))
    # real adb: "adb: error: failed to stat remote object '/data/local/tmp/nope': No such file or directory" (rc 1)
    assert r.returncode == 1
    assert "failed to stat remote object '/data/local/tmp/nope': No such file or directory" in r.stdout + r.stderr


@pytest.fixture(scope="module")
def hello_arm64(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hello")
    (d / "hello.c").write_text('#include <stdio.h>\nint main(int c, char **v) {\n'
                               '  printf("hello from %s with %d args\\n", v[0], c - 1);\n  return 7;\n}\n')
    subprocess.run(["aarch64-linux-gnu-gcc", "-static", "-O2", "-o", str(d / "hello"), str(d / "hello.c")], check=True)
    return d / "hello"


@pytest.mark.slow
@pytest.mark.qemu
@needs_arm64
def test_aarch64_static_binary_runs_as_on_a_phone(adb_server, phone, hello_arm64):
    assert adb(adb_server, phone, "push", str(hello_arm64), "/data/local/tmp/hello").returncode == 0
    r = adb(adb_server, phone, "shell", "/data/local/tmp/hello", "x")
    assert r.returncode == 7 and r.stdout.startswith("hello from ") and r.stdout.endswith("with 1 args\n")
    r = adb(adb_server, phone, "shell", "cd /data/local/tmp && ./hello; echo rc=$?; timeout 10 ./hello a b; echo rc=$?")
    assert r.stdout == "hello from ./hello with 0 args\nrc=7\nhello from ./hello with 2 args\nrc=7\n"
    r = adb(adb_server, phone, "shell", "cd /data/local/tmp && PATH=.:$PATH env hello && echo no")
    assert (r.returncode, r.stdout) == (7, "hello from hello with 0 args\n")


def test_unknown_service_is_refused(adb_server, phone):
    r = adb(adb_server, phone, "reboot")
    assert (r.returncode, r.stderr.strip()) == (1, "error: closed")


def test_unauthorized_device(adb_server, tmp_path):
    with AdbDevice(tmp_path / "locked", auth=True) as dev:
        adb_server.connect(dev, state="unauthorized")  # `adb connect` says "failed to authenticate to 127.0.0.1:PORT"
        assert f"{dev.serial}\tunauthorized" in adb_server.run("devices", text=True).stdout
        r = adb(adb_server, dev, "shell", "true")
        # real adb, rc 1: "error: device unauthorized.\nThis adb server's $ADB_VENDOR_KEYS is not set\n
        # Try 'adb kill-server' if that seems wrong.\nOtherwise check for a confirmation dialog on your device."
        assert r.returncode == 1 and r.stderr.startswith("error: device unauthorized.")


def test_unplugged_mid_push(adb_server, phone, tmp_path):
    blob = tmp_path / "big.bin"
    blob.write_bytes(os.urandom(2 * 1024 * 1024))
    phone.drop_after_sync_bytes = 300_000
    r = adb(adb_server, phone, "push", str(blob), "/data/local/tmp/big.bin")
    # real adb, rc 1: "adb: error: failed to copy 'SRC' to '/data/local/tmp/big.bin': couldn't read from device"
    # (then "SRC: 0 files pushed, 0 skipped. ..."; all of it on stdout)
    assert r.returncode == 1
    assert "failed to copy" in r.stdout and "couldn't read from device" in r.stdout
    wait_for_state(adb_server, phone, "offline")  # adb 29 keeps a lost TCP device listed while it tries to reconnect
    r = adb(adb_server, phone, "shell", "true")
    assert (r.returncode, r.stderr.strip()) == (1, "error: device offline")


@pytest.mark.slow
def test_unplugged_mid_run(adb_server, phone):
    phone.drop_during_shell_after = 0.3
    r = adb(adb_server, phone, "shell", "echo started; sleep 20; echo finished")
    # adb 29 returns 0 and the output so far when the link dies before the exit packet
    assert (r.returncode, r.stdout) == (0, "started\n")
    wait_for_state(adb_server, phone, "offline")
    assert adb(adb_server, phone, "shell", "true").stderr.strip() == "error: device offline"


@pytest.mark.slow
def test_stop_makes_the_device_disappear_and_start_plugs_it_back(adb_server, phone):
    port, pid_file = phone.port, phone.root / "data/local/tmp/pid"
    run = subprocess.Popen(["adb", "-s", phone.serial, "shell", "echo $$ > /data/local/tmp/pid; exec sleep 60"],
                           env={**os.environ, **adb_server.env()}, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    sleeper = Path(f"/proc/{pid_file.read_text().strip()}")
    assert "sleep" in (sleeper / "cmdline").read_text()
    phone.stop()
    assert run.wait(timeout=10) == 0  # the link died before the exit packet: adb 29 says 0
    assert not peer_threads()
    assert not sleeper.exists()  # stop() kills what the phone was running
    wait_for_state(adb_server, phone, "offline")
    r = adb(adb_server, phone, "shell", "true")
    assert (r.returncode, r.stderr.strip()) == (1, "error: device offline")
    phone.start()
    assert phone.port == port
    adb_server.connect(phone)
    assert adb(adb_server, phone, "shell", "echo back").stdout == "back\n"


def test_disk_full_fails_the_push_with_enospc(adb_server, small_fs, tmp_path):
    blob = tmp_path / "big.bin"
    blob.write_bytes(os.urandom(1024 * 1024))
    with AdbDevice(small_fs(256 * 1024)) as dev:
        adb_server.connect(dev)
        r = adb(adb_server, dev, "push", str(blob), "/data/local/tmp/big.bin")
        # real adb, rc 1: "adb: error: failed to copy 'SRC' to '/data/local/tmp/big.bin': remote write failed:
        # No space left on device"
        assert r.returncode == 1
        assert "remote write failed: No space left on device" in r.stdout
        assert not (dev.root / "data/local/tmp/big.bin").exists()  # adbd removes the partial file
        assert adb(adb_server, dev, "shell", "echo still here").stdout == "still here\n"


def test_read_only_path_refuses_the_push(adb_server, phone, tmp_path):
    (tmp_path / "f").write_text("x")
    phone.read_only = ["/system"]
    r = adb(adb_server, phone, "push", str(tmp_path / "f"), "/system/bin/f")
    # real adb, rc 1: "adb: error: failed to copy 'SRC' to '/system/bin/f': remote couldn't create file:
    # Read-only file system"
    assert r.returncode == 1
    assert "remote couldn't create file: Read-only file system" in r.stdout
    assert adb(adb_server, phone, "push", str(tmp_path / "f"), "/sdcard/f").returncode == 0


def test_another_program_reaches_the_phone_through_env(adb_server, phone):
    r = subprocess.run(["adb", "-s", phone.serial, "shell", "echo via env"], env={**os.environ, **adb_server.env()},
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert r.stdout == "via env\n"


@pytest.mark.slow
def test_kill_leaves_no_server_and_stop_no_thread(tmp_path):
    server = AdbServer(tmp_path / "home").start()
    assert server.pids()
    with AdbDevice(tmp_path / "p") as dev:
        server.connect(dev)
        assert peer_threads()
    assert not peer_threads()
    server.kill()
    assert not server.pids()


def test_forward_reaches_a_port_on_the_phone(adb_server, phone):
    """`adb forward tcp:LOCAL tcp:PORT` (what `mvlm serve` uses on a phone): the adb server opens "tcp:PORT" on the
    device for each connection to LOCAL; the phone's loopback is this machine's."""
    import http.server
    import socket
    import urllib.request

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"hello from the phone: {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
    try:
        r = adb(adb_server, phone, "forward", f"tcp:{local}", f"tcp:{srv.server_address[1]}")
        assert r.returncode == 0, r.stderr
        for i in range(3):  # one device stream per connection
            with urllib.request.urlopen(f"http://127.0.0.1:{local}/x{i}", timeout=10) as resp:
                assert resp.read() == f"hello from the phone: /x{i}".encode()
        assert f"tcp:{local}" in adb(adb_server, phone, "forward", "--list").stdout
        assert adb(adb_server, phone, "forward", "--remove", f"tcp:{local}").returncode == 0
    finally:
        srv.shutdown()
