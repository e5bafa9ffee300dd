"""Faults of `mvlm bench`, the transports and the device profiles (issue 13), each proven with real parts.

Real parts: the real llama.cpp host runtime (``host_runtime``), the real SmolLM2 GGUF (``smollm2_gguf``), a real
OpenSSH sshd on 127.0.0.1 (``sshd``, tests/peers.py), real tmpfs for disk-full (``small_fs``), Debian's real adb
against a device daemon speaking the ADB wire protocol (``phones``, tests/adb_device.py): adb faults are made at the
wire. No test double.

Each fault, and what the test shows:

2. report paths: ``--json/--markdown/--csv`` naming an input (model, mmproj, image, profile, baseline) or an existing
   GGUF is refused before anything is measured; the reports of one command are committed together.
3. ssh options: an allow-list. Host-key checking cannot be switched off from a profile; nothing in a profile runs a
   local command (ProxyCommand & co. would touch a marker file: the marker never appears, no connection is made).
4. the device is probed (uname -m / getprop) before anything is pushed: an ad hoc ssh device gets the runtime that fits
   it (x86_64 -> host), a profile whose target does not fit is refused in one line saying which build to make.
5. device copies are verified by their sha256 on every bench; a corrupted copy is pushed again, and the bench says so.
   A dropped push names the file being pushed and the bytes that really reached the device.
12. a model that is not a GGUF is refused locally; a failing llama.cpp gives one line (its most relevant log line and
    the log file); nonsensical counts are refused.
13. one bad profile does not break `mvlm devices` or `mvlm bench --device good`.
14. (an outside tester's report) an ssh config file is read the way OpenSSH reads it (quoted keywords, ``=``, ``Match``,
    ``Include``) and held to the ssh.options allow-list; a report that cannot be written does not cost the saved
    measurement; report paths that are devices, FIFOs or ``dir/`` are refused; ``--against`` values are validated and
    named as written; A/B records keep the real model name; profile counts are bounded; ``--device`` messages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from peers import fill_up, run_bench, small_gguf

from mvlm_bench.device.profiles import load_profile, profile_from_dict
from mvlm_bench.device.sync import sync
from mvlm_bench.device.targets import resolve_target, targets_for
from mvlm_bench.device.transports import make_transport
from mvlm_bench.device.transports.base import ConnectionLostError, DeviceInfo
from mvlm_bench.plan.protocols import LM_PROMPT, build_argv
from mvlm_bench.plan.spec import BenchSpec, check_inputs, device_settings, validate_spec
from mvlm_bench.session.failures import relevant_line
from mvlm_core.errors import MvlmError

MVLM = [sys.executable, "-m", "mvlm"]


def mvlm(*args, env: dict | None = None, timeout: float = 600, prefix: list[str] | None = None, cwd: Path | None = None):
    return subprocess.run([*(prefix or []), *MVLM, *map(str, args)], capture_output=True, text=True, errors="replace",
                          timeout=timeout, env={**os.environ, **(env or {}), "COLUMNS": "200"}, cwd=cwd)


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def local_profile(tmp_path: Path, name: str = "faultlocal", target: str = "host", **extra) -> Path:
    lines = [f'name = "{name}"', 'transport = "local"', f'workdir = "{tmp_path / ("dev-" + name)}"', f'target = "{target}"',
             "threads = 2"]
    env = extra.pop("env", {})
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    p = tmp_path / f"{name}.toml"
    p.write_text("\n".join(lines) + "\n" + _env_table(env))
    return p


def ssh_profile_file(sshd, path: Path, workdir: Path, *, options: list[str] | None = None, known_hosts: Path | None = None,
                     target: str = "host", config_file: str = "/dev/null", env: dict | None = None) -> Path:
    """A profile file for the real sshd (TOML strings via json.dumps: valid TOML basic strings)."""
    body = [
        'transport = "ssh"',
        f"address = {json.dumps(f'ssh://{sshd.user}@127.0.0.1:{sshd.port}')}",
        f"workdir = {json.dumps(str(workdir))}",
        f"target = {json.dumps(target)}",
        "threads = 2",
        "[ssh]",
        f"identity_file = {json.dumps(str(sshd.root / 'client_key'))}",
        f"known_hosts = {json.dumps(str(known_hosts or sshd.known_hosts))}",
        f"config_file = {json.dumps(config_file)}",
        "connect_timeout = 5",
    ]
    if options is not None:
        body.append(f"options = {json.dumps(options)}")
    path.write_text("\n".join(body) + "\n" + _env_table(env or {}))
    return path


@pytest.fixture
def fake_gguf(tmp_path) -> Path:
    """A small, well-formed language-model GGUF that llama.cpp cannot load: enough for everything refused before."""
    return small_gguf(tmp_path / "Model-Q4_K_S.gguf")


@pytest.fixture(scope="session")
def runtime_env(host_runtime, smollm2_gguf) -> dict[str, str]:
    """The real host runtime runs SmolLM2 on this machine with no extra environment (returned empty, so a device
    quirk could be named here); a crash fails loudly instead of being worked around.

    On a VM that advertises Intel AMX without fully supporting it, a -march=native build used to die with SIGILL in
    ggml's AMX kernel (`tilezero`) on Q4_1 weights; the runtime builder now turns AMX off where the CPU advertises it.
    """
    exe = host_runtime / "bin" / "llama-completion"
    argv = [str(exe), "-m", str(smollm2_gguf), "-p", "Hi", "-n", "2", "-no-cnv", "--temp", "0", "-t", "2"]
    base = {**os.environ, "LD_LIBRARY_PATH": str(host_runtime / "lib")}
    r = subprocess.run(argv, capture_output=True, text=True, errors="replace", env=base, timeout=300)
    if r.returncode != 0:
        pytest.fail(f"the host runtime cannot run SmolLM2 on this machine (status {r.returncode}): {r.stdout[-1500:]}")
    return {}


def _with_env(profile, env: dict[str, str]):
    return dataclasses.replace(profile, env={**profile.env, **env})


def _env_table(env: dict[str, str]) -> str:
    return "[env]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in env.items()) if env else ""


def _error_line(stderr: str) -> str:
    """mvlm's progress notes may precede it, but the failure itself is ONE line and no llama.cpp log is dumped."""
    lines = stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    import re

    for ln in lines[:-1]:  # llama.cpp's own log lines start with a timestamp or a function name
        assert not re.match(r"\s*(\d+\.\d+\.\d+\.\d+ [A-Z] |llama_|print_info|load_tensors|ggml_|main:)", ln), stderr
    return errors[0]


# ===================================================================================================== 2. report paths


@pytest.mark.slow
@pytest.mark.parametrize("option", ["--json-file", "--markdown", "--csv"])
def test_report_path_that_is_the_model_is_refused_before_measuring(tmp_path, fake_gguf, option):
    before = _sha(fake_gguf)
    prof = local_profile(tmp_path)
    r = mvlm("bench", "--device", prof, "--model", fake_gguf, option, fake_gguf)
    line = _one_line(r.stderr)
    assert r.returncode == 2
    assert option in line and str(fake_gguf) in line and "input" in line
    assert _sha(fake_gguf) == before  # the model is intact
    assert not (tmp_path / "dev-faultlocal").exists()  # nothing pushed, nothing measured


