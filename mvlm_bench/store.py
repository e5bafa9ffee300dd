"""Where the benchmark history lives: the storage seam under :mod:`mvlm_bench.history`.

Two backends run the SAME SQL text: an embedded SQLite file (the default) and a shared PostgreSQL database
(``postgresql://user@host:port/db``, through psycopg 3: ``pip install 'mvlm[lab]'``). The history writes its queries
with ``?`` placeholders; :meth:`Store.execute` turns them into ``%s`` for psycopg. Schema text carries three type
tokens that :func:`ddl` fills per backend: ``{pk}`` (the entry id), ``{int}`` (a 64-bit integer) and ``{real}`` (a
double; PostgreSQL's ``REAL`` is only 4 bytes).

A location is a path or a URL; ``--db`` is a ``pathlib.Path`` in the CLI, which folds ``postgresql://`` into
``postgresql:/``: :func:`location` undoes that, so a URL must name its host (for a Unix socket:
``postgresql://localhost/db?host=/var/run/postgresql``). A URL's password is never shown: :func:`mask_url`.
"""

from __future__ import annotations

import re
import sqlite3
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mvlm_core.errors import MvlmError

URL_SCHEMES = ("postgresql", "postgres")
_MANGLED = re.compile(r"^(postgres(?:ql)?):/+", re.IGNORECASE)
_URL = re.compile(r"^postgres(?:ql)?://", re.IGNORECASE)
_PG_LOCK_KEY = 0x6D766C6D  # "mvlm": the advisory lock that serialises schema creation and migrations


def is_url(db: Any) -> bool:
    """A PostgreSQL URL (also as the ``Path`` the CLI made of it)."""
    return db is not None and bool(_MANGLED.match(str(db)))


_ANY_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_CONNINFO = re.compile(r"(?i)(^|\s)(host|hostaddr|port|dbname|user|password|passfile|service|sslmode)\s*=")


def check_location_text(text: str) -> None:
    """Refuse, before anything is measured or written, a history location that is neither a SQLite path nor a
    PostgreSQL URL mvlm can read safely; the message never repeats the text (it may hold a password)."""
    m = _ANY_SCHEME.match(text)
    if m and not _URL.match(text):
        raise MvlmError(f"the history location is a {m.group(1)}:// URL: give a SQLite file path or a postgresql:// "
                        "URL (--db or $MVLM_HISTORY)")
    if not m and _CONNINFO.search(text):
        raise MvlmError("the history location looks like a libpq key=value string: write it as a URL, "
                        "postgresql://USER@HOST:PORT/DB (the password in PGPASSWORD), in --db or $MVLM_HISTORY")
    userinfo = text[m.end():text.rfind("@")] if m and "@" in text else ""
    if any(c in userinfo for c in "@/?#") or (m and re.search(r"(?i)[?&]password=[^&]*&(?![A-Za-z_]+=)", text)):
        raise MvlmError("the user or password of the history URL holds '@', '/', '?', '#' or '&' as is, so where it "
                        "ends cannot be told: percent-encode them (%40, %2F, %3F, %23, %26), or leave the password "
                        "out of the URL and set PGPASSWORD")
    if not text.strip():
        raise MvlmError("the history location is empty: give a SQLite file path or a postgresql:// URL "
                        "(--db or $MVLM_HISTORY)")


def location(db: Path | str) -> Path | str:
    """A SQLite path (``Path``) or a PostgreSQL URL (``str``). A URL given as text is kept as written
    (``postgresql:///mvlm?host=/run/postgresql``: no host, the Unix socket); one that went through ``Path`` (which
    folds ``//`` into ``/``) gets its ``//`` back (a ``///`` URL cannot survive that: pass URLs as text). Text that
    is neither (another scheme, a libpq key=value string, a URL whose password is not encoded) is refused."""
    if isinstance(db, str):
        check_location_text(db)
        if _URL.match(db):
            return db
    if is_url(db):
        return _MANGLED.sub(lambda m: m.group(1).lower() + "://", str(db), count=1)
    return Path(db)


def cli_location(db: str | None) -> Path | str | None:
    """What a ``--db`` option (or ``$MVLM_HISTORY``) names, from its text: a URL stays text, a file becomes a Path."""
    return None if db is None else location(db)


