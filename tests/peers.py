"""Real peers for transport and bench tests: an OpenSSH server on 127.0.0.1 and helpers (the phone behind the real
adb is tests/adb_device.py, plugged in by the ``phones`` fixture).

- ``SshServer``: a real ``sshd`` on a free port with its own host key and authorized key; ``known_hosts`` holds the
  generated host key, so host-key checking stays ON in every test that uses it.
"""

from __future__ import annotations

import os
import pwd
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mvlm_bench.device.profiles import DeviceProfile, profile_from_dict

SSHD = "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command name) of every process, from /proc."""
    out: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        out[int(entry)] = (int(stat.rsplit(")", 1)[1].split()[1]), stat[stat.index("(") + 1: stat.rindex(")")])
    return out


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for child, (ppid, _) in proc_table().items():
        children.setdefault(ppid, []).append(child)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class SshServer:
    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.user = pwd.getpwuid(os.getuid()).pw_name
        for name in ("host_key", "client_key", "other_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(root / name)], check=True)
        (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
        host_pub = (root / "host_key.pub").read_text().split()
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        self.config = root / "sshd_config"
        self.config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {root / 'host_key'}",
                    f"PidFile {root / 'sshd.pid'}",
                    f"AuthorizedKeysFile {root / 'authorized_keys'}",
                    "UsePAM no",
                    "StrictModes no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "PermitRootLogin prohibit-password",
                    "MaxStartups 50",
                    "MaxSessions 50",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        if os.getuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege-separation dir sshd insists on
        self.log = open(root / "sshd.log", "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"sshd did not start: {(root / 'sshd.log').read_text()}") from None
                time.sleep(0.05)

    def profile(
        self, workdir: str, *, key: str = "client_key", known_hosts: Path | None = None, port: int | None = None, **kw
    ) -> DeviceProfile:
        data = {
            "transport": "ssh",
            "address": f"ssh://{self.user}@127.0.0.1:{port or self.port}",
            "target": "linux-arm64",
            "workdir": workdir,
            "ssh": {
                "identity_file": str(self.root / key),
                "known_hosts": str(known_hosts or self.known_hosts),
                "config_file": "/dev/null",
                "connect_timeout": 5,
            },
            **kw,
        }
        return profile_from_dict(data, where="test", default_name="test-ssh")

    def profile_file(self, path: Path, workdir: Path, threads: int = 1) -> Path:
        """A device profile file for this server as a user writes one (target host: the binaries run here)."""
        path.write_text("\n".join([
            'transport = "ssh"', f'address = "ssh://{self.user}@127.0.0.1:{self.port}"', 'target = "host"',
            f'workdir = "{workdir}"', f"threads = {threads}", "[ssh]", f'identity_file = "{self.root / "client_key"}"',
            f'known_hosts = "{self.known_hosts}"', 'config_file = "/dev/null"', "connect_timeout = 5", ""]))
        return path

    def kill_sessions(self) -> int:
        """Kill every per-connection sshd process (the listener stays): the link drops as if the cable was pulled."""
        victims = _descendants(self.proc.pid)
        for pid in victims:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        return len(victims)

    def stop(self) -> None:
        for pid in [*_descendants(self.proc.pid), self.proc.pid]:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        self.log.close()


def fill_up(filler: Path) -> None:
    """Fill the filesystem holding ``filler`` to the last byte (unbuffered writes until ENOSPC): a real full disk."""
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                assert e.errno == 28, e


def run_bench(profile, spec, **events):
    """One configuration through the bench pipeline (plan -> session -> records), its records gathered in memory
    (mvlm_bench.session.runners.collect): ``.runs``, ``.failures``, ``.outcome``."""
    from mvlm_bench.plan.plan import Plan
    from mvlm_bench.session.runners import collect

    lease = {k: events.pop(k) for k in ("lease_db", "lease_timeout") if k in events}
    return collect(Plan(profile, [spec], **lease), **events)


def small_gguf(path: Path, arch: str = "llama", template: bool = True) -> Path:
    """A small, well-formed GGUF (gguf-py's writer) that passes every header check and that llama.cpp still cannot load
    (no hyper-parameters, one tensor): a language model (``arch`` llama: a tokenizer and a token embedding, a chat
    template unless ``template`` is False) or an mmproj (``arch`` clip). For tests of what is refused or fails later."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    if arch == "clip":
        w.add_tensor("v.patch_embd.weight", np.zeros((8, 4), np.float32))
    else:
        w.add_tokenizer_model("llama")
        w.add_token_list(["<unk>", "a", "b"])
        if template:
            w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
        w.add_tensor("token_embd.weight", np.zeros((3, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def cmdlines_with(text: str, name: str) -> list[int]:
    """pids of the processes called ``name`` whose command line contains ``text``."""
    hits = []
    for pid, (_, comm) in proc_table().items():
        try:
            if comm == name and text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                hits.append(pid)
        except OSError:
            pass
    return hits


class Served:
    """`mvlm serve ARGS` as a subprocess; waits for the lines it prints once the server is ready."""

    def __init__(self, *args: str | Path, timeout: float = 180.0):
        self.proc = subprocess.Popen([sys.executable, "-m", "mvlm", "serve", *map(str, args)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "200"},
                                     start_new_session=True)
        self.t0 = time.monotonic()
        self.out = ""
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while "Ctrl-C stops it." not in self.out:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise AssertionError(f"mvlm serve did not get ready: {self.out}\n{self.proc.stderr.read().decode()}")
            if sel.select(timeout=0.5):
                chunk = os.read(self.proc.stdout.fileno(), 65536).decode()
                self.out += chunk
        self.ready_s = time.monotonic() - self.t0
        self.base_url = re.search(r"OpenAI base URL:\s+(\S+)", self.out).group(1)
        self.alias = re.search(r"model \(alias\):\s+(\S+)", self.out).group(1)
        self.log = Path(re.search(r"server log:\s+(\S+)", self.out).group(1))

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key="none", max_retries=0, timeout=120)

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return self.proc.returncode, (self.out + out.decode() + err.decode())


def error_line(r: subprocess.CompletedProcess, code: int = 2) -> str:
    """Exactly one `error:` line, the documented exit code, no traceback; returns the line."""
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def mvlm_cli(*args: object, cwd: Path | None = None, timeout: float = 300, env: dict | None = None):
    """`mvlm ARGS` as a user runs it: a subprocess, text output, no history from the environment."""
    e = dict(os.environ) | {"COLUMNS": "200"} | (env or {})
    e.pop("MVLM_HISTORY", None)
    return subprocess.run([sys.executable, "-m", "mvlm", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          errors="replace", env=e, timeout=timeout)