@pytest.mark.slow  # more than ~3 s here (fast lane: pytest -m 'not slow')
def test_report_path_other_inputs_and_existing_gguf_are_refused(tmp_path, fake_gguf):
    prof = local_profile(tmp_path)
    mmproj = small_gguf(tmp_path / "mmproj-M-F16.gguf", "clip")
    image = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(image)
    other_model = small_gguf(tmp_path / "Other-Q8_0.gguf")  # not an input, but an existing GGUF
    other_model_bytes = other_model.read_bytes()
    base = ["bench", "--device", prof, "--protocol", "vlm", "--model", fake_gguf, "--mmproj", mmproj, "--image", image]
    cases = [
        (["--json-file", mmproj], "also an input"),
        (["--csv", image], "also an input"),
        (["--markdown", prof], "also an input"),
        (["--csv", other_model], "existing GGUF"),
        (["--json-file", tmp_path / "same.txt", "--markdown", tmp_path / "same.txt"], "also given to --json-file"),
        (["--json-file", tmp_path / "a-file" / "r.json"], "cannot create it in"),
    ]
    (tmp_path / "a-file").write_text("a file where a directory would be needed")
    for extra, words in cases:
        r = mvlm(*base, *extra)
        line = _one_line(r.stderr)
        assert r.returncode == 2 and words in line, line
    assert other_model.read_bytes() == other_model_bytes
    assert not (tmp_path / "same.txt").exists()
    assert not (tmp_path / "dev-faultlocal").exists()
    # the baseline file is an input too: the report would replace it before it is read
    baseline = tmp_path / "base.json"
    baseline.write_text("[]")
    r = mvlm("bench", "--device", prof, "--model", fake_gguf, "--json-file", baseline, "--baseline", baseline)
    assert r.returncode == 2 and "also an input" in _one_line(r.stderr)
    assert baseline.read_text() == "[]"
    r = mvlm("bench", "--device", prof, "--model", fake_gguf, "--json-file", tmp_path / "new.json",
             "--baseline", tmp_path / "new.json")  # not there yet: it would be compared with itself
    assert r.returncode == 2 and "also an input" in _one_line(r.stderr)
    r = mvlm("bench", "--device", prof, "--model", fake_gguf, "--save", "--db", other_model)  # sqlite over a GGUF
    assert r.returncode == 2 and "--db" in _one_line(r.stderr) and "existing GGUF" in r.stderr
    assert other_model.read_bytes() == other_model_bytes
    history = tmp_path / "h.sqlite"
    r = mvlm("bench", "--device", prof, "--model", fake_gguf, "--save", "--db", history, "--csv", history)
    assert r.returncode == 2 and "also an input" in _one_line(r.stderr) and not history.exists()
    assert not (tmp_path / "dev-faultlocal").exists()


@pytest.mark.slow
def test_a_full_disk_under_one_report_costs_neither_the_measurement_nor_the_other_reports(tmp_path, smollm2_gguf,
                                                                                          runtime_env, small_fs):
    """--json lands in a roomy dir, --markdown on a full tmpfs: the markdown write fails (one line, exit 28) and the
    measurement is still in the JSON report (each report is replaced whole after every repetition; a sink that fails
    is left out, the others go on), the line says where it is kept, and no temporary is left in either place."""
    full = small_fs(64 << 10)
    fill_up(full / "filler")
    old_json = tmp_path / "r.json"
    old_json.write_text("OLD REPORT")
    prof = local_profile(tmp_path)
    r = mvlm("bench", "--device", prof, "--model", smollm2_gguf, "-n", 8, "--repeat", 1, "--warmup", 0,
             "--json-file", old_json, "--markdown", full / "r.md", env=runtime_env)
    assert r.returncode == 28, r.stderr[-2000:]
    assert "disk full while writing" in r.stderr and str(full / "r.md") in r.stderr
    assert "Traceback" not in r.stderr
    (rec,) = json.loads(old_json.read_text())  # replaced whole: the new measurement, not half of it
    assert len(rec["runs"]) == 1
    assert sorted(p.name for p in full.iterdir()) == ["filler"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".r.json")]
    # the same command with room for both writes both
    r = mvlm("bench", "--device", prof, "--model", smollm2_gguf, "-n", 8, "--repeat", 1, "--warmup", 0,
             "--json-file", old_json, "--markdown", tmp_path / "r.md", env=runtime_env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(old_json.read_text()) and (tmp_path / "r.md").read_text().startswith("|")


# ===================================================================================================== 3. ssh options

# Options that switch host-key checking off or run a command here. Each would, given to ssh, connect to an unknown
# host or touch the marker (checked below with the plain ssh client); mvlm refuses every one before connecting.
BAD_OPTIONS = [
    (["StrictHostKeyChecking=false"], "StrictHostKeyChecking"),
    (["StrictHostKeyChecking=no"], "StrictHostKeyChecking"),
    (["stricthostkeychecking=OFF"], "StrictHostKeyChecking"),
    (["UserKnownHostsFile=/dev/null", "StrictHostKeyChecking=accept-new"], "UserKnownHostsFile"),
    (["UserKnownHostsFile=none"], "UserKnownHostsFile"),
    (["ProxyCommand=touch {marker}"], "ProxyCommand"),
    (["PermitLocalCommand=yes", "LocalCommand=touch {marker}"], "PermitLocalCommand"),
    (["LocalCommand=touch {marker}"], "LocalCommand"),
    (["KnownHostsCommand=/bin/sh -c 'touch {marker}'"], "KnownHostsCommand"),
    (["ProxyJump=root@127.0.0.1:1"], "ProxyJump"),
    (["ControlPath=/tmp/someone-elses-master"], "ControlPath"),
    (["ForwardAgent=yes"], "ForwardAgent"),
]


@pytest.mark.slow
def test_plain_ssh_would_obey_these_options(sshd, tmp_path):
    """The control experiment: handed to ssh itself, the options do what the refusals guard against."""
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    base = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={empty}",
            "-i", str(sshd.root / "client_key"), "-p", str(sshd.port), f"{sshd.user}@127.0.0.1"]
    r = subprocess.run([*base[:1], "-o", "StrictHostKeyChecking=false", *base[1:], "true"], capture_output=True, timeout=30)
    assert r.returncode == 0  # an unknown host accepted: host-key checking was off
    marker = tmp_path / "MARKER"
    subprocess.run([*base[:1], "-o", f"ProxyCommand=touch {marker}", *base[1:], "true"], capture_output=True, timeout=30)
    assert marker.exists()  # a command ran on this machine


@pytest.mark.slow
@pytest.mark.parametrize("options, named", BAD_OPTIONS)
def test_profile_ssh_options_are_refused_before_connecting(sshd, tmp_path, fake_gguf, options, named):
    marker = tmp_path / "MARKER"
    empty = tmp_path / "empty_known_hosts"  # the host is unknown: only switching checking off would let us in
    empty.write_text("")
    prof = ssh_profile_file(sshd, tmp_path / "box.toml", tmp_path / "remote",
                            options=[o.format(marker=marker) for o in options], known_hosts=empty)
    r = mvlm("bench", "--device", prof, "--model", fake_gguf)
    line = _one_line(r.stderr)
    assert r.returncode == 2
    assert named in line and str(prof) in line, line
    assert not marker.exists()
    assert not (tmp_path / "remote").exists()  # no connection made (a connection would have created the work dir)
    assert empty.read_text() == ""  # nothing accepted into known_hosts
    # the profile loader refuses it for every other user too (mvlm devices, runtime build --device)
    with pytest.raises(MvlmError, match=named):
        load_profile(str(prof))


def test_known_hosts_field_must_be_a_real_file(sshd, tmp_path, fake_gguf):
    prof = ssh_profile_file(sshd, tmp_path / "box.toml", tmp_path / "remote", known_hosts=Path("/dev/null"),
                            options=["StrictHostKeyChecking=accept-new"])
    r = mvlm("bench", "--device", prof, "--model", fake_gguf)
    line = _one_line(r.stderr)
    assert r.returncode == 2 and "ssh.known_hosts" in line and "/dev/null" in line and str(prof) in line
    assert not (tmp_path / "remote").exists()


@pytest.mark.parametrize("directive", [
    "ProxyCommand touch {marker}",
    'Match exec "touch {marker}"',
    "LocalCommand touch {marker}",
    "PermitLocalCommand yes",
    "StrictHostKeyChecking no",
    "UserKnownHostsFile /dev/null",
    "Include other.conf",
])
def test_config_file_named_by_a_profile_may_not_run_commands(sshd, tmp_path, fake_gguf, directive):
    """A profile shipped with an ssh config beside it (config_file is relative to the profile) is data too."""
    marker = tmp_path / "MARKER"
    (tmp_path / "evil.conf").write_text(f"Host *\n    {directive.format(marker=marker)}\n")
    prof = ssh_profile_file(sshd, tmp_path / "box.toml", tmp_path / "remote", config_file="evil.conf")
    r = mvlm("bench", "--device", prof, "--model", fake_gguf)
    line = _one_line(r.stderr)
    assert r.returncode == 2 and "evil.conf line 2" in line and directive.split()[0] in line, line
    assert not marker.exists() and not (tmp_path / "remote").exists()


