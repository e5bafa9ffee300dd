"""CPU-matched runtimes (issue 26): each device's CPU features are probed before anything is pushed, the device gets
the fastest build its CPU runs, a build it cannot run is refused in one line (never a SIGILL), the record says which
kernels ran (llama.cpp's own system_info line), and every arm64 variant computes the same thing.

Proven here under qemu-aarch64 with CPU models that do and do not have the features: cortex-a53 (Armv8.0: no dot
product), cortex-a76 (Armv8.2: dotprod + fp16) and max (+ i8mm, SVE2, bf16). qemu-user shows this machine's
/proc/cpuinfo, so an emulated device's features come from the kernel's auxiliary vector that qemu fills in for the
model it emulates (the mvlm-cpu probe)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mvlm_bench.device.cpu_features import CpuFeatures, choose
from mvlm_bench.device.profiles import load_profile, profile_from_dict
from mvlm_core import cpu_variants as cv
from mvlm_core import runtime as rtmod
from mvlm_core.errors import MvlmError

REPO = Path(__file__).resolve().parents[1]
MVLM = [sys.executable, "-m", "mvlm"]
needs_qemu = pytest.mark.skipif(shutil.which("qemu-aarch64-static") is None,
                                reason="qemu-aarch64-static is not installed (apt-get install qemu-user-static)")
# qemu CPU model -> the variant it must get (the fastest whose features it has)
EXPECTED = {"cortex-a53": "armv8.0", "cortex-a76": "dotprod", "max": "i8mm"}

# real lines, as the kernels print them: an Armv8.2 phone (Snapdragon 888 class) and this kind of x86 server
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 38.40
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
"""
X86_CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 avx512f avx512dq avx512cd avx512bw avx512vl
"""


# --- the rules, on their own --------------------------------------------------------------------------------------
def test_features_are_read_from_cpuinfo_and_hwcaps():
    assert {"asimddp", "asimdhp", "fphp"} <= set(cv.from_cpuinfo(ARM_CPUINFO, "arm64"))
    assert "i8mm" not in cv.from_cpuinfo(ARM_CPUINFO, "arm64")
    assert {"avx2", "avx512f", "fma"} <= set(cv.from_cpuinfo(X86_CPUINFO, "x86_64"))
    # another CPU's file is never read as this one's (a phone double that shows its host's /proc/cpuinfo)
    assert cv.from_cpuinfo(X86_CPUINFO, "arm64") == [] and cv.from_cpuinfo(ARM_CPUINFO, "x86_64") == []
    # Linux's hwcap bits: asimddp is AT_HWCAP bit 20, asimdhp bit 10; i8mm is AT_HWCAP2 bit 13, sve2 bit 1
    assert cv.from_hwcaps(1 << 20 | 1 << 10, 1 << 13 | 1 << 1) == ["asimddp", "asimdhp", "i8mm", "sve2"]
    assert cv.from_hwcaps(0, 0) == []


@pytest.mark.parametrize("features, want", [
    ([], "armv8.0"), (["asimd", "asimdhp", "sve"], "armv8.0"),  # a64fx: SVE and fp16, but no dot product
    (["asimddp", "asimdhp"], "dotprod"), (["asimddp"], "armv8.0"),  # dotprod needs fp16 arithmetic too
    (["asimddp", "asimdhp", "i8mm"], "i8mm"), (["asimddp", "asimdhp", "i8mm", "sve2", "bf16"], "i8mm"),
])
def test_the_fastest_variant_the_cpu_runs(features, want):
    assert cv.best("linux-arm64", features).name == want
    assert cv.best("android-arm64", features).name == want


def test_the_papers_devices_get_the_builds_their_cpus_run():
    """The profiles name their CPUs' features (with the source in a comment); the rule picks their builds."""
    assert cv.best("android-arm64", load_profile("sd888").cpu_features).name == "dotprod"
    assert cv.best("android-arm64", load_profile("sd8gen3").cpu_features).name == "i8mm"
    orin = load_profile("orin")
    assert "asimddp" in orin.cpu_features and cv.variants_for(orin.target) == ()  # one CUDA build


