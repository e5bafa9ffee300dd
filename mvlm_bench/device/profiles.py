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
    cpu_features = ["asimddp", "i8mm"]     # what the CPU is documented to have (Linux's names), checked against the
                                           # probe: a device that lacks one is named (wrong serial?), never guessed
    cpu_variant = "i8mm"                   # force a CPU variant of the target's build (default: the fastest the
                                           # probed CPU runs; mvlm_core.cpu_variants)
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
this machine): the ``[ssh]`` table is held to an allow-list (:mod:`mvlm_bench.device.ssh_config`). What each
transport kind accepts (its address, work dir, ad hoc form, own table) is said by its transport class
(:mod:`mvlm_bench.device.transports`), so a new kind adds no code here.

Public API (used by the benchmark runner and ``mvlm devices``; keep stable):

- ``load_profile(spec, search_dirs=None) -> DeviceProfile``: ``spec`` is a profile name, a path to a ``.toml``,
  ``ssh://user@host[:port]`` or ``adb:SERIAL`` (ad hoc profiles).
- ``list_profiles(search_dirs=None) -> list[DeviceProfile]``: every named profile, first found wins (raises on the
  first invalid file).
- ``scan_profiles(search_dirs=None) -> list[ProfileEntry]``: the same, but an invalid file is an entry with its error
  instead of an exception (``mvlm devices`` lists the good ones and flags the bad one).
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

from mvlm_bench.device.fields import bounded, check_table
from mvlm_bench.device.ssh_config import SshOptions, split_ssh_address
from mvlm_core.atomic import file_kind, read_small
from mvlm_core.errors import MvlmError
from mvlm_core.runtime import TARGETS

# The runtime targets `mvlm runtime build --target` knows: one list, kept by the runtime module.
KNOWN_TARGETS = TARGETS

# Bounds of the numeric fields, the same as the command line's (--threads, --n-gpu-layers).
MAX_THREADS = 1024
MAX_GPU_LAYERS = 100000

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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
    cpu_features: tuple[str, ...] = ()
    cpu_variant: str | None = None
    cpu_variant_given: bool = False  # cpu_variant came from the command line (--cpu-variant), not the file
    env: dict[str, str] = field(default_factory=dict)
    ssh: SshOptions = field(default_factory=SshOptions)
    source: Path | None = None  # the .toml it came from; None for ad hoc profiles
    # Ad hoc devices (ssh://..., adb:SERIAL): ``target`` is a placeholder; the runner probes the device (uname -m,
    # getprop ro.product.cpu.abi) and picks the runtime target from what it finds.
    probe_target: bool = False

    @property
    def ssh_user(self) -> str | None:
        return split_ssh_address(self.address or "", self._where())[0] if self.transport == "ssh" else None

    @property
    def ssh_host(self) -> str | None:
        return split_ssh_address(self.address or "", self._where())[1] if self.transport == "ssh" else None

    @property
    def ssh_port(self) -> int | None:
        if self.transport != "ssh":
            return None
        url_port = split_ssh_address(self.address or "", self._where())[2]
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
            "cpu_variant": self.cpu_variant,
        }


# --------------------------------------------------------------------------------------------------- lookup


def repo_devices_dir() -> Path | None:
    """``<repo>/devices`` when this package runs from a source checkout (editable install); else None."""
    candidate = Path(__file__).resolve().parents[2] / "devices"
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
    kind = _adhoc_kind(spec)
    if kind is not None:
        return _adhoc_profile(kind, spec)
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", spec)
    if scheme:
        raise MvlmError(f"--device {spec}: unknown scheme {scheme.group(1)}://; {_DEVICE_FORMS}")
    if len(spec) > 1024:
        raise MvlmError(f"--device {spec[:40]}...: {len(spec)} characters is no device; {_DEVICE_FORMS}")
    if spec.endswith(".toml") or os.sep in spec or "/" in spec:
        path = Path(spec).expanduser()
        try:
            path.exists()
        except OSError as e:
            raise MvlmError(f"--device {spec[:60]}...: {e.strerror or e}; {_DEVICE_FORMS}") from None
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


def _adhoc_kind(spec: str):
    """The transport class whose ad hoc form ``spec`` is (``ssh://...``, ``adb:...``), else None."""
    from mvlm_bench.device.transports import transport_kinds

    return next((k for k in transport_kinds().values() if k.adhoc_prefix and spec.startswith(k.adhoc_prefix)), None)


def _adhoc_profile(kind, spec: str) -> DeviceProfile:
    """``--device ssh://user@host`` / ``adb:SERIAL``: a profile whose target is a placeholder until the device is probed
    (``probe_target``)."""
    profile = profile_from_dict(kind.adhoc_fields(spec), where=f"--device {spec}", default_name=spec)
    return replace(profile, probe_target=True)


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
    "cpu_features": list,
    "cpu_variant": str,
    "env": dict,
}  # and each transport kind's own table ([ssh]): _top_keys()


def _top_keys() -> dict[str, type]:
    return _TOP_KEYS | {k.options_table: dict for k in _all_kinds() if k.options_table}


MAX_PROFILE_BYTES = 1 << 20  # a profile is a page of TOML; a bigger file is not one