def mask_url(url: str) -> str:
    """The URL with its password (in the user part or a ``password=`` parameter) shown as ``***``."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return scrub(url, url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = re.sub(r"(?i)(^|&)(password=)(?:[^&]|&(?![A-Za-z_]+=))*", r"\1\2***", parts.query)  # a bare & is its own
    masked = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    if not netloc and url[len(parts.scheme):].startswith("://"):  # postgresql:///db: urlunsplit drops the empty host
        masked = f"{parts.scheme}://{masked[len(parts.scheme) + 1:]}"
    return masked


_USERINFO = re.compile(r"(?i)^[a-z][a-z0-9+.-]*://[^:/@?#]*:(.*)@")  # the password part, however malformed the rest
_URL_PW = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@/]*@")  # scheme://user:PASSWORD@ anywhere in a text
_PARAM_PW = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&'\"]+)")  # password=... / password='...'


def hint_url(url: str) -> tuple[str, bool]:
    """A URL (as given or already :func:`mask_url`-ed) for a copy-paste hint: without its password, and whether it
    had one (then the hint says to set ``PGPASSWORD``, which psycopg reads, rather than showing ``***``)."""
    masked = mask_url(str(url))
    if "***" not in masked:
        return masked, False
    text = re.sub(r"(//[^:/@]*):\*\*\*@", r"\1@", masked, count=1)
    text = re.sub(r"(?i)([?&])password=\*\*\*(&|$)", lambda m: m.group(1) if m.group(2) else "", text)
    return text.rstrip("?&"), True


PGPASSWORD_NOTE = "with PGPASSWORD set to the history's password, which the URL here leaves out"


def db_option(db: Any) -> str:
    """``--db LOCATION`` for a copy-paste hint, shell-quoted; a URL's password left out (:func:`hint_url`), followed
    by `` (with PGPASSWORD set ...)`` when it had one."""
    import shlex

    shown, secret = hint_url(str(db)) if is_url(db) else (str(db), False)
    return f"--db {shlex.quote(shown)}" + (f" ({PGPASSWORD_NOTE})" if secret else "")


def url_password(url: str) -> str:
    """The password a URL carries ('' when none), even from a URL that does not parse: scrubbed from messages."""
    try:
        parts = urllib.parse.urlsplit(url)
        pw = parts.password or ""
        q = urllib.parse.parse_qs(parts.query).get("password")
    except ValueError:
        m = _USERINFO.match(url)
        pw, q = (m.group(1) if m else ""), None
    return urllib.parse.unquote(pw) or (q[0] if q else "")


def scrub(text: str, url: str | None = None) -> str:
    """``text`` with every password shown as ``***``: in ``scheme://user:PASSWORD@`` and ``password=`` anywhere in
    it (no parseable URL needed), and the password ``url`` carries (raw and percent-encoded) wherever it appears.
    Every message that may quote the history URL or a server's/psycopg's words about it goes through this."""
    text = _URL_PW.sub(r"\1***@", str(text))
    text = _PARAM_PW.sub(r"\1***", text)
    if url:
        m = _USERINFO.match(str(url))
        for secret in {url_password(str(url)), m.group(1) if m else ""}:
            if secret and secret != "***":
                text = text.replace(secret, "***")
    return text


_TYPES = {"sqlite": {"pk": "INTEGER PRIMARY KEY AUTOINCREMENT", "int": "INTEGER", "real": "REAL"},
          "postgresql": {"pk": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "int": "BIGINT",
                         "real": "DOUBLE PRECISION"}}


def ddl(text: str, kind: str) -> list[str]:
    """Schema text with ``{pk}``/``{int}``/``{real}`` tokens as this backend's statements (split on ``;``)."""
    types = _TYPES[kind]
    text = re.sub(r"\{(pk|int|real)\}", lambda m: types[m.group(1)], text)
    return [s.strip() for s in text.split(";") if s.strip()]


class Store:
    """One open connection: ``execute`` the shared SQL, explicit transactions (``begin``/``commit``/``rollback``)."""

    kind = ""
    errors: tuple[type[BaseException], ...] = ()

    def __init__(self, where: str):
        self.where = where  # for messages: the path, or the URL without its password
        self.conn: Any = None

    def sql(self, query: str) -> str:
        return query

    def execute(self, query: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(self.sql(query), tuple(params))

    def executemany(self, query: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if rows:
            self.conn.cursor().executemany(self.sql(query), rows)

    def begin(self, schema: bool = False) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        try:
            self.conn.execute("ROLLBACK")
        except self.errors:
            pass

    def tables(self) -> set[str]:
        raise NotImplementedError

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except self.errors:
                pass
            self.conn = None


class SqliteStore(Store):
    """A history file. ``timeout``: seconds to wait for another process's write lock (SQLite's busy timeout)."""

    kind = "sqlite"
    errors = (sqlite3.Error,)

    def __init__(self, path: Path, timeout: float):
        super().__init__(str(path))
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), never implicit
        self.conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
        self.conn.execute("PRAGMA foreign_keys = ON")

    def begin(self, schema: bool = False) -> None:
        self.conn.execute("BEGIN IMMEDIATE")  # the write lock first: writers queue, nobody deadlocks

    def tables(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


class PostgresStore(Store):
    """A database on a PostgreSQL server (autocommit connection, explicit BEGIN ... COMMIT like SQLite)."""

    kind = "postgresql"

    def __init__(self, url: str, connect_timeout: float, lock_timeout: float | None = None):
        super().__init__(mask_url(url))
        import psycopg

        self.errors = (psycopg.Error,)
        kwargs: dict[str, Any] = {"autocommit": True, "application_name": "mvlm"}
        if "connect_timeout" not in url:
            kwargs["connect_timeout"] = max(2, round(connect_timeout))
        self.conn = psycopg.connect(url, **kwargs)
        if lock_timeout is not None:  # a lock another session holds is waited for this long, then an error (55P03)
            ms = max(1, round(lock_timeout * 1000))  # PostgreSQL's 0 would mean "wait forever"
            self.conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{ms}ms",))

    def sql(self, query: str) -> str:
        if "%" in query:  # psycopg reads % as a placeholder: the shared SQL never holds one
            raise ValueError(f"'%' in shared SQL text: {query[:60]!r}")
        return query.replace("?", "%s")

    def begin(self, schema: bool = False) -> None:
        self.conn.execute("BEGIN")
        if schema:  # two processes creating or migrating the same database: one at a time
            self.conn.execute(f"SELECT pg_advisory_xact_lock({_PG_LOCK_KEY})")

    def tables(self) -> set[str]:
        # pg_tables lists every table (information_schema only those this user may use: a user without rights on
        # the lab's tables was told the database held none, and to create them)
        return {r[0] for r in self.conn.execute(
            "SELECT tablename FROM pg_catalog.pg_tables WHERE schemaname = current_schema()")}


def one_line(text: str, url: str | None = None) -> str:
    """A server's (multi-line) message as one line, with any password scrubbed (:func:`scrub`)."""
    return scrub(" ".join(s.strip() for s in str(text).splitlines() if s.strip()), url)