def test_the_probe_line_is_read_only_where_the_probe_writes_it():
    assert cv.parse_probe("__MVLM_HWCAP__=100400 2000\n") == ["asimddp", "asimdhp", "i8mm"]
    assert cv.parse_probe("__MVLM_X86__= sse4_2 avx2\n") == ["avx2", "sse4_2"]
    assert cv.parse_probe("x__MVLM_HWCAP__=100000 2000\n") is None  # not at a line's start
    assert cv.parse_probe("__MVLM_HWCAP__=ffffffff ffffffff\n__MVLM_HWCAP__=0 0\n") is None  # someone else wrote one
    assert cv.parse_probe("garbage") is None
    many = "Features\t: " + " ".join(f"f{i}" for i in range(5000)) + " asimddp BAD\xff \n"
    got = cv.from_cpuinfo(many, "arm64")
    assert len(got) == cv.MAX_FEATURES and all(f.isascii() and f.islower() or f[1:].isdigit() for f in got)


def test_x86_native_build_needs_what_this_machine_has():
    """A native host build carries this machine's instruction sets: an ssh box without one gets the generic build."""
    here = cv.local_features()
    native = cv.get("host", "native")
    assert cv.missing(native, here) == []
    assert cv.best("host", here).name == "native"
    if cv.required(native):  # this machine has AVX or better: a CPU without it cannot run the native build
        assert cv.best("host", ["sse2"]).name == "generic"
        assert cv.missing(native, ["sse2"]) == list(cv.required(native))
    if "avx512_fp16" in here:  # ggml's tinyBLAS and rope use it in a native build: a CPU without it is refused
        assert cv.best("host", [f for f in here if f != "avx512_fp16"]).name == "generic"


def test_variant_build_arguments_and_keys():
    src = rtmod.Source(Path("/nonexistent"), "test-source", "0c1e570", "test")
    default, _ = rtmod.cmake_args(rtmod.BuildOptions(target="linux-arm64"), src)
    dotprod, _ = rtmod.cmake_args(rtmod.BuildOptions(target="linux-arm64", cpu_variant="dotprod"), src)
    i8mm, note = rtmod.cmake_args(rtmod.BuildOptions(target="linux-arm64", cpu_variant="i8mm"), src)
    base, _ = rtmod.cmake_args(rtmod.BuildOptions(target="linux-arm64", cpu_variant="armv8.0"), src)
    assert default == dotprod  # the default build is the dotprod variant: its cache key did not change
    assert "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16+i8mm" in i8mm and "i8mm" in note
    assert "-DGGML_CPU_ARM_ARCH=armv8-a" in base
    assert sum(a.startswith("-DGGML_CPU_ARM_ARCH=") for a in i8mm) == 1
    native, _ = rtmod.cmake_args(rtmod.BuildOptions(target="host"), src)
    generic, gnote = rtmod.cmake_args(rtmod.BuildOptions(target="host", cpu_variant="generic"), src)
    assert "-DGGML_NATIVE=ON" in native and "-DGGML_NATIVE=OFF" in generic and "-DGGML_AVX2=OFF" in generic
    assert "generic" in gnote
    keys = {rtmod.build_key(src, [], rtmod.BuildOptions(target="linux-arm64", cpu_variant=v), a)
            for v, a in (("dotprod", dotprod), ("i8mm", i8mm), ("armv8.0", base))}
    assert len(keys) == 3
    for v, a in (("dotprod", default), ("i8mm", i8mm), ("armv8.0", base)):
        assert rtmod.variant_of({"target": "linux-arm64", "cmake_args": a}) == v
    with pytest.raises(MvlmError, match="choose one of armv8.0, dotprod, i8mm"):
        rtmod.cmake_args(rtmod.BuildOptions(target="linux-arm64", cpu_variant="sve"), src)
    with pytest.raises(MvlmError, match="target orin has one build"):
        rtmod.cmake_args(rtmod.BuildOptions(target="orin", cpu_variant="i8mm"), src)


