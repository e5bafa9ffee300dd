"""``mvlm devices``: the device profiles (devices/*.toml, ~/.config/mvlm/devices) and whether each is reachable."""

from __future__ import annotations

import json
import sys

import typer
from rich.table import Table

from mvlm_core.console import console as make_console

console = make_console()


def _entry(spec: str):
    """A profile named on the command line that is not on the search path: loaded as ``--device`` loads it (an
    invalid file becomes an invalid entry; an unknown name is refused in one line)."""
    from pathlib import Path

    from mvlm_bench.device.profiles import ProfileEntry, load_profile
    from mvlm_core.errors import MvlmError

    try:
        p = load_profile(spec)
    except MvlmError as e:
        if not (spec.endswith(".toml") or "/" in spec):
            raise
        return ProfileEntry(Path(spec).stem, Path(spec), None, str(e))
    return ProfileEntry(p.name, p.source or Path(spec), p)


def devices_cmd(
    names: list[str] | None = typer.Argument(None, help="Only these profiles (default: all): names, .toml paths, "
                                                        "ssh://user@host or adb:SERIAL, as --device takes them. A "
                                                        "named profile that is invalid (exit 2) or unreachable (exit "
                                                        "3) fails the command."),
    check: bool = typer.Option(True, "--check/--no-check", help="Check that each device is reachable."),
    json_: bool = typer.Option(False, "--json", help="JSON list instead of a table."),
) -> None:
    """List the device profiles (devices/*.toml, ~/.config/mvlm/devices) and whether each is reachable now.

    An invalid profile file is listed with what is wrong with it (status `invalid: ...`); the others are still listed
    and checked, and the exit status stays 0. Name profiles (`mvlm devices orin sd888`) to check just those: then an
    invalid one exits 2 and an unreachable one exits 3.
    """
    from mvlm_bench.device.profiles import scan_profiles
    from mvlm_bench.device.transports import make_transport
    from mvlm_core.errors import MvlmError

    entries = scan_profiles()
    if names:  # each as --device takes it: a profile name, a .toml path, ssh://user@host[:port], adb:SERIAL
        by_name = {e.name: e for e in entries}
        entries = [by_name[n] if n in by_name else _entry(n) for n in names]
    rows = []
    worst: MvlmError | None = None
    for e in entries:
        p = e.profile
        if p is None:
            rows.append({"name": e.name, "transport": "", "address": "", "target": "", "threads": None,
                         "emulated": False, "status": f"invalid: {e.error}", "source": str(e.path), "error": e.error})
            if names and (worst is None or worst.exit_code != 2):
                worst = MvlmError(e.error or f"{e.path}: invalid device profile")
            continue
        status = "not checked"
        if check:
            try:
                t = make_transport(p)
                try:
                    t.check()
                    status = "reachable"
                finally:
                    t.close()
            except MvlmError as err_:
                status = f"unreachable: {err_}"
                if names and worst is None:
                    worst = MvlmError(f"device {p.name} is unreachable: {err_}", exit_code=3)
        rows.append({"name": p.name, "transport": p.transport, "address": p.address or "", "target": p.target,
                     "threads": p.threads, "emulated": p.emulated, "status": status,
                     "source": str(p.source) if p.source else ""})
    if json_:
        print(json.dumps(rows, indent=2))
    else:
        t = Table(title="Device profiles")
        for col in ("name", "transport", "address", "target", "status"):
            t.add_column(col, overflow="fold")
        for r in rows:
            style = "red" if r["status"].startswith("invalid") else None
            t.add_row(r["name"], r["transport"], r["address"], r["target"] + (" (emulated)" if r["emulated"] else ""),
                      r["status"], style=style)
        console.print(t)
        sys.stdout.flush()
    if worst is not None:
        raise worst
