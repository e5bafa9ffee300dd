"""`mvlm bench` end to end: the real host runtime on real GGUFs, over local and a real sshd (a phone over the real adb:
tests/test_adb_wire.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from peers import _free_port, small_gguf

from mvlm_bench.device.profiles import profile_from_dict
from mvlm_bench.plan.engine import BenchTests
from mvlm_bench.plan.plan import Plan
from mvlm_bench.plan.protocols import artifacts
from mvlm_bench.plan.spec import BenchSpec
from mvlm_bench.records.groups import aggregate
from mvlm_bench.session.runners import collect
from mvlm_bench.views.exports import report_records


def run_bench(profile, spec, **events):
    """One configuration through the bench pipeline (plan -> session -> records), its records gathered."""
    return collect(Plan(profile, [spec]), **events)

MVLM = [sys.executable, "-m", "mvlm"]
pytestmark = pytest.mark.slow


def mvlm(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*MVLM, *map(str, args)], capture_output=True, text=True, errors="replace", timeout=timeout,
                          env={**os.environ, **(env or {}), "COLUMNS": "200"})


def local_profile(tmp_path: Path, name: str = "testlocal", **extra) -> Path:
    lines = [f'name = "{name}"', 'transport = "local"', f'workdir = "{tmp_path / "device"}"', 'target = "host"',
             "threads = 2"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    p = tmp_path / f"{name}.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory, host_runtime) -> tuple[Path, Path]:
    from mvlm_convert.convert import convert
    from mvlm_convert.families.mobilevlm import make_tiny_checkpoint

    d = tmp_path_factory.mktemp("bench")
    res = convert(make_tiny_checkpoint(d / "ckpt", variant="v2"), d / "out", outtype="f16", name="TinyV2", progress=False)
    return res.lm.path, res.mmproj.path


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_local_lm_end_to_end_and_second_push_is_empty(tmp_path, tiny_vlm):
    lm, _ = tiny_vlm
    prof = local_profile(tmp_path)
    out = tmp_path / "r"
    r = mvlm("bench", "--device", prof, "--protocol", "lm", "--model", lm, "-n", 24, "--repeat", 2,
             "--json-file", out / "r.json", "--markdown", out / "r.md", "--csv", out / "r.csv")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Eval" in r.stdout and "Total" in r.stdout
    recs = json.loads((out / "r.json").read_text())
    rec = recs[0] if isinstance(recs, list) else recs
    blob = json.dumps(rec)
    assert _sha(lm) in blob  # model hash in the record
    assert "0c1e570" in blob and "0001-clip-cls-first" in blob  # runtime build and patches
    assert "testlocal" in blob
    assert (out / "r.md").read_text().startswith("|")
    assert len((out / "r.csv").read_text().strip().splitlines()) == 1 + 2  # header + one row per repetition
    # content addressing: nothing changed -> nothing pushed
    r2 = mvlm("bench", "--device", prof, "--protocol", "lm", "--model", lm, "-n", 8, "--repeat", 1, "--warmup", 0)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "pushed 0 bytes" in r2.stderr


def test_run_bench_records_requested_tokens(tmp_path, tiny_vlm):
    lm, mmproj = tiny_vlm
    prof = profile_from_dict({"transport": "local", "workdir": str(tmp_path / "dev"), "target": "host", "threads": 2},
                             where="test", default_name="t")
    res = run_bench(prof, BenchSpec("lm", lm, repeat=2, warmup=0, n_predict=20))
    assert not res.failures and len(res.runs) == 2
    for run in res.runs:
        t = run.timing
        assert t.eval_runs == 19  # llama-completion decodes n-1 of the n tokens it generates
        assert t.prompt_tokens and t.prompt_tokens > 5 and t.eval_ms > 0 and t.prompt_eval_ms > 0
        assert run.wall_s and run.wall_s > t.eval_ms / 1000
    vres = run_bench(prof, BenchSpec("vlm", lm, mmproj=mmproj, repeat=1, warmup=0, n_predict=8))
    assert not vres.failures, vres.failures
    t = vres.runs[0].timing
    assert t.vision_encode_ms and t.vision_encode_ms > 0
    assert t.image_tokens == 144  # LDPv2: 24x24 CLIP patches pooled to 12x12


def test_real_smollm2_lm_protocol(tmp_path, smollm2_gguf, host_runtime):
    prof = local_profile(tmp_path)
    r = mvlm("bench", "--device", prof, "--protocol", "lm", "--model", smollm2_gguf, "-n", 32, "--repeat", 1,
             "--json-file", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SmolLM2" in r.stdout
    data = json.loads((tmp_path / "s.json").read_text())
    assert "q4_1" in json.dumps(data).lower()


def _cpu_model_name() -> str:
    """This machine's CPU as /proc/cpuinfo names it (the ssh and adb "devices" of these tests are this machine)."""
    text = Path("/proc/cpuinfo").read_text()
    return next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "CPU")


