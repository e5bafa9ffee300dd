"""``mvlm serve``: llama.cpp's own OpenAI-compatible server (llama-server) for an mvlm GGUF, here or on a device.

Locally (a device whose transport is ``local``: the default ``local`` profile) the runtime's ``llama-server`` runs from
the build's install dir. On an ssh device the runtime and the GGUFs are pushed with the content-addressed sync (checked
by sha256 on the device), ``llama-server`` runs there bound to 127.0.0.1 on a port it picks itself, and ``ssh -L``
forwards a local port to it (host-key checking on, the profile's allow-listed options, a connection of its own).

The server always gets ``--jinja`` (the chat template ``mvlm convert`` writes into the GGUF, e.g. MobileVLM's
conv_vicuna_v1, renders the messages), ``--mmproj`` when given (images in chat messages), ``--alias`` (the model name
the API reports; default: the GGUF's file stem) and ``--no-webui`` (the runtime is built without the web UI).

Its log (stdout and stderr; for a remote server, streamed back over ssh) goes to a file, by default
``<cache>/logs/serve-<alias>-<time>-<pid>.log``. Ready means ``GET /health`` answers 200 (it answers 503 while the
model loads). A stop (Ctrl-C, SIGTERM, SIGHUP, SIGQUIT) terminates the server, waits ``GRACE_S``, then kills it; a further
stop signal kills it at once, and none kills mvlm before the server is reaped (``StopSignals``). On an ssh device the
remote shell that started the server kills it as soon as its ssh session ends, however it ends.

adb devices are refused: the adb transport runs commands to completion and has no port forwarding.
"""

from __future__ import annotations

import dataclasses
import errno
import http.client
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from mvlm_bench.devices import MAX_GPU_LAYERS, MAX_THREADS, DeviceProfile
from mvlm_bench.gguf_header import gguf_kind
from mvlm_bench.transports import die_with_parent as _die_with_parent
from mvlm_bench.transports import kill_group
from mvlm_core import runtime as rtmod
from mvlm_core.errors import MvlmError

DEFAULT_PORT = 8080
DEFAULT_CTX = 4096  # the image's 144..576 tokens + a conversation; MobileVLM trains on 2048, LLaVA-1.5 on 4096
MIN_CTX = 256
MAX_CTX = 131072
GRACE_S = 10.0  # SIGTERM -> SIGKILL
EXIT_SERVER_FAILED = 4  # like a command that failed on a device (transports.CommandError)
_LISTENING_RE = re.compile(r"listening on https?://[^\s:]+:(\d+)")
_PID_MARKER = "__MVLM_SERVER_PID__="


@dataclasses.dataclass
class ServeSpec:
    model: Path
    mmproj: Path | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    threads: int | None = None
    ctx_size: int = DEFAULT_CTX
    n_gpu_layers: int | None = None
    alias: str | None = None
    log: Path | None = None
    ready_timeout: float = 600.0

    @property
    def model_alias(self) -> str:
        return self.alias or self.model.name.removesuffix(".gguf")


@dataclasses.dataclass
class Serving:
    """What a started server is: where to reach it, its name in the API, its log, how long it took to be ready."""

    url: str
    alias: str
    log: Path
    ready_s: float
    device: str


# --------------------------------------------------------------------------------------------------- checks


