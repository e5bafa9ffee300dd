"""`mvlm` on a phone over the real adb: Debian's adb client and server, a device daemon speaking the ADB wire protocol
(tests/adb_device.py) with an arm64 userland behind it (aarch64 binaries run through qemu-aarch64-static, as on the
phone they were built for). Nothing on the mvlm side knows it is not a phone.

- the probe picks the runtime: an arm64-v8a phone gets the android-arm64 build (pushed, and really aarch64), an
  x86_64 one (the Android emulator) one line and nothing pushed;
- the papers' protocols (lm, vlm, imp) and the dataset protocol (llama-server through `adb forward`) run there, vlm
  with the same prompt and image tokens as the local run;
- `mvlm serve --device adb:...` answers the openai client through `adb forward`, and removes the forward when stopped;
- the arm64 build computes there what the host build computes: SmolLM2's perplexity within 2 %;
- faults made at the wire: the cable pulled mid-push and mid-run, a phone gone offline, one that never authorized
  this computer, two benches on one phone (the lease) -- one line each, a meaningful exit code, nothing kept as
  measured.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peers import _free_port

from mvlm_core import runtime as rtmod

REPO = Path(__file__).resolve().parents[1]
MVLM = [sys.executable, "-m", "mvlm"]

pytestmark = [pytest.mark.slow, pytest.mark.qemu, pytest.mark.skipif(
    shutil.which("qemu-aarch64-static") is None or shutil.which("aarch64-linux-gnu-g++") is None,
    reason="an arm64 phone needs qemu-aarch64-static and the aarch64 cross compiler (scripts/install-system-deps.sh)")]


@pytest.fixture(scope="module")
def arm64_runtime() -> rtmod.Runtime:
    """The static aarch64 build (linux-arm64; android-arm64 without an NDK is the same build)."""
    return rtmod.build(rtmod.BuildOptions(target="android-arm64"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, host_runtime):
    """A tiny MobileVLM V2 (f16 LM + mmproj) and a tiny Imp (Phi-2 + SigLIP), converted."""
    from mvlm_convert.convert import convert
    from mvlm_convert.families.imp import make_tiny_imp
    from mvlm_convert.families.mobilevlm import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-adb")
    v2 = convert(make_tiny_checkpoint(root / "v2", variant="v2", seed=0), root / "out", outtype="f16", progress=False)
    imp = convert(make_tiny_imp(root / "imp"), root / "out-imp", outtype="f16", progress=False)
    return {"lm": v2.lm.path, "mmproj": v2.mmproj.path, "imp": imp.lm.path, "imp_mmproj": imp.mmproj.path}


def mvlm(*args, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("MVLM_HISTORY", None)
    return subprocess.run([*MVLM, *map(str, args)], capture_output=True, text=True, errors="replace", timeout=timeout,
                          env=env, **kw)


def bench(device: str, *args, json_file: Path, repeat: int = 1, **kw) -> subprocess.CompletedProcess:
    return mvlm("bench", "--device", device, "-n", 8, "--repeat", repeat, "--warmup", 0, "--json-file", json_file,
                *args, **kw)


def error_lines(r: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in r.stderr, r.stderr
    return [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]


def test_vlm_on_the_phone_sees_what_the_local_run_sees(phones, tiny, arm64_runtime, tmp_path):
    phone = phones()
    args = ("--protocol", "vlm", "-m", tiny["lm"], "--mmproj", tiny["mmproj"])
    r = bench(f"adb:{phone.serial}", *args, json_file=tmp_path / "adb.json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Android arm64-v8a device: using the android-arm64 runtime" in r.stderr
    row = json.loads((tmp_path / "adb.json").read_text())[0]
    assert row["params"]["target"] == "android-arm64" and row["device"] == f"adb:{phone.serial}"
    cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    assert row["cpu_info"] == cpu  # read on the phone (`adb shell cat /proc/cpuinfo`; the test phone's is this one's)
    pushed = phone.root / "data/local/tmp/mvlm/bin/llama-mtmd-cli"
    assert pushed.read_bytes() == arm64_runtime.exe("llama-mtmd-cli").read_bytes()  # aarch64 ran on the phone
    assert pushed.read_bytes()[18] == 183  # e_machine EM_AARCH64
    local = bench("local", *args, json_file=tmp_path / "local.json")
    assert local.returncode == 0, local.stderr
    here = json.loads((tmp_path / "local.json").read_text())[0]
    t_adb, t_local = row["runs"][0]["timing"], here["runs"][0]["timing"]
    assert (t_adb["prompt_tokens"], t_adb["image_tokens"]) == (t_local["prompt_tokens"], t_local["image_tokens"])
    assert t_adb["image_tokens"] == 144 and row["n_prompt"] == here["n_prompt"]


@pytest.mark.parametrize("protocol", ["lm", "imp"])
def test_lm_and_imp_protocols_on_the_phone(phones, tiny, arm64_runtime, tmp_path, protocol):
    phone = phones()
    args = ("-m", tiny["lm"]) if protocol == "lm" else ("-m", tiny["imp"], "--mmproj", tiny["imp_mmproj"])
    r = bench(f"adb:{phone.serial}", "--protocol", protocol, *args, json_file=tmp_path / "r.json")
    assert r.returncode == 0, r.stdout + r.stderr
    run = json.loads((tmp_path / "r.json").read_text())[0]["runs"][0]
    assert run["timing"]["eval_runs"] == 7 and run["peak_rss_mb"] > 0 and run["temp_start_c"] == 45.0
    if protocol == "imp":
        assert run["timing"]["image_tokens"] == 729  # SigLIP 384 / 14: 27 x 27


def test_dataset_protocol_through_adb_forward(phones, tiny, arm64_runtime, tmp_path, adb_server):
    """The dataset protocol runs llama-server on the phone and reaches it through `adb forward`."""
    from PIL import Image

    phone = phones()
    img = tmp_path / "q.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(img)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question_id": str(i), "image": str(img), "text": q}) + "\n"
                            for i, q in enumerate(("What colour?", "Shape?"))))
    r = bench(f"adb:{phone.serial}", "--protocol", "dataset", "--data", data, "-m", tiny["lm"], "--mmproj",
              tiny["mmproj"], json_file=tmp_path / "d.json")
    assert r.returncode == 0, r.stdout + r.stderr
    row = json.loads((tmp_path / "d.json").read_text())[0]
    assert row["protocol"] == "dataset" and row["params"]["target"] == "android-arm64"
    assert adb_server.run("forward", "--list", text=True).stdout.strip() == ""  # the forward is gone again


def test_serve_on_the_phone_through_adb_forward(phones, tiny, arm64_runtime, adb_server):
    import openai

    phone = phones()
    port = _free_port()
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen([*MVLM, "serve", "--device", f"adb:{phone.serial}", "-m", str(tiny["lm"]), "--mmproj",
                             str(tiny["mmproj"]), "--port", str(port), "--ctx-size", "1024", "--timeout", "300"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        assert proc.poll() is None, "".join(lines)
        forwards = adb_server.run("forward", "--list", text=True).stdout.split()
        assert forwards[:1] == [phone.serial] and len(forwards) == 3  # SERIAL tcp:LOCAL tcp:DEVICE, behind the front
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        alias = client.models.list().data[0].id
        out = client.chat.completions.create(model=alias, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert out.usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, "".join(lines) + rest
    assert adb_server.run("forward", "--list", text=True).stdout.strip() == ""  # removed with the server
    deadline = time.monotonic() + 20  # the phone's server script stops its server once the adb shell ends
    while str(phone.root) in (ps := subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout):
        assert time.monotonic() < deadline, [ln for ln in ps.splitlines() if str(phone.root) in ln]
        time.sleep(0.2)


def test_perplexity_on_the_phone_within_2pct_of_the_host(phones, arm64_runtime, host_runtime, smollm2_gguf,
                                                         tmp_path):
    """The real SmolLM2 through the phone's own llama-perplexity (pushed over adb, run with `adb shell`)."""
    from mvlm_bench.device.profiles import profile_from_dict
    from mvlm_bench.device.sync import sync
    from mvlm_bench.device.transports import make_transport
    from mvlm_convert.runtime_check import DEFAULT_TEXT, PPL_CTX, PPL_TOLERANCE, parse_perplexity, perplexity

    phone = phones()
    t = make_transport(profile_from_dict({"transport": "adb", "address": phone.serial, "target": "android-arm64"},
                                         where="test", default_name="phone"))
    text = tmp_path / "text.txt"
    text.write_text(DEFAULT_TEXT)
    sync(t, t.workdir, {"bin/llama-perplexity": arm64_runtime.exe("llama-perplexity"), "models/m.gguf": smollm2_gguf,
                        "text.txt": text}, hash_cache=tmp_path / "h.json")
    r = t.run(["bin/llama-perplexity", "-m", "models/m.gguf", "-f", "text.txt", "-c", str(PPL_CTX), "--chunks", "2",
               "-t", "2"], timeout=600, cwd=t.workdir)
    assert r.returncode == 0, r.output[-2000:]
    on_phone = parse_perplexity(r.output)
    host = perplexity("host", smollm2_gguf, chunks=2)
    print(f"\nperplexity -c {PPL_CTX} x 2 chunks: host {host:.4f}  phone (adb, arm64) {on_phone:.4f}")
    assert abs(on_phone - host) / host <= PPL_TOLERANCE


