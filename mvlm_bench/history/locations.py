"""Where the benchmark history lives: a SQLite path or a PostgreSQL URL, as text (checked, never shown with its password).

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
import urllib.parse
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



def one_line(text: str, url: str | None = None) -> str:
    """A server's (multi-line) message as one line, with any password scrubbed (:func:`scrub`)."""
    return scrub(" ".join(s.strip() for s in str(text).splitlines() if s.strip()), url)
