"""`mvlm convert` on tiny MobileVLM checkpoints in the real layouts, read back with gguf.GGUFReader.

Expected values are computed here from the source weights, loaded independently of the converter (torch.load /
safetensors.torch.load_file), with an independent loop-based reimplementation of llama.cpp's Q/K row order.
The chat-template expectation is written by hand from LLaVA's conv "v1" (conv_vicuna_v1), not from mvlm_core.conversation.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from mvlm_convert.convert import convert
from mvlm_convert.families.mobilevlm import make_tiny_checkpoint
from mvlm_convert.families.tiny_parts import CLIP, LM
from mvlm_core.errors import MvlmError

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
V2_CLIP = "model.vision_tower.vision_tower.vision_model."


# ---------------------------------------------------------------------------------------------------------------
# independent helpers
# ---------------------------------------------------------------------------------------------------------------
def load_source(d: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint dir, read without mvlm_convert."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    for f in sorted(d.glob("*.bin")):
        out.update(torch.load(f, weights_only=True, map_location="cpu"))
    return out


def ggml_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Row order llama.cpp expects for Q/K: within each head, row 2i <- i and row 2i+1 <- i + head_dim/2."""
    hd = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for i in range(hd // 2):
            out[h * hd + 2 * i] = w[h * hd + i]
            out[h * hd + 2 * i + 1] = w[h * hd + hd // 2 + i]
    return out


def read_gguf(path: Path) -> tuple[dict[str, object], dict[str, tuple[str, np.ndarray]]]:
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items()}
    tensors = {}
    for t in r.tensors:
        data = np.array(t.data)
        if t.tensor_type in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.BF16):
            data = gguf.quants.dequantize(data, t.tensor_type)
        shape = tuple(int(x) for x in reversed(t.shape))
        tensors[t.name] = (t.tensor_type.name, data.reshape(shape).astype(np.float32))
    return fields, tensors


TOL = {"f32": 0.0, "f16": 1e-3, "bf16": 8e-3, "q8_0": 1.5e-2}


def assert_close(got: np.ndarray, want: np.ndarray, outtype: str, name: str) -> None:
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    scale = float(np.abs(want).max()) or 1.0
    err = float(np.abs(got - want).max()) / scale
    assert err <= TOL[outtype], f"{name}: max rel error {err:.2e} > {TOL[outtype]}"


def expected_lm(src: dict[str, torch.Tensor], n_head: int, n_kv: int) -> dict[str, np.ndarray]:
    exp = {
        "token_embd.weight": src["model.embed_tokens.weight"],
        "output_norm.weight": src["model.norm.weight"],
        "output.weight": src["lm_head.weight"],
    }
    for i in range(LM["layers"]):
        p = f"model.layers.{i}."
        exp[f"blk.{i}.attn_norm.weight"] = src[p + "input_layernorm.weight"]
        exp[f"blk.{i}.ffn_norm.weight"] = src[p + "post_attention_layernorm.weight"]
        exp[f"blk.{i}.attn_v.weight"] = src[p + "self_attn.v_proj.weight"]
        exp[f"blk.{i}.attn_output.weight"] = src[p + "self_attn.o_proj.weight"]
        exp[f"blk.{i}.ffn_gate.weight"] = src[p + "mlp.gate_proj.weight"]
        exp[f"blk.{i}.ffn_up.weight"] = src[p + "mlp.up_proj.weight"]
        exp[f"blk.{i}.ffn_down.weight"] = src[p + "mlp.down_proj.weight"]
    out = {k: v.float().numpy() for k, v in exp.items()}
    for i in range(LM["layers"]):
        p = f"model.layers.{i}."
        out[f"blk.{i}.attn_q.weight"] = ggml_rope_rows(src[p + "self_attn.q_proj.weight"].float().numpy(), n_head)
        out[f"blk.{i}.attn_k.weight"] = ggml_rope_rows(src[p + "self_attn.k_proj.weight"].float().numpy(), n_kv)
    return out


