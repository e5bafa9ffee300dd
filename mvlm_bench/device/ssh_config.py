"""ssh's part of a device profile: the ``[ssh]`` table, the ``ssh://`` address, and the allow-list that keeps a profile
data (nothing in it may run a command on this machine or switch host-key checking off).

``ssh.options`` is an allow-list (``SSH_OPTION_RULES``: no ``ProxyCommand``, ``LocalCommand``, ``KnownHostsCommand``,
``Match exec``, ``ProxyJump``, ``Control*``; ``StrictHostKeyChecking`` only ``yes`` or ``accept-new``;
``UserKnownHostsFile`` only regular files), ``ssh.known_hosts`` must be a regular file (not ``/dev/null``), and an
``ssh.config_file`` other than your own ``~/.ssh/config`` is read line by line the way OpenSSH reads it (quotes,
``=``) and held to the same allow-list (plus ``Host`` lines; ``Match`` and ``Include`` refused whole). Each refusal is
one line naming the profile and the option (for a config file: the file, line and keyword).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mvlm_bench.device.fields import bounded, check_table
from mvlm_core.atomic import file_kind
from mvlm_core.errors import MvlmError

# Host and user end up as arguments of ssh: a leading "-" would turn them into options.
HOST_RE = re.compile(r"^[A-Za-z0-9_.%:\[\]-]+$")
USER_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.@-]*$")
_SSH_OPTION_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*=[^\n\r\0]+")


@dataclass(frozen=True)
class SshOptions:
    """How to reach an ssh device. Paths are already resolved (``~`` expanded, relative to the profile file)."""

    port: int | None = None
    identity_file: str | None = None
    known_hosts: str | None = None
    config_file: str | None = None
    connect_timeout: int = 10
    options: tuple[str, ...] = ()
    control_master: bool = True



_SSH_KEYS = {
    "port": int,
    "identity_file": str,
    "known_hosts": str,
    "config_file": str,
    "connect_timeout": int,
    "options": list,
    "control_master": bool,
}


def parse_ssh_table(table: dict[str, Any], where: str, base_dir: Path | None) -> SshOptions:
    check_table(table, _SSH_KEYS, where, prefix="ssh.")
    port = table.get("port")
    if port is not None and not 0 < port < 65536:
        raise MvlmError(f"{where}: field 'ssh.port' = {port} is not a TCP port")
    options = table.get("options", [])
    for opt in options:
        if not isinstance(opt, str) or not _SSH_OPTION_RE.fullmatch(opt):
            raise MvlmError(f"{where}: field 'ssh.options' entry {opt!r} must look like 'Key=Value'")
    check_ssh_options(options, where)
    timeout = table.get("connect_timeout", 10)
    bounded(where, "ssh.connect_timeout", timeout, 1, 3600)

    def path_of(key: str) -> str | None:
        value = table.get(key)
        if value is None:
            return None
        p = Path(value).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        return str(p)

    known_hosts = path_of("known_hosts")
    if known_hosts is not None:
        check_known_hosts_file(known_hosts, f"{where}: field 'ssh.known_hosts'")
    config_file = path_of("config_file")
    if config_file is not None:
        check_ssh_config_file(config_file, where)
    return SshOptions(
        port=port,
        identity_file=path_of("identity_file"),
        known_hosts=known_hosts,
        config_file=config_file,
        connect_timeout=timeout,
        options=tuple(options),
        control_master=table.get("control_master", True),
    )


# --------------------------------------------------------------------------------------------------- ssh allow-list
#
# A profile is data: nothing in it may run a command on this machine or switch host-key checking off. ssh options are
# therefore an allow-list (each with a value check); anything else is refused, with the reason where there is a
# well-known one. docs/devices.md lists the same.

_ALGOS_RE = re.compile(r"^[+^-]?[A-Za-z0-9@._+-]+(,[A-Za-z0-9@._+-]+)*$")
_ALIAS_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")
_PLAIN_PATH_RE = re.compile(r"^[^\s'\"\\]+$")


def _v_int(lo: int, hi: int):
    def check(v: str) -> str | None:
        ok = re.fullmatch(r"\d{1,9}", v) is not None and lo <= int(v) <= hi
        return None if ok else f"must be a whole number from {lo} to {hi}"

    return check


def _v_choice(*choices: str):
    def check(v: str) -> str | None:
        return None if v.lower() in choices else "must be " + " or ".join(choices)

    return check


def _v_match(rx: re.Pattern, what: str):
    def check(v: str) -> str | None:
        return None if rx.fullmatch(v) else f"must be {what}"

    return check


def _v_known_hosts(v: str) -> str | None:
    for f in v.split() or [""]:
        problem = known_hosts_problem(f)
        if problem:
            return problem
    return None


_YES_NO = _v_choice("yes", "no")
_ALGOS = _v_match(_ALGOS_RE, "a comma-separated algorithm list")
_PATH = _v_match(_PLAIN_PATH_RE, "a path without spaces or quotes")

# canonical name -> value check (returns what is wrong, or None)
SSH_OPTION_RULES: dict[str, Any] = {
    "Port": _v_int(1, 65535),
    "User": _v_match(USER_RE, "a user name"),
    "IdentityFile": _PATH,
    "CertificateFile": _PATH,
    "IdentitiesOnly": _YES_NO,
    "PreferredAuthentications": _v_match(re.compile(r"^[a-z-]+(,[a-z-]+)*$"), "a comma-separated method list"),
    "ConnectTimeout": _v_int(1, 3600),
    "ConnectionAttempts": _v_int(1, 100),
    "ServerAliveInterval": _v_int(0, 3600),
    "ServerAliveCountMax": _v_int(1, 1000),
    "TCPKeepAlive": _YES_NO,
    "Compression": _YES_NO,
    "AddressFamily": _v_choice("any", "inet", "inet6"),
    "IPQoS": _v_match(re.compile(r"^[a-z0-9]+(\s[a-z0-9]+)?$"), "one or two QoS names"),
    "HostKeyAlias": _v_match(_ALIAS_RE, "a name (letters, digits, . _ : -)"),
    "HostName": _v_match(re.compile(r"^[A-Za-z0-9_.%:\[\]][A-Za-z0-9_.%:\[\]-]*$"), "a host name or address"),
    "CheckHostIP": _YES_NO,
    "StrictHostKeyChecking": _v_choice("yes", "accept-new"),
    "UserKnownHostsFile": _v_known_hosts,
    "LogLevel": _v_choice("quiet", "fatal", "error", "info", "verbose", "debug", "debug1", "debug2", "debug3"),
    "HostKeyAlgorithms": _ALGOS,
    "KexAlgorithms": _ALGOS,
    "Ciphers": _ALGOS,
    "MACs": _ALGOS,
    "PubkeyAcceptedAlgorithms": _ALGOS,
    "PubkeyAcceptedKeyTypes": _ALGOS,
}
_RULES_LOWER = {k.lower(): (k, v) for k, v in SSH_OPTION_RULES.items()}
_RUNS_A_COMMAND = "it runs a command on this machine, and nothing in a profile may"
_REFUSED_WHY = {
    "proxycommand": _RUNS_A_COMMAND,
    "localcommand": _RUNS_A_COMMAND,
    "permitlocalcommand": "it lets LocalCommand run a command on this machine",
    "knownhostscommand": _RUNS_A_COMMAND,
    "match": "'Match exec' runs a command on this machine",
    "include": "it reads configuration mvlm has not checked",
    "proxyjump": "the jump host's key is not pinned by the profile: put ProxyJump under a Host alias in your "
                 "~/.ssh/config and use the alias as address",
    "controlmaster": "mvlm runs the shared connection itself: use ssh.control_master",
    "controlpath": "mvlm runs the shared connection itself: use ssh.control_master",
    "controlpersist": "mvlm runs the shared connection itself: use ssh.control_master",
    "forwardagent": "it would let the device use your ssh keys",
    "pkcs11provider": "it loads a library (code) into ssh on this machine",
    "securitykeyprovider": "it loads a library (code) into ssh on this machine",
    "batchmode": "mvlm always runs ssh with BatchMode=yes",
    "globalknownhostsfile": "pin keys with ssh.known_hosts or UserKnownHostsFile",
}


def check_ssh_options(options: list[str] | tuple[str, ...], where: str) -> None:
    """Refuse (one line naming ``where`` and the option) any ssh ``-o`` option outside the allow-list."""
    for opt in options:
        key, _, value = str(opt).partition("=")
        key, value = key.strip(), value.strip()
        if not key or not value or any(c in str(opt) for c in "\n\r\0"):
            raise MvlmError(f"{where}: field 'ssh.options' entry {opt!r} must look like 'Key=Value' on one line")
        rule = _RULES_LOWER.get(key.lower())
        seen, _ = _strdelim(str(opt))  # the keyword ssh itself reads from this -o string
        if rule is not None and (seen or "").lower() != key.lower():
            raise MvlmError(f"{where}: field 'ssh.options' entry {opt!r} must look like 'Key=Value' (no quotes or "
                            "spaces in the key)")
        if rule is None:
            why = _REFUSED_WHY.get(key.lower(), "it is not on mvlm's allow-list (docs/devices.md, 'ssh options')")
            raise MvlmError(f"{where}: field 'ssh.options': ssh option {key} is not allowed: {why}")
        name, check = rule
        problem = check(value)
        if not problem:
            continue
        if name == "StrictHostKeyChecking":
            raise MvlmError(f"{where}: field 'ssh.options': {name}={value} is not allowed: it may not turn host-key "
                            "checking off (only yes or accept-new); pin the key with ssh.known_hosts instead")
        if name == "UserKnownHostsFile":
            raise MvlmError(f"{where}: field 'ssh.options': ssh option {name} is not allowed: {problem}")
        raise MvlmError(f"{where}: field 'ssh.options': ssh option {name}={value!r} is not allowed: the value {problem}")


def known_hosts_problem(path: str) -> str | None:
    """What is wrong with a known_hosts path (None if fine): it must be a plain path to a regular file, or to one not
    created yet; never /dev/null or ``none`` (they make every host key unknown, and with accept-new, accepted)."""
    if not path or path.lower() == "none":
        return f"{path!r} turns the known_hosts file off; name a real file"
    if "%" in path or not _PLAIN_PATH_RE.fullmatch(path):
        return f"{path!r} must be a plain path (no spaces, quotes or %-tokens)"
    p = Path(path).expanduser()
    if p.exists() and not p.is_file():
        return f"{path!r} is not a regular file (a device such as /dev/null would accept any host key); name a real file"
    return None


def check_known_hosts_file(path: str, where: str) -> None:
    problem = known_hosts_problem(path)
    if problem:
        raise MvlmError(f"{where} = {problem}; host-key checking stays on")


def _own_ssh_config() -> Path:
    import pwd

    try:
        home = Path(pwd.getpwuid(os.getuid()).pw_dir)  # what ssh itself uses for ~
    except KeyError:
        home = Path.home()
    return home / ".ssh" / "config"


# ssh_config keywords: what OpenSSH's readconf.c does with a line, re-done here so that the line mvlm checks is the
# line ssh obeys. Quoting tricks ("ProxyCommand", Proxy"Command", "" ProxyCommand, "Match" exec ...) give the keyword
# ssh sees; every keyword then meets the allow-list of ssh.options (SSH_OPTION_RULES), plus ``Host`` (the block header
# a config file is for). ``ssh -G`` is never run on such a file: it evaluates ``Match exec``.
_CFG_WS = " \t\r\n"
_HOST_PATTERN_RE = re.compile(r"^!?[A-Za-z0-9_.*?:%,\[\]-]+$")
_KEYWORD_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
MAX_SSH_CONFIG_BYTES = 1 << 20


def _strdelim(s: str | None) -> tuple[str | None, str | None]:
    """OpenSSH's ``strdelim()`` (split at whitespace, a quote or one ``=``): (token, rest); token None on an unmatched
    quote. A quote inside a token is removed and the token runs to the closing quote (``Proxy"Command"``)."""
    if s is None:
        return None, None
    i = next((k for k, c in enumerate(s) if c in _CFG_WS + '"='), None)
    if i is None:
        return s, None
    if s[i] == '"':
        t = s[:i] + s[i + 1:]
        j = t.find('"', i)
        if j < 0:
            return None, None
        return t[:j], t[j + 1:].lstrip(_CFG_WS)
    rest = s[i + 1:].lstrip(_CFG_WS)
    if s[i] != "=" and rest.startswith("="):  # "Key = value": one '=' between the keyword and its arguments
        rest = rest[1:].lstrip(_CFG_WS)
    return s[:i], rest


def _argv_split(s: str) -> list[str] | None:
    """OpenSSH's ``argv_split(..., terminate_on_comment=1)``: the arguments after the keyword; None on an unmatched
    quote. (Backslashes and single quotes are refused before this is called: ssh versions differ on them.)"""
    args: list[str] = []
    i, n = 0, len(s)
    while i < n:
        if s[i] in " \t":
            i += 1
            continue
        if s[i] == "#":
            break
        arg, quote = [], ""
        while i < n:
            c = s[i]
            if not quote and c in " \t":
                break
            if not quote and c == '"':
                quote = c
            elif quote and c == quote:
                quote = ""
            else:
                arg.append(c)
            i += 1
        if quote:
            return None
        args.append("".join(arg))
    return args


def ssh_config_line_problem(raw: str) -> tuple[str, str] | None:
    """What is wrong with one line of an ssh config file a profile names: (the keyword as written, why), or None
    when the line is blank, a comment, or an allowed directive with an allowed value."""
    line = raw.rstrip(_CFG_WS + "\f")
    stripped = line.lstrip(_CFG_WS)
    if not stripped or stripped.startswith("#"):
        return None
    first = _printable((stripped.split() or ["?"])[0])
    if any(ord(c) < 32 and c != "\t" for c in line) or "\x7f" in line:
        return first, "the line holds control characters"
    keyword, rest = _strdelim(line)
    if keyword == "":
        keyword, rest = _strdelim(rest)
    if keyword is None or not _KEYWORD_RE.fullmatch(keyword):
        return _printable(keyword or first), "it cannot be read as `Keyword value` (unmatched quote, or not a keyword)"
    key = keyword.lower()
    if key == "match":
        return keyword, ("'Match exec' runs a command on this machine, and mvlm cannot tell which hosts a Match block "
                         "applies to: use Host blocks")
    if key == "include":
        return keyword, "it reads configuration mvlm has not checked: copy what you need into this file"
    rest = (rest or "").strip(_CFG_WS)
    if "\\" in rest or "'" in rest:
        return keyword, "backslashes and single quotes are not allowed in values (ssh versions read them differently)"
    args = _argv_split(rest)
    if args is None:
        return keyword, "the value has an unmatched double quote"
    if not args:
        return keyword, "it has no value"
    if any(not a or any(c in a for c in _CFG_WS + '"') for a in args):
        return keyword, "values may not be empty or contain spaces or quotes"
    if key == "host":
        bad = next((a for a in args if not _HOST_PATTERN_RE.fullmatch(a)), None)
        return (keyword, f"{bad!r} is not a host pattern") if bad is not None else None
    rule = _RULES_LOWER.get(key)
    if rule is None:
        return keyword, _REFUSED_WHY.get(key, "it is not on mvlm's allow-list (docs/devices.md, 'ssh options')")
    name, check = rule
    value = " ".join(args)
    problem = check(value)
    if problem is None:
        return None
    if name == "StrictHostKeyChecking":
        return keyword, f"{value} would turn host-key checking off (only yes or accept-new)"
    if name == "UserKnownHostsFile":
        return keyword, problem
    return keyword, f"the value {value!r} {problem}"


def _printable(text: str, limit: int = 40) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_ssh_config_file(path: str, where: str) -> bytes | None:
    """An ``ssh -F`` file named by a profile is data too: every line must be a ``Host`` line or an allowed option with
    an allowed value (the allow-list of ``ssh.options``); ``Match`` and ``Include`` are refused whole. Returns the
    bytes that were checked (the ssh transport hands ssh a private copy of exactly these), or None for the files that
    are not inspected: your own ``~/.ssh/config`` (what ssh reads without ``-F`` anyway) and ``/dev/null``."""
    p = Path(path)
    if path == os.devnull:
        return None
    if not p.is_file():
        what = file_kind(p) if p.exists() else "it does not exist"
        raise MvlmError(f"{where}: field 'ssh.config_file' = {path!r} is not a regular file ({what}); fix the path or "
                        "drop the field")
    if p.resolve() == _own_ssh_config().resolve():
        return None
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_SSH_CONFIG_BYTES + 1)
    except OSError as e:
        raise MvlmError(f"{where}: cannot read ssh.config_file {path}: {e.strerror}") from None
    if len(data) > MAX_SSH_CONFIG_BYTES:
        raise MvlmError(f"{where}: ssh.config_file {path} is larger than {MAX_SSH_CONFIG_BYTES} bytes: not an ssh config")
    if b"\0" in data:
        raise MvlmError(f"{where}: ssh.config_file {path} holds NUL bytes: not an ssh config")
    for n, raw in enumerate(data.decode("utf-8", errors="replace").split("\n"), 1):
        problem = ssh_config_line_problem(raw)
        if problem:
            keyword, why = problem
            raise MvlmError(f"{where}: ssh.config_file {path} line {n}: {keyword} is not allowed: {why}; remove it "
                            "there, or drop config_file (your ~/.ssh/config is read anyway)")
    return data


def split_ssh_address(address: str, where: str) -> tuple[str | None, str, int | None]:
    """``ssh://[user@]host[:port]`` or ``[user@]host`` -> (user, host, port)."""
    if address.startswith("ssh://"):
        try:
            parts = urlsplit(address)
            port = parts.port
        except ValueError as e:
            raise MvlmError(f"{where}: bad ssh address {address!r} ({e}); use ssh://user@host[:port]") from None
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.password:
            raise MvlmError(f"{where}: bad ssh address {address!r}: use ssh://user@host[:port] (no path, no password)")
        if not address[len("ssh://"):].strip("/"):
            raise MvlmError(f"{where}: the ssh address {address!r} names no host: use ssh://user@host[:port]")
        if port == 0 or (port is None and address.rstrip("/").endswith(":")):
            raise MvlmError(f"{where}: bad port in ssh address {address!r}: give a TCP port from 1 to 65535, or leave "
                            "':port' out for 22")
        user, host = parts.username, parts.hostname or ""
    else:
        user, _, host = address.rpartition("@")
        user = user or None
        port = None
    if not host or host.startswith("-") or not HOST_RE.match(host):
        raise MvlmError(f"{where}: bad host in ssh address {address!r}; use ssh://user@host[:port]")
    if user is not None and not USER_RE.match(user):
        raise MvlmError(f"{where}: bad user in ssh address {address!r}; use ssh://user@host[:port]")
    return user, host, port
