"""The ``ssh`` transport: the OpenSSH client. ``BatchMode=yes`` (never prompts), host-key checking stays on (the
user's default, or ``StrictHostKeyChecking=yes`` against the profile's ``known_hosts``), one shared connection
(``ControlMaster=auto``/``ControlPersist``) whose socket lives in a private 0700 temp dir. Files travel as a byte stream
into a remote ``cat``, which gives exact progress and needs nothing on the device but a POSIX shell."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path
from typing import Any

from mvlm_bench.device.ssh_config import (
    SshOptions,
    check_known_hosts_file,
    check_ssh_config_file,
    check_ssh_options,
    parse_ssh_table,
    split_ssh_address,
)
from mvlm_bench.device.transports.base import (
    CHUNK,
    HELPER_TIMEOUT_S,
    AuthError,
    Capabilities,
    ConnectionLostError,
    HostKeyError,
    OutputFn,
    ProgressFn,
    TransportError,
    UnreachableError,
    kill_group,
    last_line,
    quote_remote,
    run_client,
    split_marker,
    with_marker,
)
from mvlm_bench.device.transports.shell import ShellTransport
from mvlm_core.errors import MvlmError

_SSH_HOSTKEY = (
    "Host key verification failed",
    "REMOTE HOST IDENTIFICATION HAS CHANGED",
    "No ED25519 host key",
    "host key for",
    "No matching host key",
)
_SSH_AUTH = ("Permission denied", "Too many authentication failures", "no mutual signature")
_SSH_UNREACHABLE = (
    "Connection refused",
    "Could not resolve hostname",
    "No route to host",
    "Network is unreachable",
    "Connection timed out",
    "Operation timed out",
    "Name or service not known",
    "Connection closed by UNKNOWN",
    "kex_exchange_identification",
)


class SshTransport(ShellTransport):
    """The OpenSSH ``ssh`` client; one multiplexed connection per transport."""

    kind = "ssh"
    adhoc_prefix = "ssh://"
    default_workdir = "~/mvlm"
    options_table = "ssh"
    address_help = "ssh://user@host"
    capabilities = Capabilities(port_forward=True)

    @classmethod
    def check_address(cls, address, where: str) -> str | None:
        address = super().check_address(address, where)
        split_ssh_address(address or "", where)
        return address

    @classmethod
    def parse_options(cls, table, where: str, base_dir: Path | None, address: str | None = None) -> SshOptions:
        ssh = parse_ssh_table(table, where, base_dir)
        url_port = split_ssh_address(address or "", where)[2]
        if ssh.port is not None and url_port is not None and url_port != ssh.port:
            raise MvlmError(f"{where}: field 'ssh.port' = {ssh.port} contradicts the port in 'address' ({url_port})")
        return ssh

    @classmethod
    def adhoc_fields(cls, spec: str) -> dict:
        split_ssh_address(spec, f"--device {spec}")
        return {"transport": "ssh", "address": spec, "target": "linux-arm64", "description": "ad hoc ssh device"}

    @classmethod
    def lease_key(cls, profile: Any) -> str:
        host = (profile.ssh_host or "").lower()
        port = profile.ssh_port
        return f"ssh:{host}" + (f":{port}" if port and port != 22 else "")

    def __init__(self, profile: Any):
        super().__init__(profile)
        if shutil.which("ssh") is None:
            raise MvlmError("the OpenSSH client `ssh` is not on PATH: install it (Debian: apt-get install openssh-client)")
        # profiles are checked when loaded; a DeviceProfile built in code gets the same allow-list here
        where = str(profile.source) if profile.source else f"device {profile.name}"
        check_ssh_options(profile.ssh.options, where)
        if profile.ssh.known_hosts:
            check_known_hosts_file(profile.ssh.known_hosts, f"{where}: field 'ssh.known_hosts'")
        # The config file is checked again here, and ssh gets a private copy of exactly the bytes that were checked:
        # a file changed after the check cannot slip a ProxyCommand in.
        self._config_file = profile.ssh.config_file
        checked = check_ssh_config_file(profile.ssh.config_file, where) if profile.ssh.config_file else None
        self._private_dir: str | None = None
        if checked is not None:
            self._private_dir = _private_dir("mvlm-sshcfg-")
            self._config_file = os.path.join(self._private_dir, "ssh_config")
            fd = os.open(self._config_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(checked)
        self._control_dir: str | None = None
        if profile.ssh.control_master:
            self._control_dir = _private_dir("mvlm-ssh-")
        self._finalizer = weakref.finalize(self, _close_master, self._base_argv(), self._control_dir, self._private_dir)

    @property
    def destination(self) -> str:
        user, host, port = self.profile.ssh_user, self.profile.ssh_host, self.profile.ssh_port
        return f"{user + '@' if user else ''}{host}{':' + str(port) if port else ''}"

    def _base_argv(self) -> list[str]:
        o = self.profile.ssh
        argv = ["ssh"]
        if self._config_file:
            argv += ["-F", self._config_file]
        for opt in o.options:  # ssh takes the first value it sees: user options win over our defaults
            argv += ["-o", opt]
        argv += [
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={o.connect_timeout}",
            "-o",
            "ServerAliveInterval=10",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "LogLevel=ERROR",
        ]
        if o.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={_ssh_path(o.known_hosts)}", "-o", "StrictHostKeyChecking=yes"]
        if o.identity_file:
            argv += ["-i", o.identity_file.replace("%", "%%"), "-o", "IdentitiesOnly=yes"]
        if self._control_dir:
            # mkdtemp under /tmp: a short path without spaces (unix socket paths are limited to ~100 bytes)
            control_path = self._control_dir.replace("%", "%%") + "/%C"
            argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={control_path}", "-o", "ControlPersist=60"]
        port = self.profile.ssh_port
        if port:
            argv += ["-p", str(port)]
        if self.profile.ssh_user:
            argv += ["-l", self.profile.ssh_user]
        argv += ["--", self.profile.ssh_host or ""]
        return argv

    def _classify(self, output: str, what: str) -> TransportError:
        dest = self.destination
        line = last_line(output)
        if any(s in output for s in _SSH_HOSTKEY):
            where = self.profile.ssh.known_hosts or "~/.ssh/known_hosts"
            return HostKeyError(
                f"ssh {dest}: host key verification failed ({line}); the device's key is unknown or changed: "
                f"check it and update {where} (ssh-keygen -R HOST, then connect once with plain ssh)"
            )
        if any(s in output for s in _SSH_AUTH):
            return AuthError(
                f"ssh {dest}: authentication failed ({line}); install your public key on the device "
                "(ssh-copy-id) or set ssh.identity_file in the profile"
            )
        if any(s in output for s in _SSH_UNREACHABLE):
            return UnreachableError(
                f"ssh {dest}: cannot connect ({line}); is the device on, on this network, and running sshd on that port?"
            )
        said = f" ({line})" if line != "no message" else ""
        return ConnectionLostError(
            f"ssh {dest}: connection lost during {what}{said}; run again (an interrupted sync restarts cleanly)"
        )

    def _shell(self, script: str, timeout: float, what: str,
               on_output: OutputFn | None = None) -> tuple[int | None, str, float]:
        argv = self._base_argv() + ["sh -c " + shlex.quote(with_marker(script))]
        rc, out, duration, timed_out = run_client(argv, timeout, on_output=on_output)
        if timed_out:
            return None, out, duration
        status, text = split_marker(out)
        if status is None:
            raise self._classify(out, what)
        return status, text, duration

    def push(self, local: Path, remote: str, progress: ProgressFn | None = None) -> None:
        local = Path(local)
        total = local.stat().st_size
        argv = self._base_argv() + ["sh -c " + shlex.quote(f"cat > {quote_remote(remote)}")]
        done = 0
        broken = False
        with tempfile.TemporaryFile() as out, open(local, "rb") as src:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            assert proc.stdin is not None
            try:
                while chunk := src.read(CHUNK):
                    proc.stdin.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
                proc.stdin.close()
            except (BrokenPipeError, ConnectionResetError, ValueError):
                broken = True
            try:
                rc = proc.wait(timeout=HELPER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                rc = None
            out.seek(0)
            text = out.read().decode("utf-8", errors="replace")
        if rc == 0 and not broken:
            if progress and total == 0:
                progress(0, 0)
            return
        if rc == 255 or rc is None or broken:
            arrived = self._size_after_failure(remote)
            sent = (f"{arrived} of {total} bytes reached the device" if arrived is not None
                    else f"at most {done} of {total} bytes sent")
            raise self._classify(text, f"push of {local.name} to {remote} ({sent})")
        raise MvlmError(f"ssh {self.destination}: writing {remote} failed (status {rc}): {last_line(text)}")

    def _size_after_failure(self, remote: str) -> int | None:
        """After a dropped push: how much of ``remote`` the device really holds (one quick new connection), or None."""
        try:
            rc, out, _ = self._shell(
                f"if [ -f {quote_remote(remote)} ]; then wc -c < {quote_remote(remote)}; else echo 0; fi",
                self.profile.ssh.connect_timeout + 5.0, "size check",
            )
        except MvlmError:
            return None
        text = out.strip()
        return int(text) if rc == 0 and text.isdigit() else None

    def pull(self, remote: str, local: Path) -> None:
        local = Path(local)
        tmp = local.with_name(local.name + ".part")
        argv = self._base_argv() + ["sh -c " + shlex.quote(f"cat {quote_remote(remote)}")]
        with open(tmp, "wb") as dst, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=dst, stderr=err, start_new_session=True)
            rc = proc.wait()
            err.seek(0)
            text = err.read().decode("utf-8", errors="replace")
        if rc != 0:
            tmp.unlink(missing_ok=True)
            if rc == 255:
                raise self._classify(text, f"pull of {remote}")
            raise MvlmError(f"ssh {self.destination}: cannot read {remote}: {last_line(text)}")
        os.replace(tmp, local)

    def shell_argv(self, script: str) -> list[str]:
        """The ssh command line that runs the sh ``script`` on the device, for a process the caller starts and owns
        (``mvlm serve``: a server that outlives one call); stdin, stdout and stderr are the caller's."""
        return self._base_argv() + ["sh -c " + shlex.quote(script)]

    def forward_argv(self, local_port: int, remote_port: int) -> list[str]:
        """``ssh -N -L 127.0.0.1:LOCAL:127.0.0.1:REMOTE`` over a connection of its own (not the shared one: the forward
        ends with this process), exiting at once when the forward cannot be set up. Host-key checking as for ``run``."""
        base = self._base_argv()
        return [base[0], "-o", "ControlMaster=no", "-o", "ControlPath=none", "-o", "ExitOnForwardFailure=yes", "-N",
                "-L", f"127.0.0.1:{int(local_port)}:127.0.0.1:{int(remote_port)}", *base[1:]]

    def check(self) -> None:
        rc, out, _ = self._shell("true", self.profile.ssh.connect_timeout + 20.0, "connection check")
        if rc is None:
            raise UnreachableError(f"ssh {self.destination}: no answer within {self.profile.ssh.connect_timeout + 20} s")
        if rc != 0:
            raise TransportError(f"ssh {self.destination}: the remote shell fails ({last_line(out)})")

    def close(self) -> None:
        self._finalizer()


def _ssh_path(path: str) -> str:
    """A path as an ssh_config value: ``%`` escaped (tokens), double-quoted when it holds spaces."""
    path = path.replace("%", "%%")
    return f'"{path}"' if any(c.isspace() for c in path) else path


def _private_dir(prefix: str) -> str:
    """A 0700 temp dir under /tmp (short paths: unix socket paths are limited to ~100 bytes)."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp" if os.path.isdir("/tmp") else None)
    os.chmod(d, 0o700)
    return d


def _close_master(base_argv: list[str], control_dir: str | None, private_dir: str | None = None) -> None:
    if control_dir:
        if any(os.scandir(control_dir)):
            exit_argv = base_argv[:-2] + ["-O", "exit", "--", base_argv[-1]]
            run_client(exit_argv, 10.0)
        shutil.rmtree(control_dir, ignore_errors=True)
    if private_dir:  # the checked copy of the profile's ssh config (after `ssh -O exit`, which reads it)
        shutil.rmtree(private_dir, ignore_errors=True)
