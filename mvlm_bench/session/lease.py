"""Device leases: two benchmarks on one device never measure at the same time.

``mvlm bench`` holds a lease on the device from before it pushes its files to its last measured run (the push is
covered: device files are keyed by name, and a push's I/O would disturb a measurement). Two kinds:

- **PostgreSQL advisory lock**, when the history is PostgreSQL (``--db postgresql://...`` or ``$MVLM_HISTORY``): the
  lease is ``pg_advisory_lock`` on a 64-bit hash of the device's identity, taken on a connection of its own, so every
  process on every host that shares the history sees it. It is released when the bench ends, and by the server when
  the process dies (its connection closes). The holder is named in that connection's ``application_name``
  (``mvlm bench pid N on HOST since HH:MM:SS``), which a waiter reads from ``pg_locks`` / ``pg_stat_activity``.
  The holder checks after each run that it still holds it (``info["check"]``): a dropped connection released it.
- **A lock file** (``fcntl.flock``) under ``<cache>/leases/`` otherwise (a SQLite history or none: one machine). The
  kernel releases it when the process dies; the holder writes who it is into the file for waiters to show.
- Every bench ALWAYS takes the lock file, and with a PostgreSQL history the advisory lock after it: a bench with a
  PostgreSQL history and one with a SQLite history (or none) on the same machine see each other, for local and
  remote devices alike (a bench on another host without the shared history cannot be seen: give every runner of a
  lab the same $MVLM_HISTORY).

The device's identity (:func:`device_key`) is *where the device is*, not the profile's name: ``local:<this host>`` for
every local profile (``local``, ``qemu-arm64`` and any other profile on this machine share its CPU, so they share
one lease), ``ssh:<host>[:port]`` (the user is left out: one board, whoever logs in; a profile and an ad hoc
``ssh://user@host`` for the same host collide, as they should), ``adb:<serial>``. Two names for one host (an alias
and its address) are two keys: use the same address in every profile of a device.

A bench waits up to ``--lease-timeout`` seconds (0: do not wait) and says whom it waits for; when the time is up it
stops with one line, exit status :data:`EXIT_BUSY`, and nothing measured.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mvlm_bench.plan.plan import check_timeout
from mvlm_core.errors import MvlmError

DEFAULT_TIMEOUT_S = 3600.0
MAX_TIMEOUT_S = 7 * 24 * 3600.0
EXIT_BUSY = 75  # EX_TEMPFAIL (sysexits.h): try again later
POLL_S = 0.2
SAY_EVERY_S = 1.0  # how often a waiter's on_wait is called


def is_postgres(db: str | os.PathLike | None) -> bool:
    return isinstance(db, str) and db.startswith(("postgresql://", "postgres://"))


def history_location(db: str | os.PathLike | None = None) -> str | None:
    """The history the bench shares with others: ``--db`` as given, else ``$MVLM_HISTORY`` (None: neither)."""
    if db is not None:
        return str(db)
    return os.environ.get("MVLM_HISTORY") or None


def device_key(profile) -> str:
    """The device's identity for its lease (see the module docstring): its transport kind says what it is."""
    from mvlm_bench.device.transports import transport_kinds

    kind = transport_kinds().get(profile.transport)
    return kind.lease_key(profile) if kind is not None else f"{profile.transport}:{profile.address or profile.name}"


