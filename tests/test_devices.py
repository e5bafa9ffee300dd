"""Device profiles: the shipped ones load, ad hoc specs work, and every schema error names the file and the field."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mvlm_bench.device.profiles import list_profiles, load_profile, profile_dirs, repo_devices_dir
from mvlm_bench.device.transports.adb import AdbTransport
from mvlm_core.errors import MvlmError

DEFAULT_ADB_WORKDIR = AdbTransport.default_workdir

REPO_DEVICES = Path(__file__).resolve().parents[1] / "devices"


def test_every_shipped_profile_loads():
    assert repo_devices_dir() == REPO_DEVICES
    files = sorted(p.stem for p in REPO_DEVICES.glob("*.toml"))
    profiles = {p.name: p for p in list_profiles(search_dirs=[REPO_DEVICES])}
    assert sorted(profiles) == files
    assert {"orin", "sd888", "sd8gen3", "local", "qemu-arm64"} <= set(profiles)
    for p in profiles.values():
        assert p.source is not None and p.source.parent == REPO_DEVICES and p.description


def test_shipped_profiles_say_what_the_issue_asks():
    orin = load_profile("orin")
    assert (orin.transport, orin.target, orin.n_gpu_layers, orin.threads) == ("ssh", "orin", 999, 8)
    assert (orin.ssh_user, orin.ssh_host, orin.ssh_port) == ("nvidia", "orin.local", None)
    for name in ("sd888", "sd8gen3"):
        p = load_profile(name)
        assert (p.transport, p.target, p.threads, p.workdir) == ("adb", "android-arm64", 4, "/data/local/tmp/mvlm")
    local = load_profile("local")
    assert local.transport == "local" and local.target == "host" and local.threads == os.cpu_count()
    q = load_profile("qemu-arm64")
    assert (q.transport, q.target, q.exec_wrapper, q.emulated, q.threads) == (
        "local",
        "linux-arm64",
        ("qemu-aarch64-static",),
        True,
        2,
    )


def test_adhoc_specs():
    p = load_profile("ssh://pi@10.0.0.7:2222")
    assert (p.transport, p.ssh_user, p.ssh_host, p.ssh_port, p.source) == ("ssh", "pi", "10.0.0.7", 2222, None)
    assert p.workdir == "~/mvlm"
    p = load_profile("ssh://orin.lan")
    assert (p.ssh_user, p.ssh_host, p.ssh_port) == (None, "orin.lan", None)
    p = load_profile("adb:R58M12ABCDE")
    assert (p.transport, p.address, p.workdir, p.target) == ("adb", "R58M12ABCDE", DEFAULT_ADB_WORKDIR, "android-arm64")
    p = load_profile("adb:192.168.1.20:5555")
    assert p.address == "192.168.1.20:5555"


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("ssh://-oProxyCommand=touch%20x@host", "bad"),
        ("ssh://user@-oProxyCommand=x", "bad host"),
        ("ssh://user@host/path", "no path"),
        ("ssh://user@host:99999", "bad ssh address"),
        ("adb:", "bad adb serial"),
        ("adb:-s", "bad adb serial"),
        ("adb:a b", "bad adb serial"),
    ],
)
def test_bad_adhoc_specs(spec, msg):
    with pytest.raises(MvlmError, match=msg):
        load_profile(spec)


def test_load_by_path_and_by_search_dir(tmp_path, monkeypatch):
    d = tmp_path / "mydevices"
    d.mkdir()
    (d / "pixel.toml").write_text('transport = "adb"\naddress = "PIXEL8"\ntarget = "android-arm64"\nthreads = 6\n')
    assert load_profile(str(d / "pixel.toml")).threads == 6
    assert load_profile("pixel", search_dirs=[d]).address == "PIXEL8"
    monkeypatch.setenv("MVLM_DEVICES_DIR", str(d))
    assert profile_dirs()[-1] == d
    assert load_profile("pixel").name == "pixel"
    assert "pixel" in {p.name for p in list_profiles()}
    with pytest.raises(MvlmError, match=r"no device profile 'nope'.*known: .*pixel"):
        load_profile("nope")


def test_earlier_dir_wins(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x.toml").write_text('transport = "local"\ntarget = "host"\nthreads = 1\n')
    (b / "x.toml").write_text('transport = "local"\ntarget = "host"\nthreads = 2\n')
    assert load_profile("x", search_dirs=[a, b]).threads == 1
    assert [p.threads for p in list_profiles(search_dirs=[b, a])] == [2]


GOOD = 'transport = "ssh"\naddress = "ssh://u@h"\ntarget = "orin"\nworkdir = "/w"\n'


@pytest.mark.parametrize(
    "body, field, words",
    [
        (GOOD + "treads = 4\n", "treads", "unknown field"),
        (GOOD + 'threads = "4"\n', "threads", "must be an integer"),
        (GOOD + "threads = true\n", "threads", "must be an integer"),
        (GOOD + "threads = 0\n", "threads", "out of range: give a whole number from 1 to 1024"),
        (GOOD + "threads = 5000\n", "threads", "out of range: give a whole number from 1 to 1024"),
        (GOOD + "threads = 99999999999999999999999\n", "threads", "out of range"),
        (GOOD + "n_gpu_layers = -1\n", "n_gpu_layers", "from 0 to 100000"),
        (GOOD + "n_gpu_layers = 1000000\n", "n_gpu_layers", "from 0 to 100000"),
        (GOOD + "[ssh]\nconnect_timeout = 99999999999\n", "ssh.connect_timeout", "from 1 to 3600"),
        (GOOD + "emulated = 1\n", "emulated", "true or false"),
        (GOOD + 'exec_wrapper = "qemu"\n', "exec_wrapper", "must be a list"),
        (GOOD + "exec_wrapper = [1]\n", "exec_wrapper", "non-empty strings"),
        (GOOD + '[env]\n"A-B" = "x"\n', "env.A-B", "variable names"),
        (GOOD + "[env]\nA = 1\n", "env.A", "must be a string"),
        (GOOD + "[ssh]\nprot = 22\n", "ssh.prot", "unknown field"),
        (GOOD + "[ssh]\nport = 70000\n", "ssh.port", "not a TCP port"),
        (GOOD + '[ssh]\noptions = ["StrictHostKeyChecking=no"]\n', "ssh.options", "host-key checking off"),
        (GOOD + '[ssh]\noptions = ["-oProxyCommand x"]\n', "ssh.options", "Key=Value"),
        ('address = "ssh://u@h"\ntarget = "orin"\n', "transport", "missing required"),
        ('transport = "ssh"\naddress = "ssh://u@h"\n', "target", "missing required"),
        ('transport = "ssh"\ntarget = "orin"\n', "address", "missing required"),
        ('transport = "telnet"\ntarget = "orin"\n', "transport", "is unknown"),
        ('transport = "local"\ntarget = "ios"\n', "target", "is unknown"),
        ('transport = "local"\ntarget = "host"\naddress = "x"\n', "address", "must be absent"),
        ('transport = "adb"\naddress = "S"\ntarget = "android-arm64"\nworkdir = "rel/dir"\n', "workdir", "absolute"),
        ('transport = "local"\ntarget = "host"\nworkdir = "-rf"\n', "workdir", "may not start with '-'"),
        ('transport = "adb"\naddress = "S"\ntarget = "android-arm64"\n[ssh]\nport = 22\n', "[ssh]", "only for"),
        ('name = "other"\ntransport = "local"\ntarget = "host"\n', "name", "differs from the file name"),
        ('transport = "ssh"\naddress = "ssh://u@h:22"\ntarget = "orin"\n[ssh]\nport = 2222\n', "ssh.port", "contradicts"),
    ],
)
def test_schema_errors_name_file_and_field(tmp_path, body, field, words):
    f = tmp_path / "dev.toml"
    f.write_text(body)
    with pytest.raises(MvlmError) as e:
        load_profile(str(f))
    msg = str(e.value)
    assert str(f) in msg and field in msg and words in msg, msg
    assert "\n" not in msg


def test_toml_syntax_error(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text('transport = "local\n')
    with pytest.raises(MvlmError, match=r"broken\.toml: not valid TOML"):
        load_profile(str(f))


def test_ssh_paths_resolve_relative_to_the_profile(tmp_path):
    f = tmp_path / "box.toml"
    f.write_text(GOOD + '[ssh]\nknown_hosts = "keys/known_hosts"\nidentity_file = "~/.ssh/id_box"\n')
    p = load_profile(str(f))
    assert p.ssh.known_hosts == str(tmp_path / "keys" / "known_hosts")
    assert p.ssh.identity_file == str(Path("~/.ssh/id_box").expanduser())


def test_missing_file_and_empty_spec(tmp_path):
    with pytest.raises(MvlmError, match="does not exist"):
        load_profile(str(tmp_path / "nope.toml"))
    with pytest.raises(MvlmError, match="empty --device"):
        load_profile(" ")