def test_json_flag_prints_only_json_on_stdout(tmp_path, tiny_vlm):
    lm, mmproj = tiny_vlm
    r = mvlm("bench", "--device", local_profile(tmp_path), "--protocol", "vlm", "--model", lm, "--mmproj", mmproj,
             "-n", 8, "--repeat", 1, "--warmup", 0, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    (rec,) = json.loads(r.stdout)  # nothing but the JSON on stdout; the table went to stderr
    assert "Eval" in r.stderr and rec["protocol"] == "vlm" and rec["cpu_info"] == _cpu_model_name()
    assert rec["n_prompt"] == rec["runs"][0]["timing"]["prompt_tokens"] and rec["avg_ts"] > 0


def test_llama_bench_protocol(tmp_path, tiny_vlm):
    lm, _ = tiny_vlm
    prof = profile_from_dict({"transport": "local", "workdir": str(tmp_path / "dev"), "target": "host", "threads": 2},
                             where="test", default_name="t")
    res = run_bench(prof, BenchSpec("llama-bench", lm, repeat=2, n_predict=8, tests=BenchTests((64, 128), (8,))))
    assert not res.failures, res.failures
    # one record per test and repetition, each its own configuration (its test), carrying llama-bench's fields
    tests = [r.context.params["test"] for r in res.runs]
    assert tests == ["pp64", "pp128", "tg8"] * 2
    groups = aggregate(res.runs)
    assert [len(g.runs) for g in groups] == [2, 2, 2]
    pp64, pp128, tg8 = groups
    assert pp64.agg["prompt_tps"]["n"] == 2 and pp64.agg["eval_tps"]["n"] == 0
    assert tg8.agg["eval_tps"]["n"] == 2 and tg8.runs[0].timing.eval_runs == 8
    recs = report_records(groups)
    assert [(r["n_prompt"], r["n_gen"], r["test"]) for r in recs] == [(64, 0, "pp64"), (128, 0, "pp128"), (0, 8, "tg8")]
    assert all(r["model_type"] and r["backends"] == "CPU" and len(r["samples_ts"]) == 2 for r in recs)


# --- failures: one clear line, exit != 0, completed repetitions kept -------------------------------------------
def test_crash_keeps_output_tail(tmp_path):
    bad = small_gguf(tmp_path / "Broken-F16.gguf")  # a whole header, no hyper-parameters: llama.cpp refuses to load
    r = mvlm("bench", "--device", local_profile(tmp_path), "--protocol", "lm", "--model", bad, "--repeat", 1)
    assert r.returncode == 3
    assert "lm protocol on testlocal: the warm-up run failed: exited with status 1" in r.stderr
    # (llama.cpp's async logger sometimes exits before flushing, so its own error text is not always in the tail)


def test_timeout(tmp_path, smollm2_gguf):
    r = mvlm("bench", "--device", local_profile(tmp_path), "--protocol", "lm", "--model", smollm2_gguf, "-n", 400,
             "--repeat", 1, "--warmup", 0, "--timeout", 0.3)
    assert r.returncode == 3 and "timed out after" in r.stderr


def test_later_failure_keeps_completed_repetitions(tmp_path, tiny_vlm):
    """A device-side wrapper that lets two runs through and then crashes (SIGSEGV-like exit) on the third."""
    lm, _ = tiny_vlm
    counter = tmp_path / "count"
    flaky = tmp_path / "flaky.sh"
    flaky.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case "$*" in *--version*) exec "$@";; esac
        n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}
        if [ "$n" -ge 3 ]; then echo "Segmentation fault" >&2; kill -SEGV $$; fi
        exec "$@"
        """))
    flaky.chmod(0o755)
    prof = local_profile(tmp_path, exec_wrapper=[str(flaky)])
    out = tmp_path / "k.json"
    r = mvlm("bench", "--device", prof, "--protocol", "lm", "--model", lm, "-n", 8, "--repeat", 3, "--warmup", 0,
             "--json-file", out)
    assert r.returncode == 3 and "signal" in r.stderr
    data = json.loads(out.read_text())
    runs = data[0]["runs"] if isinstance(data, list) else data["runs"]
    assert len(runs) == 2


def test_missing_runtime_for_target_says_how_to_build(tmp_path, tiny_vlm):
    lm, _ = tiny_vlm
    prof = tmp_path / "o.toml"
    prof.write_text(f'transport = "local"\nworkdir = "{tmp_path}/d"\ntarget = "host"\n')
    r = mvlm("bench", "--device", prof, "--protocol", "lm", "--model", lm, env={"MVLM_CACHE": str(tmp_path / "empty-cache")})
    assert r.returncode == 2
    assert "mvlm runtime build --target host" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()  # nothing pushed


def test_unreachable_ssh_device(tmp_path, tiny_vlm):
    lm, _ = tiny_vlm
    port = _free_port()
    r = mvlm("bench", "--device", f"ssh://nobody@127.0.0.1:{port}", "--protocol", "lm", "--model", lm)
    assert r.returncode != 0 and "error:" in r.stderr


# --- real sshd on 127.0.0.1 ----------------------------------------------------------------------------------------
def test_ssh_end_to_end(sshd, tmp_path, tiny_vlm):
    lm, mmproj = tiny_vlm
    prof = sshd.profile(str(tmp_path / "remote"), target="host", threads=2)
    res = run_bench(prof, BenchSpec("vlm", lm, mmproj=mmproj, repeat=1, warmup=0, n_predict=8))
    assert not res.failures, res.failures
    assert res.outcome.pushed_bytes > lm.stat().st_size
    run = res.runs[0]  # Total: the process's wall time read on the device (mvlm-time), never around the ssh session
    assert run.timing.image_tokens == 144 and run.facts["wall_source"] == "device"
    assert 0 < run.wall_s < run.ended_at - run.started_at  # inside the span seen from here (the link adds to that)
    # llama-bench's fields, read on the device over ssh (cpu_info as ggml reads it) and from llama-mtmd-cli's own log
    rec = report_records(aggregate(res.runs))[0]
    assert rec["cpu_info"] == _cpu_model_name() and res.runs[0].context.cpu_info == rec["cpu_info"]
    assert (rec["build_commit"], rec["build_number"], rec["backends"], rec["gpu_info"]) == ("0c1e570", 0, "CPU", "")
    assert rec["model_type"].startswith("llama ") and rec["model_type"].endswith(" F16") and rec["type_k"] == "f16"
    assert rec["n_threads"] == 2 and rec["n_batch"] == 2048 and rec["n_ubatch"] == 512
    again = run_bench(prof, BenchSpec("vlm", lm, mmproj=mmproj, repeat=1, warmup=0, n_predict=8))
    assert again.outcome.pushed_bytes == 0


def test_a_runtime_push_carries_each_library_once_under_the_name_the_loader_asks_for(host_runtime, tiny_vlm):
    """Every library a pushed binary (or library) needs, by its ELF NEEDED entries as binutils' readelf reads them, is
    pushed under that name, and no file is pushed twice: the first push of a runtime sent each versioned library
    three times (libX.so, libX.so.0, libX.so.0.5.0: 50 MB instead of 20)."""
    import shutil

    readelf = shutil.which("readelf")
    assert readelf, "readelf missing: install binutils (the project's setup script does)"
    from mvlm_core import runtime as rtmod

    rt = rtmod.find("host")
    assert rt.root == host_runtime
    lm, mmproj = tiny_vlm
    pushed: dict[str, Path] = {}
    for spec in (BenchSpec("lm", lm), BenchSpec("vlm", lm, mmproj=mmproj),
                 BenchSpec("llama-bench", lm)):
        files, _ = artifacts(rt, spec)
        pushed.update(files)
    libs = {rel.removeprefix("lib/"): p for rel, p in pushed.items() if rel.startswith("lib/")}
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in libs.values()]
    assert len(set(digests)) == len(digests), sorted(libs)  # each library once
    in_runtime = {p.name for p in rt.lib.iterdir()}
    for rel, path in pushed.items():
        if not rel.startswith(("bin/", "lib/")):
            continue
        dyn = subprocess.run([readelf, "-d", str(path)], capture_output=True, text=True, check=True).stdout
        needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dyn))
        missing = {n for n in needed & in_runtime if n not in libs}
        assert not missing, f"{rel} needs {missing}, which would not be on the device"
    sizes = sum(p.stat().st_size for p in libs.values())
    everything = sum(p.stat().st_size for p in rt.lib.iterdir())
    assert sizes < everything / 2, (sizes, everything)


# --- native build on a device over ssh (real sshd; a stand-in llama.cpp tree keeps it seconds) ----------------------
def test_runtime_build_on_device_over_ssh(sshd, tmp_path, monkeypatch):
    """`mvlm runtime build --device` packs the patched source, builds it on the device with the target's CMake
    arguments and pulls the binaries back. The source is a stand-in CMake project with llama.cpp's layout (the
    defective llava.cpp, so patch 0001 really applies) whose tools are trivial C programs; the target is
    linux-arm64 with Debian's cross compiler, so the 'device' build is a real cross build, in seconds."""
    from mvlm_bench.session.remote_build import build_on_device
    from mvlm_core import runtime as rt

    monkeypatch.setenv("MVLM_CACHE", str(tmp_path / "cache"))
    all_patches = rt.project_patches
    src = tmp_path / "fake-llama"
    llava = src / "tools" / "mtmd" / "models" / "llava.cpp"
    llava.parent.mkdir(parents=True)
    snippet = [
        "    ggml_tensor * inp = build_inp();",
        "",
        "    // concat class_embeddings and patch_embeddings",
        "    if (model.class_embedding) {",
        "        inp = ggml_concat(ctx0, inp, model.class_embedding, 1);",
        "    }",
        "",
        "    ggml_tensor * positions = ggml_new_tensor_1d(ctx0, GGML_TYPE_I32, n_pos);",
    ]
    llava.write_text("// fake\n" * 30 + "\n".join(snippet) + "\n" + "// end\n" * 5)
    # the other patches touch files this stand-in tree does not have
    monkeypatch.setattr(rt, "project_patches", lambda: [p for p in all_patches() if p.name.startswith("0001")])
    (src / "main.c").write_text('#include <stdio.h>\nint main(void){puts("fake tool");return 0;}\n')
    exes = "\n".join(f"add_executable({b} main.c)" for b in rt.BINARIES)
    (src / "CMakeLists.txt").write_text(f"cmake_minimum_required(VERSION 3.16)\nproject(fake C)\n"
                                        f"set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${{CMAKE_BINARY_DIR}}/bin)\n{exes}\n")
    prof_file = tmp_path / "board.toml"
    p = sshd.profile(str(tmp_path / "board"), target="linux-arm64")
    prof_file.write_text(
        f'transport = "ssh"\naddress = "{p.address}"\nworkdir = "{tmp_path / "board"}"\ntarget = "linux-arm64"\n'
        f'[ssh]\nidentity_file = "{p.ssh.identity_file}"\nknown_hosts = "{p.ssh.known_hosts}"\nconfig_file = "/dev/null"\n'
    )
    root, manifest = build_on_device(str(prof_file), "linux-arm64", llama_cpp=src, jobs=2)
    assert manifest["built_on"] == "board" and manifest["patches"][0]["status"] == "applied"
    for b in rt.BINARIES:
        exe = root / "bin" / b
        assert exe.is_file()
        assert exe.read_bytes()[:4] == b"\x7fELF" and exe.read_bytes()[18] == 183  # e_machine = EM_AARCH64
    # second time: cached, nothing rebuilt
    root2, _ = build_on_device(str(prof_file), "linux-arm64", llama_cpp=src, jobs=2)
    assert root2 == root
