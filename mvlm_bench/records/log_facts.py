"""What a llama.cpp log says besides its timings: what a file holds when it has no timings (for one-line refusals),
and the llama-bench fields a run states about itself (model type, batch sizes, threads, backends, ...)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mvlm_bench.records.llama_bench_output import sql_unbalanced
from mvlm_bench.records.log_text import CONTROL_CHARS, decode

# --- what a file is, when it holds no timings -----------------------------------------------------------------------
_MAGIC = (
    (b"SQLite format 3\x00", "a SQLite database (an mvlm history? `mvlm history --db FILE` reads those)"),
    (b"GGUF", "a GGUF model file"),
    (b"\x1f\x8b", "a gzip archive (unpack it first)"),
    (b"PK\x03\x04", "a zip archive (unpack it first)"),
    (b"\x28\xb5\x2f\xfd", "a zstd archive (unpack it first)"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x7fELF", "an executable (ELF)"),
)
SNIFF_BYTES = 1 << 16


def describe_content(path: str | Path) -> str:
    """A few words on what a file holds (from its first 64 KiB), for "this is not llama.cpp output" messages."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if not head.strip():
        return "an empty file" if not head else "only whitespace"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    text = decode(head)
    odd = text.count("\ufffd") + len(CONTROL_CHARS.findall(text.replace("\x1b", "")))
    if odd > 0.05 * len(text):
        return "binary data"
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    for n, x in enumerate(text.splitlines(), 1):
        if sql_unbalanced(x.strip()):
            return (f"line {n}: an unbalanced quote in a llama-bench INSERT, so not valid SQL (llama-bench does not "
                    "escape quotes in names: rename the model file or use -o json)")
    if any(x.upper().startswith(("CREATE TABLE", "INSERT INTO")) for x in lines):
        return "SQL statements that are not llama-bench rows"
    first = lines[0] if lines else ""
    if first.startswith(("{", "[")):
        try:
            json.loads(decode(head) if len(head) < SNIFF_BYTES else "x")
            return "JSON that is not llama-bench output"
        except ValueError:
            pass
        if first.startswith("{") and all(x.startswith("{") for x in lines[:-1]):
            return "JSON lines that are not llama-bench records"
    if first.startswith("|"):
        return "a Markdown table without llama-bench's test and t/s columns"
    shown = first[:60] + ("…" if len(first) > 60 else "")
    return f"{len(lines)}{'+' if len(head) == SNIFF_BYTES else ''} line(s) of other text, starting {shown!r}"


# --- what a llama.cpp run says about itself -------------------------------------------------------------------------
_FACT_LINES = {
    "arch": re.compile(r"print_info: arch\s+=\s+(\S+)"),
    "type_name": re.compile(r"print_info: model type\s+=\s+(.+?)\s*$"),
    "ftype": re.compile(r"print_info: file type\s+=\s+(.+?)\s*$"),
    "n_batch": re.compile(r"llama_context: n_batch\s+=\s+(\d+)"),
    "n_ubatch": re.compile(r"llama_context: n_ubatch\s+=\s+(\d+)"),
    "flash_attn": re.compile(r"llama_context: flash_attn\s+=\s+(\w+)"),
    "kv": re.compile(r"llama_kv_cache: size = .*K \((\w+)\).*V \((\w+)\)"),
    "threads": re.compile(r"(?:system_info: n_threads|threadpool init, n_threads) = (\d+)"),
    "system_info": re.compile(r"system_info: n_threads = \d+ .*?\| (.*)$"),
    "device": re.compile(r"using device (\S+) \((.*?)\)(?: \(.*?\))? - \d+ MiB free"),
    "fit": re.compile(r"common_params_fit_impl: .*>= (\d+) MiB"),
    "fit_ran": re.compile(r"common_fit_params: |fitting params to device memory"),
}
_FLASH_ATTN = {"auto": -1, "disabled": 0, "enabled": 1}


def run_facts(text: str) -> dict[str, Any]:
    """The llama-bench fields a llama-completion / llama-mtmd-cli log (``-lv 4``) states about its own run.

    ``model_type`` is llama.cpp's model description (arch, size class, file type: what llama-bench prints), ``n_batch``
    / ``n_ubatch`` / ``flash_attn`` (-1 auto, 0 off, 1 on) / ``type_k`` / ``type_v`` the context's, ``n_threads`` the
    threadpool's, ``backends`` the non-CPU backends in ``system_info`` (else the devices used; "CPU" when none),
    ``gpu_info`` the descriptions of the devices the model was loaded on, ``fit_target`` / ``fit_min_ctx`` whether
    (and with which margin, MiB) the program fitted its parameters to free memory. Keys it cannot find are absent."""
    found: dict[str, Any] = {}
    devices: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.rstrip()
        for key, rx in _FACT_LINES.items():
            m = rx.search(line)
            if not m:
                continue
            if key == "device":
                devices.append((m[1], m[2]))
            elif key == "kv":
                found["type_k"], found["type_v"] = m[1], m[2]
            elif key == "fit_ran":
                found["fit_ran"] = True
            else:
                found.setdefault(key, m[1])
    out: dict[str, Any] = {}
    if all(k in found for k in ("arch", "type_name", "ftype")):
        out["model_type"] = f"{found['arch']} {found['type_name']} {found['ftype']}"
    for k in ("n_batch", "n_ubatch"):
        if k in found:
            out[k] = int(found[k])
    if "threads" in found:
        out["n_threads"] = int(found["threads"])
    if found.get("flash_attn") in _FLASH_ATTN:
        out["flash_attn"] = _FLASH_ATTN[found["flash_attn"]]
    for k in ("type_k", "type_v"):
        if k in found:
            out[k] = found[k].lower()
    regs = [part.split(" : ", 1)[0].strip() for part in found.get("system_info", "").split(" | ") if " : " in part]
    if regs:
        names = [r for r in regs if r != "CPU"]
    else:
        names = list(dict.fromkeys(re.sub(r"\d+$", "", name) for name, _ in devices))
    if "arch" in found or regs or devices:
        out["backends"] = ",".join(names) if names else "CPU"
        out["gpu_info"] = ", ".join(desc for _, desc in devices)
    if "CPU : " in found.get("system_info", ""):  # 2024+: "CPU : NEON = 1 | ..." names what the build has, only
        from mvlm_core.cpu_variants import kernels, variant_from_kernels  # (2023's "DOTPROD"-less lines say too little)

        ran = kernels(found["system_info"])
        if ran:
            out["cpu_kernels"] = ",".join(ran)
            variant = variant_from_kernels(ran)
            if variant:
                out["cpu_variant"], out["cpu_variant_source"] = variant, "system_info"
    if found.get("fit_ran"):
        out["fit_target"] = int(found.get("fit", 1024))
        out["fit_min_ctx"] = 4096  # llama.cpp's default (common.h fit_params_min_ctx); mvlm never passes -fitc
    elif "arch" in found:
        out["fit_target"], out["fit_min_ctx"] = 0, 0
    return out