def expected_clip(src: dict[str, torch.Tensor], prefix: str) -> dict[str, np.ndarray]:
    exp = {
        "v.class_embd": src[prefix + "embeddings.class_embedding"],
        "v.patch_embd.weight": src[prefix + "embeddings.patch_embedding.weight"],
        "v.position_embd.weight": src[prefix + "embeddings.position_embedding.weight"],
        "v.pre_ln.weight": src[prefix + "pre_layrnorm.weight"],
        "v.pre_ln.bias": src[prefix + "pre_layrnorm.bias"],
    }
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_out": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2",
          "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}  # fmt: skip
    for i in range(CLIP["layers"]):
        for g, h in hf.items():
            for s in ("weight", "bias"):
                exp[f"v.blk.{i}.{g}.{s}"] = src[f"{prefix}encoder.layers.{i}.{h}.{s}"]
    return {k: v.float().numpy() for k, v in exp.items()}


def expected_projector(src: dict[str, torch.Tensor], variant: str) -> dict[str, np.ndarray]:
    exp: dict[str, torch.Tensor] = {}
    if variant == "v2":
        for i in (0, 2):
            for s in ("weight", "bias"):
                exp[f"mm.model.mlp.{i}.{s}"] = src[f"model.mm_projector.mlp.mlp.{i}.{s}"]
        exp["mm.model.peg.0.weight"] = src["model.mm_projector.peg.peg.0.weight"][:, 0]
        exp["mm.model.peg.0.bias"] = src["model.mm_projector.peg.peg.0.bias"]
    else:
        p = "model.mm_projector.model."
        for i in (1, 3):
            for s in ("weight", "bias"):
                exp[f"mm.model.mlp.{i}.{s}"] = src[f"{p}mlp.{i}.{s}"]
        for k in (1, 2):
            b = f"{p}mb_block.{k}.block."
            g = f"mm.model.mb_block.{k}.block."
            exp[g + "0.0.weight"] = src[b + "0.0.weight"][:, 0]
            for rest in ("0.1.weight", "0.1.bias", "1.fc1.bias", "1.fc2.bias", "2.1.weight", "2.1.bias"):
                exp[g + rest] = src[b + rest]
            for rest in ("1.fc1.weight", "1.fc2.weight", "2.0.weight"):
                exp[g + rest] = src[b + rest][:, :, 0, 0]
    return {k: v.float().numpy() for k, v in exp.items()}


def no_outputs(d: Path) -> bool:
    return not d.exists() or not [p for p in d.iterdir() if p.suffix in (".gguf", ".tmp")]


# ---------------------------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------------------------
CASES = [
    # (variant, layout, outtype, gqa)
    ("v2", "bin", "f32", False),
    ("v2", "bin", "f16", False),
    ("v1", "bin", "f16", False),
    ("v2", "sharded-safetensors", "f16", False),
    ("v1", "sharded-bin", "f32", False),
    ("v2", "safetensors", "bf16", True),
    ("v2", "sharded-bin", "q8_0", False),
]


@pytest.mark.parametrize("variant,layout,outtype,gqa", CASES)
def test_roundtrip(tmp_path, variant, layout, outtype, gqa):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant=variant, layout=layout, gqa=gqa, seed=3)
    res = convert(ckpt, tmp_path / "out", outtype=outtype, progress=False)
    label = outtype.upper()
    name = "MobileVLM_V2-Tiny" if variant == "v2" else "MobileVLM-Tiny"
    assert res.lm.path == tmp_path / "out" / f"{name}-{label}.gguf"
    assert res.mmproj is not None and res.mmproj.path == tmp_path / "out" / f"mmproj-{name}-{label}.gguf"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([res.lm.path.name, res.mmproj.path.name])

    src = load_source(ckpt)
    n_kv = 2 if gqa else LM["heads"]

    # --- language model
    fields, tensors = read_gguf(res.lm.path)
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == LM["layers"]
    assert fields["llama.attention.head_count"] == LM["heads"]
    assert fields["llama.attention.head_count_kv"] == n_kv
    assert fields["llama.embedding_length"] == LM["hidden"]
    assert fields["llama.feed_forward_length"] == LM["ffn"]
    assert fields["llama.rope.dimension_count"] == LM["hidden"] // LM["heads"]
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == sp.vocab_size() == fields["llama.vocab_size"]
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[100] == sp.id_to_piece(100)
    exp = expected_lm(src, LM["heads"], n_kv)
    assert set(tensors) == set(exp), "LM must hold exactly the LLaMA tensors (no vision, projector or inv_freq)"
    for k, want in exp.items():
        dtype, got = tensors[k]
        if want.ndim == 1:
            assert dtype == "F32", k
        assert_close(got, want, outtype, k)

    # --- mmproj
    fields, tensors = read_gguf(res.mmproj.path)
    assert fields["general.architecture"] == "clip"
    assert fields["clip.projector_type"] == ("ldpv2" if variant == "v2" else "ldp")
    assert fields["clip.has_vision_encoder"] is True and fields["clip.has_llava_projector"] is True
    # all layers written, block_count = n: llama.cpp's llava graph then runs n-1 = hidden_states[-2]
    assert fields["clip.vision.block_count"] == CLIP["layers"]
    assert "clip.vision.feature_layer" not in fields
    assert fields["clip.vision.image_size"] == 336 and fields["clip.vision.patch_size"] == 14
    assert fields["clip.vision.embedding_length"] == CLIP["hidden"]
    assert fields["clip.vision.feed_forward_length"] == CLIP["ffn"]
    assert fields["clip.vision.attention.head_count"] == CLIP["heads"]
    assert fields["clip.use_gelu"] is False
    clip_src = src if variant == "v2" else load_source(ckpt / "clip-vit-tiny-patch14-336")
    prefix = V2_CLIP if variant == "v2" else "vision_model."
    exp = {**expected_clip(clip_src, prefix), **expected_projector(src, variant)}
    assert set(tensors) == set(exp), set(tensors) ^ set(exp)
    for k, want in exp.items():
        dtype, got = tensors[k]
        if k in ("v.patch_embd.weight", "mm.model.peg.0.weight") or k.endswith("block.0.0.weight"):
            assert dtype == "F16", f"{k}: conv kernels must be f16 for clip.cpp"
            assert_close(got, want, "f16", k)
        elif want.ndim == 1 or k in ("v.position_embd.weight",):
            assert dtype == "F32", k
            assert_close(got, want, "f32", k)
        else:
            assert_close(got, want, outtype, k)


