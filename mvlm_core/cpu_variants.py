"""CPU variants: the builds of one target that differ only in the instructions ggml's CPU kernels may use, the CPU
features each needs, and the choice of the fastest one a device's CPU runs.

arm64 (targets linux-arm64, android-arm64), static builds, one per feature level (docs/runtime.md says why not the
backend loader), each compiled with ``GGML_CPU_ARM_ARCH``:

    armv8.0   -march=armv8-a                        any arm64 CPU (Cortex-A53/A55 without dotprod, A57, A72)
    dotprod   -march=armv8.2-a+dotprod+fp16         Armv8.2 with the int8 dot product and fp16 arithmetic: Cortex-A76,
                                                    A78 (Snapdragon 888), A78AE (Jetson Orin), Neoverse-N1; the default
    i8mm      -march=armv8.2-a+dotprod+fp16+i8mm    + the int8 matrix multiply (llama.cpp's MATMUL_INT8 kernels):
                                                    Cortex-X2..X4, A710/A720 (Snapdragon 8 Gen 1..3), Neoverse-V1/N2

x86_64 (target host): ``native`` (-march=native of the building machine: the default) and ``generic`` (x86-64,
no AVX): the comparison benchmarks/cpu_variants.py measures, and the build for an ssh box whose CPU lacks an
instruction set this machine has.

A device's features are Linux's names for them (/proc/cpuinfo ``Features`` on arm64, ``flags`` on x86; on an
emulated CPU the kernel's auxiliary vector read by a tiny probe, since qemu-user shows the host's /proc/cpuinfo).
"""

from __future__ import annotations

import dataclasses

from mvlm_core.errors import MvlmError


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    arch: str  # "arm64" or "x86_64"
    needs: tuple[str, ...]  # Linux feature names the CPU must have
    cmake: tuple[str, ...]  # the CMake arguments that make it
    note: str
    optional: bool = False  # built only when asked (KleidiAI: its source is downloaded from GitHub at configure time)


ARM64 = (
    Variant("armv8.0", "arm64", (), ("-DGGML_CPU_ARM_ARCH=armv8-a",), "Armv8.0: NEON only"),
    Variant("dotprod", "arm64", ("asimddp", "asimdhp"), ("-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16",),
            "Armv8.2: int8 dot product, fp16 arithmetic"),
    Variant("i8mm", "arm64", ("asimddp", "asimdhp", "i8mm"), ("-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16+i8mm",),
            "Armv8.2 + int8 matrix multiply (MATMUL_INT8)"),
    # the same with Arm's KleidiAI micro-kernels (GGML_CPU_KLEIDIAI: q4_0/q8_0 matmuls, chosen at run time by the
    # CPU's features); run only when asked for (--cpu-variant): they change the numbers (docs/runtime.md)
    Variant("dotprod+kleidiai", "arm64", ("asimddp", "asimdhp"),
            ("-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16", "-DGGML_CPU_KLEIDIAI=ON"), "dotprod + KleidiAI", True),
    Variant("i8mm+kleidiai", "arm64", ("asimddp", "asimdhp", "i8mm"),
            ("-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16+i8mm", "-DGGML_CPU_KLEIDIAI=ON"), "i8mm + KleidiAI", True),
)
KLEIDIAI = "+kleidiai"
# generic x86-64: every instruction-set option of ggml off (ggml/CMakeLists.txt), so nothing past SSE2 is compiled in
_X86_OFF = tuple(f"-DGGML_{f}=OFF" for f in ("SSE42", "AVX", "AVX2", "BMI2", "AVX_VNNI", "FMA", "F16C", "AVX512",
                                              "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"))
X86_64 = (
    Variant("generic", "x86_64", (), ("-DGGML_NATIVE=OFF", *_X86_OFF), "x86-64 baseline (SSE2)"),
    Variant("native", "x86_64", (), ("-DGGML_NATIVE=ON",), "-march=native of the building machine"),
)
DEFAULT = {"arm64": "dotprod", "x86_64": "native"}
# a qemu-user CPU model (qemu-aarch64 -cpu help, 7.2) that has each arm64 variant's features: what runs a variant here
QEMU_CPU = {"armv8.0": "cortex-a53", "dotprod": "cortex-a76", "i8mm": "max", "dotprod+kleidiai": "cortex-a76",
            "i8mm+kleidiai": "max,sme=off"}
ARM64_TARGETS = ("linux-arm64", "android-arm64")
# the instruction sets ggml's x86 kernels are compiled for (ggml-cpu/CMakeLists.txt), as /proc/cpuinfo names them:
# a native build made where these are present needs them on the CPU it runs on
X86_RELEVANT = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512cd", "avx512vl",
                "avx512dq", "avx512bw", "avx512vbmi", "avx512_vnni", "avx512_bf16")

# Linux's arm64 hwcaps (arch/arm64/include/uapi/asm/hwcap.h): bit -> the name /proc/cpuinfo prints
_HWCAP = {0: "fp", 1: "asimd", 2: "evtstrm", 3: "aes", 4: "pmull", 5: "sha1", 6: "sha2", 7: "crc32", 8: "atomics",
          9: "fphp", 10: "asimdhp", 11: "cpuid", 12: "asimdrdm", 13: "jscvt", 14: "fcma", 15: "lrcpc", 16: "dcpop",
          17: "sha3", 18: "sm3", 19: "sm4", 20: "asimddp", 21: "sha512", 22: "sve", 23: "asimdfhm", 24: "dit",
          25: "uscat", 26: "ilrcpc", 27: "flagm", 28: "ssbs", 29: "sb", 30: "paca", 31: "pacg"}
