"""Device profiles: one small TOML file per device, validated into a ``DeviceProfile``.

A user adds a device by adding a file, not code. The schema (every key but ``transport`` and ``target`` optional)::

    name = "orin"                          # defaults to the file's stem; must match it when given
    description = "Jetson AGX Orin 64GB"
    transport = "ssh"                      # "local" | "ssh" | "adb"
    address = "ssh://nvidia@orin.local"    # ssh: ssh://[user@]host[:port] or [user@]host (an ~/.ssh/config alias works)
                                           # adb: the serial shown by `adb devices`; local: absent
    workdir = "/home/nvidia/mvlm"          # where artifacts go on the device; "~/..." is the login home (ssh, local)
    target = "orin"                        # runtime target: host | cuda | linux-arm64 | android-arm64 | orin
    threads = 8                            # absent: all cores for a local device, llama.cpp's default elsewhere
    n_gpu_layers = 999                     # default 0
    exec_wrapper = ["qemu-aarch64-static"] # argv prefix for every run() on the device (default none)
    emulated = false                       # true: timings are an emulator's, not a device's (reports say so)
    [env]                                  # extra environment for commands run on the device
    LD_LIBRARY_PATH = "/home/nvidia/mvlm/lib"
    [ssh]                                  # only for transport = "ssh"
    port = 22
    identity_file = "~/.ssh/id_ed25519"    # relative paths are relative to the profile file
    known_hosts = "~/.ssh/known_hosts_orin"  # pins host keys (StrictHostKeyChecking=yes); host-key checking is never off
    config_file = "~/.ssh/config"          # ssh -F
    connect_timeout = 10
    options = ["ServerAliveInterval=15"]   # extra ssh -o options, "Key=Value", from an allow-list (SSH_OPTION_RULES)
    control_master = true                  # reuse one connection (ControlMaster/ControlPersist, private socket dir)

Nothing in a profile runs on this machine (``exec_wrapper`` runs on the device; for a ``local`` profile the device is
this machine). So ``ssh.options`` is an allow-list (``SSH_OPTION_RULES``: no ``ProxyCommand``, ``LocalCommand``,
``KnownHostsCommand``, ``Match exec``, ``ProxyJump``, ``Control*``; ``StrictHostKeyChecking`` only ``yes`` or
``accept-new``; ``UserKnownHostsFile`` only regular files), ``ssh.known_hosts`` must be a regular file (not
``/dev/null``), and an ``ssh.config_file`` other than your own ``~/.ssh/config`` is read line by line the way OpenSSH
reads it (quotes, ``=``) and held to the same allow-list (plus ``Host`` lines; ``Match`` and ``Include`` refused whole).
Each refusal is one line naming the profile and the option (for a config file: the file, line and keyword).

Public API (used by the benchmark runner and ``mvlm devices``; keep stable):

- ``load_profile(spec, search_dirs=None) -> DeviceProfile``: ``spec`` is a profile name, a path to a ``.toml``,
  ``ssh://user@host[:port]`` or ``adb:SERIAL`` (ad hoc profiles).
- ``list_profiles(search_dirs=None) -> list[DeviceProfile]``: every named profile, first found wins (raises on the
  first invalid file).
- ``scan_profiles(search_dirs=None) -> list[ProfileEntry]``: the same, but an invalid file is an entry with its error
  instead of an exception (``mvlm devices`` lists the good ones and flags the bad one).
- ``check_ssh_options(options, where)``: the allow-list check (the ssh transport repeats it before running ssh).
- ``profile_dirs() -> list[Path]``: where names are looked up: ``<repo>/devices``, ``~/.config/mvlm/devices``, then each
  directory in ``$MVLM_DEVICES_DIR`` (``os.pathsep``-separated; lets an installed-elsewhere package find profiles).

Every schema error is an ``MvlmError`` naming the file and the field, so a typo in a profile is one clear line.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mvlm_core.atomic import file_kind
from mvlm_core.errors import MvlmError
from mvlm_core.runtime import TARGETS

TRANSPORTS = ("local", "ssh", "adb")
# The runtime targets `mvlm runtime build --target` knows: one list, kept by the runtime module.
KNOWN_TARGETS = TARGETS

DEFAULT_ADB_WORKDIR = "/data/local/tmp/mvlm"
DEFAULT_SSH_WORKDIR = "~/mvlm"
DEFAULT_LOCAL_WORKDIR = "~/.cache/mvlm/device/local"

# Bounds of the numeric fields, the same as the command line's (--threads, --n-gpu-layers).
MAX_THREADS = 1024
MAX_GPU_LAYERS = 100000

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Host, user and serial end up as arguments of ssh/adb: a leading "-" would turn them into options.
_HOST_RE = re.compile(r"^[A-Za-z0-9_.%:\[\]-]+$")
_USER_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.@-]*$")
_SERIAL_RE = re.compile(r"^[A-Za-z0-9_.:][A-Za-z0-9_.:-]*$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
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


@dataclass(frozen=True)
class DeviceProfile:
    """One device: how to reach it, where its work dir is, which runtime build it runs and how."""

    name: str
    transport: str
    target: str
    workdir: str
    description: str = ""
    address: str | None = None
    threads: int | None = None
    n_gpu_layers: int = 0
    exec_wrapper: tuple[str, ...] = ()
    emulated: bool = False
    env: dict[str, str] = field(default_factory=dict)
    ssh: SshOptions = field(default_factory=SshOptions)
    source: Path | None = None  # the .toml it came from; None for ad hoc profiles
    # Ad hoc devices (ssh://..., adb:SERIAL): ``target`` is a placeholder; the runner probes the device (uname -m,
    # getprop ro.product.cpu.abi) and picks the runtime target from what it finds.
    probe_target: bool = False

    @property
    def ssh_user(self) -> str | None:
        return _split_ssh_address(self.address or "", self._where())[0] if self.transport == "ssh" else None

    @property
    def ssh_host(self) -> str | None:
        return _split_ssh_address(self.address or "", self._where())[1] if self.transport == "ssh" else None

    @property
    def ssh_port(self) -> int | None:
        if self.transport != "ssh":
            return None
        url_port = _split_ssh_address(self.address or "", self._where())[2]
        return self.ssh.port if self.ssh.port is not None else url_port

    def _where(self) -> str:
        return str(self.source) if self.source else f"device {self.name!r}"

    def as_record(self) -> dict[str, Any]:
        """The profile as plain data, for the ``device`` field of benchmark records."""
        return {
            "name": self.name,
            "description": self.description,
            "transport": self.transport,
            "address": self.address,
            "target": self.target,
            "workdir": self.workdir,
            "threads": self.threads,
            "n_gpu_layers": self.n_gpu_layers,
            "exec_wrapper": list(self.exec_wrapper),
            "emulated": self.emulated,
        }


# --------------------------------------------------------------------------------------------------- lookup


def repo_devices_dir() -> Path | None:
    """``<repo>/devices`` when this package runs from a source checkout (editable install); else None."""
    candidate = Path(__file__).resolve().parent.parent / "devices"
    return candidate if candidate.is_dir() else None


def profile_dirs() -> list[Path]:
    """Directories searched for ``NAME.toml``, in order: repo, user config, then ``$MVLM_DEVICES_DIR`` entries."""
    dirs: list[Path] = []
    repo = repo_devices_dir()
    if repo is not None:
        dirs.append(repo)
    dirs.append(Path("~/.config/mvlm/devices").expanduser())
    for entry in os.environ.get("MVLM_DEVICES_DIR", "").split(os.pathsep):
        if entry.strip():
            dirs.append(Path(entry.strip()).expanduser())
    return dirs


def load_profile(spec: str, search_dirs: list[Path] | None = None) -> DeviceProfile:
    """Resolve ``--device SPEC``: a name, a ``.toml`` path, ``ssh://user@host[:port]`` or ``adb:SERIAL``."""
    spec = spec.strip()
    if not spec:
        raise MvlmError("empty --device: give a profile name (see `mvlm devices`), ssh://user@host or adb:SERIAL")
    if spec.startswith("ssh://"):
        return _adhoc_ssh(spec)
    if spec.startswith("adb:"):
        return _adhoc_adb(spec)
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", spec)
    if scheme:
        raise MvlmError(f"--device {spec}: unknown scheme {scheme.group(1)}://; {_DEVICE_FORMS}")
    if spec.endswith(".toml") or os.sep in spec or "/" in spec:
        path = Path(spec).expanduser()
        if not path.exists():
            raise MvlmError(f"--device {spec}: device profile {path} does not exist; {_DEVICE_FORMS}")
        if not path.is_file():
            raise MvlmError(f"--device {spec}: {path} exists but is not a profile file ({file_kind(path)}); "
                            f"{_DEVICE_FORMS}")
        return parse_profile_file(path)
    if not _NAME_RE.match(spec):
        raise MvlmError(f"bad device name {spec!r}: {_DEVICE_FORMS}")
    dirs = profile_dirs() if search_dirs is None else [Path(d) for d in search_dirs]
    for d in dirs:
        candidate = d / f"{spec}.toml"
        if candidate.is_file():
            return parse_profile_file(candidate)
    known = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.toml")})
    raise MvlmError(
        f"no device profile {spec!r} (looked in {', '.join(str(d) for d in dirs)}); "
        f"known: {', '.join(known) or 'none'}; add {spec}.toml to one of those dirs or use ssh://user@host / adb:SERIAL"
    )