def check_spec(spec: ServeSpec) -> list[str]:
    """Refuse bad input (one line, exit 2) before anything starts; returns notes for the user (no chat template)."""
    from mvlm_bench.bench import BenchSpec, check_inputs
    from mvlm_core.atomic import check_output_path

    if not (1 <= spec.port <= 65535):
        raise MvlmError(f"--port {spec.port} is out of range: give a TCP port from 1 to 65535")
    for option, value, lo, hi in (("--threads", spec.threads, 1, MAX_THREADS), ("--ctx-size", spec.ctx_size, MIN_CTX, MAX_CTX),
                                  ("--n-gpu-layers", spec.n_gpu_layers, 0, MAX_GPU_LAYERS)):
        if value is not None and not (lo <= value <= hi):
            raise MvlmError(f"{option} {value} is out of range: give a whole number from {lo} to {hi}")
    if not spec.host or spec.host.startswith("-") or not re.fullmatch(r"[A-Za-z0-9_.:%\[\]-]+", spec.host):
        raise MvlmError(f"--host {spec.host!r} is not an address: give an IP address such as 127.0.0.1 or 0.0.0.0")
    if _ipv4_shorthand(spec.host):
        full = socket.inet_ntoa(socket.inet_aton(spec.host))
        raise MvlmError(f"--host {spec.host} is a shorthand IPv4 address (it means {full}): write it in full, e.g. "
                        f"--host {full}")
    if spec.alias is not None and (not spec.alias.strip() or "," in spec.alias or any(c in spec.alias for c in "\n\r\0")):
        raise MvlmError(f"--alias {spec.alias!r}: give one non-empty name without commas")
    # the files exist and are GGUFs: the bench's own checks (the vlm protocol's when an mmproj is given)
    check_inputs(BenchSpec("vlm" if spec.mmproj is not None else "lm", spec.model, mmproj=spec.mmproj),
                 needs_template=False)
    if spec.log is not None:  # never a symlink, a model, an input, a directory or a device node (appended to, never truncated)
        if spec.log.is_symlink():
            raise MvlmError(f"--log {spec.log} is a symbolic link; the log is never written through a link: give the path "
                            "of a regular file (it is appended to) or of a new one")
        check_output_path(spec.log, [spec.model, spec.mmproj], option="--log")
    arch, is_lm, has_template = gguf_kind(spec.model)
    if arch == "clip":
        raise MvlmError(f"--model {spec.model} is an mmproj (image encoder) GGUF, not a language model: pass it as "
                        "--mmproj and give the language-model GGUF (the one without 'mmproj-') as --model")
    if not is_lm:
        raise MvlmError(f"--model {spec.model} is not a language-model GGUF (architecture {arch or 'unknown'!r}, no "
                        "token embedding or tokenizer): give the LM GGUF written by mvlm convert")
    if spec.mmproj is not None:
        march, _, _ = gguf_kind(spec.mmproj, "--mmproj")
        if march != "clip":
            raise MvlmError(f"--mmproj {spec.mmproj} is not an mmproj GGUF (architecture {march or 'unknown'!r}, not "
                            "'clip'): give the mmproj-*.gguf written by mvlm convert")
    if spec.model.resolve() == (spec.mmproj.resolve() if spec.mmproj else None):
        raise MvlmError("--model and --mmproj are the same file: give the LM GGUF and its mmproj GGUF")
    notes = []
    if not has_template:
        notes.append(f"{spec.model.name} has no chat template: llama-server falls back to its own default, which may "
                     "not be the format the model was trained on")
    return notes