_HWCAP2 = {0: "dcpodp", 1: "sve2", 2: "sveaes", 3: "svepmull", 4: "svebitperm", 5: "svesha3", 6: "svesm4",
           7: "flagm2", 8: "frint", 9: "svei8mm", 10: "svef32mm", 11: "svef64mm", 12: "svebf16", 13: "i8mm",
           14: "bf16", 15: "dgh", 16: "rng", 17: "bti", 18: "mte", 19: "ecv", 20: "afp", 21: "rpres", 22: "mte3",
           23: "sme"}


def variants_for(target: str) -> tuple[Variant, ...]:
    if target in ARM64_TARGETS:
        return ARM64
    if target == "host":
        return X86_64
    return ()


def arch_of_target(target: str) -> str | None:
    return "arm64" if target in ARM64_TARGETS else "x86_64" if target == "host" else None


def get(target: str, name: str) -> Variant:
    """The variant ``name`` of ``target``; one line listing the choices when there is no such variant."""
    choices = variants_for(target)
    for v in choices:
        if v.name == name:
            return v
    if not choices:
        raise MvlmError(f"--cpu-variant is for the linux-arm64, android-arm64 and host targets (target {target} has "
                        "one build)")
    raise MvlmError(f"unknown CPU variant {name!r} for target {target}: choose one of "
                    f"{', '.join(v.name for v in choices)}")


def from_hwcaps(hwcap: int, hwcap2: int) -> list[str]:
    """The feature names of an arm64 CPU from its AT_HWCAP / AT_HWCAP2 words."""
    names = [n for b, n in _HWCAP.items() if hwcap >> b & 1]
    return sorted(names + [n for b, n in _HWCAP2.items() if hwcap2 >> b & 1])


def from_cpuinfo(text: str, arch: str | None = None) -> list[str]:
    """The feature names in /proc/cpuinfo (arm64 ``Features``, x86 ``flags``: the first such line; only the one of
    ``arch`` when given, so another CPU's file is never read as this one's); [] when none."""
    keys = {"arm64": ("Features",), "x86_64": ("flags",)}.get(arch or "", ("Features", "flags"))
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys and value.strip():
            return sorted(set(value.split()))
    return []


def local_features() -> list[str]:
    """This machine's CPU features (/proc/cpuinfo); [] where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return from_cpuinfo(f.read())
    except OSError:
        return []


def required(variant: Variant) -> tuple[str, ...]:
    """What a build of ``variant`` needs of the CPU it runs on: for ``native``, the instruction sets of this machine
    that ggml compiles kernels for (-march=native uses them all)."""
    if variant.name == "native":
        here = set(local_features())
        return tuple(f for f in X86_RELEVANT if f in here)
    return variant.needs


def missing(variant: Variant, features: list[str] | set[str]) -> list[str]:
    have = set(features)
    return [f for f in required(variant) if f not in have]


def best(target: str, features: list[str] | set[str]) -> Variant:
    """The fastest variant of ``target`` whose every needed feature the CPU has (each ladder is ordered slowest
    first, and its first needs nothing); the optional ones (KleidiAI) are preferred by the session where built."""
    return [v for v in variants_for(target) if not v.optional and not missing(v, features)][-1]


def ladder(target: str) -> list[str]:
    """The target's variants from the fastest down, each optional one (KleidiAI) just before its plain level."""
    out: list[str] = []
    for v in variants_for(target):
        if not v.optional:
            out.insert(0, v.name)
    for v in variants_for(target):
        if v.optional:
            base = v.name.removesuffix(KLEIDIAI)
            out.insert(out.index(base), v.name)
    return out


def kleidiai_of(name: str) -> bool:
    return name.endswith(KLEIDIAI)


def refusal(device: str, target: str, variant: Variant, features: list[str]) -> str:
    """One line: the variant needs what the CPU lacks (it would die with SIGILL), and which one fits."""
    lack = missing(variant, features)
    fits = best(target, features)
    return (f"device {device}'s CPU lacks {', '.join(lack)}, which the {variant.name} build needs (it would stop with "
            f"SIGILL): use --cpu-variant {fits.name}, or leave --cpu-variant out to get the fastest build it runs "
            "(nothing was pushed)")


def kernels(system_info: str) -> list[str]:
    """The CPU backend's features that llama.cpp's ``system_info`` line says are on ("NEON = 1 | DOTPROD = 1 |
    MATMUL_INT8 = 1 ..." -> ["DOTPROD", "MATMUL_INT8", "NEON"]): what the build that ran was compiled with."""
    part = system_info.split("CPU : ", 1)[1] if "CPU : " in system_info else ""
    part = part.split(" : ", 1)[0].rsplit("|", 1)[0] if " : " in part else part
    out = []
    for item in part.split("|"):
        name, _, value = item.partition("=")
        if value.strip() == "1" and name.strip():
            out.append(name.strip())
    return sorted(set(out))


def variant_from_kernels(found: list[str]) -> str | None:
    """The variant a build is, from the CPU features llama.cpp's system_info says it was compiled with (:func:`kernels`):
    arm64 by its highest feature (MATMUL_INT8 -> i8mm, DOTPROD -> dotprod, NEON alone -> armv8.0), x86 generic when
    it has no AVX at all, else native; None when the line names neither."""
    k = set(found)
    if "NEON" in k:
        level = "i8mm" if "MATMUL_INT8" in k else "dotprod" if "DOTPROD" in k else "armv8.0"
        return level + (KLEIDIAI if "KLEIDIAI" in k else "")
    if k & {"SSE3", "AVX", "AVX2", "AVX512"}:
        return "native" if any(x.startswith("AVX") for x in k) else "generic"
    return None