_DEVICE_FORMS = ("give a profile name (see `mvlm devices`), the path of a .toml profile, ssh://user@host[:port] "
                 "or adb:SERIAL")


def list_profiles(search_dirs: list[Path] | None = None) -> list[DeviceProfile]:
    """Every profile in the search dirs, sorted by name; a name found in an earlier dir hides later ones.

    Raises the first invalid file's ``MvlmError``; ``scan_profiles`` reports invalid files instead."""
    out = []
    for entry in scan_profiles(search_dirs):
        if entry.profile is None:
            raise MvlmError(entry.error or f"{entry.path}: invalid device profile")
        out.append(entry.profile)
    return out


@dataclass(frozen=True)
class ProfileEntry:
    """One ``NAME.toml`` on the search path: its profile, or (invalid file) the one-line error saying why not."""

    name: str
    path: Path
    profile: DeviceProfile | None
    error: str | None = None


def scan_profiles(search_dirs: list[Path] | None = None) -> list[ProfileEntry]:
    """Every ``NAME.toml`` on the search path, sorted by name (first found wins); invalid files included, flagged."""
    dirs = profile_dirs() if search_dirs is None else [Path(d) for d in search_dirs]
    seen: dict[str, ProfileEntry] = {}
    for d in dirs:
        if not d.is_dir():
            continue
        for path in sorted(d.glob("*.toml")):
            if path.stem in seen:
                continue
            try:
                seen[path.stem] = ProfileEntry(path.stem, path, parse_profile_file(path))
            except MvlmError as e:
                seen[path.stem] = ProfileEntry(path.stem, path, None, str(e))
    return [seen[k] for k in sorted(seen)]