@pytest.mark.slow
def test_allowed_options_connect_and_a_profile_built_in_code_is_checked_too(sshd, tmp_path):
    ok = ["ServerAliveInterval=15", "StrictHostKeyChecking=yes", "Compression=no", "ConnectTimeout=5",
          "IdentitiesOnly=yes", "LogLevel=ERROR", "ServerAliveCountMax=2", "TCPKeepAlive=yes"]
    prof = load_profile(str(ssh_profile_file(sshd, tmp_path / "ok.toml", tmp_path / "remote", options=ok)))
    t = make_transport(prof)
    try:
        t.check()
        assert t.probe() == DeviceInfo(platform.system(), platform.machine())  # the real sshd answers
    finally:
        t.close()
    marker = tmp_path / "MARKER"
    sneaky = dataclasses.replace(prof, ssh=dataclasses.replace(prof.ssh, options=(f"ProxyCommand=touch {marker}",)))
    with pytest.raises(MvlmError, match="ProxyCommand is not allowed"):
        make_transport(sneaky)
    assert not marker.exists()


def test_adhoc_ssh_urls_cannot_smuggle_options():
    for spec in ("ssh://-oProxyCommand=touch@host", "ssh://user@-oProxyCommand=x", "ssh://u%20-o@host",
                 "ssh://user@host -oProxyCommand=x"):
        with pytest.raises(MvlmError, match="bad"):
            load_profile(spec)


# ===================================================================================================== 4. device probe


def test_targets_follow_the_probed_device():
    host_machine = platform.machine()
    assert targets_for(DeviceInfo("Linux", "aarch64"))[1] == "linux-arm64"
    assert targets_for(DeviceInfo("Linux", "aarch64", "arm64-v8a"))[1] == "android-arm64"
    assert targets_for(DeviceInfo("Linux", host_machine))[1] == "host"
    assert targets_for(DeviceInfo("Linux", "riscv64")) == ([], None)
    assert targets_for(DeviceInfo("Darwin", "aarch64"))[1] is None
    adhoc = load_profile("adb:R58M12")
    assert adhoc.probe_target
    phone = resolve_target(adhoc, DeviceInfo("Linux", "aarch64", "arm64-v8a"))
    assert phone.target == "android-arm64"
    orin = load_profile("orin")
    with pytest.raises(MvlmError, match=r"mvlm runtime build --target linux-arm64"):
        resolve_target(dataclasses.replace(orin, target="host"), DeviceInfo("Linux", "aarch64"))
    assert resolve_target(orin, DeviceInfo("Linux", "aarch64")) is orin
    qemu = load_profile("qemu-arm64")  # emulated: its x86_64 host is not what the binaries see
    assert resolve_target(qemu, DeviceInfo("Linux", "x86_64")) is qemu


def test_threads_are_never_this_machines_core_count_on_another_device():
    """A remote device without `threads` in its profile and no --threads gets no -t: llama.cpp picks its own default
    on the device (a phone's 8 cores, not a 2-core CI host's 2). Profiles and --threads still set -t."""
    spec = BenchSpec(model=Path("m.gguf"), protocol="lm")
    adhoc_ssh = load_profile("ssh://u@h")
    argv = build_argv(spec, "/w", {"model": "m.gguf"}, *device_settings(adhoc_ssh, spec))
    assert adhoc_ssh.threads is None and "-t" not in argv
    argv = build_argv(dataclasses.replace(spec, threads=3), "/w", {"model": "m.gguf"},
                      *device_settings(adhoc_ssh, dataclasses.replace(spec, threads=3)))
    assert argv[argv.index("-t") + 1] == "3"
    sd888 = load_profile("sd888")
    argv = build_argv(spec, "/w", {"model": "m.gguf"}, *device_settings(sd888, spec))
    assert argv[argv.index("-t") + 1] == str(sd888.threads)
    local = load_profile("local")
    argv = build_argv(spec, "/w", {"model": "m.gguf"}, *device_settings(local, spec))
    assert argv[argv.index("-t") + 1] == str(os.cpu_count())


@pytest.mark.slow
def test_profile_target_that_does_not_fit_the_device_is_refused_before_pushing(sshd, tmp_path, fake_gguf):
    """A profile claiming linux-arm64, pointed at the x86_64 sshd: one line saying which build to make, nothing pushed."""
    prof = ssh_profile_file(sshd, tmp_path / "arm.toml", tmp_path / "remote", target="linux-arm64")
    r = mvlm("bench", "--device", prof, "--model", fake_gguf)
    line = _one_line(r.stderr)
    assert r.returncode == 2
    assert "x86_64 Linux" in line and "'linux-arm64'" in line and "mvlm runtime build --target host" in line, line
    assert not (tmp_path / "remote").exists()
    # the same for a local profile that claims another CPU
    r = mvlm("bench", "--device", local_profile(tmp_path, target="android-arm64"), "--model", fake_gguf)
    assert r.returncode == 2 and "mvlm runtime build --target host" in _one_line(r.stderr)


@pytest.mark.slow
def test_adhoc_ssh_to_an_x86_64_device_benches_with_the_host_runtime(tmp_path, smollm2_gguf, runtime_env):
    """`--device ssh://root@127.0.0.1:PORT` with nothing but the ssh client's own configuration (as for any ad hoc
    device): the key and known_hosts come from the system ssh_config, replaced for this one process by a bind mount
    in a private mount namespace (nothing outside the test changes). The device is probed (x86_64 Linux), the host
    runtime is pushed and the real llama.cpp runs SmolLM2 there."""
    from peers import SshServer

    (tmp_path / "sshd").mkdir()
    sshd = SshServer(tmp_path / "sshd")
    try:
        if runtime_env:  # an ad hoc device has no profile [env]: this 'device' sets it itself (sshd's SetEnv)
            with open(sshd.config, "a") as f:
                f.write("SetEnv " + " ".join(f"{k}={v}" for k, v in runtime_env.items()) + "\n")
            sshd.proc.send_signal(signal.SIGHUP)  # sshd re-executes itself and reads the config again
            _wait_for_port(sshd.port)
        _adhoc_bench(sshd, tmp_path, smollm2_gguf)
    finally:
        sshd.stop()


def _wait_for_port(port: int) -> None:
    import socket
    import time

    time.sleep(0.3)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _private_ssh_config(sshd, tmp_path: Path) -> list[str]:
    """A command prefix under which the ssh client's system config (/etc/ssh/ssh_config) knows the test sshd: a bind
    mount in a private mount namespace, so nothing outside that one process sees it."""
    if shutil.which("unshare") is None:
        pytest.skip("util-linux `unshare` is needed to give the ssh client a private ssh_config")
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Host 127.0.0.1\n    IdentityFile {sshd.root / 'client_key'}\n    IdentitiesOnly yes\n"
                   f"    UserKnownHostsFile {sshd.known_hosts}\n    StrictHostKeyChecking yes\n")
    prefix = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/ssh/ssh_config && exec "$@"', str(cfg)]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"a private mount namespace needs root: {probe.stderr.strip()}")
    return prefix


@pytest.mark.slow
def test_adhoc_ssh_runtime_build_for_a_target_the_device_cannot_run_is_refused(sshd, tmp_path):
    prefix = _private_ssh_config(sshd, tmp_path)
    r = mvlm("runtime", "build", "--target", "linux-arm64", "--device", f"ssh://{sshd.user}@127.0.0.1:{sshd.port}",
             prefix=prefix, env={"MVLM_CACHE": str(tmp_path / "cache")})
    line = _one_line(r.stderr)
    assert r.returncode == 2 and "is x86_64 Linux: a linux-arm64 runtime does not run there" in line, line


