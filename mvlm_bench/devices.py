"""Device profiles: one small TOML file per device, validated into a ``DeviceProfile``.

A user adds a device by adding a file, not code. The schema (every key but ``transport`` and ``target`` optional)::

    name = "orin"                          # defaults to the file's stem; must match it when given
    description = "Jetson AGX Orin 64GB"
    transport = "ssh"                      # "local" | "ssh" | "adb"
    address = "ssh://nvidia@orin.local"    # ssh: ssh://[user@]host[:port] or [user@]host (an ~/.ssh/config alias works)
                                           # adb: the serial shown by `adb devices`; local: absent
    workdir = "/home/nvidia/mvlm"          # where artifacts go on the device; "~/..." is the login home (ssh, local)
    target = "orin"                        # runtime target: host | linux-arm64 | android-arm64 | orin
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
    options = ["ServerAliveInterval=15"]   # extra ssh -o options, "Key=Value"
    control_master = true                  # reuse one connection (ControlMaster/ControlPersist, private socket dir)

Public API (used by the benchmark runner and ``mvlm devices``; keep stable):

- ``load_profile(spec, search_dirs=None) -> DeviceProfile``: ``spec`` is a profile name, a path to a ``.toml``,
  ``ssh://user@host[:port]`` or ``adb:SERIAL`` (ad hoc profiles).
- ``list_profiles(search_dirs=None) -> list[DeviceProfile]``: every named profile, first found wins.
- ``profile_dirs() -> list[Path]``: where names are looked up: ``<repo>/devices``, ``~/.config/mvlm/devices``, then each
  directory in ``$MVLM_DEVICES_DIR`` (``os.pathsep``-separated; lets an installed-elsewhere package find profiles).

Every schema error is an ``MvlmError`` naming the file and the field, so a typo in a profile is one clear line.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mvlm_bench.runtime import TARGETS
from mvlm_convert.errors import MvlmError

TRANSPORTS = ("local", "ssh", "adb")
# The runtime targets `mvlm runtime build --target` knows: one list, kept by the runtime module.
KNOWN_TARGETS = TARGETS

DEFAULT_ADB_WORKDIR = "/data/local/tmp/mvlm"
DEFAULT_SSH_WORKDIR = "~/mvlm"
DEFAULT_LOCAL_WORKDIR = "~/.cache/mvlm/device/local"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Host, user and serial end up as arguments of ssh/adb: a leading "-" would turn them into options.
_HOST_RE = re.compile(r"^[A-Za-z0-9_.%:\[\]-]+$")
_USER_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.@-]*$")
_SERIAL_RE = re.compile(r"^[A-Za-z0-9_.:][A-Za-z0-9_.:-]*$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SSH_OPTION_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*=.+$")


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
    if spec.endswith(".toml") or os.sep in spec or "/" in spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise MvlmError(f"device profile {path} does not exist: give an existing .toml file or a profile name")
        return parse_profile_file(path)
    if not _NAME_RE.match(spec):
        raise MvlmError(f"bad device name {spec!r}: use a profile name, a .toml path, ssh://user@host or adb:SERIAL")
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


def list_profiles(search_dirs: list[Path] | None = None) -> list[DeviceProfile]:
    """Every profile in the search dirs, sorted by name; a name found in an earlier dir hides later ones."""
    dirs = profile_dirs() if search_dirs is None else [Path(d) for d in search_dirs]
    seen: dict[str, DeviceProfile] = {}
    for d in dirs:
        if not d.is_dir():
            continue
        for path in sorted(d.glob("*.toml")):
            if path.stem not in seen:
                seen[path.stem] = parse_profile_file(path)
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
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise MvlmError(f"{path}: not valid TOML ({e}); fix the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MvlmError(f"{path}: cannot read device profile ({e})") from None
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
    if threads is not None and threads < 1:
        raise MvlmError(f"{where}: field 'threads' must be >= 1")
    if threads is None and transport == "local":
        threads = os.cpu_count() or 1
    n_gpu_layers = data.get("n_gpu_layers", 0)
    if n_gpu_layers < 0:
        raise MvlmError(f"{where}: field 'n_gpu_layers' must be >= 0")

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
        if not isinstance(opt, str) or not _SSH_OPTION_RE.match(opt):
            raise MvlmError(f"{where}: field 'ssh.options' entry {opt!r} must look like 'Key=Value'")
        if opt.split("=", 1)[0].lower() == "stricthostkeychecking" and opt.split("=", 1)[1].lower() in ("no", "off"):
            raise MvlmError(
                f"{where}: field 'ssh.options' may not turn host-key checking off; pin the key with ssh.known_hosts instead"
            )
    timeout = table.get("connect_timeout", 10)
    if timeout < 1:
        raise MvlmError(f"{where}: field 'ssh.connect_timeout' must be >= 1")

    def path_of(key: str) -> str | None:
        value = table.get(key)
        if value is None:
            return None
        p = Path(value).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        return str(p)

    return SshOptions(
        port=port,
        identity_file=path_of("identity_file"),
        known_hosts=path_of("known_hosts"),
        config_file=path_of("config_file"),
        connect_timeout=timeout,
        options=tuple(options),
        control_master=table.get("control_master", True),
    )


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
    return profile_from_dict(
        {"transport": "ssh", "address": spec, "target": "linux-arm64", "description": "ad hoc ssh device"},
        where=f"--device {spec}",
        default_name=spec,
    )


def _adhoc_adb(spec: str) -> DeviceProfile:
    serial = spec[len("adb:") :]
    if not serial or not _SERIAL_RE.match(serial):
        raise MvlmError(f"--device {spec}: bad adb serial {serial!r}; use adb:SERIAL with a serial from `adb devices`")
    return profile_from_dict(
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
