"""What a run's record says beside its timings, read before the measured runs: the device's CPU (as llama-bench's
``cpu_info``), the build's own version, the GGUF's size and parameter count, and the llama-bench fields mvlm's command
lines leave at llama.cpp's defaults."""

from __future__ import annotations

import re
from pathlib import Path

from mvlm_core.errors import MvlmError

# llama-bench fields of a llama-completion / llama-mtmd-cli run that mvlm's command line leaves at llama.cpp's
# defaults (common/common.h; tools/llama-bench/llama-bench.cpp prints them under these names and in these forms)
COMMAND_LINE_DEFAULTS: dict[str, object] = {
    "cpu_mask": "0x0", "cpu_strict": False, "poll": 50, "n_cpu_moe": 0, "split_mode": "layer", "main_gpu": 0,
    "no_kv_offload": False, "devices": "auto", "tensor_split": "0.00", "tensor_buft_overrides": "none",
    "load_mode": "auto", "lazy_mode": "auto", "embeddings": False, "no_op_offload": 0, "no_host": False, "repack": True,
}  # fmt: skip
_VERSION = re.compile(r"version: .*?\(build (\d+), commit (\w+)\)|version: (\d+) \((\w+)\)")


def device_cpu_info(transport) -> str:
    """The CPU's name the way ggml's CPU backend (and so llama-bench's cpu_info) reads it, on the device itself:
    the first ``model name`` of /proc/cpuinfo (Linux, Android), ``sysctl machdep.cpu.brand_string`` (macOS), else
    ggml's own default, "CPU" (most ARM kernels print no model name)."""
    text = transport.read_text("/proc/cpuinfo")
    if text:
        for line in text.splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip() or "CPU"
        return "CPU"
    try:
        r = transport.run(["sysctl", "-n", "machdep.cpu.brand_string"], timeout=30)
    except (MvlmError, OSError):
        return "CPU"
    name = r.output.strip().splitlines()[-1].strip() if r.returncode == 0 and r.output.strip() else ""
    return name or "CPU"


def build_version(transport, exe: str, env: dict[str, str]) -> dict[str, object]:
    """build_number and build_commit as the device's binary states them (``--version``); {} when it does not say."""
    try:
        r = transport.run([exe, "--version"], timeout=60, env=env)
    except (MvlmError, OSError):
        return {}
    m = _VERSION.search(r.output or "")
    if r.returncode != 0 or not m:
        return {}
    number, commit = (m[1], m[2]) if m[1] is not None else (m[3], m[4])
    return {"build_number": int(number), "build_commit": commit}


def gguf_facts(path: Path) -> dict[str, object]:
    """model_size (bytes of all tensors) and model_n_params (elements of all tensors) of a GGUF, as llama.cpp's
    loader sums them (llama_model_size / llama_model_n_params, which llama-bench prints); {} if unreadable."""
    from mvlm_core.gguf_header import GgufError, read_header

    try:
        sums = read_header(path).tensor_bytes()
    except (OSError, GgufError):  # checked before the bench: a file changed meanwhile; the fields stay null
        return {}
    return {} if sums is None else {"model_size": sums[0], "model_n_params": sums[1]}