def _adhoc_bench(sshd, tmp_path: Path, smollm2_gguf: Path) -> None:
    prefix = _private_ssh_config(sshd, tmp_path)
    home = Path(os.path.expanduser("~" + sshd.user))
    workdir = home / "mvlm"  # the ad hoc default work dir, on the 'device' (this machine, through sshd)
    existed = workdir.exists()
    out = tmp_path / "adhoc.json"
    try:
        r = mvlm("bench", "--device", f"ssh://{sshd.user}@127.0.0.1:{sshd.port}", "--protocol", "lm",
                 "--model", smollm2_gguf, "-n", 16, "--repeat", 2, "--warmup", 0, "--json-file", out, prefix=prefix)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "x86_64 Linux: using the host runtime" in r.stderr
        (rec,) = json.loads(out.read_text())
        assert rec["params"]["target"] == "host" and rec["device"] == f"ssh://{sshd.user}@127.0.0.1:{sshd.port}"
        assert rec["model_sha256"] == _sha(smollm2_gguf) and rec["repetitions"] == 2
        assert rec["n_gen"] == 15  # llama-completion decodes n-1 of the n tokens it generates
        for run in rec["runs"]:
            t = run["timing"]
            assert 0 < t["eval_ms"] < 60_000 and 0 < t["prompt_eval_ms"] < 60_000, t
            assert 0.1 < 15 * 1000 / t["eval_ms"] < 100_000  # tokens/s of a 135M model on 2 busy shared cores
        assert _sha(workdir / "models" / smollm2_gguf.name) == _sha(smollm2_gguf)
    finally:
        if not existed:
            shutil.rmtree(workdir, ignore_errors=True)


# ===================================================================================================== 5. device copies


