"""What a device's CPU can execute, read once per session before anything is pushed, and the build (CPU variant,
:mod:`mvlm_core.cpu_variants`) that follows from it.

Where the features come from (the record's ``cpu_features_source``):

- ``cpuinfo``: the device's /proc/cpuinfo (``Features`` on arm64 Linux and Android, ``flags`` on x86), read through
  the transport like any file;
- ``auxv``: on an emulated device (a local profile whose exec_wrapper is qemu), /proc/cpuinfo is this machine's, so a
  tiny static probe (``mvlm-cpu``) runs under the wrapper and prints the kernel's auxiliary vector (``AT_HWCAP``,
  ``AT_HWCAP2``), which qemu fills in for the CPU model it emulates (``-cpu cortex-a53`` ... ``max``);
- ``profile``: neither could be read, and the profile names its CPU's features (``cpu_features``);
- ``None``: nothing known; the target's default build is used and the record says so.
"""

from __future__ import annotations

import dataclasses
import re

from mvlm_bench.device.profiles import DeviceProfile
from mvlm_bench.device.targets import emulated_here
from mvlm_core import cpu_variants
from mvlm_core.errors import MvlmError
from mvlm_core.exec_timer import build_tool

PROBE_NAME = "mvlm-cpu"
PROBE_SOURCE = r"""/* mvlm-cpu: print the kernel's AT_HWCAP / AT_HWCAP2 words (what an arm64 CPU can execute). */
#include <stdio.h>
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif
int main(void) {
#if defined(__aarch64__) && defined(__linux__)
    printf("__MVLM_HWCAP__=%lx %lx\n", (unsigned long)getauxval(AT_HWCAP), (unsigned long)getauxval(AT_HWCAP2));
    return 0;
#else
    return 3;
#endif
}
"""
_MARKER = re.compile(r"__MVLM_HWCAP__=([0-9a-f]+) ([0-9a-f]+)")


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
    if emulated_here(profile) and profile.target in cpu_variants.ARM64_TARGETS:
        tool = build_tool(PROBE_NAME, PROBE_SOURCE, "linux-arm64")
        if tool is None:
            note = "no aarch64 compiler here for the CPU probe (apt-get install gcc-aarch64-linux-gnu)"
        else:
            r = transport.run([str(tool)], timeout=60)
            m = _MARKER.search(r.output or "")
            if r.returncode == 0 and m:
                return CpuFeatures(tuple(cpu_variants.from_hwcaps(int(m[1], 16), int(m[2], 16))), "auxv")
            note = f"the CPU probe under {profile.exec_wrapper[0]} said nothing (exit {r.returncode})"
    else:
        try:
            text = transport.read_text("/proc/cpuinfo")
        except (OSError, MvlmError):
            text = None
        arch = cpu_variants.arch_of_target(profile.target)
        found = cpu_variants.from_cpuinfo(text or "", arch)
        if found:
            return CpuFeatures(tuple(found), "cpuinfo")
        line = {"arm64": " (no arm64 'Features' line)", "x86_64": " (no x86 'flags' line)"}.get(arch or "", "")
        note = f"the device's /proc/cpuinfo lists no CPU features{line}"
    if profile.cpu_features:
        return CpuFeatures(tuple(sorted(profile.cpu_features)), "profile", note + ": using the profile's cpu_features")
    return CpuFeatures((), None, note)


def with_cpu_variant(profile: DeviceProfile, cpu_variant: str | None) -> DeviceProfile:
    """The profile with --cpu-variant forced (checked against its target now; an ad hoc device's after the probe)."""
    if not cpu_variant:
        return profile
    if not profile.probe_target:
        cpu_variants.get(profile.target, cpu_variant)
    return dataclasses.replace(profile, cpu_variant=cpu_variant)


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
        variant = cpu_variants.get(target, want)
        if cpu.known and cpu_variants.missing(variant, cpu.features):
            raise MvlmError(cpu_variants.refusal(profile.name, target, variant, list(cpu.features)))
        if not cpu.known:
            logs.append(f"device {profile.name}: its CPU features are unknown ({cpu.note}); running the {want} build "
                        "as asked")
        return variant.name, logs
    if not cpu.known:
        default = cpu_variants.DEFAULT[cpu_variants.arch_of_target(target) or ""]
        logs.append(f"device {profile.name}: its CPU features are unknown ({cpu.note}); using the default {default} "
                    "build (--cpu-variant picks another)")
        return default, logs
    return cpu_variants.best(target, cpu.features).name, logs
