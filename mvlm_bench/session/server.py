"""llama-server on a device, started through the session's transport and reachable here: what ``mvlm serve`` and the
dataset protocol share.

The transport says how (``transport.server_launch``): on this machine the server is a child process; over ssh a remote
sh script runs it, prints its pid on a marker line and kills it as soon as the session ends, and ``ssh -L`` forwards a
local port to it. The server's output (stdout and stderr; for a remote server, streamed back) comes to this process
through a pipe and is copied to the log file (opened to append) as it comes: the port and pid are read from that
stream, never from the file, so a log that an earlier or a concurrent session appends to cannot lend this one another
server's port or pid. Ready means the server printed its port, ``GET /health`` answers 200 (503 while the model loads)
and ``GET /v1/models`` lists the model this session started (an impostor on that port is refused).
"""

from __future__ import annotations

import errno
import http.client
import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mvlm_bench.device.transports.base import SERVER_PID_MARKER, die_with_parent, kill_group
from mvlm_bench.session.failures import LOG_PREFIX, relevant_line
from mvlm_core.atomic import file_kind
from mvlm_core.errors import MvlmError
from mvlm_core.stops import Stopped, starting

GRACE_S = 10.0  # SIGTERM -> SIGKILL
HEAD_BYTES = 1 << 20  # the start of a server's output kept here: its port and pid lines come within the first KBs
EXIT_SERVER_FAILED = 4  # like a command that failed on a device (transports.CommandError)
_LISTENING_RE = re.compile(r"listening on https?://[^\s:]+:(\d+)")
# The lines of a server log that say why it stopped, best first: a port it could not bind, an explicit "error: ..."
# of a loader (e.g. "mtmd_init_from_file: error: mismatch between text model (n_embd = 576) and mmproj (n_embd = 128)"),
# then the loaders' and argument parser's complaints; "exiting due to ..." only says that it stopped.
_START_FAILURE = [re.compile(p, re.I) for p in (
    r"couldn't bind|address already in use",
    r"\berror: ",
    r"error loading model|failed to load|GGML_ASSERT|unknown argument|invalid argument|error while handling argument",
)]


def open_append(path: Path, option: str = "--log"):
    """``path`` opened to append (binary), created if absent; a symlink, or anything but a regular file, is refused."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_NONBLOCK: a FIFO put there since the checks fails (ENXIO) instead of blocking; cleared below
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise MvlmError(f"{option} {path} is a symbolic link; the log is never written through a link: give the "
                            "path of a regular file") from None
        raise MvlmError(f"cannot write the server log {path}: {e.strerror or e}; give {option} FILE in a writable "
                        "directory") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MvlmError(f"{option} {path} is {file_kind(path)}, not a regular file: give the path of a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "ab")


def health(host: str, port: int, timeout: float = 2.0) -> int | None:
    """HTTP status of ``GET /health`` (200 ready, 503 loading), None when nothing answers."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


class Tee(threading.Thread):
    """Copies a process's output (``stream``, a pipe) to its log file as it comes, and keeps the first
    :data:`HEAD_BYTES` of it: this session's own lines, whatever else the log file receives. The log is written
    through a file descriptor of its own (``logf``'s, duplicated): the caller may close its file object at once; the
    tee closes its copy when the stream ends."""

    def __init__(self, stream, logf):
        super().__init__(daemon=True, name="server-log")
        self.stream, self.fd = stream, os.dup(logf.fileno())
        self._head = bytearray()
        self._lock = threading.Lock()

    def run(self) -> None:
        try:
            for chunk in iter(lambda: self.stream.read1(1 << 16), b""):
                self._write(chunk)
                with self._lock:
                    if len(self._head) < HEAD_BYTES:
                        self._head += chunk[: HEAD_BYTES - len(self._head)]
        finally:
            os.close(self.fd)

    def _write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError:  # a full disk: the stream is still read and kept
            pass

    def text(self) -> str:
        with self._lock:
            return self._head.decode("utf-8", errors="replace")


def model_ids(host: str, port: int, timeout: float = 5.0) -> list[str]:
    """The model ids ``GET /v1/models`` lists ([] when it does not answer with a list)."""
    import json

    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/v1/models")
        resp = conn.getresponse()
        obj = json.loads(resp.read(1 << 20)) if resp.status == 200 else None
    except (OSError, http.client.HTTPException, ValueError, RecursionError):
        return []
    finally:
        conn.close()
    data = obj.get("data") if isinstance(obj, dict) else None
    return [str(m.get("id")) for m in data if isinstance(m, dict)] if isinstance(data, list) else []


