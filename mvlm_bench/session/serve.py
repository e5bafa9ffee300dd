"""``mvlm serve``: llama.cpp's own OpenAI-compatible server (llama-server) for an mvlm GGUF, here or on a device.

On a device that is this machine (``capabilities.same_host``: the default ``local`` profile) the runtime's
``llama-server`` runs from the build's install dir. On a device reached over a link that can forward ports (ssh) the
runtime and the GGUFs are pushed with the content-addressed sync (checked by sha256 on the device) and a local port is
forwarded to the server there (:mod:`mvlm_bench.session.server`: one implementation with the dataset protocol). A
transport that cannot forward ports (adb) is refused. Either way llama-server listens on its device's 127.0.0.1, on a
port it picks itself, and clients reach it through the front (:mod:`mvlm_bench.session.front`) on ``--host``/``--port``
here: image size, body size and concurrency limits, remote image URLs refused, the API key checked.

The server always gets ``--jinja`` (the chat template ``mvlm convert`` writes into the GGUF, e.g. MobileVLM's
conv_vicuna_v1, renders the messages), ``--mmproj`` when given (images in chat messages), ``--alias`` (the model name
the API reports; default: the GGUF's file stem) and ``--no-webui`` (the runtime is built without the web UI).

Its log goes to a file, by default ``<cache>/logs/serve-<alias>-<time>-<pid>.log``. A stop (Ctrl-C, SIGTERM, SIGHUP,
SIGQUIT) terminates the server, waits, then kills it; a further stop signal kills it at once, and none kills mvlm
before the server is reaped (:class:`mvlm_core.stops.StopSignals`).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mvlm_bench.device.profiles import MAX_GPU_LAYERS, MAX_THREADS, DeviceProfile
from mvlm_bench.plan.protocols import runtime_files
from mvlm_bench.session.front import Front, Limits
from mvlm_bench.session.server import EXIT_SERVER_FAILED, Server, loopback_for, open_append
from mvlm_bench.session.session import Session
from mvlm_core import runtime as rtmod
from mvlm_core.errors import MvlmError
from mvlm_core.gguf_header import read_header
from mvlm_core.stops import Stopped, StopSignals, stop_exit_code

DEFAULT_PORT = 8080
DEFAULT_CTX = 4096  # the image's 144..576 tokens + a conversation; MobileVLM trains on 2048, LLaVA-1.5 on 4096
MIN_CTX = 256
MAX_CTX = 131072
MAX_PARALLEL = 256  # llama-server's slots; each holds ctx-size / slots of the context


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
    limits: Limits = Limits()
    parallel: int | None = None  # llama-server's slots (-np): requests decoded at once; None: llama-server's default
    server_args: tuple[str, ...] = ()  # given after `--`: passed to llama-server unchanged (check_server_args)

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


def make_limits(max_pixels: int, max_body_mb: int, max_concurrent: int, allow_remote: bool,
                api_keys: tuple[str, ...] = ()) -> Limits:
    """The front's limits from ``mvlm serve``'s options, each range-checked (one line, exit 2)."""
    for option, value, lo, hi in (("--max-image-pixels", max_pixels, 1, 1 << 31), ("--max-body-mb", max_body_mb, 1, 4096),
                                  ("--max-concurrent", max_concurrent, 1, 1024)):
        if not lo <= value <= hi:
            raise MvlmError(f"{option} {value} is out of range: give a whole number from {lo} to {hi}")
    return Limits(max_body=max_body_mb << 20, max_pixels=max_pixels, max_concurrent=max_concurrent,
                  max_connections=max(64, 2 * max_concurrent), allow_remote_media=allow_remote, api_keys=api_keys)


def api_keys(key: str | None, key_file: Path | None) -> tuple[str, ...]:
    """The API keys of ``--api-key`` and ``--api-key-file`` (one per line, ``#`` comments and blank lines skipped, as
    llama-server reads its own)."""

    def file_text(key_file: Path) -> str:
        """The text of ``--api-key-file``: a regular file of at most 1 MiB (thousands of keys; /dev/zero or a disk
        image is a mistake), opened without blocking (a FIFO nobody writes to would wait forever); one line otherwise."""
        from mvlm_core.atomic import read_small

        what = "a text file of keys, one per line"
        try:
            return read_small(key_file, 1 << 20, what, "--api-key-file").decode("utf-8")
        except UnicodeDecodeError:
            raise MvlmError(f"--api-key-file {key_file}: cannot be read (not UTF-8 text); give {what}") from None

    keys = [] if key is None else [key]
    if key is not None and (not key.strip() or any(c in key for c in "\r\n\0")):
        raise MvlmError("--api-key is empty or has a line break: give the key itself")
    if key_file is not None:
        text = file_text(key_file)
        found = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if not found:
            raise MvlmError(f"--api-key-file {key_file} has no key: write one key per line")
        keys += found
    return tuple(keys)


def check_spec(spec: ServeSpec, key_on_command_line: bool = False) -> list[str]:
    """Refuse bad input (one line, exit 2) before anything starts; returns notes for the user (no chat template, a
    server open beyond this machine without a key, a key on the command line)."""
    from mvlm_bench.plan.spec import BenchSpec, check_inputs
    from mvlm_core.atomic import check_output_path

    if not (1 <= spec.port <= 65535):
        raise MvlmError(f"--port {spec.port} is out of range: give a TCP port from 1 to 65535")
    for option, value, lo, hi in (("--threads", spec.threads, 1, MAX_THREADS), ("--ctx-size", spec.ctx_size, MIN_CTX, MAX_CTX),
                                  ("--n-gpu-layers", spec.n_gpu_layers, 0, MAX_GPU_LAYERS),
                                  ("--parallel", spec.parallel, 1, MAX_PARALLEL)):
        if value is not None and not (lo <= value <= hi):
            raise MvlmError(f"{option} {value} is out of range: give a whole number from {lo} to {hi}")
    if not spec.host or spec.host.startswith("-") or not re.fullmatch(r"[A-Za-z0-9_.:%\[\]-]+", spec.host):
        raise MvlmError(f"--host {spec.host!r} is not an address: give an IP address such as 127.0.0.1 or 0.0.0.0")
    if ipv4_shorthand(spec.host):
        full = socket.inet_ntoa(socket.inet_aton(spec.host))
        raise MvlmError(f"--host {spec.host} is a shorthand IPv4 address (it means {full}): write it in full, e.g. "
                        f"--host {full}")
    if spec.alias is not None and (not spec.alias.strip() or "," in spec.alias or any(c in spec.alias for c in "\n\r\0")):
        raise MvlmError(f"--alias {spec.alias!r}: give one non-empty name without commas")
    # the files exist, are GGUFs this runtime reads, an LM and its mmproj: the bench's own checks
    check_inputs(BenchSpec("vlm" if spec.mmproj is not None else "lm", spec.model, mmproj=spec.mmproj),
                 needs_template=False)
    if spec.log is not None:  # never a symlink, a model, an input, a directory or a device node (appended to, never truncated)
        if spec.log.is_symlink():
            raise MvlmError(f"--log {spec.log} is a symbolic link; the log is never written through a link: give the path "
                            "of a regular file (it is appended to) or of a new one")
        check_output_path(spec.log, [spec.model, spec.mmproj], option="--log")
    notes = []
    if not _is_loopback(spec.host) and not spec.limits.api_keys:
        notes.append(f"--host {spec.host} without an API key: anyone who reaches this machine's port {spec.port} can use "
                     "the model; give --api-key-file FILE (or MVLM_API_KEY)")
    if key_on_command_line:
        notes.append("--api-key on the command line is readable by every local user (ps, /proc): prefer "
                     "--api-key-file FILE or the MVLM_API_KEY environment variable")
    if not read_header(spec.model).has_chat_template:
        notes.append(f"{spec.model.name} has no chat template: llama-server falls back to its own default, which may "
                     "not be the format the model was trained on")
    return notes


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return False


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
    if spec.parallel is not None:
        argv += ["-np", str(spec.parallel)]
    return argv + list(spec.server_args)


# llama-server options that mvlm sets itself, and the mvlm option to use instead. Given after `--`, two values would
# reach llama-server (the later one wins there, silently) or the front door would no longer match the server.
OWNED_SERVER_OPTIONS = {
    ("-m", "--model"): "--model", ("-mu", "--model-url", "-hf", "-hfr", "--hf-repo", "-hff", "--hf-file"): "--model",
    ("-mm", "--mmproj", "-mmu", "--mmproj-url", "--no-mmproj"): "--mmproj",
    ("--host",): "--host", ("--port",): "--port", ("-a", "--alias"): "--alias",
    ("--api-key", "--api-key-file"): "--api-key-file (mvlm's front door checks the key)",
    ("-c", "--ctx-size"): "--ctx-size", ("-t", "--threads"): "--threads",
    ("-ngl", "--gpu-layers", "--n-gpu-layers"): "--n-gpu-layers", ("-np", "--parallel"): "--parallel",
    ("--log-file",): "--log", ("--path",): "nothing: serving files from the device is not offered",
    ("--log-disable", "-lv", "--verbosity", "--log-verbosity", "-q", "--quiet"):
        "nothing: mvlm reads llama-server's log to find its port; `--log FILE` keeps it",
    ("--api-prefix",): "nothing: the front door serves the API at the root (/v1, /health)",
    ("--ssl-key-file", "--ssl-cert-file"): "nothing: the front door speaks plain HTTP to the server on its loopback",
}


def check_server_args(args: Sequence[str]) -> tuple[str, ...]:
    """The options after ``--`` for llama-server: every one passes unchanged except those mvlm owns, each refused
    with the mvlm option to use instead."""
    for a in args:
        name = a.split("=", 1)[0]
        spelled = name[:2] + name[2:].replace("_", "-") if name.startswith("--") else name  # llama.cpp reads both
        for names, instead in OWNED_SERVER_OPTIONS.items():
            if spelled in names:
                raise MvlmError(f"{name} after --: mvlm owns that llama-server setting; use mvlm serve's {instead}")
        if "\n" in a or "\x00" in a:
            raise MvlmError(f"{a!r} after --: an argument with a line break or NUL cannot be passed to llama-server")
    return tuple(args)


def ipv4_shorthand(host: str) -> bool:
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


def _runtime(session: Session) -> rtmod.Runtime:
    rt = session.runtime()
    target = session.profile.target
    if not rt.exe("llama-server").is_file():
        raise MvlmError(f"the {target} runtime in {rt.root} was built without llama-server: run `mvlm runtime "
                        f"build --target {target}` again")
    return rt


def _server_command(session: Session, spec: ServeSpec, log: Callable[[str], None],
                    sync_progress=None) -> tuple[list[str], dict[str, str]]:
    """llama-server's command line and environment on the device, listening on the device's 127.0.0.1 on a port it
    picks. A device that is this machine runs the build where it is; one over a link gets the runtime and models
    pushed first."""
    rt, p = _runtime(session), session.profile
    ngl = spec.n_gpu_layers if spec.n_gpu_layers is not None else p.n_gpu_layers
    if session.capabilities.same_host:
        threads = spec.threads or p.threads or os.cpu_count() or 1
        argv = server_argv(str(rt.exe("llama-server")), spec, str(spec.model.resolve()),
                           str(spec.mmproj.resolve()) if spec.mmproj else None, "127.0.0.1", 0, threads, ngl)
        return argv, {}
    files = runtime_files(rt, ["llama-server"]) | {f"models/{spec.model.name}": spec.model}
    if spec.mmproj is not None:
        files[f"models/{spec.mmproj.name}"] = spec.mmproj
    wd, _ = session.push(files, sync_progress=sync_progress)
    argv = server_argv(f"{wd}/bin/llama-server", spec, f"{wd}/models/{spec.model.name}",
                       f"{wd}/models/{spec.mmproj.name}" if spec.mmproj else None, "127.0.0.1", 0,
                       spec.threads or p.threads, ngl)
    env = {"LD_LIBRARY_PATH": f"{wd}/lib"} if rt.lib.is_dir() and "LD_LIBRARY_PATH" not in p.env else {}
    return argv, env


def serve(profile: DeviceProfile, spec: ServeSpec, on_ready: Callable[[Serving], None],
          log: Callable[[str], None] = lambda s: None, sync_progress=None) -> bool:
    """Run llama-server on the device until a stop signal (True) or until it dies on its own (MvlmError naming why).
    ``on_ready`` hears where it is once ``/health`` answers 200."""
    from mvlm_bench.device.transports import transport_kinds

    kind = transport_kinds().get(profile.transport)
    if kind is not None and not kind.capabilities.port_forward:  # said before anything connects
        raise MvlmError(f"--device {profile.name}: serving needs a device whose port can be reached from here, and its "
                        f"transport ({profile.transport}) forwards none; use a local, ssh or adb device")
    spec = dataclasses.replace(spec, host=spec.host.strip("[]"))  # bind() takes ::1, a URL [::1]
    check_port_free(spec.host, spec.port)  # before waiting for the device's lease: a taken port is refused at once
    stops = StopSignals().install()
    server: Server | None = None
    front: Front | None = None
    logf = None
    try:
        # the device's lease, as a bench holds it, for as long as it serves: its push and its load never land inside
        # a bench's measurement, and a bench started meanwhile waits rather than measure beside (or under) it
        with Session(profile, log, on_wait=log) as session, session.leased(shared=True):
            check_port_free(spec.host, spec.port)  # again: the wait for the lease may have been long
            argv, env = _server_command(session, spec, log, sync_progress)
            log_path, logf = open_log(spec)
            server = Server(session.transport, argv, env, log_path, logf, spec.ready_timeout, session.profile.name,
                            log, host="127.0.0.1", procs=stops.procs)
            front = _open_front(spec, server)
            here = loopback_for(spec.host)
            url = f"http://{f'[{here}]' if ':' in here else here}:{front.port}"
            on_ready(Serving(url, spec.model_alias, log_path, server.ready_s, session.profile.name))
            while True:
                why = server.dead("while serving")
                if why:
                    raise MvlmError(why, exit_code=EXIT_SERVER_FAILED)
                time.sleep(0.5)
    except (KeyboardInterrupt, SystemExit, Stopped) as e:
        if stop_exit_code(e) is None:
            raise
        return True
    finally:
        stops.begin()  # from here on a stop signal only hastens the stop
        if front is not None:
            front.close()
        if server is not None:
            server.close()
        stops.done()
        if logf is not None:
            logf.close()


def _open_front(spec: ServeSpec, server: Server) -> Front:
    try:
        return Front(spec.host, spec.port, (server.host, server.port), spec.limits).start()
    except OSError as e:  # taken since the check before the model loaded
        raise MvlmError(f"--port {spec.port} on {spec.host}: cannot listen ({e.strerror or e}); choose another port",
                        exit_code=EXIT_SERVER_FAILED) from None
