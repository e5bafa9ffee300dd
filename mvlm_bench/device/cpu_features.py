"""What a device's CPU can execute, read once per session before anything is pushed, and the build (CPU variant,
:mod:`mvlm_core.cpu_variants`) that follows from it.

Where the features come from (the record's ``cpu_features_source``):

- ``cpuinfo``: the device's /proc/cpuinfo (``Features`` on arm64 Linux and Android, ``flags`` on x86), read through
  the transport like any file;
- ``auxv`` / ``cpuid``: on an emulated device (a local profile whose exec_wrapper is qemu), /proc/cpuinfo is this
  machine's, so a tiny static probe (``mvlm-cpu``) runs under the wrapper and prints, for arm64, the kernel's
  auxiliary vector (``AT_HWCAP``, ``AT_HWCAP2``), which qemu fills in for the CPU model it emulates (``-cpu
  cortex-a53`` ... ``max``), for x86-64 what CPUID says (qemu-x86_64 ``-cpu Nehalem`` ...);
- ``profile``: neither could be read, and the profile names its CPU's features (``cpu_features``);
- ``None``: nothing known; the target's default build is used and the record says so.
"""

from __future__ import annotations

import dataclasses

from mvlm_bench.device.profiles import DeviceProfile
from mvlm_bench.device.targets import emulated_here
from mvlm_bench.device.transports.base import UnreachableError
from mvlm_core import cpu_variants
from mvlm_core.errors import MvlmError


@dataclasses.dataclass(frozen=True)
class CpuFeatures:
    features: tuple[str, ...]
    source: str | None  # cpuinfo | auxv | profile | None (module docstring)
    note: str = ""  # what was tried and failed, said once

    @property
    def known(self) -> bool:
        return self.source is not None


def probe(transport, profile: DeviceProfile) -> CpuFeatures:
    """The device's CPU features (module docstring); never raises for a device that does not say (the caller then
    uses the target's default build), only for a lost link (the transport's own error)."""
    note = ""
    arch = cpu_variants.arch_of_target(profile.target)
    if emulated_here(profile) and arch is not None:
        try:
            found = cpu_variants.emulated_features(list(profile.exec_wrapper), target=profile.target)
        except MvlmError as e:
            raise UnreachableError(f"device {profile.name}: {e}") from None
        if found is not None:
            return CpuFeatures(tuple(found), "auxv" if arch == "arm64" else "cpuid")
        note = "no compiler here for the CPU probe (apt-get install gcc-aarch64-linux-gnu)"
    else:
        try:
            text = transport.read_text("/proc/cpuinfo")
            read_error = None
        except (OSError, MvlmError) as e:
            if isinstance(e, UnreachableError):
                raise
            text, read_error = None, str(e)
        found = cpu_variants.from_cpuinfo(text or "", arch)
        if found:
            return CpuFeatures(tuple(found), "cpuinfo")
        line = {"arm64": " (no arm64 'Features' line)", "x86_64": " (no x86 'flags' line)"}.get(arch or "", "")
        note = (f"its /proc/cpuinfo could not be read ({read_error[:200]})" if read_error else
                f"the device's /proc/cpuinfo lists no CPU features{line}")
    if profile.cpu_features:
        return CpuFeatures(tuple(sorted(profile.cpu_features)), "profile", note + ": using the profile's cpu_features")
    return CpuFeatures((), None, note)


def with_cpu_variant(profile: DeviceProfile, cpu_variant: str | None) -> DeviceProfile:
    """The profile with --cpu-variant forced (checked against its target now; an ad hoc device's after the probe)."""
    if cpu_variant is None:
        return profile
    if not cpu_variant.strip():
        raise MvlmError("--cpu-variant is empty: name a variant (linux-arm64 / android-arm64: armv8.0, dotprod, i8mm, "
                        "dotprod+kleidiai, i8mm+kleidiai; host: native, generic), or leave the option out")
    if not profile.probe_target:
        cpu_variants.get(profile.target, cpu_variant)
    return dataclasses.replace(profile, cpu_variant=cpu_variant, cpu_variant_given=True)


def choose(profile: DeviceProfile, cpu: CpuFeatures, forced: str | None = None) -> tuple[str | None, list[str]]:
    """(the CPU variant to run, lines to log). ``forced`` (--cpu-variant, else the profile's cpu_variant) is refused in
    one line when the CPU lacks what it needs; unforced: the fastest variant the CPU runs. None: the target has one
    build (cuda, orin), or nothing is known of the CPU and nothing was forced (the default build runs)."""
    target = profile.target
    if not cpu_variants.variants_for(target):
        if forced:
            cpu_variants.get(target, forced)  # raises: this target has one build
        return None, []
    want = forced or profile.cpu_variant
    logs: list[str] = []
    lacking = [f for f in profile.cpu_features if cpu.source in ("cpuinfo", "auxv") and f not in cpu.features]
    if lacking:
        logs.append(f"device {profile.name}: its profile says the CPU has {', '.join(lacking)}, the device says it "
                    "does not (is it the device the profile describes?): going by the device")
    if want:
        from_profile = not forced and not profile.cpu_variant_given
        try:
            variant = cpu_variants.get(target, want)
        except MvlmError as e:
            raise MvlmError(f"{profile.source}: field 'cpu_variant': {e}" if from_profile and profile.source else str(e)) \
                from None
        if cpu.known and cpu_variants.missing(variant, cpu.features):
            where = f"cpu_variant = \"{want}\" in {profile.source or 'the profile'}" if from_profile else None
            raise MvlmError(cpu_variants.refusal(profile.name, target, variant, list(cpu.features), where))
        if not cpu.known:
            logs.append(f"device {profile.name}: its CPU features are unknown ({cpu.note}); running the {want} build "
                        "as asked")
        return variant.name, logs
    if not cpu.known:
        default = cpu_variants.UNKNOWN_CPU[cpu_variants.arch_of_target(target) or ""]
        logs.append(f"device {profile.name}: its CPU features are unknown ({cpu.note}); using the {default} build "
                    "(--cpu-variant picks another)")
        return default, logs
    return cpu_variants.best(target, cpu.features).name, logs