def check_identity(host: str, port: int, alias: str, device: str) -> None:
    """``GET /v1/models`` on ``host:port`` lists ``alias`` (the ``--alias`` this session gave its server), or one line
    saying another process answers there (exit 4)."""
    ids = model_ids(host, port)
    if alias not in ids:
        said = ", ".join(repr(i) for i in ids[:5]) if ids else "no model"
        raise MvlmError(f"the server answering on {host}:{port} is not the one started on {device} (GET /v1/models "
                        f"lists {said}, not {alias!r}): another process holds that port; stop it or choose another "
                        "--port", exit_code=EXIT_SERVER_FAILED)


def _alias_of(argv: list[str]) -> str | None:
    return argv[argv.index("--alias") + 1] if "--alias" in argv[:-1] else None


def read_from(path: Path, offset: int) -> str:
    """A log's text from ``offset`` on ('' when unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def failure_line(log: Path, limit: int = 300, offset: int = 0) -> str:
    """The line of a server log that says why it stopped: its own start-up errors first, else a failed run's choice."""
    text = read_from(log, offset)
    if not text and not log.exists():
        return "its log cannot be read"
    lines = [LOG_PREFIX.sub("", ln.strip()) for ln in text.splitlines() if ln.strip() and "exiting due to" not in ln]
    for rx in _START_FAILURE:
        hit = next((ln for ln in lines if rx.search(ln)), None)
        if hit:
            return hit if len(hit) <= limit else hit[: limit - 3] + "..."
    return relevant_line(text, limit)


def stop_process(proc: subprocess.Popen, grace: float = GRACE_S) -> None:
    """SIGTERM to the process's group, ``grace`` seconds, then SIGKILL; always reaped (no zombie, no orphan)."""
    kill_group(proc, grace)


def exit_status(proc: subprocess.Popen) -> str:
    rc = proc.returncode
    if rc is not None and rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"status {rc}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_for(host: str) -> str:
    """The address this machine reaches a server listening on ``host`` at: a wildcard (0.0.0.0, ::, ::0 ...) becomes
    its loopback."""
    import ipaddress

    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    return ("127.0.0.1" if ip.version == 4 else "::1") if ip.is_unspecified else host


