"""Which runtime build runs on a device: the targets a probed device can run (:func:`targets_for`), and a profile's
target checked against what the device says it is (:func:`resolve_target`: ad hoc devices get the target the probe
calls for; a profile whose target cannot run there is refused before anything is pushed)."""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path

from mvlm_bench.device.profiles import DeviceProfile
from mvlm_bench.device.transports.base import normalise_machine
from mvlm_core.errors import MvlmError

_TARGET_DESC = {
    "cuda": "this machine's own build with CUDA (an NVIDIA GPU)",
    "linux-arm64": "aarch64 Linux (static)",
    "android-arm64": "Android arm64-v8a",
    "orin": "aarch64 Linux with CUDA (Jetson Orin)",
}


def _host() -> tuple[str, str]:
    return platform.system(), normalise_machine(platform.machine())


def target_description(target: str) -> str:
    if target == "host":
        system, machine = _host()
        return f"{machine} {system}, this machine's own build"
    return _TARGET_DESC.get(target, target)


def targets_for(info) -> tuple[list[str], str | None]:
    """(runtime targets that run on a device, the one to suggest or None). ``info`` is a transports.DeviceInfo."""
    host_system, host_machine = _host()
    host_ok = not info.android and info.system == host_system and info.machine == host_machine
    if info.android:
        if info.android_abi == "arm64-v8a" or info.machine == "aarch64":
            return ["android-arm64", "linux-arm64"], "android-arm64"  # both builds are static aarch64
        return [], None
    if info.system == "Linux" and info.machine == "aarch64":
        return ["linux-arm64", "orin"] + (["host", "cuda"] if host_ok else []), "linux-arm64"
    if host_ok:
        return ["host", "cuda"], "host"  # cuda: the host recipe plus an NVIDIA GPU
    return [], None


def _wrapped_by_emulator(profile: DeviceProfile) -> bool:
    return any(Path(w).name.startswith("qemu-") for w in profile.exec_wrapper)


def emulated_here(profile: DeviceProfile) -> bool:
    """An emulated device whose processes run on this machine (a local profile with qemu as its exec_wrapper): a
    helper that wraps them is this machine's own program."""
    return profile.transport == "local" and _wrapped_by_emulator(profile)


def resolve_target(profile: DeviceProfile, info) -> DeviceProfile:
    """Ad hoc devices: the profile with the target the probe calls for. Profiles: refused when their target cannot
    run on the probed device (one line saying which build to make). Emulated (qemu) devices are not second-guessed."""
    if _wrapped_by_emulator(profile):
        return profile
    ok, suggest = targets_for(info)
    where = str(profile.source) if profile.source else f"--device {profile.name}"
    if profile.probe_target:
        if suggest is None:
            raise MvlmError(
                f"device {profile.name} is {info.describe()}: mvlm has no runtime target for it (targets: host = "
                f"{target_description('host')}, cuda, linux-arm64, android-arm64, orin)"
            )
        return dataclasses.replace(profile, target=suggest)
    if profile.target in ok:
        return profile
    if suggest is None:
        raise MvlmError(
            f"device {profile.name} is {info.describe()}, but {where} says target {profile.target!r} "
            f"({target_description(profile.target)}), and mvlm has no runtime target for this device"
        )
    raise MvlmError(
        f"device {profile.name} is {info.describe()}, but {where} says target {profile.target!r} "
        f"({target_description(profile.target)}): set target = \"{suggest}\" there and run "
        f"`mvlm runtime build --target {suggest}` (nothing was pushed)"
    )
