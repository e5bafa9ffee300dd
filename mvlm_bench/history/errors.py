"""History errors as one line (what is wrong with the file or database, and what to do), and where the history is by
default."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from mvlm_bench.history.locations import location, mask_url, one_line
from mvlm_core.errors import MvlmError

DEFAULT_DB_NAME = "mvlm-history.sqlite"
DEFAULT_LOCK_TIMEOUT_S = 5.0


class HistoryError(MvlmError):
    """A history file that cannot be used: ``what`` is wrong with it, ``todo`` is what to do (message: both)."""

    def __init__(self, what: str, todo: str = "pass another --db", *, exit_code: int | None = None):
        super().__init__(f"{what}: {todo}", exit_code=exit_code)
        self.what, self.todo = what, todo


def lock_timeout() -> float:
    """Seconds to wait for another process's lock: ``$MVLM_HISTORY_LOCK_TIMEOUT`` or 5."""
    try:
        v = float(os.environ.get("MVLM_HISTORY_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT_S))
    except ValueError:
        return DEFAULT_LOCK_TIMEOUT_S
    return v if math.isfinite(v) and v >= 0 else DEFAULT_LOCK_TIMEOUT_S


def writable_dir(d: Path) -> bool:
    return d.is_dir() and os.access(d, os.W_OK | os.X_OK)


def db_error(path: Path, exc: BaseException, doing: str = "reading") -> HistoryError:
    """A SQLite (or OS) error on the history file as one line: what is wrong with the file and what to do."""
    msg = str(exc) or type(exc).__name__
    low = msg.lower()
    try:
        is_dir = path.is_dir()
    except OSError:
        is_dir = False
    if is_dir:
        return HistoryError(f"{path} is a directory, not a benchmark history",
                            f"pass a file, e.g. --db {path / DEFAULT_DB_NAME}")
    if "not a database" in low or "encrypted" in low:
        return HistoryError(f"{path} is not a readable SQLite benchmark history (file is not a database)",
                            "move the file aside (the next --save starts a new history) or pass another --db")
    if "malformed" in low or "corrupt" in low:
        return HistoryError(f"{path} is damaged ({msg})",
                            f"restore it from a backup or move the file aside (`sqlite3 {path} .recover` may rescue its "
                            "rows), or pass another --db")
    if "locked" in low or "busy" in low:
        return HistoryError(f"{path} is locked by another process (waited {lock_timeout():g} s)",
                            "run again when that process is done (or raise $MVLM_HISTORY_LOCK_TIMEOUT), "
                            "or pass another --db")
    if "readonly" in low or "read-only" in low:
        return HistoryError(f"{path} is read-only ({msg})",
                            "make the file and its directory writable, or pass another --db")
    if "disk is full" in low or "no space" in low or getattr(exc, "errno", None) == 28:
        return HistoryError(f"the disk holding {path} is full ({msg})", "free space and run again, or pass another --db",
                            exit_code=28)
    if "unable to open" in low or "cannot open" in low:
        if not writable_dir(path.parent):
            verb = "create" if not path.exists() else "write" if doing == "writing" else "open"
            return HistoryError(f"cannot {verb} {path}: its directory {path.parent} is not writable",
                                "make it writable or pass another --db")
        return HistoryError(f"cannot open {path} ({msg})", "check the path and its permissions, or pass another --db")
    if "disk i/o" in low or isinstance(exc, OSError):
        return HistoryError(f"I/O error on {path} ({msg})", "check the disk it is on, or pass another --db")
    if "no such table" in low or "no such column" in low or isinstance(exc, (KeyError, ValueError, TypeError)):
        return HistoryError(f"{path} is damaged or not an mvlm benchmark history ({type(exc).__name__}: {msg})",
                            "restore it from a backup or pass another --db")
    return HistoryError(f"SQLite error while {doing} {path} ({msg})", "pass another --db")


def pg_error(url: str, exc: BaseException, doing: str = "reading") -> HistoryError:
    """A psycopg (or decoding) error on a PostgreSQL history as one line; the URL's password is never shown."""
    where = mask_url(url)
    msg = one_line(str(exc) or type(exc).__name__, url)
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if doing == "connecting":
        if "invalid" in msg.lower() and ("dsn" in msg.lower() or "connection option" in msg.lower()
                                         or "uri" in msg.lower()):
            return HistoryError(f"{where} is not a usable PostgreSQL URL ({msg})",
                                "write it as postgresql://user@host:port/database, or pass another --db")
        lines = [one_line(ln, url) for ln in str(exc).splitlines() if ln.strip()] or [msg]
        reason = re.sub(r"^connection failed:\s*", "", ": ".join(lines))
        reason = re.sub(r'^connection to server at "[^"]*"(?:\s*\([^)]*\))?, port \d+ failed:\s*', "", reason)
        return HistoryError(f"cannot connect to {where}: {reason}",
                            "start the server or fix the URL (host, port, user, database), or pass another --db")
    if sqlstate == "53100":
        return HistoryError(f"the disk of the PostgreSQL server holding {where} is full ({msg})",
                            "free space on the server and run again, or pass another --db", exit_code=28)
    if sqlstate == "55P03":  # lock_timeout: another session holds a lock on the tables
        return HistoryError(f"{where} is locked by another session (waited {lock_timeout():g} s)",
                            "run again when it is done (or raise $MVLM_HISTORY_LOCK_TIMEOUT), or pass another --db")
    if sqlstate.startswith("42501") or "permission denied" in msg.lower():
        return HistoryError(f"{where}: permission denied ({msg})",
                            "grant the user CREATE, SELECT and INSERT on the database, or pass another --db")
    if sqlstate in ("42P01", "42703") or isinstance(exc, (KeyError, ValueError, TypeError)):
        return HistoryError(f"{where} is damaged or not an mvlm benchmark history ({type(exc).__name__}: {msg})",
                            "restore it from a backup or pass another --db")
    if sqlstate.startswith("08") or sqlstate.startswith("57") or "connection" in msg.lower():
        return HistoryError(f"lost the connection to {where} while {doing} ({msg})",
                            "check the server and run again, or pass another --db")
    return HistoryError(f"PostgreSQL error while {doing} {where} ({msg})", "pass another --db")


def default_db_path() -> Path | str:
    """``$MVLM_HISTORY`` (a file as a Path, a PostgreSQL URL as written) or ``./mvlm-history.sqlite``."""
    env = os.environ.get("MVLM_HISTORY")
    return location(env) if env else Path.cwd() / DEFAULT_DB_NAME