class Server:
    """A llama-server started on the session's device from ``argv`` (its paths the device's), logging to
    ``log_path`` (``logf``: that file, opened to append). Ready when constructed: ``port`` is where this machine
    reaches it (``host``), ``ready_s`` how long that took. ``local_port``: the tunnel's end here (a device reached
    over a link; None: a free port). ``procs`` registers the started processes (a second stop signal SIGKILLs them)."""

    def __init__(self, transport, argv: list[str], env: dict[str, str], log_path: Path, logf, timeout: float,
                 name: str, log: Callable[[str], None] = lambda s: None, local_port: int | None = None,
                 host: str = "127.0.0.1", procs: list | None = None):
        self.transport, self.name, self.log_path = transport, name, log_path
        self.procs: list[tuple[subprocess.Popen, str, Path]] = []
        self.registry = procs if procs is not None else []
        self.tunnel: subprocess.Popen | None = None
        self.pid: str | None = None
        self.offset = log_path.stat().st_size if log_path.exists() else 0  # this session's lines start here
        self.tee: Tee | None = None
        self.alias = _alias_of(argv)
        launch = transport.server_launch(argv, env)
        self.via_shell = launch.via_shell
        t0 = time.monotonic()
        log(f"starting llama-server on {name} (log: {log_path})")
        self.server: subprocess.Popen | None = None
        try:
            with starting():  # a stop signal during the start is raised once the process is ours to stop
                self.server = subprocess.Popen(
                    launch.argv, stdin=subprocess.PIPE if launch.via_shell else subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=launch.env, start_new_session=True,
                    preexec_fn=die_with_parent)
                self.registry.append(self.server)
                self.tee = Tee(self.server.stdout, logf)
                self.tee.start()
                self.procs.append((self.server, f"llama-server on {name}", log_path))
            device_port = self._wait_listening(timeout)
            self.host, self.port = loopback_for(host), device_port
            if not transport.capabilities.same_host:
                self._open_tunnel(local_port or free_port(), device_port)
            self._wait_ready(max(1.0, timeout - (time.monotonic() - t0)), timeout)
            self._check_identity()
        except OSError as e:
            if self.server is not None:
                self.close()
                raise
            raise MvlmError(f"cannot start llama-server: {e.strerror or e}; rebuild the runtime (`mvlm runtime build "
                            f"--target {transport.profile.target}`)", exit_code=EXIT_SERVER_FAILED) from None
        except BaseException:
            self.close()
            raise
        self.ready_s = time.monotonic() - t0

    def _open_tunnel(self, local_port: int, device_port: int) -> None:
        self.host, self.port = "127.0.0.1", local_port
        tlog = self.log_path.with_name(self.log_path.name.removesuffix(".log") + "-tunnel.log")
        with open_append(tlog) as f:
            self.tunnel = subprocess.Popen(self.transport.forward_argv(local_port, device_port),
                                           stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                           start_new_session=True, preexec_fn=die_with_parent)
        self.registry.append(self.tunnel)
        self.procs.append((self.tunnel, f"the tunnel to {self.name}", tlog))

    def _wait_listening(self, timeout: float) -> int:
        """The port the server bound (its 'listening on' line, printed once the model is loaded), from this session's
        part of the log only; the pid marker of a remote server too."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.tee.text() if self.tee is not None else ""
            self.pid = self.pid or next((ln.strip()[len(SERVER_PID_MARKER):] for ln in text.splitlines()
                                         if ln.startswith(SERVER_PID_MARKER)), None)
            m = _LISTENING_RE.search(text)
            if m:
                return int(m.group(1))
            self._check_alive("at start-up")
            if time.monotonic() > deadline:
                raise MvlmError(f"llama-server on {self.name} did not load the model within {timeout:g} s; see "
                                f"{self.log_path}, or raise --timeout", exit_code=EXIT_SERVER_FAILED)
            time.sleep(0.1)

    def _wait_ready(self, left: float, timeout: float) -> None:
        """Until ``/health`` answers 200 (``left`` seconds of the ``timeout`` the start was given): a process that exits
        first fails the start with the relevant log line."""
        deadline = time.monotonic() + left
        while health(self.host, self.port) != 200:
            self._check_alive("at start-up")
            if time.monotonic() > deadline:
                raise MvlmError(f"llama-server was not ready within {timeout:g} s (GET /health on {self.host}:"
                                f"{self.port}); see {self.log_path}, or raise --timeout for a big model on a slow device",
                                exit_code=EXIT_SERVER_FAILED)
            time.sleep(0.1)

    def _check_identity(self) -> None:
        if self.alias is not None:
            check_identity(self.host, self.port, self.alias, self.name)

    def _check_alive(self, when: str) -> None:
        why = self.dead(when)
        if why:
            raise MvlmError(why, exit_code=EXIT_SERVER_FAILED)

    def dead(self, when: str = "") -> str | None:
        """Why a process of this server stopped (``when``: "at start-up", "while serving"), one line; None while all
        run."""
        for proc, what, log in self.procs:
            if proc.poll() is not None:
                offset = self.offset if log == self.log_path else 0
                return (f"{what} stopped{' ' + when if when else ''} ({exit_status(proc)}): "
                        f"{failure_line(log, offset=offset)} (whole log: {log})")
        return None

    def close(self) -> None:
        """Stop the tunnel and the server (TERM, then KILL); a remote server through its session's end, then by pid."""
        if self.tunnel is not None:
            stop_process(self.tunnel, grace=2.0)
            self.tunnel = None
        if self.server is not None:
            if self.via_shell:
                self._stop_remote()
            else:
                stop_process(self.server)
            self.server = None
        if self.tee is not None:
            self.tee.join(timeout=5.0)  # the pipe ends with the process: every line it wrote is in the log

    def _stop_remote(self) -> None:
        """End the server's session (its stdin): the remote script then kills the server; if the session does not end
        within the grace period, the local client is killed and the server killed by pid over a fresh command."""
        server = self.server
        assert server is not None
        try:
            if server.stdin is not None:
                server.stdin.close()
        except OSError:
            pass
        try:
            server.wait(timeout=GRACE_S + 5.0)
            return
        except (subprocess.TimeoutExpired, KeyboardInterrupt, Stopped):
            pass
        stop_process(server, grace=2.0)
        if self.pid and self.pid.isdigit():
            try:
                self.transport.run(["kill", "-KILL", self.pid], timeout=20.0)
            except MvlmError:
                pass