# --------------------------------------------------------------------------------------------------- parsing

_TOP_KEYS = {
    "name": str,
    "description": str,
    "transport": str,
    "address": str,
    "workdir": str,
    "target": str,
    "threads": int,
    "n_gpu_layers": int,
    "exec_wrapper": list,
    "emulated": bool,
    "env": dict,
    "ssh": dict,
}
_SSH_KEYS = {
    "port": int,
    "identity_file": str,
    "known_hosts": str,
    "config_file": str,
    "connect_timeout": int,
    "options": list,
    "control_master": bool,
}
_TYPE_WORDS = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "a table"}


def parse_profile_file(path: Path) -> DeviceProfile:
    """Read and validate one profile file; errors name the file and the field."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO would block the read forever; a device is no profile
        raise MvlmError(f"{path}: not a device profile file ({file_kind(path)}); give a .toml file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MvlmError(f"{path}: cannot read device profile ({e})") from None
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as e:  # ValueError: an integer too long to convert
        raise MvlmError(f"{path}: not valid TOML ({e}); fix the file") from None
    return profile_from_dict(data, where=str(path), default_name=path.stem, base_dir=path.parent, source=path)


def profile_from_dict(
    data: dict[str, Any],
    *,
    where: str,
    default_name: str,
    base_dir: Path | None = None,
    source: Path | None = None,
) -> DeviceProfile:
    """Validate a parsed profile table. ``where`` names it in errors (the file path)."""
    _check_table(data, _TOP_KEYS, where, prefix="")

    name = data.get("name", default_name)
    if ("name" in data or source is not None) and not _NAME_RE.match(name):
        raise MvlmError(f"{where}: field 'name' = {name!r} must be letters, digits, '.', '_' or '-'")
    if source is not None and name != default_name:
        raise MvlmError(f"{where}: field 'name' = {name!r} differs from the file name; rename the file to {name}.toml")

    for key in ("transport", "target"):
        if key not in data:
            raise MvlmError(f"{where}: missing required field '{key}'")
    transport = data["transport"]
    if transport not in TRANSPORTS:
        raise MvlmError(f"{where}: field 'transport' = {transport!r} is unknown; use one of {', '.join(TRANSPORTS)}")
    target = data["target"]
    if target not in KNOWN_TARGETS:
        raise MvlmError(f"{where}: field 'target' = {target!r} is unknown; use one of {', '.join(KNOWN_TARGETS)}")

    address = data.get("address")
    if transport == "local":
        if address not in (None, "", "none"):
            raise MvlmError(f"{where}: field 'address' must be absent for transport 'local'")
        address = None
    elif not address:
        example = "ssh://user@host" if transport == "ssh" else "the serial from `adb devices`"
        raise MvlmError(f"{where}: missing required field 'address' for transport {transport!r} ({example})")
    elif transport == "ssh":
        _split_ssh_address(address, where)
    else:
        if not _SERIAL_RE.match(address):
            raise MvlmError(f"{where}: field 'address' = {address!r} is not an adb serial (letters, digits, . : _ -)")

    default_workdir = {"local": DEFAULT_LOCAL_WORKDIR, "ssh": DEFAULT_SSH_WORKDIR, "adb": DEFAULT_ADB_WORKDIR}
    workdir = data.get("workdir", default_workdir[transport])
    _check_workdir(workdir, transport, where)

    threads = data.get("threads")
    if threads is not None:
        _bounded(where, "threads", threads, 1, MAX_THREADS)
    if threads is None and transport == "local":
        threads = os.cpu_count() or 1
    n_gpu_layers = data.get("n_gpu_layers", 0)
    _bounded(where, "n_gpu_layers", n_gpu_layers, 0, MAX_GPU_LAYERS)

    exec_wrapper = data.get("exec_wrapper", [])
    if not all(isinstance(x, str) and x for x in exec_wrapper):
        raise MvlmError(f"{where}: field 'exec_wrapper' must be a list of non-empty strings")

    env = data.get("env", {})
    for k, v in env.items():
        if not _ENV_KEY_RE.match(k):
            raise MvlmError(f"{where}: field 'env.{k}': variable names are letters, digits and '_'")
        if not isinstance(v, str):
            raise MvlmError(f"{where}: field 'env.{k}' must be a string")

    ssh_table = data.get("ssh")
    if ssh_table is not None and transport != "ssh":
        raise MvlmError(f"{where}: table [ssh] is only for transport 'ssh' (this profile is {transport!r})")
    ssh = _parse_ssh(ssh_table or {}, where, base_dir)
    if transport == "ssh" and ssh.port is not None:
        url_port = _split_ssh_address(address, where)[2]
        if url_port is not None and url_port != ssh.port:
            raise MvlmError(f"{where}: field 'ssh.port' = {ssh.port} contradicts the port in 'address' ({url_port})")

    return DeviceProfile(
        name=name,
        description=data.get("description", ""),
        transport=transport,
        address=address,
        workdir=workdir,
        target=target,
        threads=threads,
        n_gpu_layers=n_gpu_layers,
        exec_wrapper=tuple(exec_wrapper),
        emulated=data.get("emulated", False),
        env=dict(env),
        ssh=ssh,
        source=source,
    )


def _bounded(where: str, name: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        shown = str(value) if abs(value) < 10**24 else f"a {value.bit_length()}-bit number"
        raise MvlmError(f"{where}: field '{name}' = {shown} is out of range: give a whole number from {lo} to {hi}")


def _check_table(data: dict[str, Any], schema: dict[str, type], where: str, prefix: str) -> None:
    for key, value in data.items():
        if key not in schema:
            raise MvlmError(f"{where}: unknown field '{prefix}{key}'; known fields: {', '.join(schema)}")
        want = schema[key]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if not ok:
            raise MvlmError(f"{where}: field '{prefix}{key}' must be {_TYPE_WORDS[want]}, not {value!r}")


def _parse_ssh(table: dict[str, Any], where: str, base_dir: Path | None) -> SshOptions:
    _check_table(table, _SSH_KEYS, where, prefix="ssh.")
    port = table.get("port")
    if port is not None and not 0 < port < 65536:
        raise MvlmError(f"{where}: field 'ssh.port' = {port} is not a TCP port")
    options = table.get("options", [])
    for opt in options:
        if not isinstance(opt, str) or not _SSH_OPTION_RE.fullmatch(opt):
            raise MvlmError(f"{where}: field 'ssh.options' entry {opt!r} must look like 'Key=Value'")
    check_ssh_options(options, where)
    timeout = table.get("connect_timeout", 10)
    _bounded(where, "ssh.connect_timeout", timeout, 1, 3600)

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
    "User": _v_match(_USER_RE, "a user name"),
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


def _check_workdir(workdir: str, transport: str, where: str) -> None:
    if not workdir or "\0" in workdir or "\n" in workdir:
        raise MvlmError(f"{where}: field 'workdir' must be a non-empty path on one line")
    if workdir.startswith("-"):
        raise MvlmError(f"{where}: field 'workdir' may not start with '-'")
    if transport == "adb" and not workdir.startswith("/"):
        raise MvlmError(f"{where}: field 'workdir' must be absolute on an adb device (e.g. {DEFAULT_ADB_WORKDIR})")
    if transport != "adb" and not (workdir.startswith("/") or workdir == "~" or workdir.startswith("~/")):
        raise MvlmError(f"{where}: field 'workdir' must be absolute or start with '~/'")


def _split_ssh_address(address: str, where: str) -> tuple[str | None, str, int | None]:
    """``ssh://[user@]host[:port]`` or ``[user@]host`` -> (user, host, port)."""
    if address.startswith("ssh://"):
        try:
            parts = urlsplit(address)
            port = parts.port
        except ValueError as e:
            raise MvlmError(f"{where}: bad ssh address {address!r} ({e}); use ssh://user@host[:port]") from None
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.password:
            raise MvlmError(f"{where}: bad ssh address {address!r}: use ssh://user@host[:port] (no path, no password)")
        user, host = parts.username, parts.hostname or ""
    else:
        user, _, host = address.rpartition("@")
        user = user or None
        port = None
    if not host or host.startswith("-") or not _HOST_RE.match(host):
        raise MvlmError(f"{where}: bad host in ssh address {address!r}; use ssh://user@host[:port]")
    if user is not None and not _USER_RE.match(user):
        raise MvlmError(f"{where}: bad user in ssh address {address!r}; use ssh://user@host[:port]")
    return user, host, port


def _adhoc_ssh(spec: str) -> DeviceProfile:
    _split_ssh_address(spec, f"--device {spec}")
    profile = profile_from_dict(
        {"transport": "ssh", "address": spec, "target": "linux-arm64", "description": "ad hoc ssh device"},
        where=f"--device {spec}",
        default_name=spec,
    )
    return replace(profile, probe_target=True)  # linux-arm64 is a placeholder until the device is probed


def _adhoc_adb(spec: str) -> DeviceProfile:
    serial = spec[len("adb:") :]
    if not serial or not _SERIAL_RE.match(serial):
        raise MvlmError(f"--device {spec}: bad adb serial {serial!r}; use adb:SERIAL with a serial from `adb devices`")
    profile = profile_from_dict(
        {
            "transport": "adb",
            "address": serial,
            "target": "android-arm64",
            "threads": 4,
            "description": "ad hoc adb device",
        },
        where=f"--device {spec}",
        default_name=spec,
    )
    return replace(profile, probe_target=True)
