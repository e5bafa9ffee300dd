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
    probe: bool = typer.Option(False, "--probe", help="Also ask each device (checked, even with --no-check) what it is: "
                                                      "its CPU's features (/proc/cpuinfo; on an emulated CPU the "
                                                      "kernel's hwcaps) and the CPU variant of the build it gets, "
                                                      "with a note where it is refused or not built; --json adds the "
                                                      "OS, the architecture and every feature."),
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
        extra: dict = {}
        if check or probe:
            try:
                t = make_transport(p)
                try:
                    t.check()
                    status = "reachable"
                    if probe:
                        extra = _probe(t, p)
                finally:
                    t.close()
            except MvlmError as err_:
                status = f"unreachable: {err_}"
                if names and worst is None:
                    worst = MvlmError(f"device {p.name} is unreachable: {err_}", exit_code=3)
        if extra.get("cpu_refused") and names and worst is None:
            worst = MvlmError(extra["cpu_note"])
        rows.append({"name": p.name, "transport": p.transport, "address": p.address or "", "target": p.target,
                     "threads": p.threads, "emulated": p.emulated, "status": status,
                     "source": str(p.source) if p.source else "", **extra})
    if json_:
        print(json.dumps(rows, indent=2))
    else:
        t = Table(title="Device profiles")
        cols = ["name", "transport", "address", "target", "status"] + (["CPU variant", "CPU features"] if probe else [])
        for col in cols:
            t.add_column(col, overflow="fold")
        for r in rows:
            style = "red" if r["status"].startswith("invalid") else None
            cells = [r["name"], r["transport"], r["address"], r["target"] + (" (emulated)" if r["emulated"] else ""),
                     r["status"]]
            if probe:
                variant = r.get("cpu_variant") or ("refused" if r.get("cpu_refused") else "")
                cells += [variant + (" (not built)" if r.get("cpu_variant_built") is False else ""),
                          _shown_features(r)]
            t.add_row(*cells, style=style)
        console.print(t)
        sys.stdout.flush()
    if worst is not None:
        raise worst


def _probe(transport, profile) -> dict:
    """What ``--probe`` adds to a reachable device's row: what it is, its CPU's features, the build it gets."""
    from mvlm_bench.device.cpu_features import choose
    from mvlm_bench.device.cpu_features import probe as cpu_probe
    from mvlm_bench.device.targets import resolve_target
    from mvlm_core.errors import MvlmError

    info = transport.probe()
    out: dict = {"system": info.system, "machine": info.machine, "android_abi": info.android_abi or None}
    try:
        resolved = resolve_target(profile, info)
    except MvlmError as e:
        return out | {"cpu_note": str(e)}
    transport.profile = resolved
    cpu = cpu_probe(transport, resolved)
    out |= {"target": resolved.target, "cpu_features": list(cpu.features), "cpu_features_source": cpu.source}
    try:
        variant, notes = choose(resolved, cpu)
    except MvlmError as e:
        return out | {"cpu_variant": None, "cpu_refused": True,
                      "cpu_note": str(e).removesuffix(" (nothing was pushed)")}
    built = None
    if variant:
        from mvlm_core import runtime as rtmod

        try:
            rtmod.find(resolved.target, cpu_variant=variant)
            built = True
        except MvlmError:
            built = False
            notes.append(f"the {variant} build is not built here (`mvlm runtime build --target {resolved.target} "
                         f"--cpu-variant {variant}`): a bench runs the best built one it runs")
    return out | {"cpu_variant": variant, "cpu_variant_built": built, "cpu_note": " / ".join(notes) or cpu.note or None}


# the features that decide a build (cpu_variants), shown in the table; --json lists them all
_SHOWN = ("asimddp", "asimdhp", "i8mm", "bf16", "sve", "sve2", "sme", "avx", "avx2", "fma", "f16c", "avx_vnni",
          "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def _shown_features(row: dict) -> str:
    feats, note = row.get("cpu_features"), row.get("cpu_note")
    if feats is None:
        return note or ""
    if row.get("cpu_features_source") is None:
        shown = "unknown"
    else:
        shown = (" ".join(f for f in _SHOWN if f in feats) or "none of these") + f" [{row['cpu_features_source']}]"
    return shown + (f"; {note}" if note else "")
