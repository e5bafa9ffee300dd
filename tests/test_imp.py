"""Imp v1 (Phi-2 + SigLIP-384 + mlp2x_gelu): detection, conversion read back with gguf.GGUFReader, parity.

Tiny checkpoints come from mvlm_convert.families.imp.make_tiny_imp (PhiForCausalLM names, a byte-level BPE
tokenizer.json trained on the spot with ``tokenizers``, a SigLIP copy without CLS / pre-LN, cut after
``mm_vision_select_layer`` as Imp saves it). Slow tests run ``verify`` against the host runtime (fixture host_runtime)
and measure what Imp's squash preprocessing vs llama.cpp's padding does to a non-square image.
"""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
import torch
from gguf_read import assert_reference_lm_matches, field, tensor, verify_f32_parity

from mvlm_convert import reference as ref
from mvlm_convert.convert import convert
from mvlm_convert.families import detect_family
from mvlm_convert.families.imp import IMP_LM, IMP_SIGLIP, make_tiny_imp
from mvlm_core.errors import MvlmError

F32_IMAGE_BAR = 2e-3
F32_LOGITS_BAR = 1e-3  # ggml's CPU GELU is an f16 lookup table: ~3e-4 on the tiny Phi-2, more than LLaMA's SiLU


def test_imp_v1_detected_and_other_projectors_refused_in_one_line():
    info = detect_family({"architectures": ["ImpForCausalLM"], "model_type": "imp", "mm_projector_type": "mlp2x_gelu"})
    assert (info.family, info.variant, info.projector) == ("imp", "v1", "mlp")  # v1.5: tests/test_imp15.py
    with pytest.raises(MvlmError) as e:
        detect_family({"architectures": ["ImpQwen2ForCausalLM"], "mm_projector_type": "linear"})
    assert "mlp2x_gelu" in str(e.value) and "\n" not in str(e.value)