def test_v1_preprocessor_mean_std_and_vision_tower_override(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="v1", seed=1)
    # move the CLIP dir away so mm_vision_tower no longer resolves; give it with --vision-tower instead
    clip = ckpt / "clip-vit-tiny-patch14-336"
    moved = tmp_path / "my-clip"
    clip.rename(moved)
    pp = json.loads((moved / "preprocessor_config.json").read_text())
    pp["image_mean"], pp["image_std"] = [0.5, 0.25, 0.125], [0.2, 0.3, 0.4]
    (moved / "preprocessor_config.json").write_text(json.dumps(pp))

    with pytest.raises(MvlmError, match="--vision-tower"):
        convert(ckpt, tmp_path / "out0", progress=False)
    assert no_outputs(tmp_path / "out0")

    res = convert(ckpt, tmp_path / "out", vision_tower=moved, name="My V1", progress=False)
    assert res.lm.path.name == "My-V1-F16.gguf" and res.mmproj.path.name == "mmproj-My-V1-F16.gguf"
    fields, _ = read_gguf(res.mmproj.path)
    assert np.allclose(fields["clip.vision.image_mean"], [0.5, 0.25, 0.125])
    assert np.allclose(fields["clip.vision.image_std"], [0.2, 0.3, 0.4])
    assert fields["general.name"] == "My-V1"


def test_3b_config_trap_uses_hf_keys(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="v2", trap_3b=True)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["n_head"] != cfg["num_attention_heads"]  # the trap is really there
    res = convert(ckpt, tmp_path / "out", outtype="f32", progress=False)
    fields, tensors = read_gguf(res.lm.path)
    assert fields["llama.attention.head_count"] == LM["heads"]
    assert fields["llama.block_count"] == LM["layers"]
    assert fields["llama.embedding_length"] == LM["hidden"]
    src = load_source(ckpt)
    want = ggml_rope_rows(src["model.layers.1.self_attn.q_proj.weight"].float().numpy(), LM["heads"])
    assert_close(tensors["blk.1.attn_q.weight"][1], want, "f32", "q")


def test_mobilellama_text_only(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="mobilellama", layout="safetensors")
    res = convert(ckpt, tmp_path / "out", progress=False)
    assert res.mmproj is None
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["MobileLLaMA-Tiny-F16.gguf"]


