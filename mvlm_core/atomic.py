"""Outputs committed together: every file of one command is written under a temporary name and renamed at the end.

A command that writes several files (convert: LM + mmproj; quantize: one file per type; bench: JSON + Markdown +
CSV reports) must never leave a mix of new and old files, nor lose an earlier good file when a later one fails.
``AtomicOutputs`` hands out a temporary path per final path (same directory, so the rename is atomic), and only
when every file is complete renames them all, one after the other. Until then the earlier files are untouched;
on any failure (an exception, Ctrl-C, or SIGTERM: the CLI turns it into ``SystemExit``) the temporaries go.

``check_output_path`` refuses an output path that would destroy an input (``--json m.gguf`` for the model), or that
is not a regular file (a device, FIFO, socket, directory, or ``dir/``).

Temporary names look like ``.<final name>.<pid>.<random>.tmp``; :func:`is_temporary` recognises them. Each is
created exclusively and never through a link (``O_CREAT|O_EXCL|O_NOFOLLOW``): a symbolic link planted at a temporary
name by anyone who can write to the output directory is never followed (the name is taken by a new random one).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Iterable, Iterator
from pathlib import Path

from mvlm_core.errors import MvlmError

TMP_SUFFIX = ".tmp"


def temporary_for(final: Path) -> Path:
    """A new temporary file for ``final``: hidden, in the same directory (so the rename is atomic), created empty and
    exclusively (never an existing file, never through a symbolic link). When the directory does not exist yet the
    name alone is returned (the caller's write then fails with its own error)."""
    import secrets

    for _ in range(100):
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue  # a name taken (a planted link, a file): draw another
        except OSError:
            return tmp
        os.close(fd)
        return tmp
    raise MvlmError(f"cannot create a temporary file next to {final}: every name tried exists")


def private_dir(final: Path) -> Path:
    """A new, empty directory next to ``final`` (hidden, ``.tmp`` suffix, mode 0700) to fill and then rename to
    ``final``: created by ``mkdtemp``, so never an existing directory nor a planted link."""
    import tempfile

    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=TMP_SUFFIX, dir=final.parent))


def open_fresh(path: Path, mode: str = "w", **kwargs):
    """``open(path, mode)`` for a file this process writes from the start (a log, a lock): whatever is at ``path``
    (an old file, a planted link) is removed first and the file created exclusively, never through a link. Mode
    ``a`` keeps an existing regular file (a lock) but still refuses a link."""
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_RDWR if "+" in mode else os.O_WRONLY)
    if mode.startswith("a"):
        flags |= os.O_APPEND
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        raise MvlmError(f"cannot create {path}: {e.strerror or e} (a link or another file is in the way: remove it "
                        "and retry)") from None
    return os.fdopen(fd, mode, **kwargs)


def is_temporary(p: Path) -> bool:
    return p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC, or numpy's short write, which carries no errno (``N requested and M written``)."""
    if not isinstance(e, OSError):
        return False
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    msg = str(e)
    return e.errno is None and "requested and" in msg and "written" in msg


class AtomicOutputs:
    """Temporary paths for a command's outputs, renamed together by :meth:`commit`.

    Use as a context manager: leaving the block with an exception removes every temporary; leaving it normally
    without ``commit()`` also removes them (nothing half-done is ever renamed)::

        with AtomicOutputs() as out:
            write_lm(out.path(lm_final))
            write_mmproj(out.path(mm_final))
            out.commit()
    """

    def __init__(self) -> None:
        self._pairs: list[tuple[Path, Path]] = []
        self.committed = False

    def path(self, final: str | Path) -> Path:
        """Reserve ``final``; returns the temporary path to write instead."""
        final = Path(final)
        for f, tmp in self._pairs:
            if f.resolve() == final.resolve():
                return tmp
        tmp = temporary_for(final)
        self._pairs.append((final, tmp))
        return tmp

    @property
    def finals(self) -> list[Path]:
        return [f for f, _ in self._pairs]

    def commit(self) -> list[Path]:
        """Rename every temporary over its final name; all must exist. Returns the final paths."""
        missing = [str(t) for _, t in self._pairs if not t.exists()]
        if missing:
            raise RuntimeError(f"commit before every output was written: {', '.join(missing)}")
        for _, tmp in self._pairs:
            fsync_path(tmp)
        # The renames are not interrupted half-way (new LM next to an old mmproj): Ctrl-C / SIGTERM arriving now
        # is held back and delivered once every file has its final name.
        with _signals_held():
            for final, tmp in self._pairs:
                os.replace(tmp, final)
            self.committed = True
        if self._pairs:
            fsync_path(self._pairs[0][0].parent)
        return self.finals

    def abort(self) -> None:
        for _, tmp in self._pairs:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass

    def __enter__(self) -> AtomicOutputs:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.abort()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Block SIGINT/SIGTERM for this thread while the block runs (no-op where pthread_sigmask is missing)."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def fsync_path(p: Path) -> None:
    """Flush a file's data, or a directory's entries (after renames), to disk; best effort (some filesystems refuse)."""
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(final: str | Path, text: str) -> Path:
    """One text file, written to a temporary name and renamed when complete (disk full -> one clear error)."""
    final = Path(final)
    with AtomicOutputs() as out:
        tmp = out.path(final)
        try:
            tmp.write_text(text)
        except OSError as e:
            if is_disk_full(e):
                raise MvlmError(f"disk full while writing {final}: free space and retry (nothing was written)") from e
            raise MvlmError(f"cannot write {final}: {e.strerror or e}") from e
        out.commit()
    return final


GGUF_MAGIC = b"GGUF"


