"""TEST PEER: an Android device daemon (adbd) for the tests -- NOT part of the product.

No phone is attached to the test machines, so ``AdbDevice`` plays one: it speaks the real ADB wire protocol over TCP
on 127.0.0.1, and Debian's real ``adb`` client and server talk to it after ``adb connect 127.0.0.1:PORT`` (its serial).
As adbd does (AOSP packages/modules/adb: protocol.txt, SYNC.TXT, SERVICES.TXT, shell_protocol.h), it implements:

- the transport: CNXN (features ``shell_v2,cmd,stat_v2,ls_v2,fixed_push_mkdir``), AUTH (``auth=True``: every
  signature and public key is refused, so ``adb devices`` says ``unauthorized``), OPEN/OKAY/WRTE/CLSE streams with
  one WRTE in flight per stream, both ways;
- ``shell:CMD`` (v1: stdout+stderr on one stream, no exit status), ``shell,v2,...:CMD`` (shell protocol v2: stdin,
  stdout, stderr, exit status), ``exec:CMD`` (raw and binary-safe; stderr joins stdout, as on adbd) and ``sync:``
  (STAT, STA2, LST2, LIST, LIS2, SEND, RECV, QUIT, with adbd's FAIL texts, e.g. "write failed: <strerror>").

The phone is the directory ``root``: the device paths /data, /sdcard and /sys/class/thermal live under it (rewritten
in shell command text and in sync paths; a sync write elsewhere lands under ``root`` too, never on the host). Commands
run with the host's /bin/sh in "/", PATH ``root/system/bin:/usr/bin:/bin``, where ``getprop`` prints ``props`` and
``uname`` says aarch64. aarch64 ELF files run as on a phone: an LD_PRELOAD exec wrapper (C, compiled once into
~/.cache/mvlm/test-peers) turns exec*/posix_spawn* of an EM_AARCH64 file into ``qemu-aarch64-static``. Output is not
rewritten back: a path that a command prints is a host path.

Faults, settable at any time: ``drop_after_sync_bytes`` (unplugged mid-push), ``drop_during_shell_after`` (unplugged
mid-run), ``read_only`` (SEND fails "Read-only file system"); a full filesystem under ``root`` gives the real ENOSPC.
``AdbServer`` runs the real adb server on a private port, so that a test never touches the user's adb server.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

A_CNXN, A_AUTH, A_OPEN, A_OKAY, A_CLSE, A_WRTE = 0x4E584E43, 0x48545541, 0x4E45504F, 0x59414B4F, 0x45534C43, 0x45545257
A_VERSION = 0x01000001
MAX_PAYLOAD = 256 * 1024
SYNC_DATA_MAX = 64 * 1024
FEATURES = "shell_v2,cmd,stat_v2,ls_v2,fixed_push_mkdir"  # no delayed_ack: one WRTE in flight
MAPPED = ("/data", "/sdcard", "/sys/class/thermal")
DEFAULT_PROPS = {
    "ro.product.cpu.abi": "arm64-v8a", "ro.product.model": "mvlm-test-phone", "ro.product.name": "mvlm_test",
    "ro.product.device": "mvlm_test", "ro.build.version.sdk": "34", "ro.build.version.release": "14",
    "ro.serialno": "MVLMTEST0001",
}
_MAPPED_RE = re.compile(r"(?<![\w.~/$-])(/data|/sdcard|/sys/class/thermal)(?![\w.-])")
_HDR = struct.Struct("<6I")                # command, arg0, arg1, data_length, data_checksum, magic
_REQ = struct.Struct("<4sI")               # sync request / DATA / DONE / OKAY / FAIL: id, length
_STAT2 = struct.Struct("<4sIQQIIIIQqqq")   # sync_stat_v2: id, error, dev, ino, mode, nlink, uid, gid, size, a/m/ctime
_DENT1 = struct.Struct("<4sIIII")          # sync_dent_v1: id, mode, size, mtime, namelen
_DENT2 = struct.Struct("<4sIQQIIIIQqqqI")  # sync_dent_v2: the stat_v2 fields, namelen
_STDIN, _STDOUT, _STDERR, _EXIT, _CLOSE_STDIN = 0, 1, 2, 3, 4  # shell protocol v2 packet ids

_GETPROP = """#!/bin/sh
# getprop of the mvlm test phone (tests/adb_device.py)
if [ $# -eq 0 ]; then
  while IFS='=' read -r k v; do printf '[%s]: [%s]\\n' "$k" "$v"; done < '{props}'; exit 0
fi
while IFS='=' read -r k v; do if [ "$k" = "$1" ]; then printf '%s\\n' "$v"; exit 0; fi; done < '{props}'
printf '%s\\n' "$2"
"""
_UNAME = "#!/bin/sh\n# uname of the mvlm test phone: its ABI's kernel\n/bin/uname \"$@\" | sed 's/x86_64/{machine}/g'\n"
_MACHINE = {"arm64-v8a": "aarch64", "armeabi-v7a": "armv8l", "x86_64": "x86_64", "x86": "i686"}

EXEC_WRAPPER_C = r"""/* LD_PRELOAD exec wrapper of the mvlm adb test peer: aarch64 ELF files run under qemu-aarch64-static. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
extern char **environ;
typedef int (*spawn_t)(pid_t *, const char *, const posix_spawn_file_actions_t *, const posix_spawnattr_t *,
                       char *const[], char *const[]);
static char qemu[PATH_MAX];  /* read once: `env -i` must not lose it */
__attribute__((constructor)) static void init(void) {
    const char *q = getenv("MVLM_PEER_QEMU");
    if (q) strncpy(qemu, q, sizeof qemu - 1);
}
static int is_aarch64(const char *path) {
    unsigned char h[20];
    int fd = path ? open(path, O_RDONLY | O_CLOEXEC) : -1;
    if (fd < 0) return 0;
    ssize_t n = read(fd, h, sizeof h);
    close(fd);
    return qemu[0] && n == 20 && memcmp(h, ELFMAG, SELFMAG) == 0 && (h[18] | h[19] << 8) == EM_AARCH64;
}
static char **qemu_argv(const char *path, char *const argv[]) {  /* qemu -0 ARGV0 -U LD_PRELOAD PATH ARGV[1:] */
    size_t n = 0, i = 0;
    while (argv && argv[n]) n++;
    char **out = malloc((n + 7) * sizeof(char *));
    if (!out) return NULL;
    out[i++] = qemu; out[i++] = "-0"; out[i++] = n ? argv[0] : (char *)path;
    out[i++] = "-U"; out[i++] = "LD_PRELOAD"; out[i++] = (char *)path;
    for (size_t k = 1; k < n; k++) out[i++] = argv[k];
    out[i] = NULL;
    return out;
}
static const char *search(const char *file, char *buf) {  /* the file execvp would run, or NULL */
    struct stat st;
    if (strchr(file, '/')) return file;
    const char *s = getenv("PATH") ? getenv("PATH") : "/bin:/usr/bin";
    for (;; s++) {
        const char *e = strchrnul(s, ':');
        snprintf(buf, PATH_MAX, "%.*s%s%s", (int)(e - s), s, e == s ? "" : "/", file);
        if (access(buf, X_OK) == 0 && stat(buf, &st) == 0 && S_ISREG(st.st_mode)) return buf;
        if (!*e) return NULL;
        s = e;
    }
}
static int run(const char *path, char *const argv[], char *const envp[]) {
    int (*real)(const char *, char *const[], char *const[]) = dlsym(RTLD_NEXT, "execve");
    char **q = is_aarch64(path) ? qemu_argv(path, argv) : NULL;
    if (!q) return real(path, argv, envp);
    int rc = real(qemu, q, envp), e = errno;
    free(q); errno = e;
    return rc;
}
int execve(const char *p, char *const a[], char *const e[]) { return run(p, a, e); }
int execv(const char *p, char *const a[]) { return run(p, a, environ); }
int execvpe(const char *f, char *const a[], char *const e[]) {
    char buf[PATH_MAX];
    const char *p = search(f, buf);
    if (is_aarch64(p)) return run(p, a, e);
    return ((int (*)(const char *, char *const[], char *const[]))dlsym(RTLD_NEXT, "execvpe"))(f, a, e);
}
int execvp(const char *f, char *const a[]) { return execvpe(f, a, environ); }
static int spawn(int use_path, pid_t *pid, const char *f, const posix_spawn_file_actions_t *fa,
                 const posix_spawnattr_t *at, char *const a[], char *const e[]) {
    char buf[PATH_MAX];
    const char *p = use_path ? search(f, buf) : f;
    char **q = is_aarch64(p) ? qemu_argv(p, a) : NULL;
    if (!q) return ((spawn_t)dlsym(RTLD_NEXT, use_path ? "posix_spawnp" : "posix_spawn"))(pid, f, fa, at, a, e);
    int rc = ((spawn_t)dlsym(RTLD_NEXT, "posix_spawn"))(pid, qemu, fa, at, q, e);
    free(q);
    return rc;
}
int posix_spawn(pid_t *pid, const char *p, const posix_spawn_file_actions_t *fa, const posix_spawnattr_t *at,
                char *const a[], char *const e[]) { return spawn(0, pid, p, fa, at, a, e); }
int posix_spawnp(pid_t *pid, const char *f, const posix_spawn_file_actions_t *fa, const posix_spawnattr_t *at,
                 char *const a[], char *const e[]) { return spawn(1, pid, f, fa, at, a, e); }
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exec_wrapper() -> Path | None:
    """The LD_PRELOAD exec wrapper, compiled once per source hash; None without gcc (aarch64 files will not run)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mvlm" / "test-peers"
    lib = cache / f"execwrap-{hashlib.sha256(EXEC_WRAPPER_C.encode()).hexdigest()[:16]}.so"
    if lib.exists() or shutil.which("gcc") is None:
        return lib if lib.exists() else None
    cache.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_name(f"{lib.name}.{os.getpid()}.{threading.get_ident()}")  # concurrent builders: last one wins
    tmp.with_suffix(".c").write_text(EXEC_WRAPPER_C)
    try:
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", str(tmp), str(tmp.with_suffix(".c")), "-ldl"],
                       check=True, capture_output=True)
        os.replace(tmp, lib)
    finally:
        tmp.with_suffix(".c").unlink(missing_ok=True)
    return lib


class _Stream:
    """One stream (a service the host OPENed): an inbox fed by the host's WRTEs and a flow-controlled writer."""

    def __init__(self, conn: _Connection, local_id: int, remote_id: int):
        self.conn, self.local_id, self.remote_id = conn, local_id, remote_id
        self._cv = threading.Condition()
        self._write_lock = threading.Lock()
        self._inbox = bytearray()
        self._acked, self._gone, self._closed = True, False, False
        self._on_end: list[Callable[[], None]] = []

    def feed(self, data: bytes) -> None:
        with self._cv:
            self._inbox += data
            self._cv.notify_all()

    def acked(self) -> None:
        with self._cv:
            self._acked = True
            self._cv.notify_all()

    def on_end(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` when the host closes the stream or the link dies."""
        self._on_end.append(hook)

    def ended(self, answer: bool) -> None:
        """The host sent CLSE (``answer``: CLSE back) or the link is gone."""
        with self._cv:
            self._gone = True
            self._cv.notify_all()
        for hook in self._on_end:
            hook()
        if answer:
            self.close()

    def read(self, n: int | None = None) -> bytes:
        """Exactly ``n`` bytes from the host (EOFError once the stream is over); ``n`` None: what came (b"": over)."""
        with self._cv:
            while len(self._inbox) < (1 if n is None else n) and not (self._gone or self._closed):
                self._cv.wait()
            if n is None:
                n = len(self._inbox)
            elif len(self._inbox) < n:
                raise EOFError("stream closed")
            out = bytes(self._inbox[:n])
            del self._inbox[:n]
            return out

    def write(self, data: bytes) -> None:
        """WRTE ``data`` in payloads of at most maxdata, each one once the host OKAYed the previous one."""
        with self._write_lock:
            for off in range(0, len(data), self.conn.maxdata):
                with self._cv:
                    while not self._acked and not (self._gone or self._closed):
                        self._cv.wait()
                    if self._gone or self._closed:
                        raise EOFError("stream closed")
                    self._acked = False
                try:
                    self.conn.send(A_WRTE, self.local_id, self.remote_id, data[off:off + self.conn.maxdata])
                except OSError as e:
                    raise EOFError(f"link lost: {e}") from e

    def close(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        self.conn.streams.pop(self.local_id, None)
        with contextlib.suppress(OSError):
            self.conn.send(A_CLSE, self.local_id, self.remote_id)


class _Connection:
    """One TCP connection from the adb server (its own thread): the handshake, then the streams' messages."""

    def __init__(self, device: AdbDevice, sock: socket.socket):
        self.device, self.sock = device, sock
        self.maxdata = MAX_PAYLOAD
        self.streams: dict[int, _Stream] = {}
        self._send_lock = threading.Lock()
        self._last_id = 0

    def send(self, cmd: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        header = _HDR.pack(cmd, arg0, arg1, len(data), sum(data) & 0xFFFFFFFF, cmd ^ 0xFFFFFFFF)
        with self._send_lock:
            self.sock.sendall(header + data)

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("connection closed")
            buf += chunk
        return bytes(buf)

    def _message(self) -> tuple[int, int, int, bytes]:
        cmd, arg0, arg1, length, _checksum, magic = _HDR.unpack(self._recv(_HDR.size))  # checksum: may be 0
        if magic != cmd ^ 0xFFFFFFFF:
            raise EOFError(f"bad magic in message {cmd:#x}")
        return cmd, arg0, arg1, self._recv(length) if length else b""

    def abort(self) -> None:
        """Drop the link as an unplug does: a TCP reset to the host; the reader thread wakes up and ends."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.shutdown(socket.SHUT_RD)

    def run(self) -> None:
        try:
            self._handshake()
            while True:
                self._dispatch(*self._message())
        except (OSError, EOFError) as e:
            log.debug("adb test peer %s: connection ends: %s", self.device.serial, e)
        finally:
            for s in list(self.streams.values()):
                s.ended(answer=False)
            self.streams.clear()
            self.sock.close()

    def _handshake(self) -> None:
        cmd, _version, maxdata, _banner = self._message()
        while cmd != A_CNXN:
            cmd, _version, maxdata, _banner = self._message()
        self.maxdata = min(MAX_PAYLOAD, maxdata or MAX_PAYLOAD)
        if self.device.auth:  # the "Allow USB debugging?" dialog that nobody confirms
            self.send(A_AUTH, 1, 0, secrets.token_bytes(20))  # TOKEN
            while True:
                cmd, kind, _, _ = self._message()
                if cmd == A_AUTH and kind == 2:  # SIGNATURE: refused, a new TOKEN; RSAPUBLICKEY (3): no answer ever
                    self.send(A_AUTH, 1, 0, secrets.token_bytes(20))
        self.send(A_CNXN, A_VERSION, self.maxdata, self.device.banner().encode())

    def _dispatch(self, cmd: int, arg0: int, arg1: int, data: bytes) -> None:
        stream = self.streams.get(arg1)
        if cmd == A_OPEN:
            self._open(arg0, data.rstrip(b"\0").decode("utf-8", "replace"))
        elif cmd == A_WRTE and stream is not None:
            stream.feed(data)
            self.send(A_OKAY, arg1, arg0)
        elif cmd == A_OKAY and stream is not None:
            stream.acked()
        elif cmd == A_CLSE and stream is not None:
            self.streams.pop(arg1, None)
            stream.ended(answer=True)

    def _open(self, remote_id: int, service: str) -> None:
        handler = self.device.service(service)
        log.debug("adb test peer %s: OPEN %r", self.device.serial, service)
        if handler is None:
            log.warning("adb test peer %s: unknown service %r refused", self.device.serial, service)
            self.send(A_CLSE, 0, remote_id)
            return
        self._last_id += 1
        stream = _Stream(self, self._last_id, remote_id)
        self.streams[stream.local_id] = stream
        self.send(A_OKAY, stream.local_id, remote_id)
        self.device.spawn(_run_service, handler, stream, name=f"adb-peer-{service[:24]}")


def _run_service(handler: Callable[[_Stream], None], stream: _Stream) -> None:
    try:
        handler(stream)
    except EOFError:
        pass
    finally:
        stream.close()


class AdbDevice:
    """An Android phone for the tests: ``adb -s 127.0.0.1:PORT`` after ``AdbServer.connect`` (see the module doc).

    ``root``: the phone's directory (start() creates data/local/tmp, sdcard, system/bin and thermal_zone0);
    ``props``: merged over ``DEFAULT_PROPS`` (``getprop``; product, model and device in ``adb devices -l``);
    ``auth``: True = the device asks for AUTH and refuses every key (``adb devices`` shows ``unauthorized``).
    Faults, set at any time: ``drop_after_sync_bytes`` -- once that many more bytes of sync SEND data came, the device
    is unplugged (TCP reset, listener closed); ``drop_during_shell_after`` -- seconds after a shell/exec service
    starts, the device is unplugged (each start arms a timer; the first that expires unplugs, even if that command
    ended); ``read_only`` -- device path prefixes where SEND fails "Read-only file system"; ``path`` -- the shell's
    PATH, for a phone with fewer tools; ``drop_matching`` -- arm ``drop_during_shell_after`` only for commands whose
    text holds it (e.g. ``llama-mtmd-cli``: unplugged during a run, not during the probe).
    ``stop()`` unplugs it for good; ``start()`` plugs it back in on the same port.
    """

    def __init__(self, root: Path, props: dict[str, str] | None = None, auth: bool = False):
        self.root = Path(root)
        self.props = {**DEFAULT_PROPS, **(props or {})}
        self.auth = auth
        self.port = 0
        self.drop_during_shell_after: float | None = None
        self.read_only: list[str] = []
        self.drop_matching: str | None = None  # drop_during_shell_after only for commands holding this text
        self.path: str | None = None  # the shell's PATH (None: root/system/bin, then the host's /usr/bin and /bin)
        self._drop_after: int | None = None
        self._sync_bytes = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[_Connection] = set()
        self._procs: set[subprocess.Popen] = set()
        self._threads: list[threading.Thread] = []
        self._qemu = shutil.which("qemu-aarch64-static")
        self._wrapper: Path | None = None

    @property
    def serial(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def drop_after_sync_bytes(self) -> int | None:
        return self._drop_after

    @drop_after_sync_bytes.setter
    def drop_after_sync_bytes(self, value: int | None) -> None:
        with self._lock:
            self._drop_after, self._sync_bytes = value, 0  # counted from now on

    def __enter__(self) -> AdbDevice:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def banner(self) -> str:
        p = self.props
        return (f"device::ro.product.name={p['ro.product.name']};ro.product.model={p['ro.product.model']};"
                f"ro.product.device={p['ro.product.device']};features={FEATURES}")

    def start(self) -> AdbDevice:
        """Lay out the phone and listen on 127.0.0.1 (a free port the first time, the same port after a stop)."""
        zone = self.root / "sys/class/thermal/thermal_zone0"
        for d in ("data/local/tmp", "sdcard", "system/bin", zone):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        for name, text in (("type", "cpu-0-0\n"), ("temp", "45000\n")):
            if not (zone / name).exists():
                (zone / name).write_text(text)
        props = self.root / "system/build.prop"
        props.write_text("".join(f"{k}={v}\n" for k, v in self.props.items()))
        machine = _MACHINE.get(self.props["ro.product.cpu.abi"], "aarch64")
        for name, text in (("getprop", _GETPROP.replace("{props}", str(props))),
                           ("uname", _UNAME.replace("{machine}", machine))):
            (self.root / "system/bin" / name).write_text(text)
            (self.root / "system/bin" / name).chmod(0o755)
        if self._qemu and self._wrapper is None:
            self._wrapper = exec_wrapper()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(8)
        self.port, self._listener = listener.getsockname()[1], listener
        self.spawn(self._accept, listener, name=f"adb-peer-listen-{self.port}")
        return self

    def stop(self) -> None:
        """Unplug: close the listener and every connection, kill what runs; returns once the peer's threads ended."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, procs, threads = list(self._conns), list(self._procs), list(self._threads)
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            conn.abort()
        for proc in procs:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
        for t in threads:
            if t is not threading.current_thread():
                if isinstance(t, threading.Timer):
                    t.cancel()
                t.join(timeout=10)

    def spawn(self, target: Callable, *args, name: str, delay: float | None = None) -> threading.Thread:
        """Run ``target(*args)`` in a thread (after ``delay`` seconds) that ``stop()`` waits for."""
        if delay is None:
            t = threading.Thread(target=target, args=args, name=name, daemon=True)
        else:
            t = threading.Timer(delay, target, args=args)
            t.name, t.daemon = name, True
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()
        return t

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            conn = _Connection(self, sock)
            with self._lock:
                if self._listener is not listener:
                    sock.close()
                    return
                self._conns.add(conn)
            self.spawn(self._serve, conn, name=f"adb-peer-conn-{self.port}")

    def _serve(self, conn: _Connection) -> None:
        try:
            conn.run()
        finally:
            with self._lock:
                self._conns.discard(conn)

    def _unplug(self, why: str) -> None:
        log.info("adb test peer %s: unplugged (%s)", self.serial, why)
        self.stop()

    def host_path(self, device_path: str, write: bool = False) -> Path:
        """Where a device path is here: under ``root`` for /data, /sdcard, /sys/class/thermal and for any write; the
        host's for other reads, unless ``root`` has that path."""
        p = "/" + device_path.lstrip("/")
        inside = self.root / p.lstrip("/")
        if write or any(p == m or p.startswith(m + "/") for m in MAPPED) or os.path.lexists(inside):
            return inside
        return Path(p)

    def map_command(self, cmd: str) -> str:
        """Shell command text with the device paths /data, /sdcard, /sys/class/thermal made host paths."""
        return _MAPPED_RE.sub(lambda m: str(self.root) + m.group(1), cmd)

    def _is_read_only(self, device_path: str) -> bool:
        p = "/" + device_path.lstrip("/")
        return any(p == r.rstrip("/") or p.startswith(r.rstrip("/") + "/") for r in self.read_only if r)

    def service(self, name: str) -> Callable[[_Stream], None] | None:
        """The handler of an OPENed service, or None: refused with CLSE, as adbd does with a service it lacks."""
        head, colon, cmd = name.partition(":")
        kind, *args = head.split(",")
        if kind == "shell" and colon:  # shell[,v2][,TERM=...][,raw|,pty]:CMD; a pty joins stderr to stdout
            env = {k: v for k, _, v in (a.partition("=") for a in args) if k == "TERM"}
            pty = "pty" in args or (not cmd and "raw" not in args)
            return lambda s: self._shell(s, cmd, v2="v2" in args, merge=pty or "v2" not in args, env=env)
        if kind == "exec" and colon:
            return lambda s: self._shell(s, cmd, v2=False, merge=True, env={})
        if kind == "tcp" and colon and cmd.isdigit():  # `adb forward tcp:L tcp:PORT`: a connection to the device's port
            return lambda s: self._tcp(s, int(cmd))
        return self._sync if name == "sync:" else None

    def _tcp(self, stream: _Stream, port: int) -> None:
        """Relay one forwarded connection to 127.0.0.1:``port`` (the phone's loopback is this machine's)."""
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            return  # nothing listens there: the stream closes, as adbd does
        sock.settimeout(None)
        stream.on_end(lambda: _shut(sock))
        self.spawn(_relay_in, stream, sock, name="adb-peer-tcp-in")
        try:
            while chunk := sock.recv(SYNC_DATA_MAX):
                stream.write(chunk)
        except (EOFError, OSError):
            pass
        finally:
            _shut(sock)
            sock.close()

    def _popen(self, cmd: str, merge: bool, env: dict[str, str]) -> subprocess.Popen:
        env = {**env, "PATH": self.path or f"{self.root}/system/bin:/usr/bin:/bin", "HOME": f"{self.root}/data/local/tmp",
               "ANDROID_ROOT": "/system", "ANDROID_DATA": f"{self.root}/data", "EXTERNAL_STORAGE": f"{self.root}/sdcard"}
        if self._wrapper is not None:
            env.update(LD_PRELOAD=str(self._wrapper), MVLM_PEER_QEMU=str(self._qemu))
        argv = ["/bin/sh", "-c", self.map_command(cmd)] if cmd else ["/bin/sh"]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/", env=env, bufsize=0,
                                stderr=subprocess.STDOUT if merge else subprocess.PIPE, start_new_session=True)
        with self._lock:
            self._procs.add(proc)
        return proc

    def _shell(self, stream: _Stream, cmd: str, v2: bool, merge: bool, env: dict[str, str]) -> None:
        """Run a command: its output to the host until both pipes end (as adbd), then the exit packet (v2)."""
        proc = self._popen(cmd, merge, env)
        if (delay := self.drop_during_shell_after) is not None and (self.drop_matching or "") in cmd:
            self.spawn(self._unplug, f"{delay} s into {cmd!r}", name="adb-peer-drop", delay=delay)
        stream.on_end(lambda: _hang_up(proc))
        pumps = [self.spawn(_pump, stream, proc.stdout, _STDOUT if v2 else None, name="adb-peer-stdout")]
        if proc.stderr is not None:
            pumps.append(self.spawn(_pump, stream, proc.stderr, _STDERR, name="adb-peer-stderr"))
        self.spawn(_feed_stdin, stream, proc.stdin, v2, name="adb-peer-stdin")
        for t in pumps:
            t.join()
        rc = proc.wait()
        with self._lock:
            self._procs.discard(proc)
        if v2:
            stream.write(_packet(_EXIT, bytes([(128 - rc if rc < 0 else rc) & 0xFF])))

    def _sync(self, stream: _Stream) -> None:
        while True:
            rid, n = _REQ.unpack(stream.read(8))
            if n > 1024:
                _sync_fail(stream, "path too long")
                return
            path = stream.read(n).decode("utf-8", "surrogateescape")
            log.debug("adb test peer %s: sync %s %r", self.serial, rid.decode(errors="replace"), path)
            if rid == b"STAT":
                st = _lstat(self.host_path(path))  # stat_v1: mode, size, mtime; all 0 when it is missing
                v1 = (st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime)) if st else (0, 0, 0)
                stream.write(struct.pack("<4sIII", rid, *v1))
            elif rid in (b"STA2", b"LST2"):
                stream.write(_stat2(rid, self.host_path(path), follow=rid == b"STA2"))
            elif rid in (b"LIST", b"LIS2"):
                stream.write(_listing(self.host_path(path), v2=rid == b"LIS2"))
            elif rid == b"SEND":
                if not self._sync_send(stream, path):
                    return  # adbd ends the sync service after a failed SEND or RECV
            elif rid == b"RECV":
                if not _sync_recv(stream, self.host_path(path)):
                    return
            elif rid == b"QUIT":
                return
            else:
                _sync_fail(stream, f"unknown command {int.from_bytes(rid, 'little'):08x}")
                return

    def _count_sync(self, n: int) -> None:
        with self._lock:
            self._sync_bytes += n
            drop = self._drop_after is not None and self._sync_bytes >= self._drop_after
        if drop:
            self._unplug(f"after {self._sync_bytes} bytes of sync data")
            raise EOFError("unplugged")

    def _sync_send(self, stream: _Stream, spec: str) -> bool:
        """SEND "path,mode", DATA..., DONE(mtime) -> OKAY; or FAIL with adbd's text, the rest read and dropped."""
        path, comma, mode_text = spec.rpartition(",")
        if not comma:
            return _sync_fail(stream, "missing , in ID_SEND_V1")
        mode = int(mode_text, 8) if mode_text[:1] == "0" and mode_text.isdigit() else int(mode_text, 0)  # strtoul
        host, fd, error = self.host_path(path, write=True), None, None
        if stat.S_ISLNK(mode):
            return self._send_link(stream, host)
        mode &= 0o777
        mode |= (mode >> 3) & 0o070  # as adbd: the user bits copied to group, then group to other
        mode |= (mode >> 3) & 0o007
        if self._is_read_only(path):
            error = "couldn't create file: Read-only file system"
        else:
            try:
                fd = _create(host, mode)
            except OSError as e:
                error = f"{e.filename}: {e.strerror}"  # _create names adbd's step in filename
        created = fd is not None
        if error:
            _sync_fail(stream, error)
        while True:
            did, size = _REQ.unpack(stream.read(8))
            if did != b"DATA" or size > SYNC_DATA_MAX:
                break
            data = stream.read(size)
            self._count_sync(size)
            try:
                if fd is not None:
                    _write_all(fd, data)
            except OSError as e:  # ENOSPC, EIO...: FAIL now, then read the rest and drop it (as adbd)
                error = f"write failed: {e.strerror}"
                _sync_fail(stream, error)
                os.close(fd)
                fd = None
        if fd is not None:
            os.close(fd)
        if did != b"DONE" and not error:
            error = "invalid data message" if did != b"DATA" else "oversize data message"
            _sync_fail(stream, error)
        if error:
            if created:
                host.unlink(missing_ok=True)
            return False
        os.utime(host, (size, size), follow_symlinks=False)  # DONE's length field is the mtime
        stream.write(_REQ.pack(b"OKAY", 0))
        return True

    def _send_link(self, stream: _Stream, host: Path) -> bool:
        did, size = _REQ.unpack(stream.read(8))
        target = stream.read(size).rstrip(b"\0")
        done, _mtime = _REQ.unpack(stream.read(8))
        if did != b"DATA" or done != b"DONE":
            return _sync_fail(stream, "invalid data message")
        try:
            host.parent.mkdir(parents=True, exist_ok=True)
            host.unlink(missing_ok=True)
            os.symlink(target, host)
        except OSError as e:
            return _sync_fail(stream, f"symlink failed: {e.strerror}")
        stream.write(_REQ.pack(b"OKAY", 0))
        return True


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _relay_in(stream: _Stream, sock: socket.socket) -> None:
    """The host's bytes of a forwarded connection to the device-side socket."""
    try:
        while data := stream.read():
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except (EOFError, OSError):
        _shut(sock)


def _packet(kind: int, data: bytes) -> bytes:
    return struct.pack("<BI", kind, len(data)) + data


def _hang_up(proc: subprocess.Popen) -> None:
    """The host went away: SIGHUP to the command, as adbd does (then its stdin ends and its output pipes close)."""
    with contextlib.suppress(OSError):
        proc.send_signal(signal.SIGHUP)


def _pump(stream: _Stream, pipe, kind: int | None) -> None:
    """A command's stdout or stderr to the host: shell v2 packets of ``kind``, or raw bytes (``kind`` None)."""
    try:
        while chunk := pipe.read(min(stream.conn.maxdata - 5, SYNC_DATA_MAX)):
            stream.write(chunk if kind is None else _packet(kind, chunk))
    except (EOFError, OSError):
        pass  # the host is gone: the pipe closes and a command that writes on gets SIGPIPE, as with adbd
    finally:
        pipe.close()


def _feed_stdin(stream: _Stream, pipe, v2: bool) -> None:
    """The host's input to a command: shell v2 stdin and close-stdin packets, or the raw bytes."""
    try:
        while True:
            if v2:
                kind, size = struct.unpack("<BI", stream.read(5))
                data = stream.read(size)
                if kind == _CLOSE_STDIN:
                    break
                if kind != _STDIN:
                    continue  # window-size-change: no pty here
            elif not (data := stream.read()):
                break
            with contextlib.suppress(BrokenPipeError):
                pipe.write(data)
    except (EOFError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError):
            pipe.close()


def _sync_fail(stream: _Stream, message: str) -> bool:
    data = message.encode()
    stream.write(_REQ.pack(b"FAIL", len(data)) + data)
    return False


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def _fields(st: os.stat_result) -> list[int]:
    """dev, ino, mode, nlink, uid, gid, size, atime, mtime, ctime: the stat_v2 / dent_v2 fields."""
    return [st.st_dev, st.st_ino, st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size,
            int(st.st_atime), int(st.st_mtime), int(st.st_ctime)]


def _stat2(rid: bytes, path: Path, follow: bool) -> bytes:
    try:
        return _STAT2.pack(rid, 0, *_fields(os.stat(path, follow_symlinks=follow)))
    except OSError as e:
        return _STAT2.pack(rid, e.errno or errno.EIO, *([0] * 10))


def _listing(path: Path, v2: bool) -> bytes:
    """The LIST / LIS2 answer: a DENT / DNT2 per entry (. and .. included, as readdir gives them), then DONE."""
    out = bytearray()
    try:
        names = [".", "..", *sorted(os.listdir(path))]
    except OSError:
        names = []
    for name in names:
        raw, st = os.fsencode(name), _lstat(path / name)
        if v2:
            out += _DENT2.pack(b"DNT2", 0 if st else errno.ENOENT, *(_fields(st) if st else [0] * 10), len(raw)) + raw
        elif st:
            out += _DENT1.pack(b"DENT", st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime), len(raw)) + raw
    return bytes(out + (_DENT2.pack(b"DONE", *([0] * 12)) if v2 else _DENT1.pack(b"DONE", 0, 0, 0, 0)))


def _create(host: Path, mode: int) -> int:
    """Open a SEND target as adbd does: a regular file is replaced, missing parents are made; an OSError's filename
    is adbd's name of the step that failed."""
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.lstat(host).st_mode) or host.is_symlink():
            host.unlink()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(host, flags, mode)
    except FileNotFoundError:
        try:
            host.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, e.strerror, "secure_mkdirs failed") from e
        fd = _create_fd(host, flags, mode)
    except FileExistsError:
        fd = _create_fd(host, os.O_WRONLY | os.O_CLOEXEC, mode)
    except OSError as e:
        raise OSError(e.errno, e.strerror, "couldn't create file") from e
    with contextlib.suppress(OSError):
        os.fchmod(fd, mode)
    return fd


def _create_fd(host: Path, flags: int, mode: int) -> int:
    try:
        return os.open(host, flags, mode)
    except OSError as e:
        raise OSError(e.errno, e.strerror, "couldn't create file") from e


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _sync_recv(stream: _Stream, host: Path) -> bool:
    """RECV: DATA chunks (64 KiB with their header, as adbd), then DONE; or FAIL with adbd's text."""
    try:
        fd = os.open(host, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return _sync_fail(stream, f"open failed: {e.strerror}")
    try:
        while chunk := os.read(fd, SYNC_DATA_MAX - _REQ.size):
            stream.write(_REQ.pack(b"DATA", len(chunk)) + chunk)
    except OSError as e:
        return _sync_fail(stream, f"read failed: {e.strerror}")
    finally:
        os.close(fd)
    stream.write(_REQ.pack(b"DONE", 0))
    return True


class AdbServer:
    """The real adb server on a private port (``ANDROID_ADB_SERVER_PORT``), its keys and log under ``home``.

    ``start()`` runs ``adb start-server``; ``run(*args, serial=)`` runs the real ``adb`` client against it;
    ``connect(device, state)`` runs ``adb connect`` and waits for the state; ``env()`` is what another program needs
    in its environment to use this server; ``kill()`` runs ``adb kill-server`` and makes sure the server is gone.
    """

    def __init__(self, home: Path, adb: str = "adb"):
        self.home = Path(home)
        self.adb = shutil.which(adb) or adb
        self.port = free_port()

    def env(self) -> dict[str, str]:
        return {"ANDROID_ADB_SERVER_PORT": str(self.port)}

    def run(self, *args: str, serial: str | None = None, **kwargs) -> subprocess.CompletedProcess:
        """``adb [-s SERIAL] ARGS`` (output captured, stdin /dev/null unless ``input=``, 60 s timeout unless told)."""
        kwargs.setdefault("stdin", None if "input" in kwargs else subprocess.DEVNULL)
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("timeout", 60)
        env = {**os.environ, "HOME": str(self.home), "TMPDIR": str(self.home), **self.env(), **kwargs.pop("env", {})}
        env.pop("ANDROID_SERIAL", None)
        return subprocess.run([self.adb, *(["-s", serial] if serial else []), *args], env=env, **kwargs)

    def start(self) -> AdbServer:
        self.home.mkdir(parents=True, exist_ok=True)
        r = self.run("start-server", text=True)
        if r.returncode != 0:
            raise RuntimeError(f"adb start-server failed ({r.returncode}): {r.stdout}{r.stderr}")
        atexit.register(self.kill)
        return self

    def state(self, serial: str) -> str | None:
        """The state ``adb devices`` shows for ``serial`` (device, offline, unauthorized...); None: not listed."""
        for line in self.run("devices", text=True).stdout.splitlines()[1:]:
            if line.split()[:1] == [serial]:
                return line.split()[1]
        return None

    def connect(self, device: AdbDevice, state: str = "device", timeout: float = 20) -> None:
        """``adb connect`` the device, then wait until ``adb devices`` shows it in ``state``."""
        r = self.run("connect", device.serial, text=True)
        deadline = time.monotonic() + timeout
        while (now := self.state(device.serial)) != state:
            if time.monotonic() > deadline:
                raise RuntimeError(f"adb connect {device.serial}: {now!r}, not {state!r}: {r.stdout}{r.stderr}")
            time.sleep(0.02)

    def pids(self) -> list[int]:
        """The pids of this server (its command line names its private port)."""
        out = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if b"fork-server" in argv and f"tcp:{self.port}".encode() in argv:
                    out.append(int(entry))
        return out

    def kill(self) -> None:
        """``adb kill-server``; a server that does not go within 5 s is killed."""
        atexit.unregister(self.kill)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.run("kill-server", timeout=10)
        deadline = time.monotonic() + 5
        while pids := self.pids():
            for pid in pids if time.monotonic() > deadline else []:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)

    def __enter__(self) -> AdbServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