def test_imp_converts_to_phi2_and_siglip_mmproj(tmp_path):
    from tokenizers import Tokenizer

    ckpt = make_tiny_imp(tmp_path / "ckpt")
    res = convert(ckpt, tmp_path / "out", outtype="f32", progress=False)
    assert res.family == "imp"
    lm = gguf.GGUFReader(str(res.lm.path))
    src = ref.StateReader(ckpt)
    assert field(lm, "general.architecture") == "phi2"
    head_dim = IMP_LM["hidden"] // IMP_LM["heads"]
    assert field(lm, "phi2.rope.dimension_count") == int(IMP_LM["rotary"] * head_dim)
    assert math.isclose(field(lm, "phi2.attention.layer_norm_epsilon"), 1e-5, rel_tol=1e-6)
    assert field(lm, "phi2.feed_forward_length") == IMP_LM["ffn"]
    for gname, hf in (("output.bias", "lm_head.bias"), ("blk.1.attn_q.bias", "model.layers.1.self_attn.q_proj.bias"),
                      ("blk.0.attn_output.weight", "model.layers.0.self_attn.dense.weight"),
                      ("blk.0.ffn_up.weight", "model.layers.0.mlp.fc1.weight"),
                      ("output_norm.bias", "model.final_layernorm.bias")):
        assert np.array_equal(tensor(lm, gname), src.get(hf).numpy()), gname
    # vocabulary: the BPE tokens by id, padded to the embedding rows; merges; no BOS added
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tokens = field(lm, "tokenizer.ggml.tokens")
    rows = src.get("model.embed_tokens.weight").shape[0]
    assert field(lm, "tokenizer.ggml.model") == "gpt2" and field(lm, "tokenizer.ggml.pre") == "phi-2"
    assert len(tokens) == rows > tok.get_vocab_size()
    assert all(tokens[i] == t for t, i in tok.get_vocab().items())
    assert tokens[-1] == f"[PAD{rows - 1}]"
    merges = json.loads((ckpt / "tokenizer.json").read_text())["model"]["merges"]
    got = field(lm, "tokenizer.ggml.merges")
    assert [m if isinstance(m, str) else " ".join(m) for m in merges] == got
    assert field(lm, "tokenizer.ggml.add_bos_token") is False
    assert field(lm, "tokenizer.ggml.eos_token_id") == tok.token_to_id("<|endoftext|>")

    mm = gguf.GGUFReader(str(res.mmproj.path))
    names = {t.name for t in mm.tensors}
    assert "v.class_embd" not in names and not any(n.startswith("v.pre_ln") for n in names)
    assert not any(n.startswith("v.post_ln") for n in names)
    prefix = "model.vision_tower.vision_tower.vision_model."
    assert np.array_equal(tensor(mm, "v.patch_embd.bias"), src.get(prefix + "embeddings.patch_embedding.bias").numpy())
    assert tensor(mm, "v.position_embd.weight").shape == ((384 // 14) ** 2, IMP_SIGLIP["hidden"])
    assert field(mm, gguf.Keys.Clip.PROJECTOR_TYPE) == "mlp"
    assert field(mm, gguf.Keys.ClipVision.USE_GELU) is True
    assert field(mm, gguf.Keys.ClipVision.IMAGE_SIZE) == 384
    assert field(mm, gguf.Keys.ClipVision.Attention.HEAD_COUNT) == IMP_SIGLIP["heads"]
    assert math.isclose(field(mm, gguf.Keys.ClipVision.Attention.LAYERNORM_EPS), 1e-6, rel_tol=1e-5)
    assert list(field(mm, gguf.Keys.ClipVision.IMAGE_MEAN)) == [0.5] * 3
    # the stored copy is already cut (2 of 3 layers): both run, which needs an explicit feature layer
    assert field(mm, gguf.Keys.ClipVision.BLOCK_COUNT) == IMP_SIGLIP["layers"] - 1
    assert list(field(mm, "clip.vision.feature_layer")) == [IMP_SIGLIP["layers"] - 1]
    assert res.mmproj.metadata["image_tokens"] == 729


@pytest.mark.slow  # over ~0.9 s: the fast lane stays under 2 minutes
@pytest.mark.parametrize(("stored", "tower_config", "run"), [(3, True, 2), (2, False, 2), (3, False, 3)])
def test_imp_vision_layers_counted_from_the_full_tower(tmp_path, stored, tower_config, run):
    """Full tower stored + config: n-1 run (no feature_layer key); no config: the stored copy is taken as cut."""
    ckpt = make_tiny_imp(tmp_path / "ckpt", stored_layers=stored, with_tower_config=tower_config)
    res = convert(ckpt, tmp_path / "out", outtype="f32", progress=False)
    assert res.mmproj.metadata["vision_layers_run"] == run
    mm = gguf.GGUFReader(str(res.mmproj.path))
    fl = field(mm, "clip.vision.feature_layer")
    assert (fl is None) == (run == stored - 1)
    assert ref.load_vision(ckpt).clip.config.num_hidden_layers == run  # the reference cuts the same way


def test_imp_tower_config_smaller_than_the_stored_copy_is_refused(tmp_path):
    ckpt = make_tiny_imp(tmp_path / "ckpt", stored_layers=3)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vision_tower_config"]["num_hidden_layers"] = 2
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MvlmError, match="3 encoder layers stored") as e:
        convert(ckpt, tmp_path / "out", progress=False)
    assert "\n" not in str(e.value) and not list((tmp_path / "out").glob("*.gguf"))


@pytest.mark.slow
def test_reference_phi2_matches_transformers_from_pretrained(tmp_path):
    """The reference's Phi-2 (built from Imp's keys, loaded by name) == PhiForCausalLM.from_pretrained on a copy."""
    from safetensors.torch import load_file, save_file
    from transformers import PhiConfig, PhiForCausalLM

    ckpt = make_tiny_imp(tmp_path / "ckpt", dtype=torch.float32)
    cfg = json.loads((ckpt / "config.json").read_text())
    phi_dir = tmp_path / "phi"
    phi_dir.mkdir()
    lm_keys = {k: v for k, v in load_file(str(ckpt / "model.safetensors")).items() if not k.startswith(
        ("model.vision_tower.", "model.mm_projector."))}
    save_file(lm_keys, str(phi_dir / "model.safetensors"))
    PhiConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
              num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
              partial_rotary_factor=cfg["partial_rotary_factor"], layer_norm_eps=cfg["layer_norm_eps"]
              ).save_pretrained(phi_dir)
    theirs = PhiForCausalLM.from_pretrained(str(phi_dir), torch_dtype=torch.float32).eval()
    assert_reference_lm_matches(theirs, ckpt)


# ---------------------------------------------------------------------------------------------------------------
# parity through the host runtime
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imp_f32(tmp_path_factory, host_runtime):
    root = tmp_path_factory.mktemp("imp")
    ckpt = make_tiny_imp(root / "ckpt")
    return ckpt, convert(ckpt, root / "out", outtype="f32", progress=False)