def check_port_free(host: str, port: int, option: str = "--port") -> None:
    """Refuse (exit 2) a port something already listens on, and a host that is not an address of this machine."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise MvlmError(f"--host {host}: cannot resolve it ({e.strerror}); give an IP address such as 127.0.0.1") from None
    family, stype, proto, _, addr = infos[0]
    with socket.socket(family, stype, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as llama-server's HTTP library does
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise MvlmError(f"{option} {port}: port {port} is in use on {host} (bound by another process, on this "
                                "address or on every interface); stop it or choose another port") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise MvlmError(f"--host {host} is not an address of this machine: give 127.0.0.1, 0.0.0.0 or one of "
                                "its own addresses") from None
            if e.errno == errno.EACCES:
                raise MvlmError(f"{option} {port}: binding a port below 1024 needs root; choose a port from 1024 up") from None
            raise MvlmError(f"{option} {port} on {host}: cannot bind ({e.strerror})") from None


# --------------------------------------------------------------------------------------------------- pieces


def server_argv(exe: str, spec: ServeSpec, model: str, mmproj: str | None, host: str, port: int,
                threads: int | None, n_gpu_layers: int) -> list[str]:
    """llama-server's command line (paths are the device's)."""
    argv = [exe, "-m", model]
    if mmproj:
        argv += ["--mmproj", mmproj]
    argv += ["--jinja", "--alias", spec.model_alias, "--host", host, "--port", str(port), "-c", str(spec.ctx_size),
             "-ngl", str(n_gpu_layers), "--no-webui"]
    if threads:
        argv += ["-t", str(threads)]
    return argv


def default_log_path(alias: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", alias).strip("_")[:60] or "model"
    return rtmod.cache_root() / "logs" / f"serve-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def open_log(spec: ServeSpec):
    """The log file, opened to append (never truncated: an existing file keeps its lines, two serves with the same
    --log both append) and never through a symlink (O_NOFOLLOW), with a header line saying which serve starts when."""
    path = spec.log or default_log_path(spec.model_alias)
    f = open_append(path)
    f.write(f"==== mvlm serve (pid {os.getpid()}) started {time.strftime('%Y-%m-%d %H:%M:%S %z')}: model "
            f"{spec.model_alias} on port {spec.port} ====\n".encode())
    f.flush()
    return path, f


def open_append(path: Path):
    """``path`` opened to append (binary), created if absent; a symlink, or anything but a regular file, is refused."""
    import stat

    from mvlm_core.atomic import file_kind

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_NONBLOCK: a FIFO put there since the checks fails (ENXIO) instead of blocking; cleared below
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise MvlmError(f"--log {path} is a symbolic link; the log is never written through a link: give the path "
                            "of a regular file") from None
        raise MvlmError(f"cannot write the server log {path}: {e.strerror or e}; give --log FILE in a writable "
                        "directory") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MvlmError(f"--log {path} is {file_kind(path)}, not a regular file: give the path of a regular file")
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


# The lines of a server log that say why it stopped, best first: a port it could not bind, an explicit "error: ..."
# of a loader (e.g. "mtmd_init_from_file: error: mismatch between text model (n_embd = 576) and mmproj (n_embd = 128)"),
# then the loaders' and argument parser's complaints; "exiting due to ..." only says that it stopped.
_START_FAILURE = [re.compile(p, re.I) for p in (
    r"couldn't bind|address already in use",
    r"\berror: ",
    r"error loading model|failed to load|GGML_ASSERT|unknown argument|invalid argument|error while handling argument",
)]


def failure_line(log: Path, limit: int = 300) -> str:
    """The line of a server log that says why it stopped: its own start-up errors first, else bench's choice."""
    from mvlm_bench.bench import _LOG_PREFIX, relevant_line

    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "its log cannot be read"
    lines = [_LOG_PREFIX.sub("", ln.strip()) for ln in text.splitlines() if ln.strip() and "exiting due to" not in ln]
    for rx in _START_FAILURE:
        hit = next((ln for ln in lines if rx.search(ln)), None)
        if hit:
            return hit if len(hit) <= limit else hit[: limit - 3] + "..."
    return relevant_line(text, limit)


def stop_process(proc: subprocess.Popen, grace: float = GRACE_S) -> None:
    """SIGTERM to the process's group, ``grace`` seconds, then SIGKILL; always reaped (no zombie, no orphan)."""
    kill_group(proc, grace)


class StopRequested(KeyboardInterrupt):
    """The first stop signal (SIGINT, SIGTERM, SIGHUP, SIGQUIT): unwinds like Ctrl-C, then the server is stopped."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class StopSignals:
    """Handlers for the stop signals while a server runs. The first one raises ``StopRequested`` (the caller stops the
    server); once stopping (``begin()``: a user stop, or cleanup after an error), any further stop signal only hastens it
    (SIGKILL to the registered processes' groups at once) and never raises, so mvlm always reaps its server. The
    handlers stay for the rest of the process: ``done()`` (the server reaped) ignores the stop signals from then on,
    since Python's own shutdown restores the default action (death by the signal) for a handler it installed."""

    def __init__(self) -> None:
        self.stopping = False
        self.procs: list[subprocess.Popen] = []

    def install(self) -> StopSignals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)
        return self

    def begin(self) -> None:
        self.stopping = True

    def done(self) -> None:
        import threading

        self.stopping = True
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum: int, frame: object) -> None:
        if not self.stopping:
            self.stopping = True
            raise StopRequested(signum)
        for proc in self.procs:  # hasten: no more grace period
            if proc.returncode is None:  # not reaped yet, so the pid is still this process's
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def _status(proc: subprocess.Popen) -> str:
    rc = proc.returncode
    if rc is not None and rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"status {rc}"