def test_chat_template_renders_mobilevlm_v1(tmp_path):
    import jinja2

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="v2")
    res = convert(ckpt, tmp_path / "out", progress=False)
    fields, _ = read_gguf(res.lm.path)
    tmpl = jinja2.Environment().from_string(fields["tokenizer.chat_template"])

    # llama-mtmd-cli puts the marker in front of the prompt without a newline; MobileVLM was trained on "<image>\n"
    msgs = [
        {"role": "user", "content": "<__media__>What is in the picture?"},
        {"role": "assistant", "content": "A cat on a table."},
        {"role": "user", "content": "What colour is it?"},
    ]
    want = (
        SYSTEM + " USER: <__media__>\nWhat is in the picture? ASSISTANT: A cat on a table.</s>USER: What colour is it? ASSISTANT:"
    )
    assert tmpl.render(messages=msgs, add_generation_prompt=True) == want
    # a marker already followed by a newline is left as is
    one = [{"role": "user", "content": "<__media__>\nWhat is in the picture?"}]
    assert tmpl.render(messages=one, add_generation_prompt=True) == (
        SYSTEM + " USER: <__media__>\nWhat is in the picture? ASSISTANT:"
    )
    # an explicit system message replaces the default
    sysmsg = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tmpl.render(messages=sysmsg, add_generation_prompt=True) == "Be brief. USER: Hi ASSISTANT:"
    # llama.cpp's non-Jinja path recognises it by these strings (runtime patch 0005: built-in "vicuna-v1")
    t = fields["tokenizer.chat_template"]
    assert "USER: " in t and "ASSISTANT: " in t and "SYSTEM: " not in t and "<|im_start|>" not in t
    assert "A chat between a curious user and an artificial intelligence assistant" in t


# ---------------------------------------------------------------------------------------------------------------
# bad input: one clear error, nothing left behind
# ---------------------------------------------------------------------------------------------------------------
def test_truncated_bin(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="v2")
    f = ckpt / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(MvlmError, match=r"pytorch_model\.bin.*truncated or corrupt"):
        convert(ckpt, tmp_path / "out", progress=False)
    assert no_outputs(tmp_path / "out")


def test_corrupt_safetensors_header(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="v2", layout="sharded-safetensors")
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    raw = bytearray(shard.read_bytes())
    raw[8:20] = b"#garbage####"
    shard.write_bytes(bytes(raw))
    with pytest.raises(MvlmError, match=shard.name + ".*corrupt safetensors header"):
        convert(ckpt, tmp_path / "out", progress=False)
    assert no_outputs(tmp_path / "out")


def test_truncated_safetensors(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="v2", layout="safetensors")
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(MvlmError, match=r"model\.safetensors.*truncated"):
        convert(ckpt, tmp_path / "out", progress=False)
    assert no_outputs(tmp_path / "out")


@pytest.mark.parametrize(
    "drop", ["model.layers.1.mlp.up_proj.weight", "model.mm_projector.peg.peg.0.bias", V2_CLIP + "pre_layrnorm.weight"]
)
def test_missing_tensor_is_named(tmp_path, drop):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="v2")
    sd = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    del sd[drop]
    torch.save(sd, ckpt / "pytorch_model.bin")
    with pytest.raises(MvlmError, match="missing") as ei:
        convert(ckpt, tmp_path / "out", progress=False)
    assert drop in str(ei.value)
    assert no_outputs(tmp_path / "out")


def test_unknown_projector_type(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="v2")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mm_projector_type"] = "qformer"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MvlmError, match=r"unknown mm_projector_type 'qformer'.*ldpnetv2\*.*ldpnet\*"):
        convert(ckpt, tmp_path / "out", progress=False)
    assert no_outputs(tmp_path / "out")


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_wrong_clip_grid_for_ldp(tmp_path, variant):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant=variant, image_size=224)
    with pytest.raises(MvlmError, match="24x24 patch grid"):
        convert(ckpt, tmp_path / "out", progress=False)
    assert no_outputs(tmp_path / "out")


def test_unwritable_outdir(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="v2")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a dir")
    with pytest.raises(MvlmError, match="cannot create output directory"):
        convert(ckpt, blocker / "out", progress=False)


def test_disk_full_leaves_nothing(tmp_path, monkeypatch):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="v2")
    calls = {"n": 0}
    real = gguf.GGUFWriter.write_tensor_data

    def flaky(self, tensor, *a, **k):
        calls["n"] += 1
        if calls["n"] == 40:  # somewhere in the second file, after the first is complete
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", flaky)
    with pytest.raises(MvlmError, match="disk full") as e:
        convert(ckpt, tmp_path / "out", progress=False)
    assert e.value.exit_code == 28  # docs/reliability.md: a full disk is exit 28 for every command
    assert calls["n"] == 40
    assert no_outputs(tmp_path / "out"), list((tmp_path / "out").iterdir())