def is_gguf(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_small(path: Path, limit: int, what: str, option: str = "") -> bytes:
    """A small input file's bytes (a device profile, a key file), bounded: only a regular file (opened without
    blocking: a FIFO cannot hang the command; /dev/zero is no file), at most ``limit`` bytes; else one line naming
    ``what`` it should be (and the ``option`` it came from)."""
    import stat

    said = f"{option} {path}:" if option else f"{path}:"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise MvlmError(f"{said} cannot be read ({e.strerror or e}); give {what}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MvlmError(f"{said} is {file_kind(Path(path))}, not a regular file; give {what}")
        chunks, size = [], 0
        while size <= limit:  # a file that grows while read is still read no further than the limit
            b = os.read(fd, min(limit + 1 - size, 1 << 20))
            if not b:
                break
            chunks.append(b)
            size += len(b)
        if max(size, st.st_size) > limit:
            raise MvlmError(f"{said} is {max(size, st.st_size)} bytes, more than the {limit} of {what} (is it the right "
                            "file?)")
        return b"".join(chunks)
    except OSError as e:
        raise MvlmError(f"{said} cannot be read ({e.strerror or e}); give {what}") from None
    finally:
        os.close(fd)


def file_kind(p: Path) -> str:
    """What an existing path that is not a regular file is, in words (for one-line errors)."""
    import stat

    try:
        mode = p.stat().st_mode
    except OSError as e:
        return e.strerror or "unreadable"
    for test, word in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word
    return "not a regular file"


SQLITE_MAGIC = b"SQLite format 3\x00"


def _starts_with(p: Path, magic: bytes) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def check_output_path(out: str | Path, inputs: Iterable[str | Path | None] = (), *, option: str = "output",
                      history: bool = False) -> Path:
    """Refuse an output path that is one of the command's inputs, an existing GGUF (a model, most likely), an existing
    SQLite file (a benchmark history) unless ``history`` (the path is one: then anything else that is not empty is
    refused), or anything an output file cannot replace: an existing directory, device, FIFO or socket (``--json
    /dev/full`` would replace the device node; a FIFO would block the command forever), a path written with a trailing
    slash (``dir/``), an empty path, a symbolic link (an output is renamed over its path: ``--json-file /dev/stdout``
    would replace /dev's link with a file; a history is opened through one), a link loop, a name too long for the file
    system.

    Catches the same file under another name too (hard links, symlinks, ``./m.gguf`` vs ``m.gguf``). Nothing is opened
    but to read a magic number. Give the option's text as a ``str`` so that a trailing slash can be seen (``Path``
    drops it).
    """
    if isinstance(out, str) and not out.strip():
        raise MvlmError(f"{option} is empty: give a file path (an unset variable in a script?)")
    if str(out) == "-":
        raise MvlmError(f"{option} -: outputs go to files here, '-' is not stdout; give a file path"
                        + (" (--json prints the JSON report on stdout)" if option == "--json-file" else ""))
    if isinstance(out, str) and out.endswith(("/", os.sep)) and out.strip("/" + os.sep):
        raise MvlmError(f"{option} {out} ends with '/': that names a directory; give a file path (e.g. {out}report)")
    out = Path(out)
    try:
        _check_output(out, inputs, option, history)
    except (OSError, RuntimeError) as e:  # a link loop (ELOOP / RuntimeError), a name too long, an unreadable parent
        why = getattr(e, "strerror", None) or ("a symbolic link loop" if isinstance(e, RuntimeError) else str(e))
        raise MvlmError(f"{option} {str(out)[:200]}: cannot be used as an output ({why}); give another path") from None
    return out


def _check_output(out: Path, inputs: Iterable[str | Path | None], option: str, history: bool) -> None:
    if not history and out.is_symlink():  # an output is renamed over its path: the link, not its target, is replaced
        target = os.readlink(out)
        raise MvlmError(f"{option} {out} is a symbolic link (to {target}): an output would replace the link itself, not "
                        f"write to {target}; give the real path")
    exists = os.path.lexists(out) and out.exists()
    if os.path.lexists(out) and not exists:
        os.stat(out)  # a dangling link (a history's): a loop raises ELOOP here
    if exists and out.is_dir():
        raise MvlmError(f"{option} {out} is a directory; give a file path")
    if exists and not out.is_file():
        raise MvlmError(f"{option} {out} is {file_kind(out)}, not a regular file; an output would replace it: give the path "
                        "of a regular file")
    for i in inputs:
        if i is None:
            continue
        ip = Path(i)
        try:
            same = exists and ip.exists() and os.path.samefile(out, ip)
        except OSError:
            same = False
        if same or out.resolve() == ip.resolve():
            raise MvlmError(f"{option} {out} is also an input of this command; it would be overwritten: choose another path")
    if exists and (out.suffix.lower() == ".gguf" or is_gguf(out)):
        raise MvlmError(f"{option} {out} is an existing GGUF model; refusing to overwrite it: choose another path")
    if exists and not history and _starts_with(out, SQLITE_MAGIC):
        raise MvlmError(f"{option} {out} is a SQLite file (a benchmark history?); refusing to overwrite it: choose "
                        "another path")
    if exists and history and out.stat().st_size and not _starts_with(out, SQLITE_MAGIC):
        raise MvlmError(f"{option} {out} is not a SQLite benchmark history (it is another kind of file); give the "
                        "history's path, or a new one")


def check_writable(out: Path, option: str) -> None:
    """An output can be made at ``out``: a file is created (exclusively) in its directory, or the nearest existing one,
    and removed. Refused in one line before anything is measured (a read-only directory, /proc, a full quota)."""
    parent = out.resolve().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    probe = temporary_for(parent / out.name)
    try:
        if not probe.exists():
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.close(fd)
        probe.unlink()
    except OSError as e:
        raise MvlmError(f"{option} {out}: cannot create it in {parent} ({e.strerror or e}); choose another path") from None