def test_an_x86_64_phone_gets_one_line_and_nothing_pushed(phones, tiny, tmp_path):
    phone = phones("emulator", props={"ro.product.cpu.abi": "x86_64"})
    r = bench(f"adb:{phone.serial}", "-m", tiny["lm"], json_file=tmp_path / "r.json")
    lines = error_lines(r)
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "Android x86_64 device" in lines[0] and "no runtime target" in lines[0]
    assert not (phone.root / "data/local/tmp/mvlm/bin").exists() and not (tmp_path / "r.json").exists()


def test_a_phone_that_does_not_say_its_abi_gets_one_line_and_nothing_pushed(phones, tiny, tmp_path):
    """An empty `ro.product.cpu.abi` was taken for an x86_64 Linux box, and the host build was pushed to the phone."""
    phone = phones("noabi", props={"ro.product.cpu.abi": ""})
    r = bench(f"adb:{phone.serial}", "-m", tiny["lm"], json_file=tmp_path / "r.json")
    lines = error_lines(r)
    assert r.returncode == 2 and len(lines) == 1 and "does not say its ABI" in lines[0], r.stderr
    assert not (phone.root / "data/local/tmp/mvlm/bin").exists()


def test_cable_pulled_mid_push_and_mid_run(phones, tiny, arm64_runtime, adb_server, tmp_path):
    phone = phones()
    phone.drop_after_sync_bytes = 2_000_000
    r = bench(f"adb:{phone.serial}", "-m", tiny["lm"], json_file=tmp_path / "push.json")
    lines = error_lines(r)
    assert r.returncode == 3 and len(lines) == 1, r.stderr
    assert "device lost during push of" in lines[0] and not (tmp_path / "push.json").exists()
    phone.drop_after_sync_bytes = None
    phone.start()
    adb_server.connect(phone)
    phone.drop_during_shell_after = 2.0  # into the first run of llama-mtmd-cli (~10 s under qemu): its prompt
    phone.drop_matching = "What is in the picture"
    r = bench(f"adb:{phone.serial}", "--protocol", "vlm", "-m", tiny["lm"], "--mmproj", tiny["mmproj"], repeat=2,
              json_file=tmp_path / "run.json")
    lines = error_lines(r)
    print(r.stderr)
    assert r.returncode == 3 and len(lines) == 1, r.stdout + r.stderr
    assert phone.serial in lines[0] and "llama-mtmd-cli" in lines[0]
    assert not (tmp_path / "run.json").exists() or json.loads((tmp_path / "run.json").read_text()) == []