def test_bad_outtype(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="mobilellama")
    with pytest.raises(MvlmError, match="q4_0.*not supported"):
        convert(ckpt, tmp_path / "out", outtype="q4_0", progress=False)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def test_cli_json(tmp_path):
    import typer
    from typer.testing import CliRunner

    from mvlm_convert.convert_cli import convert_cmd

    app = typer.Typer()
    app.command("convert")(convert_cmd)
    app.command("noop")(lambda: None)  # keep "convert" a sub-command
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="v1", layout="sharded-bin")
    r = CliRunner().invoke(app, ["convert", str(ckpt), "-o", str(tmp_path / "out"), "--outtype", "q8_0", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["variant"] == "v1" and out["outtype"] == "q8_0"
    assert [Path(p).name for p in out["files"]] == ["MobileVLM-Tiny-Q8_0.gguf", "mmproj-MobileVLM-Tiny-Q8_0.gguf"]
    assert out["mmproj"]["metadata"]["vision_layers_run"] == CLIP["layers"] - 1
    assert out["lm"]["dtypes"]["Q8_0"] == 7 * LM["layers"] + 2


@pytest.mark.slow
def test_cli_error_is_one_line(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="v2")
    (ckpt / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    p = subprocess.run(
        [sys.executable, "-m", "mvlm", "convert", str(ckpt), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "pytorch_model.bin" in lines[0], p.stderr
    assert no_outputs(tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp loads and runs what we wrote (needs the patched host runtime)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_llama_cpp_runs_converted_lm(tmp_path, host_runtime, outtype):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="v2", gqa=True)
    res = convert(ckpt, tmp_path / "out", outtype=outtype, progress=False)
    p = subprocess.run(
        [str(host_runtime / "bin" / "llama-completion"), "-m", str(res.lm.path), "-p", "hello", "-n", "4",
         "-no-cnv", "--temp", "0", "-t", "2"],
        capture_output=True, text=True, errors="replace", timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "n_head_kv" in p.stderr or "llama" in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_llama_mtmd_cli_runs_without_chat_template_flag(tmp_path, host_runtime, variant):
    from PIL import Image

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant=variant)
    res = convert(ckpt, tmp_path / "out", progress=False)
    img = tmp_path / "img.png"
    Image.fromarray((np.arange(336 * 336 * 3) % 251).astype(np.uint8).reshape(336, 336, 3)).save(img)
    base = [str(host_runtime / "bin" / "llama-mtmd-cli"), "-m", str(res.lm.path), "--mmproj", str(res.mmproj.path),
            "--image", str(img), "-p", "What is in the picture?", "-n", "2", "--temp", "0", "-t", "2"]  # fmt: skip
    for extra in ([], ["--jinja"]):
        p = subprocess.run(base + extra, capture_output=True, text=True, errors="replace", timeout=300)
        assert p.returncode == 0, (extra, p.stderr[-3000:])
        assert "encoding done" in p.stderr, p.stderr[-2000:]  # the image went through CLIP + projector
        example = p.stderr[p.stderr.find("chat template example") :][:600]
        # llama.cpp formats a fixed example conversation (system "You are a helpful assistant", Hello / Hi there /
        # How are you?) with the file's template at start-up
        # Jinja: our template rendered by llama.cpp's own engine; no --jinja: the runtime's built-in "vicuna-v1"
        # (patch 0005), recognised from the template text. Both must give exactly conv "v1".
        want = "You are a helpful assistant USER: Hello ASSISTANT: Hi there</s>USER: How are you? ASSISTANT:"
        assert want in example, (extra, example)


@pytest.mark.slow
def test_disk_full_for_real(tmp_path, small_fs):
    """A real filesystem that fills up mid-write (a 256 KiB tmpfs): one line, exit != 0, nothing left behind."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="v2")
    out = small_fs(256 * 1024)
    r = subprocess.run([sys.executable, "-m", "mvlm", "convert", str(ckpt), "-o", str(out), "--outtype", "f32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 28, r.stderr  # a full disk: exit 28, as for bench reports and history saves
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "disk full" in errors[0], r.stderr  # one line (the rest is the progress bar)
    assert "Traceback" not in r.stderr
    assert list(out.iterdir()) == []
