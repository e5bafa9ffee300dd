"""Benchmark `mvlm convert` against llama.cpp's legacy MobileVLM path on a MobileVLM_V2-1.7B-sized checkpoint.

The checkpoint has the exact released shapes (LM 2048 hidden / 24 layers / 16 heads / 5632 ffn / vocab 32000,
CLIP ViT-L/14-336 copy with 24 layers, LDPv2 projector), random bf16 weights, one pytorch_model.bin of ~3.35 GB,
plus a 32000-piece SentencePiece tokenizer and the separate CLIP directory the legacy path needs. It is written
once to the cache dir and reused.

Measured per command, in the same run: wall time and peak RSS of the child process (os.wait4 rusage). The legacy
path is the one docs/multimodal/MobileVLM.md describes (pinned llama.cpp source): llava_surgery.py ->
convert_image_encoder_to_gguf.py (--projector-type ldpv2) -> examples/convert_legacy_llama.py; a step that fails
is recorded with its error line, never replaced by a number.

    .venv/bin/python benchmarks/convert.py [--cache DIR] [--llama-cpp SRC] [--json-file out.json] [--skip-legacy]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mvlm_convert.families.tiny_parts import train_tokenizer, write_clip_dir, write_sentencepiece_config  # noqa: E402

LM = {"hidden": 2048, "layers": 24, "heads": 16, "ffn": 5632, "vocab": 32000}
VIT = {"hidden": 1024, "layers": 24, "heads": 16, "ffn": 4096, "patch": 14, "image": 336}
DEFAULT_SRC = Path("/tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp")


def _rand(g: torch.Generator, *shape: int, std: float = 0.02) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _tokenizer_32000(path: Path) -> None:
    """A LLaMA-sized (32000 pieces) SentencePiece model: a small trained BPE model padded with unused pieces.

    Pieces are appended as raw protobuf records (ModelProto field 1: piece=1, score=2, type=3), since protobuf's
    Python package is not a dependency; repeated fields may appear anywhere in the message.
    """
    import sentencepiece as spm

    train_tokenizer(path)
    raw = bytearray(path.read_bytes())
    n = spm.SentencePieceProcessor(model_file=str(path)).vocab_size()
    for i in range(LM["vocab"] - n):
        piece = f"\u2581w{i}".encode()
        body = b"\x0a" + _varint(len(piece)) + piece + b"\x15" + struct.pack("<f", -1000.0 - i) + b"\x18\x01"
        raw += b"\x0a" + _varint(len(body)) + body
    path.write_bytes(bytes(raw))
    assert spm.SentencePieceProcessor(model_file=str(path)).vocab_size() == LM["vocab"]


def make_checkpoint(root: Path) -> Path:
    ckpt = root / "MobileVLM_V2-1.7B-random"
    done = ckpt / ".complete"
    if done.is_file():
        return ckpt
    ckpt.mkdir(parents=True, exist_ok=True)
    if not _weights_ok(ckpt / "pytorch_model.bin"):
        _write_weights(ckpt)
    _finish_checkpoint(root, ckpt)
    done.write_text("ok\n")
    return ckpt


def _weights_ok(path: Path) -> bool:
    """A weights file from an earlier interrupted run is reused only if torch can index it completely."""
    if not path.is_file() or path.stat().st_size < 3_000_000_000:
        return False
    try:
        sd = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except Exception:  # noqa: BLE001
        return False
    return "lm_head.weight" in sd and len(sd) > 700


def _write_weights(ckpt: Path) -> None:
    g = torch.Generator().manual_seed(0)
    d, f, v = LM["hidden"], LM["ffn"], LM["vocab"]
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": _rand(g, v, d)}
    for i in range(LM["layers"]):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[f"{p}self_attn.{n}.weight"] = _rand(g, d, d)
        sd[p + "mlp.gate_proj.weight"] = _rand(g, f, d)
        sd[p + "mlp.up_proj.weight"] = _rand(g, f, d)
        sd[p + "mlp.down_proj.weight"] = _rand(g, d, f)
        sd[p + "input_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    sd["model.norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    c, cf, pt = VIT["hidden"], VIT["ffn"], VIT["patch"]
    vp = "model.vision_tower.vision_tower.vision_model."
    sd[vp + "embeddings.class_embedding"] = _rand(g, c)
    sd[vp + "embeddings.patch_embedding.weight"] = _rand(g, c, 3, pt, pt)
    sd[vp + "embeddings.position_embedding.weight"] = _rand(g, (VIT["image"] // pt) ** 2 + 1, c)
    sd[vp + "pre_layrnorm.weight"] = torch.ones(c, dtype=torch.bfloat16)
    sd[vp + "pre_layrnorm.bias"] = _rand(g, c)
    for i in range(VIT["layers"]):
        q = f"{vp}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[f"{q}self_attn.{n}.weight"] = _rand(g, c, c)
            sd[f"{q}self_attn.{n}.bias"] = _rand(g, c)
        for n in ("layer_norm1", "layer_norm2"):
            sd[f"{q}{n}.weight"] = torch.ones(c, dtype=torch.bfloat16)
            sd[f"{q}{n}.bias"] = _rand(g, c)
        sd[q + "mlp.fc1.weight"] = _rand(g, cf, c)
        sd[q + "mlp.fc1.bias"] = _rand(g, cf)
        sd[q + "mlp.fc2.weight"] = _rand(g, c, cf)
        sd[q + "mlp.fc2.bias"] = _rand(g, c)
    sd[vp + "post_layernorm.weight"] = torch.ones(c, dtype=torch.bfloat16)
    sd[vp + "post_layernorm.bias"] = _rand(g, c)
    mp = "model.mm_projector."
    sd[mp + "mlp.mlp.0.weight"] = _rand(g, d, c)
    sd[mp + "mlp.mlp.0.bias"] = _rand(g, d)
    sd[mp + "mlp.mlp.2.weight"] = _rand(g, d, d)
    sd[mp + "mlp.mlp.2.bias"] = _rand(g, d)
    sd[mp + "peg.peg.0.weight"] = _rand(g, d, 1, 3, 3)
    sd[mp + "peg.peg.0.bias"] = _rand(g, d)
    sd["lm_head.weight"] = _rand(g, v, d)
    torch.save(sd, ckpt / "pytorch_model.bin")


def _finish_checkpoint(root: Path, ckpt: Path) -> None:
    d, f, v, c = LM["hidden"], LM["ffn"], LM["vocab"], VIT["hidden"]
    _tokenizer_32000(ckpt / "tokenizer.model")
    clip_dir = root / "clip-vit-large-patch14-336-random"
    _write_vit_l_dir(clip_dir)
    cfg = {
        "_name_or_path": "mtgv/MobileVLM_V2-1.7B",
        "architectures": ["MobileLlamaForCausalLM"],
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "hidden_act": "silu", "hidden_size": d, "intermediate_size": f, "initializer_range": 0.02,
        "max_position_embeddings": 2048, "model_type": "mobilevlm",
        "num_attention_heads": LM["heads"], "num_hidden_layers": LM["layers"], "num_key_value_heads": LM["heads"],
        "rms_norm_eps": 1e-6, "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1", "use_cache": True, "vocab_size": v,
        "image_aspect_ratio": "pad", "mm_hidden_size": c, "mm_projector_type": "ldpnetv2",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "use_mm_proj": True, "vision_tower_type": "clip",
    }  # fmt: skip
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
    write_sentencepiece_config(ckpt, pad_token="<unk>", tokenizer_class="LlamaTokenizer")


def _write_vit_l_dir(clip_dir: Path) -> None:
    """The separate CLIP directory the legacy path reads (ViT-L/14-336 shapes, f32, CLIPVisionModel layout)."""
    dims = {"hidden": VIT["hidden"], "layers": VIT["layers"], "heads": VIT["heads"], "ffn": VIT["ffn"],
            "patch": VIT["patch"], "projection_dim": 768}
    write_clip_dir(clip_dir, seed=0, image_size=VIT["image"], dims=dims)


def measure(cmd: list[str], log: Path, cwd: Path | None = None) -> dict[str, object]:
    """Run one command under /usr/bin/time: wall seconds, peak RSS (MiB) of the command, exit code, error line.

    /usr/bin/time (not wait4 here) because a child forked from this Python process inherits its RSS high-water mark
    across exec on Linux, which would report this process's memory instead of the command's.
    """
    marker = "MVLM_TIME"
    full = ["/usr/bin/time", "-f", f"{marker} %e %M", *cmd]
    with open(log, "wb") as out:
        p = subprocess.run(full, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    text = log.read_text(errors="replace").strip().splitlines()
    timing = next(ln for ln in reversed(text) if ln.startswith(marker)).split()
    body = [ln for ln in text if not ln.startswith(marker) and not ln.startswith("Command exited")]
    err = next((ln for ln in reversed(body) if "Error" in ln or "error" in ln), body[-1] if body else "")
    return {
        "cmd": " ".join(cmd),
        "wall_s": round(float(timing[1]), 2),
        "peak_rss_mib": round(int(timing[2]) / 1024, 1),
        "rc": p.returncode,
        "error": err[:300] if p.returncode else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("MVLM_BENCH_CACHE", "/tmp/mvlm-bench-cache")))
    ap.add_argument("--llama-cpp", type=Path, default=DEFAULT_SRC, help="pinned llama.cpp source tree")
    ap.add_argument("--outtype", default="f16")
    ap.add_argument("--json-file", dest="json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--skip-legacy", action="store_true")
    args = ap.parse_args()

    t0 = time.perf_counter()
    ckpt = make_checkpoint(args.cache)
    print(f"checkpoint: {ckpt} ({(ckpt / 'pytorch_model.bin').stat().st_size / 1e9:.2f} GB) "
          f"ready in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    work = args.cache / "out"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    py = sys.executable
    rows: list[dict[str, object]] = []

    r = measure([py, "-m", "mvlm", "convert", str(ckpt), "-o", str(work / "mvlm"), "--outtype",
                 args.outtype, "--json"], work / "mvlm.log", cwd=REPO)  # fmt: skip
    rows.append({"tool": "mvlm convert", "step": "LM + mmproj", **r})

    if not args.skip_legacy:
        src = args.llama_cpp
        leg = work / "legacy"
        leg.mkdir()
        clip_dir = args.cache / "clip-vit-large-patch14-336-random"
        steps = [
            ("llava_surgery.py", [py, str(src / "tools/mtmd/legacy-models/llava_surgery.py"), "-m", str(ckpt)]),
            ("convert_image_encoder_to_gguf.py", [py, str(src / "tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py"),
             "-m", str(clip_dir), "--llava-projector", str(ckpt / "llava.projector"), "--output-dir", str(leg),
             "--projector-type", "ldpv2", "--clip-model-is-vision"]),
            ("convert_legacy_llama.py", [py, str(src / "examples/convert_legacy_llama.py"), str(ckpt), "--skip-unknown",
             "--outtype", args.outtype, "--outfile", str(leg / f"MobileVLM_V2-1.7B-{args.outtype.upper()}.gguf")]),
        ]  # fmt: skip
        for label, cmd in steps:
            r = measure(cmd, work / f"{label}.log", cwd=src)
            rows.append({"tool": "llama.cpp legacy", "step": label, **r})
        for extra in ("llava.projector", "llava.clip"):
            (ckpt / extra).unlink(missing_ok=True)
        legacy = [x for x in rows if x["tool"] == "llama.cpp legacy"]
        rows.append({
            "tool": "llama.cpp legacy", "step": "total",
            "wall_s": round(sum(float(x["wall_s"]) for x in legacy), 2),
            "peak_rss_mib": max(float(x["peak_rss_mib"]) for x in legacy),
            "rc": max(int(x["rc"]) for x in legacy), "error": None,
        })  # fmt: skip

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Conversion of a MobileVLM_V2-1.7B-sized checkpoint (bf16 .bin, {os.cpu_count()} cores)")
    for col in ("tool", "step", "wall s", "peak RSS MiB", "rc", "error"):
        t.add_column(col)
    for x in rows:
        t.add_row(str(x["tool"]), str(x["step"]), f"{x['wall_s']}", f"{x['peak_rss_mib']}", str(x["rc"]),
                  str(x.get("error") or ""))  # fmt: skip
    Console().print(t)
    sizes = {p.name: p.stat().st_size for p in work.rglob("*.gguf")}
    result = {"checkpoint": str(ckpt), "outtype": args.outtype, "cpu_count": os.cpu_count(), "rows": rows,
              "outputs": sizes}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if rows[0]["rc"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