def test_offline_and_unauthorized_phones(phones, tiny, adb_server, tmp_path):
    gone = phones("gone")
    gone.stop()  # adb keeps it listed, offline
    r = bench(f"adb:{gone.serial}", "-m", tiny["lm"], json_file=tmp_path / "a.json")
    lines = error_lines(r)
    assert r.returncode == 3 and len(lines) == 1 and "device not available" in lines[0], r.stderr
    locked = phones("locked", state="unauthorized", auth=True)
    r = bench(f"adb:{locked.serial}", "-m", tiny["lm"], json_file=tmp_path / "b.json")
    lines = error_lines(r)
    assert r.returncode == 3 and len(lines) == 1 and "unauthorized" in lines[0] and "Allow USB debugging" in lines[0]
    r = mvlm("devices", f"adb:{locked.serial}", f"adb:{gone.serial}")
    assert r.returncode == 3 and "unauthorized" in r.stdout and "device not available" in r.stdout, r.stdout


def test_two_benches_on_one_phone_take_turns(phones, tiny, arm64_runtime, tmp_path):
    """The lease is the phone's (adb:SERIAL): a second bench waits, or with --lease-timeout gives up in one line."""
    from mvlm_bench.device.profiles import profile_from_dict
    from mvlm_bench.session import lease

    phone = phones()
    key = lease.device_key(profile_from_dict({"transport": "adb", "address": phone.serial, "target": "android-arm64"},
                                             where="test", default_name="p"))
    assert key == f"adb:{phone.serial}"
    with lease.device_lease(key, None, timeout=60):
        t0 = time.monotonic()
        r = bench(f"adb:{phone.serial}", "-m", tiny["lm"], "--lease-timeout", 1, json_file=tmp_path / "r.json")
    lines = error_lines(r)
    assert r.returncode == lease.EXIT_BUSY and len(lines) == 1 and "nothing was measured" in lines[0], r.stderr
    assert time.monotonic() - t0 < 120 and not (tmp_path / "r.json").exists()