@pytest.mark.slow
def test_imp_verify_f32_parity(imp_f32):
    ckpt, res = imp_f32
    verify_f32_parity("imp f32", ckpt, res, F32_IMAGE_BAR, F32_LOGITS_BAR, 729)


@pytest.mark.slow
def test_imp_bpe_tokenization_matches_tokenizers(imp_f32):
    from tokenizers import Tokenizer

    from mvlm_core.backends import get_backend

    ckpt, res = imp_f32
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    rt = get_backend("host")
    for text in ("What is in the picture?", "A chat between a curious user and an artificial intelligence assistant.",
                 " USER: hello  world 1234\n ASSISTANT:", "Building a website can be done in 10 simple steps"):
        assert rt.tokenize(res.lm.path, text) == tok.encode(text).ids, text


@pytest.mark.slow
def test_imp_squash_vs_llama_cpp_padding_on_a_non_square_image(imp_f32, tmp_path):
    """Imp squashes 500x300 to 384x384; llama.cpp letterboxes. Same squashed bitmap: parity; raw file: deviation."""
    from PIL import Image

    from mvlm_convert.verify import rel_err
    from mvlm_core.backends import get_backend

    ckpt, res = imp_f32
    wide = Image.fromarray(ref.synthetic_image(500)).resize((500, 300), Image.Resampling.BICUBIC)
    raw = np.asarray(wide, dtype=np.uint8).copy()
    vis = ref.load_vision(ckpt)
    want = vis.embed(ref.squash_image(wide, 384))  # what Imp computes
    rt = get_backend("host")
    same_input = rt.image_embedding(res.mmproj.path, res.lm.path, ref.squash_image(wide, 384))
    own_preproc = rt.image_embedding(res.mmproj.path, res.lm.path, raw)  # llama.cpp pads + resizes itself
    parity, deviation = rel_err(same_input, want), rel_err(own_preproc, want)
    print(f"\n[imp 500x300] squashed bitmap to both: {parity:.3g}; llama.cpp's own preprocessing: {deviation:.3g}")
    assert parity <= F32_IMAGE_BAR
    assert deviation > 10 * parity  # the preprocessing difference is real and far above float error


# ---------------------------------------------------------------------------------------------------------------
# Imp-3B@196 (Imp-v1.5-3B-196): SigLIP retrained at 196 px, 14x14 = 196 image tokens (Imp's paper, Table 4)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_tower_config", [True, False], ids=["tower-config", "weights-only"])
def test_imp_196_image_size_and_token_count_come_from_the_checkpoint(tmp_path, with_tower_config):
    """The mmproj says 196 px / patch 14 because the checkpoint's position embeddings have 196 rows (and its tower
    config says 196 where there is one), not because a name says @196: nothing is assumed from mm_vision_tower."""
    ckpt = make_tiny_imp(tmp_path / "ckpt", image_size=196, with_tower_config=with_tower_config)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["mm_vision_tower"].endswith("-384")  # as the release names its tower
    res = convert(ckpt, tmp_path / "out", outtype="f32", progress=False)
    mm = gguf.GGUFReader(str(res.mmproj.path))
    assert field(mm, "clip.vision.image_size") == 196 and field(mm, "clip.vision.patch_size") == IMP_SIGLIP["patch"]
    pos = tensor(mm, "v.position_embd.weight")
    assert pos.shape[0] == (196 // IMP_SIGLIP["patch"]) ** 2 == 196
    assert ref.load_vision(ckpt).image_size == 196


def test_imp_196_tower_config_that_contradicts_the_weights_is_refused(tmp_path):
    ckpt = make_tiny_imp(tmp_path / "ckpt", image_size=196)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vision_tower_config"]["image_size"] = 384  # a 384 config over 196-row position embeddings
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MvlmError, match="does not match") as e:
        convert(ckpt, tmp_path / "out", progress=False)
    assert "\n" not in str(e.value) and not list((tmp_path / "out").glob("*.gguf"))


@pytest.mark.slow
def test_imp_196_verify_f32_parity(tmp_path, host_runtime):
    ckpt = make_tiny_imp(tmp_path / "ckpt", image_size=196)
    res = convert(ckpt, tmp_path / "out", outtype="f32", progress=False)
    verify_f32_parity("imp@196 f32", ckpt, res, F32_IMAGE_BAR, F32_LOGITS_BAR, 196)