def _wait_ready(host: str, port: int, procs: list[tuple[subprocess.Popen, str, Path]], timeout: float) -> None:
    """Until ``/health`` answers 200: a process that exits first fails the start with the relevant line of its log."""
    deadline = time.monotonic() + timeout
    while True:
        for proc, what, log in procs:
            if proc.poll() is not None:
                raise MvlmError(f"{what} stopped at start-up ({_status(proc)}): {failure_line(log)} (whole log: "
                                f"{log})", exit_code=EXIT_SERVER_FAILED)
        if health(host, port) == 200:
            return
        if time.monotonic() > deadline:
            raise MvlmError(f"llama-server was not ready within {timeout:g} s (GET /health on {host}:{port}); see "
                            f"{procs[0][2]}, or raise --timeout for a big model on a slow device",
                            exit_code=EXIT_SERVER_FAILED)
        time.sleep(0.1)


def _serve(host: str, port: int, procs: list[tuple[subprocess.Popen, str, Path]], timeout: float, t0: float,
           ready: Serving, on_ready: Callable[[Serving], None]) -> bool:
    """Wait until ready, tell ``on_ready``, then block until Ctrl-C / SIGTERM (True) or until a process dies on its
    own (MvlmError naming why). The caller stops the processes."""
    try:
        _wait_ready(host, port, procs, timeout)
        on_ready(dataclasses.replace(ready, ready_s=time.monotonic() - t0))
        while True:
            for proc, what, log in procs:
                if proc.poll() is not None:
                    raise MvlmError(f"{what} stopped while serving ({_status(proc)}): {failure_line(log)} "
                                    f"(whole log: {log})", exit_code=EXIT_SERVER_FAILED)
            time.sleep(0.5)
    except (KeyboardInterrupt, SystemExit) as e:
        if not _stopped_by_user(e):
            raise
        return True


def _stopped_by_user(e: BaseException) -> bool:
    """A stop signal (``StopRequested``, a KeyboardInterrupt), or the SIGTERM that ``mvlm``'s entry point turns into
    SystemExit(143) where ``StopSignals`` is not installed."""
    return isinstance(e, KeyboardInterrupt) or (isinstance(e, SystemExit) and e.code == 128 + signal.SIGTERM)


# --------------------------------------------------------------------------------------------------- local


def serve_local(profile: DeviceProfile, spec: ServeSpec, on_ready: Callable[[Serving], None],
                log: Callable[[str], None] = lambda s: None) -> bool:
    """Run llama-server on this machine until stopped. True when the user stopped it (a stop signal)."""
    stops = StopSignals().install()
    rt = _runtime(profile)
    check_port_free(spec.host, spec.port)
    threads = spec.threads or profile.threads or os.cpu_count() or 1
    spec = dataclasses.replace(spec, host=spec.host.strip("[]"))  # llama-server and bind() take ::1, not [::1]
    ngl = spec.n_gpu_layers if spec.n_gpu_layers is not None else profile.n_gpu_layers
    argv = [*profile.exec_wrapper, *server_argv(str(rt.exe("llama-server")), spec, str(spec.model.resolve()),
                                                str(spec.mmproj.resolve()) if spec.mmproj else None, spec.host,
                                                spec.port, threads, ngl)]
    env = {**os.environ, **profile.env}
    log_path, logf = open_log(spec)
    proc: subprocess.Popen | None = None
    try:
        log(f"starting {shlex.join(argv)}")
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, preexec_fn=_die_with_parent)
            stops.procs.append(proc)
        except OSError as e:
            raise MvlmError(f"cannot start {argv[0]}: {e.strerror}; rebuild the runtime (`mvlm runtime build --target "
                            f"{profile.target}`)", exit_code=EXIT_SERVER_FAILED) from None
        here = _loopback_for(spec.host)  # where this machine reaches the server
        ready = Serving(f"http://{f'[{here}]' if ':' in here else here}:{spec.port}", spec.model_alias, log_path, 0.0,
                        profile.name)
        return _serve(here, spec.port, [(proc, "llama-server", log_path)], spec.ready_timeout, t0, ready, on_ready)
    finally:
        stops.begin()  # from here on a stop signal only hastens the stop
        if proc is not None:
            stop_process(proc)
        stops.done()
        logf.close()