def test_kleidiai_variants_build_from_a_given_tree_or_the_download(tmp_path):
    """The KleidiAI variants: the pinned version's tree (checked) or CMake's download, one build key either way."""
    src = rtmod.pinned_source() if (rtmod.cache_root() / "src").is_dir() else None
    if src is None:
        pytest.fail("the pinned llama.cpp source is not extracted: run `make setup`")
    want = rtmod.pinned_kleidiai(src)
    assert want and want.count(".") == 2  # the pinned ggml names the KleidiAI release it downloads
    tree = tmp_path / "kleidiai"
    tree.mkdir()
    (tree / "CMakeLists.txt").write_text(f"cmake_minimum_required(VERSION 3.18)\nproject(KleidiAI VERSION {want}\n"
                                         "    LANGUAGES C CXX ASM)\n")
    given, note = rtmod.cmake_args(rtmod.BuildOptions(target="linux-arm64", cpu_variant="i8mm+kleidiai",
                                                      kleidiai_src=tree), src)
    download, dnote = rtmod.cmake_args(rtmod.BuildOptions(target="linux-arm64", cpu_variant="i8mm+kleidiai"), src)
    assert "-DGGML_CPU_KLEIDIAI=ON" in given and f"-DFETCHCONTENT_SOURCE_DIR_KLEIDIAI={tree.resolve()}" in given
    assert "from GitHub" in dnote and f"KleidiAI {want}" in note
    opts = rtmod.BuildOptions(target="linux-arm64", cpu_variant="i8mm+kleidiai")
    assert rtmod.build_key(src, [], opts, given) == rtmod.build_key(src, [], opts, download)
    assert rtmod.variant_of({"target": "linux-arm64", "cmake_args": given}) == "i8mm+kleidiai"
    plain, _ = rtmod.cmake_args(rtmod.BuildOptions(target="linux-arm64", cpu_variant="i8mm"), src)
    assert rtmod.variant_of({"target": "linux-arm64", "cmake_args": plain}) == "i8mm"
    (tree / "CMakeLists.txt").write_text("project(KleidiAI VERSION 0.9.0 LANGUAGES C)\n")
    with pytest.raises(MvlmError, match=f"KleidiAI 0.9.0; this llama.cpp source is made for {want}"):
        rtmod.cmake_args(rtmod.BuildOptions(target="linux-arm64", cpu_variant="i8mm+kleidiai", kleidiai_src=tree), src)
    with pytest.raises(MvlmError, match="not a KleidiAI source tree"):
        rtmod.check_options(rtmod.BuildOptions(target="linux-arm64", cpu_variant="i8mm+kleidiai",
                                               kleidiai_src=tmp_path))
    with pytest.raises(MvlmError, match="for the KleidiAI variants"):
        rtmod.check_options(rtmod.BuildOptions(target="linux-arm64", cpu_variant="i8mm", kleidiai_src=tree))
    # never chosen by the features alone: it runs when asked for (its numbers differ; docs/runtime.md)
    assert cv.best("linux-arm64", ["asimddp", "asimdhp", "i8mm"]).name == "i8mm"
    assert cv.ladder("linux-arm64") == ["i8mm+kleidiai", "i8mm", "dotprod+kleidiai", "dotprod", "armv8.0"]
    assert cv.variant_from_kernels(["NEON", "DOTPROD", "MATMUL_INT8", "KLEIDIAI"]) == "i8mm+kleidiai"


def _profile(**kw):
    data = {"transport": "local", "target": "linux-arm64", "exec_wrapper": ["qemu-aarch64-static"], "emulated": True}
    return profile_from_dict({**data, **kw}, where="test", default_name="dev")