def _corrupt_in_place(p: Path) -> None:
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.seek(size // 2)
        chunk = f.read(4096)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    assert p.stat().st_size == size


@pytest.mark.slow
def test_corrupted_copy_on_a_local_device_is_pushed_again(tmp_path, smollm2_gguf, runtime_env):
    prof = local_profile(tmp_path, env=runtime_env)
    args = ("bench", "--device", prof, "--model", smollm2_gguf, "-n", 8, "--repeat", 1, "--warmup", 0)
    r = mvlm(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    copy = tmp_path / "dev-faultlocal" / "models" / smollm2_gguf.name
    _corrupt_in_place(copy)
    assert _sha(copy) != _sha(smollm2_gguf)
    r = mvlm(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"device copy of models/{smollm2_gguf.name} did not match its sha256" in r.stderr
    assert "pushing it again" in r.stderr
    assert _sha(copy) == _sha(smollm2_gguf)
    r = mvlm(*args)  # and once repaired, nothing moves
    assert r.returncode == 0 and "pushed 0 bytes" in r.stderr and "did not match" not in r.stderr


@pytest.mark.slow
def test_corrupted_copy_over_ssh_is_pushed_again(sshd, tmp_path, smollm2_gguf, runtime_env):
    prof = load_profile(str(ssh_profile_file(sshd, tmp_path / "box.toml", tmp_path / "remote", env=runtime_env)))
    spec = BenchSpec("lm", smollm2_gguf, repeat=1, warmup=0, n_predict=8)
    first = run_bench(prof, spec)
    assert not first.failures and first.outcome.pushed_bytes > smollm2_gguf.stat().st_size
    copy = tmp_path / "remote" / "models" / smollm2_gguf.name
    _corrupt_in_place(copy)
    said: list[str] = []
    again = run_bench(prof, spec, log=said.append)
    assert not again.failures, again.failures
    assert again.outcome.pushed_bytes == smollm2_gguf.stat().st_size  # only the model, again
    assert any("did not match its sha256" in m and "pushing it again" in m for m in said), said
    assert _sha(copy) == _sha(smollm2_gguf)


@pytest.mark.slow  # over ~0.9 s: the fast lane stays under 2 minutes
def test_device_without_sha256sum_falls_back_to_sizes_and_says_so(tmp_path, phones):
    """A phone whose shell has no sha256sum/shasum (its PATH holds only the tools such a device has)."""
    phone = phones()
    tools = tmp_path / "device-tools"
    tools.mkdir()
    for name in ("sh", "cat", "mkdir", "mv", "rm", "chmod", "stat", "wc", "df", "dirname", "uname", "setsid", "sleep",
                 "sed"):
        found = shutil.which(name)
        if found:
            (tools / name).symlink_to(found)
    phone.path = f"{phone.root}/system/bin:{tools}"
    t = make_transport(profile_from_dict({"transport": "adb", "address": phone.serial, "target": "android-arm64"},
                                         where="test", default_name="old"))
    src = tmp_path / "m.gguf"
    src.write_bytes(os.urandom(10_000))
    first = sync(t, t.workdir, {"models/m.gguf": src}, hash_cache=tmp_path / "h.json")
    assert first.pushed_files == ["models/m.gguf"] and first.notes == []
    second = sync(t, t.workdir, {"models/m.gguf": src}, hash_cache=tmp_path / "h.json")
    assert second.pushed_files == [] and second.notes == [
        "device old has no sha256sum/shasum: its copies were checked by size only"]


@pytest.mark.slow
def test_adb_corrupted_copy_is_pushed_again(tmp_path, phones):
    phone = phones()
    t = make_transport(profile_from_dict({"transport": "adb", "address": phone.serial, "target": "android-arm64"},
                                         where="test", default_name="p2"))
    src = tmp_path / "m.gguf"
    src.write_bytes(os.urandom(200_000))
    sync(t, t.workdir, {"models/m.gguf": src}, hash_cache=tmp_path / "h.json")
    copy = phone.root / "data/local/tmp/mvlm/models/m.gguf"
    _corrupt_in_place(copy)
    res = sync(t, t.workdir, {"models/m.gguf": src}, hash_cache=tmp_path / "h.json")
    assert res.repaired == ["models/m.gguf"] and res.pushed_files == ["models/m.gguf"]
    assert "did not match its sha256" in res.notes[0]
    assert _sha(copy) == _sha(src)


@pytest.mark.slow  # more than ~3 s here (fast lane: pytest -m 'not slow')
def test_dropped_push_names_the_file_and_the_bytes_that_arrived(sshd, tmp_path):
    """The session is killed while the SECOND file is on its way: the message names that file, its device path and
    the bytes the device really holds (what ssh had buffered never arrived)."""
    t = make_transport(sshd.profile(str(tmp_path / "remote")))
    first = tmp_path / "first.bin"
    first.write_bytes(os.urandom(3 << 20))
    big = tmp_path / "big.gguf"
    big.write_bytes(os.urandom(48 << 20))
    killed = []

    def pull_the_plug(done: int, total: int) -> None:
        if done >= (6 << 20) and not killed:
            killed.append(sshd.kill_sessions())

    try:
        with pytest.raises(ConnectionLostError) as e:
            sync(t, str(tmp_path / "remote"), {"models/first.bin": first, "models/big.gguf": big},
                 progress=pull_the_plug, hash_cache=tmp_path / "h.json")
    finally:
        t.close()
    msg = str(e.value)
    part = tmp_path / "remote" / "models" / "big.gguf.part"
    arrived = part.stat().st_size if part.exists() else 0
    assert f"push of big.gguf to {part}" in msg, msg
    assert f"({arrived} of {big.stat().st_size} bytes reached the device)" in msg, msg
    assert "\n" not in msg and "(no message)" not in msg


@pytest.mark.slow
def test_adb_device_lost_names_the_file(tmp_path, phones):
    phone = phones()
    t = make_transport(profile_from_dict({"transport": "adb", "address": phone.serial, "target": "android-arm64"},
                                         where="test", default_name="g2"))
    t.check()
    src = tmp_path / "m.gguf"
    src.write_bytes(os.urandom(500_000))
    phone.drop_after_sync_bytes = 100_000  # the cable comes out during the push
    with pytest.raises(ConnectionLostError, match=r"push of m\.gguf to /data/local/tmp/mvlm/models/m\.gguf\.part "
                                                  r"\(500000 bytes\)"):
        sync(t, t.workdir, {"models/m.gguf": src}, hash_cache=tmp_path / "h.json")


# ===================================================================================================== 12. messages


@pytest.mark.slow
def test_model_that_is_not_gguf_is_refused_before_pushing(tmp_path, fake_gguf):
    prof = local_profile(tmp_path)
    notgguf = tmp_path / "notgguf"
    notgguf.write_text("this is a text file, not a model\n" * 100)
    r = mvlm("bench", "--device", prof, "--model", notgguf)
    line = _one_line(r.stderr)
    assert r.returncode == 2 and f"--model {notgguf} is not a GGUF file" in line
    r = mvlm("bench", "--device", prof, "--protocol", "vlm", "--model", fake_gguf, "--mmproj", notgguf)
    assert r.returncode == 2 and "--mmproj" in _one_line(r.stderr) and "not a GGUF" in r.stderr
    mmproj = small_gguf(tmp_path / "mmproj-M-F16.gguf", "clip")
    r = mvlm("bench", "--device", prof, "--protocol", "vlm", "--model", fake_gguf, "--mmproj", mmproj, "--image", notgguf)
    assert r.returncode == 2 and "--image" in _one_line(r.stderr) and "not an image" in r.stderr
    r = mvlm("bench", "--device", prof, "--model", tmp_path / "missing.gguf")
    assert r.returncode == 2 and "does not exist" in _one_line(r.stderr)
    assert not (tmp_path / "dev-faultlocal").exists()


@pytest.mark.slow  # over ~0.9 s: the fast lane stays under 2 minutes
def test_a_gguf_cut_short_is_refused_before_pushing(tmp_path, smollm2_gguf):
    """An interrupted copy or download: the header is whole, the tensor data is not (llama.cpp would fail on the
    device, after the push, with 'data is not within the file bounds')."""
    prof = local_profile(tmp_path)
    cut = tmp_path / "SmolLM2-Q4_1.gguf"
    with open(smollm2_gguf, "rb") as src:
        cut.write_bytes(src.read(3_000_000))
    missing = smollm2_gguf.stat().st_size - 3_000_000
    for args in (("bench", "--device", prof, "--model", cut), ("serve", "--model", cut)):
        r = mvlm(*args)
        line = _one_line(r.stderr)
        assert r.returncode == 2 and f"--model {cut} is truncated" in line and f"{missing} bytes past the end" in line
    assert not (tmp_path / "dev-faultlocal").exists()


@pytest.mark.slow
def test_llama_cpp_failure_is_one_line_with_the_relevant_log_line(tmp_path, host_runtime):
    bad = small_gguf(tmp_path / "Broken-F16.gguf")  # a whole header, no hyper-parameters: llama.cpp cannot load it
    prof = local_profile(tmp_path)
    r = mvlm("bench", "--device", prof, "--model", bad, "--repeat", 1, "--warmup", 0)
    line = _error_line(r.stderr)
    assert r.returncode == 3
    assert line.startswith("error: lm protocol on faultlocal: run 1 failed: exited with status 1: ")
    assert "full log: " in line
    log = Path(line.rsplit("full log: ", 1)[1].rstrip(")"))
    text = log.read_text()
    assert "llama" in text  # the whole output of llama.cpp, kept
    relevant = line.split("exited with status 1: ", 1)[1].rsplit(" (full log:", 1)[0]
    assert relevant in text and ("error" in relevant.lower() or "fail" in relevant.lower()), relevant
    rv = mvlm("bench", "--device", prof, "--model", bad, "--repeat", 1, "--warmup", 0, "--verbose")
    assert rv.returncode == 3 and "llama_model_load" in rv.stderr.split("full log:", 1)[1]  # --verbose adds the tail


def test_relevant_line_prefers_the_loader_error():
    out = "\n".join([
        "build: 1 (0c1e570) with cc",
        "llama_model_loader: loaded meta data with 0 key-value pairs",
        "llama_model_load: error loading model: tensor 'x' data is not within the file bounds",
        "llama_model_load_from_file_impl: failed to load model",
        "main: error: unable to load model",
    ])
    assert relevant_line(out) == "llama_model_load: error loading model: tensor 'x' data is not within the file bounds"
    assert relevant_line("llama-completion: 15: Syntax error: word unexpected (expecting \")\")\n") .startswith(
        "llama-completion: 15: Syntax error")
    assert "no output" in relevant_line("")


@pytest.mark.parametrize("args, option", [
    (["-n", "-1"], "--n-predict"),
    (["-n", "0"], "--n-predict"),
    (["-n", "100000"], "--n-predict"),
    (["--repeat", "0"], "--repeat"),
    (["--repeat", "-3"], "--repeat"),
    (["--warmup", "-1"], "--warmup"),
    (["--threads", "-2"], "--threads"),
    (["--threads", "0"], "--threads"),
    (["--n-gpu-layers", "-2"], "--n-gpu-layers"),
    (["--timeout", "0"], "--timeout"),
    (["--timeout", "nan"], "--timeout"),
    (["--timeout", "inf"], "--timeout"),
])
def test_nonsensical_counts_are_refused(tmp_path, fake_gguf, args, option):
    r = mvlm("bench", "--device", local_profile(tmp_path), "--model", fake_gguf, *args)
    line = _one_line(r.stderr)
    assert r.returncode == 2 and option in line and "out of range" in line, line
    assert not (tmp_path / "dev-faultlocal").exists()


# ===================================================================================================== 13. devices


@pytest.fixture
def profile_dir(tmp_path, monkeypatch):
    d = tmp_path / "mydevices"
    d.mkdir()
    (d / "good.toml").write_text(f'transport = "local"\ntarget = "host"\nthreads = 2\nworkdir = "{tmp_path / "gooddev"}"\n')
    (d / "bad.toml").write_text('transport = "local"\ntarget = "host"\ntreads = 2\n')
    (d / "evil.toml").write_text('transport = "ssh"\naddress = "u@h"\ntarget = "orin"\n'
                                 '[ssh]\noptions = ["ProxyCommand=touch /tmp/never"]\n')
    monkeypatch.setenv("MVLM_DEVICES_DIR", str(d))
    return d


@pytest.mark.slow
def test_devices_lists_good_profiles_and_flags_bad_ones(profile_dir):
    r = mvlm("devices", "--no-check", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["good"]["status"] == "not checked" and rows["good"]["transport"] == "local"
    assert rows["bad"]["status"].startswith("invalid: ") and "unknown field 'treads'" in rows["bad"]["status"]
    assert "ProxyCommand is not allowed" in rows["evil"]["status"]
    assert {"orin", "sd888", "local"} <= set(rows)  # the shipped ones are still there
    r = mvlm("devices", "--no-check")
    assert r.returncode == 0 and "invalid" in r.stdout and "good" in r.stdout
    r = mvlm("devices", "good")  # asked about a good one: checked, exit 0
    assert r.returncode == 0 and "reachable" in r.stdout
    r = mvlm("devices", "bad")  # asked about the bad one: its row, then one error line, exit 2
    assert r.returncode == 2 and "unknown field 'treads'" in _one_line(r.stderr)
    r = mvlm("devices", "nope")
    assert r.returncode == 2 and "no device profile 'nope'" in _one_line(r.stderr)


@pytest.mark.slow
def test_bench_on_a_good_profile_works_beside_a_bad_one(profile_dir, tmp_path, smollm2_gguf, runtime_env):
    r = mvlm("bench", "--device", "good", "--model", smollm2_gguf, "-n", 8, "--repeat", 1, "--warmup", 0, env=runtime_env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = mvlm("bench", "--device", "bad", "--model", smollm2_gguf)
    assert r.returncode == 2 and "treads" in _one_line(r.stderr)



# ===================================================================================================== 14. ssh config file
#
# An outside tester got past the config_file screening with OpenSSH's own quoting: the old check read `"ProxyCommand"`
# as no keyword at all. Each config below is first handed to the plain ssh client (the control: the command runs, or
# an unknown host is accepted), then named by a profile: mvlm refuses it in one line, and nothing runs or connects.

CONFIG_BYPASSES = [
    ("quoted-keyword", 'Host *\n  "ProxyCommand" touch {marker}\n', "line 2: ProxyCommand"),
    ("quote-inside-keyword", 'Host *\n  Proxy"Command" touch {marker}\n', "line 2: ProxyCommand"),
    ("empty-token-first", 'Host *\n"" ProxyCommand touch {marker}\n', "line 2: ProxyCommand"),
    ("equals", "Host *\n  ProxyCommand=touch {marker}\n", "line 2: ProxyCommand"),
    ("match-not-exec", 'Match !exec "touch {marker}"\n', "line 1: Match"),
    ("match-quoted-exec", 'Match "exec" "touch {marker}"\n', "line 1: Match"),
    ("quoted-match", '"Match" exec "touch {marker}"\n', "line 1: Match"),
    ("quoted-include", '"Include" {evil}\n', "line 1: Include"),
    ("quoted-localcommand", 'Host *\n  "PermitLocalCommand" yes\n  "LocalCommand" touch {marker}\n',
     "line 2: PermitLocalCommand"),
    ("quoted-hostkey-off", 'Host *\n  "StrictHostKeyChecking" no\n  "UserKnownHostsFile" /dev/null\n',
     "line 2: StrictHostKeyChecking"),
]


def _write_bypass(tmp_path: Path, text: str) -> tuple[Path, Path]:
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil_config"  # what the Include pulls in
    evil.write_text(f"Host *\n  ProxyCommand touch {marker}\n")
    conf = tmp_path / "box_ssh_config"
    conf.write_text(text.format(marker=marker, evil=evil))
    return conf, marker


def _bare_ssh_profile(sshd, path: Path, workdir: Path, config_file: str) -> Path:
    """An ssh profile with no known_hosts of its own (as the tester wrote it): the host is unknown unless something
    switches checking off."""
    path.write_text("\n".join([
        'transport = "ssh"',
        f"address = {json.dumps(f'ssh://{sshd.user}@127.0.0.1:{sshd.port}')}",
        f"workdir = {json.dumps(str(workdir))}",
        'target = "host"',
        "[ssh]",
        f"identity_file = {json.dumps(str(sshd.root / 'client_key'))}",
        f"config_file = {json.dumps(config_file)}",
        "connect_timeout = 5",
    ]) + "\n")
    return path


@pytest.mark.parametrize("name, text, said", CONFIG_BYPASSES, ids=[c[0] for c in CONFIG_BYPASSES])
def test_plain_ssh_obeys_the_bypass_configs(sshd, tmp_path, name, text, said):
    """The control: each config really runs a command here, or really lets ssh into an unknown host."""
    conf, marker = _write_bypass(tmp_path, text)
    argv = ["ssh", "-F", str(conf), "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-i", str(sshd.root / "client_key"),
            "-p", str(sshd.port), f"{sshd.user}@127.0.0.1", "true"]
    if name == "quoted-localcommand":  # LocalCommand runs after a successful login: give ssh the pinned key
        argv[1:1] = ["-o", f"UserKnownHostsFile={sshd.known_hosts}", "-o", "StrictHostKeyChecking=yes"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if name == "quoted-hostkey-off":
        assert r.returncode == 0, r.stderr  # connected to a host whose key nobody pinned
    else:
        assert marker.exists(), (name, r.stderr)


@pytest.mark.parametrize("name, text, said", CONFIG_BYPASSES, ids=[c[0] for c in CONFIG_BYPASSES])
def test_ssh_config_bypasses_are_refused(sshd, tmp_path, fake_gguf, name, text, said):
    conf, marker = _write_bypass(tmp_path, text)
    prof = _bare_ssh_profile(sshd, tmp_path / "box.toml", tmp_path / "remote", conf.name)
    r = mvlm("bench", "--device", prof, "--model", fake_gguf, timeout=120)
    line = _one_line(r.stderr)
    assert r.returncode == 2, r.stderr
    assert str(prof) in line and f"{conf} {said} is not allowed" in line, line
    assert not marker.exists()
    assert not (tmp_path / "remote").exists()  # no connection (a connection would have created the work dir)
    # the transport checks a profile built in code the same way (nothing runs, nothing connects)
    sneaky = dataclasses.replace(sshd.profile(str(tmp_path / "remote")), ssh=dataclasses.replace(
        sshd.profile(str(tmp_path / "remote")).ssh, known_hosts=None, config_file=str(conf)))
    with pytest.raises(MvlmError, match=said.split(": ", 1)[1]):
        make_transport(sneaky)
    assert not marker.exists() and not (tmp_path / "remote").exists()


@pytest.mark.slow  # over ~0.9 s: the fast lane stays under 2 minutes
def test_a_config_that_turns_host_key_checking_off_does_not_connect(sshd, tmp_path):
    """The host-key case end to end against the real sshd: the same profile with a harmless config file fails on the
    unknown host key (exit 3: checking is on); with the quoted StrictHostKeyChecking no, it is refused (exit 2)."""
    harmless = tmp_path / "harmless_config"
    harmless.write_text("Host *\n  ServerAliveInterval 15\n")
    prof = _bare_ssh_profile(sshd, tmp_path / "box.toml", tmp_path / "remote", harmless.name)
    r = mvlm("devices", "--no-check", env={"MVLM_DEVICES_DIR": str(tmp_path)})
    assert r.returncode == 0
    r = mvlm("devices", "box", env={"MVLM_DEVICES_DIR": str(tmp_path)}, timeout=120)
    assert r.returncode == 3 and "host key verification failed" in _one_line(r.stderr), r.stderr
    conf, _ = _write_bypass(tmp_path, dict((c[0], c[1]) for c in CONFIG_BYPASSES)["quoted-hostkey-off"])
    _bare_ssh_profile(sshd, prof, tmp_path / "remote", conf.name)
    r = mvlm("devices", "box", env={"MVLM_DEVICES_DIR": str(tmp_path)}, timeout=120)
    line = _one_line(r.stderr)
    assert r.returncode == 2 and "StrictHostKeyChecking is not allowed" in line and "host-key checking off" in line
    assert not (tmp_path / "remote").exists()


@pytest.mark.parametrize("directive", [
    "ForwardAgent yes", "ControlPath /tmp/someone-elses-master", "ControlMaster auto", "ControlPersist 600",
    "PKCS11Provider /usr/lib/x86_64-linux-gnu/opensc-pkcs11.so", "SecurityKeyProvider /tmp/evil.so",
    "ProxyJump root@127.0.0.1:1", "KnownHostsCommand /bin/true", "SendEnv *", "BatchMode no",
    "StrictHostKeyChecking ask", "UserKnownHostsFile none", "GlobalKnownHostsFile /dev/null",
])
def test_config_file_keywords_meet_the_ssh_options_allow_list(tmp_path, directive):
    """What ssh.options refuses, a config_file may not say either (an unknown keyword is refused too)."""
    (tmp_path / "c.conf").write_text(f"# my board\nHost *\n  {directive}\n")
    prof = tmp_path / "box.toml"
    prof.write_text(GOOD_SSH + '[ssh]\nconfig_file = "c.conf"\n')
    with pytest.raises(MvlmError) as e:
        load_profile(str(prof))
    msg = str(e.value)
    assert f"c.conf line 3: {directive.split()[0]} is not allowed" in msg and "\n" not in msg, msg


def test_every_refused_ssh_option_is_refused_in_a_config_file_too(tmp_path):
    for options, named in BAD_OPTIONS:
        lines = "".join(f"  {o.replace('=', ' ', 1)}\n" for o in options)
        (tmp_path / "c.conf").write_text("Host *\n" + lines.format(marker=tmp_path / "M"))
        prof = tmp_path / "box.toml"
        prof.write_text(GOOD_SSH + '[ssh]\nconfig_file = "c.conf"\n')
        with pytest.raises(MvlmError, match=rf"(?i)c\.conf line 2: {named} is not allowed"):
            load_profile(str(prof))


GOOD_SSH = 'transport = "ssh"\naddress = "ssh://u@h"\ntarget = "orin"\nworkdir = "/w"\n'


@pytest.mark.slow
def test_an_allowed_config_file_connects_and_ssh_reads_the_copy_that_was_checked(sshd, tmp_path):
    """A config with a Host alias and allowed options works against the real sshd; rewriting the file after the
    check (a ProxyCommand slipped in) changes nothing: ssh reads mvlm's private copy of the checked bytes."""
    conf = tmp_path / "alias_config"
    conf.write_text(f'Host mvlm-test-box\n  HostName 127.0.0.1\n  "Port" {sshd.port}\n  User={sshd.user}\n'
                    f"  IdentityFile {sshd.root / 'client_key'}\n  ServerAliveInterval 15  # keep alive\n")
    prof = tmp_path / "alias.toml"
    prof.write_text("\n".join([
        'transport = "ssh"', 'address = "mvlm-test-box"', f"workdir = {json.dumps(str(tmp_path / 'remote'))}",
        'target = "host"', "[ssh]", f"known_hosts = {json.dumps(str(sshd.known_hosts))}",
        f'config_file = "{conf.name}"', "connect_timeout = 5"]) + "\n")
    checked = conf.read_bytes()
    t = make_transport(load_profile(str(prof)))
    copy = Path(t._config_file)  # what ssh -F reads: a private copy of the checked bytes
    marker = tmp_path / "MARKER"
    conf.write_text(f"Host *\n  ProxyCommand touch {marker}\n")
    try:
        assert copy != conf and copy.read_bytes() == checked and (copy.parent.stat().st_mode & 0o777) == 0o700
        t.check()
        assert t.probe().system == platform.system()
    finally:
        t.close()
    assert not marker.exists()
    assert not copy.parent.exists()  # removed with the transport


# ===================================================================================================== 14. reports vs save


@pytest.mark.slow
def test_a_report_that_cannot_be_written_does_not_cost_the_saved_measurement(tmp_path, smollm2_gguf, runtime_env,
                                                                              small_fs):
    """--json on a full tmpfs, the history in a roomy dir: the measurement is saved (each repetition as it ends), and the
    report error (exit 28) says where it is kept; no temporary is left on the full disk."""
    full = small_fs(64 << 10)
    fill_up(full / "filler")
    db = tmp_path / "h.sqlite"
    r = mvlm("bench", "--device", local_profile(tmp_path), "--model", smollm2_gguf, "-n", 8, "--repeat", 1,
             "--warmup", 0, "--json-file", full / "r.json", "--save", "--db", db, env=runtime_env, cwd=tmp_path)
    line = _error_line(r.stderr)
    assert r.returncode == 28, r.stderr[-2000:]
    assert f"disk full while writing {full / 'r.json'}" in line and f"kept in the history {db} (id:1)" in line, line
    assert sorted(p.name for p in full.iterdir()) == ["filler"]
    h = mvlm("history", "--db", db, "--model", smollm2_gguf.stem, "--json")
    assert h.returncode == 0 and len(json.loads(h.stdout)) == 1, h.stdout + h.stderr


@pytest.mark.slow
def test_report_and_history_on_a_full_disk_spill_the_runs(tmp_path, smollm2_gguf, runtime_env, small_fs):
    """The tester's case: history and --json both on a full tmpfs. Before: exit 28, nothing saved, no spill. Now the
    runs are spilled (the history's dir is full, so the current directory), and the one error line names both."""
    full = small_fs(64 << 10)
    fill_up(full / "filler")
    r = mvlm("bench", "--device", local_profile(tmp_path), "--model", smollm2_gguf, "-n", 8, "--repeat", 1,
             "--warmup", 0, "--json-file", full / "r.json", "--save", "--db", full / "h.sqlite", env=runtime_env, cwd=tmp_path)
    line = _error_line(r.stderr)
    assert r.returncode == 28, r.stderr[-2000:]
    assert f"disk full while writing {full / 'r.json'}" in line and "not saved to the benchmark history" in line, line
    spills = list(tmp_path.glob("h.sqlite.unsaved-*.json"))
    assert len(spills) == 1 and str(spills[0].resolve()) in line, (line, spills)
    (rec,) = json.loads(spills[0].read_text())
    assert rec["model_sha256"] == _sha(smollm2_gguf) and rec["repetitions"] == 1
    assert sorted(p.name for p in full.iterdir()) == ["filler"]  # no temporaries, no half history


# ===================================================================================================== 14. output paths


@pytest.mark.slow
def test_report_paths_that_are_not_regular_files_are_refused(tmp_path, fake_gguf):
    """A FIFO (would block forever), a device (/dev/null: refused, stays a character device; as root the old code
    replaced such a node), a socket, and `dir/` (used to write a file named `dir`): one line each, exit 2."""
    import socket
    import stat

    prof = local_profile(tmp_path)
    fifo = tmp_path / "myfifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    (tmp_path / "adir").mkdir()
    try:
        cases = [
            (["--json-file", fifo], "is a FIFO (named pipe), not a regular file"),
            (["--markdown", "/dev/null"], "is a character device, not a regular file"),
            (["--csv", sock_path], "is a socket, not a regular file"),
            (["--json-file", f"{tmp_path / 'newdir'}/"], "ends with '/'"),
            (["--json-file", f"{tmp_path / 'adir'}/"], "ends with '/'"),
            (["--markdown", tmp_path / "adir"], "is a directory"),
            (["--save", "--db", fifo], "--db"),
        ]
        for extra, words in cases:
            r = mvlm("bench", "--device", prof, "--model", fake_gguf, *extra, timeout=60)
            line = _one_line(r.stderr)
            assert r.returncode == 2 and words in line, line
        assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and stat.S_ISFIFO(os.stat(fifo).st_mode)
        assert not (tmp_path / "newdir").exists() and list((tmp_path / "adir").iterdir()) == []
        assert not (tmp_path / "dev-faultlocal").exists()
        # mvlm compare --markdown checks the same way before it opens anything (it used to block on the FIFO)
        r = mvlm("compare", "a.json", "b.json", "--markdown", fifo, timeout=60, cwd=tmp_path)
        assert r.returncode == 2 and "FIFO" in _one_line(r.stderr)
    finally:
        sock.close()


# ===================================================================================================== 14. A/B options


@pytest.mark.slow
@pytest.mark.parametrize("against, words", [
    ("ctx-size=-5", "--against ctx-size=-5 is out of range: give a whole number from 464 to 131072"),
    ("ctx-size=1", "--against ctx-size=1 is out of range"),
    ("ctx-size=99999999", "--against ctx-size=99999999 is out of range"),
    ("threads=0", "--against threads=0 is out of range: give a whole number from 1 to 1024"),
    ("n-gpu-layers=-2", "--against n-gpu-layers=-2 is out of range"),
    ("model=/nonexistent.gguf", "--against model=/nonexistent.gguf does not exist"),
    ("llama-cpp=/tmp", "--against llama-cpp=/tmp: /tmp is not a llama.cpp checkout (it needs CMakeLists.txt and ggml/)"),
    ("llama-cpp=/nonexistent", "--against llama-cpp=/nonexistent: /nonexistent is not a directory"),
    ("runtime=/tmp", "--against runtime=/tmp: /tmp is not an mvlm runtime"),
])
def test_against_values_are_validated_and_named_as_written(tmp_path, fake_gguf, against, words):
    r = mvlm("bench", "--device", local_profile(tmp_path), "--model", fake_gguf, "--against", against, timeout=120)
    line = _one_line(r.stderr)
    assert r.returncode == 2 and words in line, line
    assert "--threads" not in line and "--model " not in line
    assert not (tmp_path / "dev-faultlocal").exists()  # refused before anything is pushed


def test_context_size_is_bounded_for_every_spec(fake_gguf):
    for ctx in (0, 63, 400, 131073):
        with pytest.raises(MvlmError, match=rf"context size \(ctx_size\) {ctx} is out of range"):
            validate_spec(BenchSpec("lm", fake_gguf, ctx_size=ctx))
    validate_spec(BenchSpec("lm", fake_gguf, n_predict=16, ctx_size=128))
    with pytest.raises(MvlmError, match="from 896 to"):  # the vlm protocol also needs room for the image
        validate_spec(BenchSpec("vlm", fake_gguf, ctx_size=512))


def test_runtime_find_hint_keeps_the_whole_command_in_backticks(tmp_path, monkeypatch):
    from mvlm_core import runtime as rtmod

    monkeypatch.setenv("MVLM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MvlmError) as e:
        rtmod.find("host", llama_cpp=tmp_path / "llama.cpp")
    assert str(e.value).endswith(f"run `mvlm runtime build --target host --llama-cpp {tmp_path / 'llama.cpp'}`")


# gdb's backtrace after a llama.cpp abort, as the real runtime prints it (see the live test below)
_CRASH = """0.00.238.542 I generate: n_ctx = 256, n_batch = 2048, n_predict = 16, n_keep = 0
Building a website can be done in 10 simple steps:
Step 1:../src/common/common.cpp:2158: get_sub_batch: failed to add token 33 at index 8 (error -1, n = 18)

[New LWP 2856]
[Thread debugging using libthread_db enabled]
Using host libthread_db library "/lib/x86_64-linux-gnu/libthread_db.so.1".
0x00007f6c0bf82c17 in __GI___wait4 (pid=2857, stat_loc=0x0, options=0, usage=0x0) at ../sysdeps/unix/sysv/linux/wait4.c:30
30\t../sysdeps/unix/sysv/linux/wait4.c: No such file or directory.
#0  0x00007f6c0bf82c17 in __GI___wait4 (pid=2857, stat_loc=0x0) at ../sysdeps/unix/sysv/linux/wait4.c:30
30\tin ../sysdeps/unix/sysv/linux/wait4.c
#1  0x00007f6c0b54e68b in ggml_print_backtrace () from /x/lib/libggml-base.so.0
#2  0x00007f6c0b54e7de in ggml_abort () from /x/lib/libggml-base.so.0
#6  0x00007f6c0bed624a in __libc_start_call_main (main=0x5567d38aa050 <main>) at ../sysdeps/nptl/libc_start_call_main.h:58
58\t../sysdeps/nptl/libc_start_call_main.h: No such file or directory.
#8  0x00005567d38aa081 in _start ()
[Inferior 1 (process 2854) detached]
"""


def test_relevant_line_skips_a_crash_backtrace():
    assert relevant_line(_CRASH) == (
        "../src/common/common.cpp:2158: get_sub_batch: failed to add token 33 at index 8 (error -1, n = 18)")
    assert relevant_line("x\n/src/ggml/ggml.c:12: GGML_ASSERT(n > 0) failed\n#0 0x01 in f ()\n") == (
        "/src/ggml/ggml.c:12: GGML_ASSERT(n > 0) failed")
    # a real missing file is still the relevant line
    assert "No such file" in relevant_line("sh: 1: /w/bin/llama-completion: No such file or directory\n")


@pytest.mark.slow
def test_relevant_line_of_a_real_llama_cpp_abort(tmp_path, host_runtime, smollm2_gguf):
    """The real runtime, run with a context too small for the prompt (what --against ctx-size=1 used to reach)."""
    exe = host_runtime / "bin" / "llama-completion"
    r = subprocess.run([str(exe), "-m", str(smollm2_gguf), "-p", LM_PROMPT, "-n", "16", "-no-cnv", "--temp", "0",
                        "-c", "1", "-t", "1", "-lv", "4"], capture_output=True, text=True, errors="replace", timeout=300,
                       env={**os.environ, "LD_LIBRARY_PATH": str(host_runtime / "lib")})
    assert r.returncode != 0
    line = relevant_line(r.stdout + r.stderr)
    assert "failed to add token" in line or "GGML_ASSERT" in line or "error" in line.lower(), line
    assert "sysdeps" not in line and not line.startswith("#"), line


@pytest.mark.slow
def test_ab_warmup_failure_reads_as_a_sentence(tmp_path, smollm2_gguf, runtime_env):
    bad = small_gguf(tmp_path / "Broken-F16.gguf")
    r = mvlm("bench", "--device", local_profile(tmp_path), "--model", smollm2_gguf, "-n", 8, "--repeat", 1,
             "--against", f"model={bad}", env=runtime_env)
    line = _error_line(r.stderr)
    assert r.returncode == 3
    assert line.startswith("error: lm protocol on faultlocal: the baseline's warm-up run failed: exited with status 1: "), line


@pytest.mark.slow
def test_ab_save_keeps_the_real_model_name(tmp_path, smollm2_gguf, runtime_env):
    db, md = tmp_path / "h.sqlite", tmp_path / "ab.md"
    r = mvlm("bench", "--device", local_profile(tmp_path), "--model", smollm2_gguf, "-n", 8, "--threads", 1,
             "--repeat", 2, "--warmup", 0, "--against", "threads=2", "--save", "--db", db, "--markdown", md,
             env=runtime_env)
    assert r.returncode == 0, r.stderr[-3000:]
    # one table, a row per side: the side and what --against changed (threads) are columns
    assert "A/B side" in r.stdout and "Threads" in r.stdout and "baseline" in r.stdout and "candidate" in r.stdout
    h = mvlm("history", "--db", db, "--model", smollm2_gguf.stem, "--json")
    rows = json.loads(h.stdout)
    assert h.returncode == 0 and len(rows) == 2, h.stdout + h.stderr
    assert {row["model"] for row in rows} == {smollm2_gguf.stem}
    text = md.read_text().splitlines()
    assert text[0].startswith("| Model | Threads | A/B side | Hardware |")
    assert text[2].startswith(f"| {smollm2_gguf.stem} | 2 | baseline |")
    assert text[3].startswith(f"| {smollm2_gguf.stem} | 1 | candidate |")


# ===================================================================================================== 14. profiles


@pytest.mark.parametrize("field, value, words", [
    ("threads", "5000", "field 'threads' = 5000 is out of range: give a whole number from 1 to 1024"),
    ("threads", "99999999999999999999999", "field 'threads' = 99999999999999999999999 is out of range"),
    ("threads", "9" * 40, "field 'threads' = a 133-bit number is out of range"),
    ("threads", "0", "field 'threads' = 0 is out of range"),
    ("n_gpu_layers", "-3", "field 'n_gpu_layers' = -3 is out of range: give a whole number from 0 to 100000"),
])
def test_profile_counts_are_bounded_like_the_command_line(tmp_path, fake_gguf, field, value, words):
    prof = tmp_path / "big.toml"
    prof.write_text(f'transport = "local"\ntarget = "host"\nworkdir = "{tmp_path / "dev"}"\n{field} = {value}\n')
    r = mvlm("bench", "--device", prof, "--model", fake_gguf)
    line = _one_line(r.stderr)
    assert r.returncode == 2 and str(prof) in line and words in line, line
    assert not (tmp_path / "dev").exists()


@pytest.mark.slow
def test_device_spec_messages_keep_the_users_text(tmp_path, fake_gguf, profile_dir):
    forms = "a profile name (see `mvlm devices`), the path of a .toml profile, ssh://user@host[:port] or adb:SERIAL"
    r = mvlm("bench", "--device", "foo://x", "--model", fake_gguf)
    line = _one_line(r.stderr)
    assert r.returncode == 2 and "--device foo://x: unknown scheme foo://" in line and forms in line, line
    r = mvlm("bench", "--device", "/dev/null", "--model", fake_gguf)
    line = _one_line(r.stderr)
    assert r.returncode == 2 and "/dev/null exists but is not a profile file (a character device)" in line, line
    r = mvlm("bench", "--device", tmp_path / "nope.toml", "--model", fake_gguf)
    assert r.returncode == 2 and "does not exist" in _one_line(r.stderr) and forms in r.stderr
    # a FIFO named like a profile is refused, not read (a read would block forever), also when `mvlm devices` scans
    os.mkfifo(profile_dir / "pipe.toml")
    r = mvlm("bench", "--device", profile_dir / "pipe.toml", "--model", fake_gguf, timeout=60)
    assert r.returncode == 2 and "a FIFO" in _one_line(r.stderr)
    r = mvlm("devices", "--no-check", "--json", timeout=60)
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert r.returncode == 0 and "not a device profile file (a FIFO (named pipe))" in rows["pipe"]["status"]


def _tiny_lm_gguf(path: Path, template: str | None) -> Path:
    """A real (tiny) LM GGUF header: token embedding + tokenizer, with or without tokenizer.chat_template."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch="phi2")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b"])
    if template is not None:
        w.add_chat_template(template)
    w.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["vlm", "imp"])
def test_image_protocol_refuses_a_model_without_chat_template_before_pushing(tmp_path, protocol):
    """llama-mtmd-cli stops on a model without a chat template ("Model does not have chat template."): bench says so
    up front in one line, exit 2, nothing pushed; the same model with a template passes the input checks."""
    prof = local_profile(tmp_path)
    model = _tiny_lm_gguf(tmp_path / "imp-tiny-F16.gguf", None)
    mmproj = small_gguf(tmp_path / "mmproj-imp-tiny-F16.gguf", "clip")
    r = mvlm("bench", "--device", prof, "--protocol", protocol, "--model", model, "--mmproj", mmproj,
             "--repeat", 1, "--warmup", 0)
    line = _one_line(r.stderr)
    assert r.returncode == 2, r.stderr
    assert "no chat template" in line and str(model) in line and "mvlm convert" in line, line
    assert not (tmp_path / "dev-faultlocal").exists()  # nothing reached the device's workdir
    templated = _tiny_lm_gguf(tmp_path / "with-template.gguf", "{{ messages[0]['content'] }}")
    check_inputs(BenchSpec(protocol, templated, mmproj=mmproj))
    check_inputs(BenchSpec("lm", model))  # llama-completion needs no template