def _loopback_for(host: str) -> str:
    """The address this machine reaches a server listening on ``host`` at: a wildcard (0.0.0.0, ::, ::0 ...) becomes
    its loopback."""
    import ipaddress

    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    return ("127.0.0.1" if ip.version == 4 else "::1") if ip.is_unspecified else host


def _ipv4_shorthand(host: str) -> bool:
    """``0``, ``127.1``, ``0x7f.1`` ...: inet_aton's abbreviated IPv4 forms (bound as 0.0.0.0, 127.0.0.1 ...)."""
    import ipaddress

    try:
        socket.inet_aton(host)
    except OSError:
        return False
    try:
        ipaddress.IPv4Address(host)
        return False
    except ValueError:
        return True


def _runtime(profile: DeviceProfile) -> rtmod.Runtime:
    try:
        rt = rtmod.find(profile.target)
    except MvlmError as e:
        raise MvlmError(f"no {profile.target} runtime for device {profile.name}: run `mvlm runtime build --target "
                        f"{profile.target}` first") from e
    if not rt.exe("llama-server").is_file():
        raise MvlmError(f"the {profile.target} runtime in {rt.root} was built without llama-server: run `mvlm runtime "
                        f"build --target {profile.target}` again")
    return rt


# --------------------------------------------------------------------------------------------------- ssh


def remote_script(workdir: str, argv: list[str], env: dict[str, str], grace: float = GRACE_S) -> str:
    """The sh script that runs llama-server on the device: it prints the server's pid on a marker line, streams its
    log, and kills it (TERM, then KILL) as soon as its own stdin ends, i.e. when the ssh session ends for any reason."""
    q = shlex.quote
    for key in env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise MvlmError(f"bad environment variable name {key!r}: letters, digits and '_' only")
    assigns = " ".join(f"{k}={q(v)}" for k, v in env.items())
    g = max(1, int(grace))
    return "\n".join([
        f"cd {q(workdir)} || exit 125",
        "exec 3<&0",  # the session's stdin: an asynchronous list would get /dev/null
        "__s=; command -v setsid >/dev/null 2>&1 && __s=setsid",
        f"{assigns + ' ' if assigns else ''}$__s {' '.join(q(a) for a in argv)} </dev/null 3<&- 2>&1 & __p=$!",
        f"echo {_PID_MARKER}$__p",
        f"( cat <&3 >/dev/null 2>&1; kill -TERM $__p 2>/dev/null; __n=0; while kill -0 $__p 2>/dev/null && "
        f"[ $__n -lt {g} ]; do sleep 1; __n=$((__n+1)); done; kill -KILL $__p 2>/dev/null ) >/dev/null 2>&1 &",
        "__w=$!",
        "exec 3<&-",
        "wait $__p; __rc=$?",
        "kill $__w 2>/dev/null",
        "exit $__rc",
    ])


