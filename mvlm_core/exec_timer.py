"""``mvlm-time``: the device-side helper that runs one benchmark binary and reports what the kernel says it cost.

``mvlm-time PROGRAM [ARGS...]`` forks, execs PROGRAM, waits for it with ``wait4`` and then prints, on stderr, two
marker lines: ``__MVLM_WALL_NS__=N`` (CLOCK_MONOTONIC from just before the fork to the child's exit, read on the
device) and ``__MVLM_PEAK_RSS_KB__=N`` (the child's ``ru_maxrss``). It exits with the child's status unchanged: the
same code, or the same signal (re-raised with core dumps off). Nothing runs beside the binary: no poller, no shell.
When the exec itself fails it prints ``__MVLM_EXEC_FAILED__=errno`` and exits 127, so the caller can fall back to
sampling (a device that cannot run the helper's child, e.g. an emulated one without binfmt).

It is compiled per device kind, once, into the cache (``$MVLM_CACHE/tools/``), keyed by its source and compiler:
the host's C compiler for this machine (``host``, ``cuda``; and for emulated devices, whose processes run here under
qemu), Debian's ``aarch64-linux-gnu-gcc -static`` for ``linux-arm64`` and ``android-arm64`` (an NDK's clang when one is
given). ``orin`` is built on the board: no helper, the sampling wrapper is used there and the record says so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from mvlm_core.atomic import temporary_for

NAME = "mvlm-time"
WALL_MARKER = "__MVLM_WALL_NS__="
EXEC_FAILED_MARKER = "__MVLM_EXEC_FAILED__="

SOURCE = r"""/* mvlm-time: run PROGRAM, wait4 it, report its wall time and ru_maxrss; exit with its status. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile pid_t child = 0;

static void forward(int sig) { if (child > 0) kill(child, sig); }

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: mvlm-time PROGRAM [ARGS...]\n"); return 2; }
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) { perror("mvlm-time: pipe"); return 126; }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = forward;
    int sigs[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT};
    for (unsigned i = 0; i < sizeof sigs / sizeof *sigs; i++) sigaction(sigs[i], &sa, NULL);
    long long t0 = now_ns();
    child = fork();
    if (child < 0) { perror("mvlm-time: fork"); return 126; }
    if (child == 0) {
        close(fds[0]);
        /* a path is exec'd as it is: execvp would hand a file the kernel refused (ENOEXEC) to /bin/sh as a script */
        if (strchr(argv[1], '/')) execv(argv[1], argv + 1); else execvp(argv[1], argv + 1);
        int e = errno;
        (void)!write(fds[1], &e, sizeof e);
        _exit(127);
    }
    close(fds[1]);
    int exec_errno = 0;
    ssize_t got = read(fds[0], &exec_errno, sizeof exec_errno); /* EOF: the exec succeeded (CLOEXEC) */
    close(fds[0]);
    int status = 0;
    struct rusage ru;
    pid_t w;
    do { w = wait4(child, &status, 0, &ru); } while (w < 0 && errno == EINTR);
    long long wall = now_ns() - t0;
    if (w < 0) { perror("mvlm-time: wait4"); return 126; }
    if (got == (ssize_t)sizeof exec_errno) {
        fprintf(stderr, "\nmvlm-time: cannot run %s: %s\n__MVLM_EXEC_FAILED__=%d\n", argv[1], strerror(exec_errno),
                exec_errno);
        return 127;
    }
    fprintf(stderr, "\n__MVLM_WALL_NS__=%lld\n__MVLM_PEAK_RSS_KB__=%ld\n", wall, ru.ru_maxrss);
    fflush(stderr);
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        struct rlimit none = {0, 0};
        setrlimit(RLIMIT_CORE, &none);
        signal(sig, SIG_DFL);
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, sig);
        sigprocmask(SIG_UNBLOCK, &set, NULL);
        raise(sig);
        return 128 + sig;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 126;
}
"""


def compiler_for(target: str, ndk: Path | None = None) -> list[str] | None:
    """The compiler command (without the output and source) that builds the helper for ``target``; None: none here."""
    if target in ("host", "cuda"):  # static: it also runs on another Linux of this architecture (an ssh box)
        cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        return [cc, "-O2", "-static"] if cc else None
    if target == "android-arm64" and ndk is not None:
        clang = Path(ndk) / "toolchains/llvm/prebuilt/linux-x86_64/bin/aarch64-linux-android28-clang"
        return [str(clang), "-O2", "-static"] if clang.is_file() else None
    if target in ("linux-arm64", "android-arm64"):
        cc = shutil.which("aarch64-linux-gnu-gcc")
        return [cc, "-O2", "-static"] if cc else None
    return None


def for_device(target: str, emulated_here: bool) -> Path | None:
    """The helper a device runs: this machine's own for an emulated device whose processes run here under qemu (it
    times the emulator's process, as GNU time would), else the one for the device's target."""
    return build("host" if emulated_here else target)


def build(target: str, ndk: Path | None = None) -> Path | None:
    """The helper for ``target`` (compiled into the cache once per source and compiler); None when this machine has
    no compiler for it, or the compiler failed (the caller samples instead and says so)."""
    return build_tool(NAME, SOURCE, target, ndk)


def build_tool(name: str, source: str, target: str, ndk: Path | None = None) -> Path | None:
    """A one-file C tool ``name`` for ``target``, compiled into ``$MVLM_CACHE/tools/`` once per source and compiler
    (static); None when this machine has no compiler for the target, or the compiler failed."""
    from mvlm_core.cache import cache_root

    cc = compiler_for(target, ndk)
    if cc is None:
        return None
    key = hashlib.sha256(("\0".join([source, *cc])).encode()).hexdigest()[:16]
    out = cache_root() / "tools" / f"{name}-{target}-{key}"
    if out.is_file() and os.access(out, os.X_OK):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.with_suffix(".c")
    src.write_text(source)
    tmp = temporary_for(out)
    try:
        r = subprocess.run([*cc, "-o", str(tmp), str(src)], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            return None
        tmp.chmod(0o755)
        tmp.replace(out)
    except (OSError, subprocess.TimeoutExpired):
        return None
    finally:
        tmp.unlink(missing_ok=True)
    return out