def parse_profile_file(path: Path) -> DeviceProfile:
    """Read and validate one profile file; errors name the file and the field."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO would block the read forever; a device is no profile
        raise MvlmError(f"{path}: not a device profile file ({file_kind(path)}); give a .toml file")
    try:
        text = read_small(path, MAX_PROFILE_BYTES, "a device profile (.toml)").decode("utf-8")
    except UnicodeDecodeError as e:
        raise MvlmError(f"{path}: cannot read device profile ({e})") from None
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as e:  # ValueError: an integer too long to convert
        raise MvlmError(f"{path}: not valid TOML ({e}); fix the file") from None
    except RecursionError:
        raise MvlmError(f"{path}: not a device profile (arrays or tables nested thousands deep); fix the file") from None
    return profile_from_dict(data, where=str(path), default_name=path.stem, base_dir=path.parent, source=path)


def profile_from_dict(
    data: dict[str, Any],
    *,
    where: str,
    default_name: str,
    base_dir: Path | None = None,
    source: Path | None = None,
) -> DeviceProfile:
    """Validate a parsed profile table. ``where`` names it in errors (the file path). The transport kind checks its
    own fields (address, work dir, its table): :mod:`mvlm_bench.device.transports`."""
    from mvlm_bench.device.transports import transport_kinds

    check_table(data, _top_keys(), where, prefix="")
    name = data.get("name", default_name)
    if ("name" in data or source is not None) and not _NAME_RE.match(name):
        raise MvlmError(f"{where}: field 'name' = {name!r} must be letters, digits, '.', '_' or '-'")
    if source is not None and name != default_name:
        raise MvlmError(f"{where}: field 'name' = {name!r} differs from the file name; rename the file to {name}.toml")
    for key in ("transport", "target"):
        if key not in data:
            raise MvlmError(f"{where}: missing required field '{key}'")
    kinds = transport_kinds()
    transport = data["transport"]
    if transport not in kinds:
        raise MvlmError(f"{where}: field 'transport' = {transport!r} is unknown; use one of {', '.join(kinds)}")
    kind = kinds[transport]
    target = data["target"]
    if target not in KNOWN_TARGETS:
        raise MvlmError(f"{where}: field 'target' = {target!r} is unknown; use one of {', '.join(KNOWN_TARGETS)}")
    address = kind.check_address(data.get("address"), where)
    workdir = data.get("workdir", kind.default_workdir)
    _check_workdir(workdir, where)
    kind.check_workdir(workdir, where)
    threads = data.get("threads")
    if threads is not None:
        bounded(where, "threads", threads, 1, MAX_THREADS)
    if threads is None and kind.capabilities.wall_clock:  # this machine: all its cores
        threads = os.cpu_count() or 1
    n_gpu_layers = data.get("n_gpu_layers", 0)
    bounded(where, "n_gpu_layers", n_gpu_layers, 0, MAX_GPU_LAYERS)
    exec_wrapper = data.get("exec_wrapper", [])
    if not all(isinstance(x, str) and x for x in exec_wrapper):
        raise MvlmError(f"{where}: field 'exec_wrapper' must be a list of non-empty strings")
    env = data.get("env", {})
    for k, v in env.items():
        if not _ENV_KEY_RE.match(k):
            raise MvlmError(f"{where}: field 'env.{k}': variable names are letters, digits and '_'")
        if not isinstance(v, str):
            raise MvlmError(f"{where}: field 'env.{k}' must be a string")
    features = data.get("cpu_features", [])
    if not all(isinstance(x, str) and re.fullmatch(r"[a-z0-9_]{1,40}", x) for x in features):
        raise MvlmError(f"{where}: field 'cpu_features' must be a list of Linux CPU feature names (as /proc/cpuinfo "
                        "prints them: asimddp, i8mm, avx2)")
    cpu_variant = data.get("cpu_variant")
    if cpu_variant is not None:
        from mvlm_core import cpu_variants

        try:
            cpu_variants.get(target, cpu_variant)
        except MvlmError as e:
            raise MvlmError(f"{where}: field 'cpu_variant': {e}") from None
    options = _kind_options(kind, data, address, where, base_dir)
    return DeviceProfile(name=name, description=data.get("description", ""), transport=transport, address=address,
                         workdir=workdir, target=target, threads=threads, n_gpu_layers=n_gpu_layers,
                         exec_wrapper=tuple(exec_wrapper), emulated=data.get("emulated", False), env=dict(env),
                         cpu_features=tuple(features), cpu_variant=cpu_variant,
                         ssh=options if isinstance(options, SshOptions) else SshOptions(), source=source)


def _kind_options(kind, data: dict[str, Any], address: str | None, where: str, base_dir: Path | None):
    """The transport kind's own table (``[ssh]``), refused in a profile of another kind."""
    for table in {k.options_table for k in _all_kinds() if k.options_table}:
        if table in data and table != kind.options_table:
            raise MvlmError(f"{where}: table [{table}] is only for transport {table!r} (this profile is {kind.kind!r})")
    if not kind.options_table:
        return None
    return kind.parse_options(data.get(kind.options_table) or {}, where, base_dir, address)


def _all_kinds():
    from mvlm_bench.device.transports import transport_kinds

    return transport_kinds().values()


# directories whose bin/ and lib/ a push would mix mvlm's files into (Linux, Android): never a work dir
_SYSTEM_DIRS = {"/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media", "/mnt",
                "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/usr", "/var", "/data", "/system",
                "/vendor", "/sdcard", "/usr/local", "/data/local"}


def _check_workdir(workdir: str, where: str) -> None:
    if not workdir or "\0" in workdir or "\n" in workdir:
        raise MvlmError(f"{where}: field 'workdir' must be a non-empty path on one line")
    if workdir.startswith("-"):
        raise MvlmError(f"{where}: field 'workdir' may not start with '-'")
    import posixpath

    norm = posixpath.normpath(workdir) if workdir.startswith("/") else workdir.rstrip("/")
    if norm in ("/", "~", ".") or norm in _SYSTEM_DIRS:
        suggestion = posixpath.join(norm if norm != "." else "~", "mvlm")
        raise MvlmError(f"{where}: field 'workdir' is {workdir!r}: mvlm puts its bin/, lib/ and models/ there, beside "
                        f"whatever the directory holds; give a directory of its own, e.g. {suggestion!r}")