def serve_ssh(profile: DeviceProfile, spec: ServeSpec, on_ready: Callable[[Serving], None],
              log: Callable[[str], None] = lambda s: None, sync_progress=None) -> bool:
    """Push, start llama-server on the device (127.0.0.1, a port it picks), forward ``spec.port`` here with ssh -L."""
    from mvlm_bench.bench import _connect, runtime_libraries
    from mvlm_bench.sync import sync

    if spec.host not in ("127.0.0.1", "localhost"):
        raise MvlmError(f"--host {spec.host}: on a device the local end of the ssh tunnel is always 127.0.0.1 (the "
                        "server there listens on the device's 127.0.0.1 only); drop --host")
    check_port_free("127.0.0.1", spec.port)
    stops = StopSignals().install()
    transport, profile = _connect(profile, log)
    procs: list[tuple[subprocess.Popen, str, Path]] = []
    log_path, logf = open_log(spec)
    server: subprocess.Popen | None = None
    tunnel: subprocess.Popen | None = None
    pid: str | None = None
    try:
        rt = _runtime(profile)
        files = {"bin/llama-server": rt.exe("llama-server"), f"models/{spec.model.name}": spec.model}
        if spec.mmproj is not None:
            files[f"models/{spec.mmproj.name}"] = spec.mmproj
        if rt.lib.is_dir():
            files.update({f"lib/{name}": real for name, real in runtime_libraries(rt.lib).items()})
        wd = transport.workdir.rstrip("/")
        log(f"syncing {len(files)} files to {profile.name}:{wd}")
        sres = sync(transport, wd, files, progress=sync_progress)
        for note in sres.notes:
            log(note)
        log(sres.summary())
        ngl = spec.n_gpu_layers if spec.n_gpu_layers is not None else profile.n_gpu_layers
        argv = transport.wrapped(server_argv(
            f"{wd}/bin/llama-server", spec, f"{wd}/models/{spec.model.name}",
            f"{wd}/models/{spec.mmproj.name}" if spec.mmproj else None, "127.0.0.1", 0, spec.threads or profile.threads,
            ngl))
        env = dict(profile.env)
        if rt.lib.is_dir() and "LD_LIBRARY_PATH" not in env:
            env["LD_LIBRARY_PATH"] = f"{wd}/lib"
        t0 = time.monotonic()
        server = subprocess.Popen(transport.shell_argv(remote_script(wd, argv, env)), stdin=subprocess.PIPE,
                                  stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                  preexec_fn=_die_with_parent)
        stops.procs.append(server)
        procs.append((server, f"llama-server on {profile.name}", log_path))
        remote_port, pid = _wait_remote_port(server, log_path, procs, spec.ready_timeout)
        log(f"llama-server on {profile.name} listens on its 127.0.0.1:{remote_port} (pid {pid})")
        tunnel_log = log_path.with_name(log_path.name.removesuffix(".log") + "-tunnel.log")
        with open_append(tunnel_log) as tlog:
            tunnel = subprocess.Popen(transport.forward_argv(spec.port, remote_port), stdin=subprocess.DEVNULL,
                                      stdout=tlog, stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=_die_with_parent)
            stops.procs.append(tunnel)
        procs.append((tunnel, f"the ssh tunnel to {profile.name}", tunnel_log))
        ready = Serving(f"http://127.0.0.1:{spec.port}", spec.model_alias, log_path, 0.0, profile.name)
        return _serve("127.0.0.1", spec.port, procs, max(30.0, spec.ready_timeout - (time.monotonic() - t0)), t0,
                      ready, on_ready)
    except (KeyboardInterrupt, SystemExit) as e:
        if not _stopped_by_user(e):
            raise
        return True
    finally:
        stops.begin()
        if tunnel is not None:
            stop_process(tunnel, grace=2.0)
        if server is not None:
            _stop_remote(server, transport, pid)
        stops.done()
        transport.close()
        logf.close()


def _wait_remote_port(server: subprocess.Popen, log_path: Path, procs, timeout: float) -> tuple[int, str | None]:
    """The port the device's llama-server bound (its 'listening on' line, printed once the model is loaded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        pid = next((ln.strip()[len(_PID_MARKER):] for ln in text.splitlines() if ln.startswith(_PID_MARKER)), None)
        m = _LISTENING_RE.search(text)
        if m:
            return int(m.group(1)), pid
        for proc, what, log in procs:
            if proc.poll() is not None:
                raise MvlmError(f"{what} stopped at start-up ({_status(proc)}): {failure_line(log)} (whole log: "
                                f"{log})", exit_code=EXIT_SERVER_FAILED)
        if time.monotonic() > deadline:
            raise MvlmError(f"llama-server on the device did not load the model within {timeout:g} s; see "
                            f"{log_path}, or raise --timeout", exit_code=EXIT_SERVER_FAILED)
        time.sleep(0.1)


def _stop_remote(server: subprocess.Popen, transport, pid: str | None) -> None:
    """End the server's ssh session (its stdin): the remote script then kills the server; if the session does not end
    within the grace period, the local client is killed and the server killed by pid over a fresh command."""
    try:
        if server.stdin is not None:
            server.stdin.close()
    except OSError:
        pass
    try:
        server.wait(timeout=GRACE_S + 5.0)
        return
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        pass
    stop_process(server, grace=2.0)
    if pid and pid.isdigit():
        try:
            transport.run(["kill", "-KILL", pid], timeout=20.0)
        except MvlmError:
            pass