def test_choose_refuses_what_the_cpu_lacks_and_says_what_it_assumes():
    a53 = CpuFeatures(("asimd", "fp"), "auxv")
    with pytest.raises(MvlmError) as e:
        choose(_profile(), a53, "i8mm")
    msg = str(e.value)
    assert "lacks asimddp, asimdhp, i8mm" in msg and "--cpu-variant armv8.0" in msg and "nothing was pushed" in msg
    assert "\n" not in msg
    # asked for in the profile file: the message names the file's field, not an option the user never gave
    with pytest.raises(MvlmError, match='change cpu_variant = "i8mm" in the profile to armv8.0'):
        choose(_profile(cpu_variant="i8mm"), a53)
    assert choose(_profile(), a53) == ("armv8.0", [])
    assert choose(_profile(cpu_variant="armv8.0"), CpuFeatures(("asimddp", "asimdhp", "i8mm"), "auxv"))[0] == "armv8.0"
    # nothing known of the CPU: the default build, said once
    variant, notes = choose(_profile(), CpuFeatures((), None, "the probe said nothing"))
    assert variant == "dotprod" and "unknown" in notes[0] and "--cpu-variant" in notes[0]
    # the profile's own features are a fallback, and a device that lacks them is named
    variant, notes = choose(_profile(cpu_features=["asimddp", "asimdhp", "i8mm"]), CpuFeatures(("asimddp", "asimdhp"),
                                                                                               "cpuinfo"))
    assert variant == "dotprod" and "i8mm" in notes[0] and "going by the device" in notes[0]
    with pytest.raises(MvlmError, match="cpu_variant.*choose one of"):
        _profile(cpu_variant="avx2")


def test_system_info_says_which_kernels_ran():
    from mvlm_bench.records.log_facts import run_facts

    line = ("0.02.529.494 I system_info: n_threads = 2 (n_threads_batch = 2) / 2 | CPU : NEON = 1 | ARM_FMA = 1 | "
            "FP16_VA = 1 | MATMUL_INT8 = 1 | DOTPROD = 1 | REPACK = 1 | ")
    f = run_facts(line)
    assert f["cpu_variant"] == "i8mm" and "MATMUL_INT8" in f["cpu_kernels"].split(",")
    assert f["cpu_variant_source"] == "system_info"
    cuda = ("system_info: n_threads = 4 (n_threads_batch = 4) / 12 | CUDA : ARCHS = 870 | USE_GRAPHS = 1 | "
            "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | OPENMP = 1 | REPACK = 1 |")
    assert run_facts(cuda)["cpu_variant"] == "dotprod"
    # 2023's line does not name DOTPROD at all: no claim is made from it
    old = (REPO / "tests/data/llama-cpp-outputs/02_ggml-ci_c574bdd_arm64-cpu_main-f16_2023-08.txt").read_text()
    assert "cpu_variant" not in run_facts(old)


# --- the builds, under emulated CPUs ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def arm64_variants() -> dict[str, rtmod.Runtime]:
    """Every arm64 variant built (the default one first: with ccache the others recompile ggml's CPU backend only;
    cross-built on first use, then cached)."""
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.fail("no aarch64 cross compiler: install it (the project's setup script does: apt-get install "
                    "g++-aarch64-linux-gnu)")
    names = ["dotprod", *(v.name for v in cv.ARM64 if v.name != "dotprod" and not v.optional)]
    return {n: rtmod.build(rtmod.BuildOptions(target="linux-arm64", cpu_variant=n)) for n in names}


def _qemu_profile(tmp_path: Path, cpu: str, name: str | None = None) -> Path:
    name = name or f"qemu-{cpu}"
    p = tmp_path / f"{name}.toml"
    p.write_text(f'transport = "local"\ntarget = "linux-arm64"\nthreads = 2\nemulated = true\n'
                 f'exec_wrapper = ["qemu-aarch64-static", "-cpu", "{cpu}"]\nworkdir = "{tmp_path / name}"\n')
    return p


