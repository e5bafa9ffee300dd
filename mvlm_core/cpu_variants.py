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
import re
import subprocess

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
# a device whose CPU features cannot be read: arm64 the default (every papers' device has dotprod), x86 the build that
# runs on any x86-64 (a native build carries the building machine's instruction sets)
UNKNOWN_CPU = {"arm64": "dotprod", "x86_64": "generic"}
# a qemu-user CPU model (qemu-aarch64 -cpu help, 7.2) that has each arm64 variant's features: what runs a variant here
QEMU_CPU = {"armv8.0": "cortex-a53", "dotprod": "cortex-a76", "i8mm": "max", "dotprod+kleidiai": "cortex-a76",
            "i8mm+kleidiai": "max,sme=off"}
ARM64_TARGETS = ("linux-arm64", "android-arm64")

PROBE_NAME = "mvlm-cpu"
PROBE_SOURCE = r"""/* mvlm-cpu: what the CPU this program runs on can execute: arm64 the kernel's AT_HWCAP / AT_HWCAP2 words,
   x86-64 the instruction sets CPUID reports (Linux's names for them). Under qemu-user: the emulated CPU model's. */
#include <stdio.h>
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif
int main(void) {
#if defined(__aarch64__) && defined(__linux__)
    printf("__MVLM_HWCAP__=%lx %lx\n", (unsigned long)getauxval(AT_HWCAP), (unsigned long)getauxval(AT_HWCAP2));
    return 0;
#elif defined(__x86_64__)
    __builtin_cpu_init();
    printf("__MVLM_X86__=");
    if (__builtin_cpu_supports("sse3")) printf(" pni");
    if (__builtin_cpu_supports("ssse3")) printf(" ssse3");
    if (__builtin_cpu_supports("sse4.1")) printf(" sse4_1");
    if (__builtin_cpu_supports("sse4.2")) printf(" sse4_2");
    if (__builtin_cpu_supports("popcnt")) printf(" popcnt");
    if (__builtin_cpu_supports("avx")) printf(" avx");
    if (__builtin_cpu_supports("avx2")) printf(" avx2");
    if (__builtin_cpu_supports("fma")) printf(" fma");
    if (__builtin_cpu_supports("f16c")) printf(" f16c");
    if (__builtin_cpu_supports("bmi")) printf(" bmi1");
    if (__builtin_cpu_supports("bmi2")) printf(" bmi2");
    if (__builtin_cpu_supports("avxvnni")) printf(" avx_vnni");
    if (__builtin_cpu_supports("avx512f")) printf(" avx512f");
    if (__builtin_cpu_supports("avx512cd")) printf(" avx512cd");
    if (__builtin_cpu_supports("avx512vl")) printf(" avx512vl");
    if (__builtin_cpu_supports("avx512dq")) printf(" avx512dq");
    if (__builtin_cpu_supports("avx512bw")) printf(" avx512bw");
    if (__builtin_cpu_supports("avx512vbmi")) printf(" avx512vbmi");
    if (__builtin_cpu_supports("avx512vnni")) printf(" avx512_vnni");
    if (__builtin_cpu_supports("avx512bf16")) printf(" avx512_bf16");
    if (__builtin_cpu_supports("avx512fp16")) printf(" avx512_fp16");
    if (__builtin_cpu_supports("avx512ifma")) printf(" avx512ifma");
    if (__builtin_cpu_supports("avx512vbmi2")) printf(" avx512_vbmi2");
    if (__builtin_cpu_supports("avx512bitalg")) printf(" avx512_bitalg");
    if (__builtin_cpu_supports("avx512vpopcntdq")) printf(" avx512_vpopcntdq");
    if (__builtin_cpu_supports("gfni")) printf(" gfni");
    if (__builtin_cpu_supports("vaes")) printf(" vaes");
    if (__builtin_cpu_supports("vpclmulqdq")) printf(" vpclmulqdq");
    if (__builtin_cpu_supports("aes")) printf(" aes");
    if (__builtin_cpu_supports("pclmul")) printf(" pclmulqdq");
    printf("\n");
    return 0;
#else
    return 3;
#endif
}
"""
HWCAP_MARKER = re.compile(r"^__MVLM_HWCAP__=([0-9a-f]{1,16}) ([0-9a-f]{1,16})$", re.M)
X86_MARKER = re.compile(r"^__MVLM_X86__=([a-z0-9_ ]{0,2000})$", re.M)
# the x86 instruction sets a -march=native build may use: the building machine's must all be on the CPU it runs on
X86_ISA = ("pni", "ssse3", "sse4_1", "sse4_2", "popcnt", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "avx_vnni",
           "avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512vbmi", "avx512_vnni", "avx512_bf16",
           "avx512_fp16", "avx512ifma", "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq", "gfni", "vaes",
           "vpclmulqdq", "aes", "pclmulqdq")