def key_id(key: str) -> int:
    """A signed 64-bit number for ``pg_advisory_lock`` (the first 8 bytes of the key's sha256)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)


def lock_path(key: str) -> Path:
    from mvlm_core.runtime import cache_root

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_")[:60] or "device"
    return cache_root() / "leases" / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.lock"


def _holder_text(key: str) -> str:
    return json.dumps({"device": key, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})


def describe_holder(info: dict | None) -> str:
    """``held by pid N on HOST since HH:MM:SS`` from a holder record (the parts it has)."""
    if not info:
        return "held by another bench"
    bits = ["held by"]
    if info.get("pid"):
        bits.append(f"pid {info['pid']}")
    if info.get("host"):
        bits.append(f"on {info['host']}")
    if isinstance(info.get("since"), int | float):
        bits.append(f"since {time.strftime('%H:%M:%S', time.localtime(info['since']))}")
    elif info.get("since"):
        bits.append(f"since {info['since']}")
    return " ".join(bits) if len(bits) > 1 else "held by another bench"


def _busy(name: str, holder: str, waited: float, timeout: float) -> MvlmError:
    if timeout == 0:
        return MvlmError(f"device {name} is busy ({holder}) and --lease-timeout is 0: nothing was measured; run again "
                         "when it is free, or give --lease-timeout SECONDS to wait", exit_code=EXIT_BUSY)
    return MvlmError(f"device {name} is still busy after {waited:.0f} s ({holder}): nothing was measured; run again "
                     "later or raise --lease-timeout", exit_code=EXIT_BUSY)


def _wait(try_acquire: Callable[[], bool], holder: Callable[[], str], name: str, timeout: float,
          on_wait: Callable[[str], None] | None) -> float:
    """Try until acquired or ``timeout`` passed; returns the seconds waited."""
    start = time.monotonic()
    said = -SAY_EVERY_S
    while True:
        if try_acquire():
            return time.monotonic() - start
        waited = time.monotonic() - start
        if waited >= timeout:
            raise _busy(name, holder(), waited, timeout)
        if on_wait is not None and waited - said >= SAY_EVERY_S:
            said = waited
            on_wait(f"waiting for device {name}: {holder()} (waited {waited:.0f} s of {timeout:.0f})")
        time.sleep(min(POLL_S, max(0.01, timeout - waited)))


@contextlib.contextmanager
def _file_lease(key: str, name: str, timeout: float, on_wait, shared: bool = False) -> Iterator[dict]:
    path = lock_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise MvlmError(f"cannot create the lease file {path} for device {name}: {e.strerror or e}; check the "
                        "permissions of that directory ($MVLM_CACHE sets where it is)") from None

    def try_acquire() -> bool:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def holder() -> str:
        try:
            with open(path, encoding="utf-8") as f:
                return describe_holder(json.loads(f.read() or "null"))
        except (OSError, ValueError):
            return describe_holder(None)

    try:
        waited = _wait(try_acquire, holder, name, timeout, on_wait)
        text = _holder_text(key).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)
        yield {"kind": "file", "key": key, "path": str(path), "waited_s": waited, "check": lambda: None}
    finally:
        os.close(fd)  # releases the flock (the holder record stays; a waiter only reads it while the lock is held)


def _pg_message(exc: BaseException, url: str) -> str:
    """psycopg's message (its first line) with the URL's password scrubbed, however malformed the URL is."""
    from mvlm_bench.history.locations import scrub

    return scrub((str(exc).strip().splitlines() or [type(exc).__name__])[0], url)


@contextlib.contextmanager
def _pg_lease(url: str, key: str, name: str, timeout: float, on_wait, shared: bool = False) -> Iterator[dict]:
    import psycopg

    lock = key_id(key)
    since = time.strftime("%H:%M:%S")
    app = f"mvlm bench pid {os.getpid()} on {socket.gethostname()} since {since}"[:63]
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=10, application_name=app)
    except psycopg.Error as e:
        raise MvlmError(f"cannot reach the PostgreSQL history to lease device {name} ({_pg_message(e, url)}): check --db / "
                        "$MVLM_HISTORY and that the server is up", exit_code=3) from None
    hi, lo = (lock >> 32) & 0xFFFFFFFF, lock & 0xFFFFFFFF

    def try_acquire() -> bool:
        fn = "pg_try_advisory_lock_shared" if shared else "pg_try_advisory_lock"
        return bool(conn.execute(f"SELECT {fn}(%s)", (lock,)).fetchone()[0])

    def holder() -> str:
        row = conn.execute(
            "SELECT a.application_name, a.client_addr::text, a.backend_start FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
            "AND l.classid::bigint = %s AND l.objid::bigint = %s AND l.objsubid = 1 LIMIT 1", (hi, lo)).fetchone()
        if not row:
            return describe_holder(None)
        app_name, addr, _started = row
        return f"held by {app_name}" if app_name and app_name.startswith("mvlm bench") else \
            f"held by a session from {addr or 'this server'}"

    def check() -> None:
        """Raise when this session no longer holds the lock (its connection dropped: the server released it)."""
        try:
            row = conn.execute(
                "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid() "
                "AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 1", (hi, lo)).fetchone()
            why = "" if row else "the server no longer holds it for this bench"
        except psycopg.Error as e:
            why = f"the PostgreSQL connection was lost: {_pg_message(e, url)}"
        if why:
            raise MvlmError(f"the lease of device {name} was lost during the measurement ({why}); another bench may "
                            "have measured on it meanwhile, so these runs are not kept: run again", exit_code=3)

    try:
        waited = _wait(try_acquire, holder, name, timeout, on_wait)
        yield {"kind": "postgresql", "key": key, "lock_id": lock, "waited_s": waited, "check": check}
    except psycopg.Error as e:
        raise MvlmError(f"the PostgreSQL lease of device {name} failed ({_pg_message(e, url)}): run again",
                        exit_code=3) from None
    finally:
        conn.close()  # closing the session releases the advisory lock


@contextlib.contextmanager
def device_lease(device_key: str, db: str | os.PathLike | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 on_wait: Callable[[str], None] | None = None, name: str | None = None,
                 shared: bool = False) -> Iterator[dict]:
    """Hold the device's lease for the ``with`` block (see the module docstring); yields what was taken:
    ``{"kind": "postgresql"|"file", "key": ..., "waited_s": ...}``.

    ``db``: the history location (a ``postgresql://`` URL adds the advisory lock, taken after this machine's lock
    file; anything else, or None: the lock file alone). ``timeout``: seconds to wait (0: fail at once when busy);
    then ``MvlmError`` with exit status :data:`EXIT_BUSY`. ``on_wait(message)``: called about once a second while
    waiting. ``name``: the device as the messages call it (default: the key). The yielded ``check()`` raises (exit 3)
    when a remote device's advisory lock was lost meanwhile. ``shared``: held beside other shared holders (servers:
    ``mvlm serve``), never beside an exclusive one (a bench measuring)."""
    timeout = check_timeout(timeout)
    shown = name or device_key
    if not is_postgres(db):
        with _file_lease(device_key, shown, timeout, on_wait, shared) as info:
            yield info
        return
    # With PostgreSQL: this machine's lock file first (so benches here with other histories, or none, see this one),
    # then the advisory lock (benches on every host sharing the history).
    start = time.monotonic()
    with _file_lease(device_key, shown, timeout, on_wait, shared) as file_info:
        left = max(0.0, timeout - (time.monotonic() - start))
        with _pg_lease(str(db), device_key, shown, left, on_wait, shared) as info:
            # A device on this machine is no other host's to measure: its lock file alone keeps it, so a dropped
            # advisory lock loses nothing. A remote device could have been taken by another host meanwhile.
            check = file_info["check"] if device_key.startswith("local:") else info["check"]
            yield {**info, "path": file_info["path"], "waited_s": file_info["waited_s"] + info["waited_s"],
                   "check": check}


def profile_lease(profile, db: str | os.PathLike | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                  on_wait: Callable[[str], None] | None = None, shared: bool = False):
    """:func:`device_lease` for a device profile: its key, the history from ``db`` or ``$MVLM_HISTORY``."""
    return device_lease(device_key(profile), history_location(db), timeout, on_wait, name=profile.name, shared=shared)