@pytest.mark.slow
@pytest.mark.qemu
@needs_qemu
def test_devices_probe_reads_the_emulated_cpu(tmp_path):
    profiles = [str(_qemu_profile(tmp_path, cpu)) for cpu in EXPECTED]
    r = subprocess.run([*MVLM, "devices", "--probe", "--json", *profiles], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    for cpu, want in EXPECTED.items():
        row = rows[f"qemu-{cpu}"]
        assert row["cpu_features_source"] == "auxv" and row["cpu_variant"] == want, row
    assert "i8mm" in rows["qemu-max"]["cpu_features"] and "asimddp" not in rows["qemu-cortex-a53"]["cpu_features"]
    # an emulated x86 CPU: CPUID under qemu-x86_64, not this machine's /proc/cpuinfo; the native build needs more
    x86 = tmp_path / "qemu-nehalem.toml"
    x86.write_text(f'transport = "local"\ntarget = "host"\nemulated = true\nworkdir = "{tmp_path / "x"}"\n'
                   'exec_wrapper = ["qemu-x86_64-static", "-cpu", "Nehalem"]\n')
    r = subprocess.run([*MVLM, "devices", "--probe", "--json", str(x86)], capture_output=True, text=True, timeout=120)
    row = json.loads(r.stdout)[0]
    assert row["cpu_features_source"] == "cpuid" and "sse4_2" in row["cpu_features"] and "avx" not in row["cpu_features"]
    assert row["cpu_variant"] == ("generic" if cv.required(cv.get("host", "native")) else "native")
    # a CPU model qemu does not know: the device is unreachable, in qemu's own words, not probed as "baseline"
    bad = _qemu_profile(tmp_path, "cortex-a99", "qemu-a99")
    r = subprocess.run([*MVLM, "devices", "--probe", "--json", str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and "unable to find CPU model 'cortex-a99'" in r.stderr, r.stderr
    assert json.loads(r.stdout)[0]["status"].startswith("unreachable")
    # a profile that asks for a build its CPU cannot run: refused in the table, naming the profile's field
    forced = tmp_path / "qemu-forced.toml"
    forced.write_text(_qemu_profile(tmp_path, "cortex-a53").read_text() + 'cpu_variant = "i8mm"\n')
    r = subprocess.run([*MVLM, "devices", "--probe", "--json", str(forced)], capture_output=True, text=True, timeout=120)
    row = json.loads(r.stdout)[0]
    assert r.returncode == 2 and row["cpu_variant"] is None and 'change cpu_variant = "i8mm"' in row["cpu_note"], row


@pytest.mark.slow
@pytest.mark.qemu
@needs_qemu
@pytest.mark.parametrize("cpu", list(EXPECTED))
def test_each_emulated_cpu_gets_and_runs_its_variant(arm64_variants, smollm2_gguf, tmp_path, cpu):
    """`mvlm bench` on a device of each CPU model: the probe picks the variant, that build is what is pushed and
    run, and the record says so from llama.cpp's own system_info line."""
    want = EXPECTED[cpu]
    profile = _qemu_profile(tmp_path, cpu)
    out = tmp_path / "r.json"
    r = subprocess.run([*MVLM, "bench", "--device", str(profile), "-m", str(smollm2_gguf), "-n", "4", "--repeat", "1",
                        "--warmup", "0", "--json-file", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads(out.read_text())[0]
    assert rec["cpu_variant"] == want and rec["cpu_features_source"] == "auxv"
    assert ("i8mm" in rec["cpu_features"]) == (want == "i8mm")
    # a build other than the target's default is another configuration (history, compare, the gate)
    assert rec["params"].get("cpu_variant") == (None if want == "dotprod" else want)
    kernels = rec["cpu_kernels"].split(",")
    assert ("MATMUL_INT8" in kernels) == (want == "i8mm") and ("DOTPROD" in kernels) == (want != "armv8.0")
    pushed = tmp_path / f"qemu-{cpu}" / "bin" / "llama-completion"
    assert pushed.read_bytes() == arm64_variants[want].exe("llama-completion").read_bytes()


@pytest.mark.slow
@pytest.mark.qemu
@needs_qemu
def test_a_variant_the_cpu_lacks_is_refused_before_any_push(arm64_variants, smollm2_gguf, tmp_path):
    profile = _qemu_profile(tmp_path, "cortex-a53")
    r = subprocess.run([*MVLM, "bench", "--device", str(profile), "-m", str(smollm2_gguf), "-n", "4", "--repeat", "1",
                        "--cpu-variant", "i8mm"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "lacks asimddp, asimdhp, i8mm" in lines[0] and "SIGILL" in lines[0], r.stderr
    assert not (tmp_path / "qemu-cortex-a53").exists() or not any((tmp_path / "qemu-cortex-a53").rglob("llama-*"))
    # and what the refusal saves the user from: the i8mm build on that CPU dies with SIGILL at its first matmul
    run = subprocess.run(["qemu-aarch64-static", "-cpu", "cortex-a53", str(arm64_variants["i8mm"].exe("llama-completion")),
                          "-m", str(smollm2_gguf), "-p", "hi", "-n", "1", "-no-cnv"], capture_output=True, timeout=300)
    assert run.returncode in (-4, 132)


@pytest.mark.slow
@pytest.mark.qemu
@needs_qemu
def test_another_variant_is_another_setup_in_the_history(arm64_variants, smollm2_gguf, tmp_path):
    """A stored dotprod measurement is no baseline for an armv8.0 run of the same device: the gate says so."""
    profile, db = _qemu_profile(tmp_path, "cortex-a76"), tmp_path / "h.sqlite"
    base = [*MVLM, "bench", "--device", str(profile), "-m", str(smollm2_gguf), "-n", "2", "--repeat", "2", "--warmup",
            "0", "--db", str(db)]
    r = subprocess.run([*base, "--save"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*base, "--cpu-variant", "armv8.0", "--baseline", "latest", "--fail-on-regression", "5%"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "cpu_variant" in r.stderr and "armv8.0" in r.stderr, r.stderr


@pytest.mark.slow
def test_llama_bench_records_say_the_build_variant_and_where_it_came_from(host_runtime, smollm2_gguf, tmp_path):
    """llama-bench prints no system_info line: its records name the build's variant and say it is the build's."""
    out = tmp_path / "lb.json"
    r = subprocess.run([*MVLM, "bench", "--device", "local", "-P", "llama-bench", "-m", str(smollm2_gguf), "-p", "8",
                        "-n", "4", "--repeat", "1", "--warmup", "0", "--json-file", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for rec in json.loads(out.read_text()):
        assert (rec["cpu_variant"], rec["cpu_variant_source"], rec["cpu_kernels"]) == ("native", "build", None)
        assert rec["cpu_features_source"] == "cpuinfo" and rec["cpu_features"]


@pytest.mark.slow
@pytest.mark.qemu
@needs_qemu
def test_runtime_check_refuses_a_variant_the_emulated_cpu_lacks():
    r = subprocess.run([*MVLM, "runtime", "check", "--target", "linux-arm64", "--cpu-variant", "i8mm", "--qemu-cpu",
                        "cortex-a53", "--chunks", "1"], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "lacks asimddp, asimdhp, i8mm" in lines[0], r.stderr


@pytest.mark.slow
@pytest.mark.qemu
@needs_qemu
@pytest.mark.parametrize("variant", [v.name for v in cv.ARM64 if not v.optional])
def test_every_variant_computes_the_model(arm64_variants, host_runtime, smollm2_gguf, tmp_path, variant):
    """On the CPU model that has its features: SmolLM2 perplexity within 1% of the host build, and the tiny MobileVLM
    V2's image embeddings within 2e-3 of the independent PyTorch forward (mvlm verify)."""
    from mvlm_convert.runtime_check import compare_perplexity, tiny_verify

    cpu = cv.QEMU_CPU[variant]
    ppl = compare_perplexity("linux-arm64", smollm2_gguf, chunks=2, cpu_variant=variant, qemu_cpu=cpu)
    print(f"\n{variant} on qemu -cpu {cpu}: perplexity host {ppl.host_ppl:.4f} arm64 {ppl.target_ppl:.4f} "
          f"({ppl.rel_diff:.3%})")
    assert ppl.rel_diff <= 0.01
    figs = tiny_verify("linux-arm64", tmp_path, cpu_variant=variant, qemu_cpu=cpu)
    arm = figs[f"linux-arm64 {variant}"]
    assert f"-cpu {cpu}" in arm["runtime"] and variant in arm["runtime"]
    assert arm["passed"], arm["problems"]
    assert arm["image_rel_err"] <= 2e-3 and arm["logits_rel_err"] <= 1e-5 and arm["top1_agree"] == 1.0


def _kleidiai_build() -> rtmod.Runtime | None:
    """The i8mm+kleidiai build: cached, or built from $MVLM_KLEIDIAI_SRC; None when neither is possible here."""
    try:
        return rtmod.find("linux-arm64", cpu_variant="i8mm+kleidiai")
    except MvlmError:
        pass
    src = os.environ.get("MVLM_KLEIDIAI_SRC")
    if not src:
        return None
    return rtmod.build(rtmod.BuildOptions(target="linux-arm64", cpu_variant="i8mm+kleidiai", kleidiai_src=Path(src)))


@pytest.mark.slow
@pytest.mark.qemu
@needs_qemu
def test_kleidiai_build_runs_its_kernels_and_computes_the_model(arm64_variants, host_runtime, smollm2_gguf,
                                                                tmp_path):
    """Where the KleidiAI build exists, an i8mm device runs it when asked (never unasked: the plain i8mm build runs
    otherwise), its system_info names KLEIDIAI, and it computes the model within the bars."""
    rt = _kleidiai_build()
    if rt is None:
        pytest.skip("KleidiAI's source is downloaded from GitHub while configuring, which this machine cannot reach: "
                    "set MVLM_KLEIDIAI_SRC to KleidiAI v1.24.0's source tree to build and test the KleidiAI variant")
    from mvlm_convert.runtime_check import compare_perplexity, tiny_verify

    profile = _qemu_profile(tmp_path, "max,sme=off", "qemu-i8mm")  # i8mm without SME, like the Snapdragon 8 Gen 3
    for asked, want in ((None, "i8mm"), ("i8mm+kleidiai", "i8mm+kleidiai")):
        out = tmp_path / "r.json"
        r = subprocess.run([*MVLM, "bench", "--device", str(profile), "-m", str(smollm2_gguf), "-n", "4", "--repeat",
                            "1", "--warmup", "0", "--json-file", str(out), *(["--cpu-variant", asked] if asked else [])],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        rec = json.loads(out.read_text())[0]
        assert rec["cpu_variant"] == want and ("KLEIDIAI" in rec["cpu_kernels"].split(",")) == bool(asked)
    pushed = tmp_path / "qemu-i8mm" / "bin" / "llama-completion"
    assert pushed.read_bytes() == rt.exe("llama-completion").read_bytes()
    ppl = compare_perplexity("linux-arm64", smollm2_gguf, chunks=2, cpu_variant="i8mm+kleidiai", qemu_cpu="max,sme=off")
    print(f"\ni8mm+kleidiai on qemu -cpu max: perplexity host {ppl.host_ppl:.4f} arm64 {ppl.target_ppl:.4f} "
          f"({ppl.rel_diff:.3%})")
    assert ppl.rel_diff <= 0.01
    arm = tiny_verify("linux-arm64", tmp_path / "v", cpu_variant="i8mm+kleidiai",
                      qemu_cpu="max,sme=off")["linux-arm64 i8mm+kleidiai"]
    assert arm["passed"], arm["problems"]
    assert arm["image_rel_err"] <= 2e-3 and arm["logits_rel_err"] <= 1e-5


def test_the_gate_reruns_a_baseline_on_its_own_variant(tmp_path, monkeypatch):
    """find_build (the gate's confirming re-measure): a baseline of the default build is re-run on the default build,
    never on a newer build of another variant from the same source and patches."""
    import time

    monkeypatch.setenv("MVLM_CACHE", str(tmp_path))
    for i, variant in enumerate(("native", "generic")):  # generic built last: the newest
        inst = tmp_path / "runtime" / f"host-{i}" / "install"
        inst.mkdir(parents=True)
        (inst / "manifest.json").write_text(json.dumps({"target": "host", "commit": "0c1e570", "cpu_variant": variant,
                                                        "patches": [{"name": "0001-x"}]}))
        time.sleep(0.02)
    assert rtmod.variant_of(rtmod.find_build("host", "0c1e570", ["0001-x"]).manifest) == "native"
    assert rtmod.variant_of(rtmod.find_build("host", "0c1e570", ["0001-x"], "generic").manifest) == "generic"
    assert rtmod.find_build("linux-arm64", "0c1e570", ["0001-x"]) is None