def parse_probe(output: str) -> list[str] | None:
    """The features the probe printed (exactly one marker line, at a line's start); None when it printed none or
    several (something beside the probe wrote one)."""
    arm, x86 = HWCAP_MARKER.findall(output), X86_MARKER.findall(output)
    if len(arm) + len(x86) != 1:
        return None
    if arm:
        return from_hwcaps(int(arm[0][0], 16), int(arm[0][1], 16))
    return sorted(set(x86[0].split()))




def emulated_features(wrapper: list[str], timeout: float = 60, target: str = "linux-arm64") -> list[str] | None:
    """The features of the CPU an emulator (``wrapper``: qemu-aarch64-static -cpu MODEL) gives an arm64 program: the
    probe run under it; None when there is no aarch64 compiler here for the probe. MvlmError with the emulator's own
    words when it cannot run the probe (an unknown -cpu model)."""
    from mvlm_core.exec_timer import build_tool

    tool = build_tool(PROBE_NAME, PROBE_SOURCE, "linux-arm64" if target in ARM64_TARGETS else "host")
    if tool is None:
        return None
    try:
        r = subprocess.run([*wrapper, str(tool)], capture_output=True, text=True, timeout=timeout, errors="replace")
    except subprocess.TimeoutExpired:
        raise MvlmError(f"{' '.join(wrapper)} ran the CPU probe past {timeout:.0f} s: check the wrapper") from None
    except OSError as e:
        raise MvlmError(f"{' '.join(wrapper)} cannot run the CPU probe ({e})") from None
    found = parse_probe(r.stdout)
    if r.returncode != 0 or found is None:
        said = [ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        raise MvlmError(f"{' '.join(wrapper)} cannot run the CPU probe (exit {r.returncode}"
                        + (f": {said[-1][:300]}" if said else "") + "): qemu -cpu help lists the CPU models")
    return found


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
    other = next((t for t in ("linux-arm64", "host") if any(v.name == name for v in variants_for(t))), None)
    hint = f" ({name} is a variant of the {other} target: --target {other}?)" if other and other != target else ""
    raise MvlmError(f"unknown CPU variant {name!r} for target {target}: choose one of "
                    f"{', '.join(v.name for v in choices)}{hint}")


_FEATURE_NAME = re.compile(r"[a-z0-9_.]{1,40}")
MAX_FEATURES = 512  # a real CPU lists ~40 (arm64) to ~150 (x86); a device that says more is not believed past this


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
            names = {f for f in value.split() if _FEATURE_NAME.fullmatch(f)}
            return sorted(names)[:MAX_FEATURES]
    return []


def local_features() -> list[str]:
    """This machine's CPU features (/proc/cpuinfo); [] where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return from_cpuinfo(f.read())
    except OSError:
        return []


def required(variant: Variant) -> tuple[str, ...]:
    """What a build of ``variant`` needs of the CPU it runs on: for ``native``, every instruction set of this machine
    (-march=native may use any of them: AVX512-FP16 in ggml's tinyBLAS and rope, for one), AMX aside (host builds
    turn it off)."""
    if variant.name == "native":
        here = set(local_features())
        return tuple(f for f in X86_ISA if f in here)
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


def refusal(device: str, target: str, variant: Variant, features: list[str], where: str | None = None) -> str:
    """One line: the variant needs what the CPU lacks (it would die with SIGILL), and which one fits. ``where``: the
    profile setting that asked for it (else it was --cpu-variant)."""
    lack = missing(variant, features)
    fits = best(target, features)
    how = (f"change {where} to {fits.name} or remove it" if where else
           f"use --cpu-variant {fits.name}, or leave --cpu-variant out")
    return (f"device {device}'s CPU lacks {', '.join(lack)}, which the {variant.name} build needs (it would stop with "
            f"SIGILL): {how} to get the fastest build it runs (nothing was pushed)")


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