# ---------------------------------------------------------------------------------------------------------------
# Imp v1's chat template: LLaVA's v1 conversation with Phi-2's "<|endoftext|>" as sep2
# ---------------------------------------------------------------------------------------------------------------
def test_imp_v1_gets_the_phi2_v1_chat_template_unless_the_checkpoint_has_one(tmp_path):
    from mvlm_convert.families.imp import V1_CHAT_TEMPLATE
    from mvlm_core.conversation import v1_conversation

    ckpt = make_tiny_imp(tmp_path / "ckpt", image_size=196)
    assert "chat_template" not in json.loads((ckpt / "tokenizer_config.json").read_text())  # as the Imp releases
    lm = gguf.GGUFReader(str(convert(ckpt, tmp_path / "out", progress=False).lm.path))
    template = field(lm, "tokenizer.chat_template")
    assert template == V1_CHAT_TEMPLATE
    import jinja2

    got = jinja2.Environment().from_string(template).render(
        messages=[{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                  {"role": "user", "content": "Q2"}], add_generation_prompt=True)
    assert got == v1_conversation(["Q1", "A1", "Q2"], sep2="<|endoftext|>") and "A1<|endoftext|>USER: Q2" in got
    # the checkpoint's own template wins
    tc = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": "{{ messages[0]['content'] }}"}))
    lm = gguf.GGUFReader(str(convert(ckpt, tmp_path / "own", progress=False).lm.path))
    assert field(lm, "tokenizer.chat_template") == "{{ messages[0]['content'] }}"


@pytest.mark.slow
def test_imp_v1_converted_benches_with_the_imp_protocol(tmp_path, host_runtime):
    """The outside tester's repro: tiny Imp v1 @196 converted by mvlm, then `mvlm bench --protocol imp` on local."""
    import os
    import subprocess
    import sys

    ckpt = make_tiny_imp(tmp_path / "imp196", image_size=196)
    res = convert(ckpt, tmp_path / "out", progress=False)
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "mvlm", "bench", "--device", "local", "--protocol", "imp",
                        "--model", str(res.lm.path), "--mmproj", str(res.mmproj.path), "--repeat", "1", "--warmup", "0",
                        "--threads", "2", "--json-file", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr[-3000:]
    (rec,) = json.loads(out.read_text())
    assert rec["protocol"] == "imp" and rec["params"]["n_text"] == 41, rec
    (run,) = rec["runs"]
    # llama-mtmd-cli ran the chat template (--jinja): the prompt holds the 196 image tokens, the 41-token request and
    # the template's system prompt and roles; 64 tokens came out
    assert run["metrics"]["n_gen"] == 64 and run["timing"]["image_tokens"] == 196
    assert run["metrics"]["n_prompt"] > 196 + 41


@pytest.mark.parametrize(("image_size", "accepted"), [(196, True), (200, True), (209, True), (210, False), (182, False)])
def test_imp_siglip_image_size_is_checked_the_way_siglip_counts_patches(tmp_path, image_size, accepted):
    """SigLIP (transformers' SiglipVisionEmbeddings) has (image_size // patch)^2 positions and its stride-patch conv
    drops the remainder: the released so400m-patch14-384 is 384 px over 27 * 14 = 378. So 200 px over 196 positions is
    a real SigLIP geometry (llama.cpp's clip counts patches the same way), and a size whose patch grid is not the
    stored one is refused in one line."""
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings

    ckpt = make_tiny_imp(tmp_path / "ckpt", image_size=196)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vision_tower_config"]["image_size"] = image_size
    (ckpt / "config.json").write_text(json.dumps(cfg))
    hf = SiglipVisionEmbeddings(SiglipVisionConfig(image_size=image_size, patch_size=IMP_SIGLIP["patch"], hidden_size=8))
    assert (hf.num_positions == 196) is accepted  # the oracle: transformers' own position count
    if accepted:
        mm = gguf.GGUFReader(str(convert(ckpt, tmp_path / "out", progress=False).mmproj.path))
        assert field(mm, "clip.vision.image_size") == image_size
    else:
        with pytest.raises(MvlmError, match="does not match") as e:
            convert(ckpt, tmp_path / "out", progress=False)
        assert "\n" not in str(e.value) and not list((tmp_path / "out").glob("*.gguf"))
