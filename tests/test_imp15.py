"""Imp-v1.5 (Qwen1.5 -> arch ``qwen2``, Phi-3 -> arch ``phi3``; same SigLIP + mlp2x_gelu as Imp v1).

Tiny checkpoints from mvlm_convert.families.imp.make_tiny_imp15 (Imp's key names, a Qwen-style byte-level BPE trained
with ``tokenizers`` / a SentencePiece model + Phi-3's added chat tokens trained on the spot). Fast tests read the
GGUF back with gguf.GGUFReader and compare against the checkpoint tensors; the reference LMs are checked against
transformers' own from_pretrained; slow tests run ``verify`` through the host runtime.
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
from mvlm_convert.families.imp import IMP15_KV, IMP_LM, PHI3_ADDED, make_tiny_imp15
from mvlm_core.errors import MvlmError

F32_IMAGE_BAR = 2e-3
F32_LOGITS_BAR = 1e-3


@pytest.mark.parametrize(("arch", "mtype", "variant"), [("ImpQwen2ForCausalLM", "imp_qwen2", "v1.5-qwen2"),
                                                        ("ImpPhi3ForCausalLM", "imp_phi3", "v1.5-phi3")])
def test_imp15_detected(arch, mtype, variant):
    for cfg in ({"architectures": [arch]}, {"model_type": mtype}):
        info = detect_family({**cfg, "mm_projector_type": "mlp2x_gelu"})
        assert (info.family, info.variant, info.projector) == ("imp", variant, "mlp")


def test_imp15_qwen2_gguf(tmp_path):
    from tokenizers import Tokenizer

    ckpt = make_tiny_imp15(tmp_path / "ckpt", lm="qwen2")
    res = convert(ckpt, tmp_path / "out", outtype="f32", progress=False)
    assert (res.family, res.variant) == ("imp", "v1.5-qwen2")
    lm = gguf.GGUFReader(str(res.lm.path))
    src = ref.StateReader(ckpt)
    assert field(lm, "general.architecture") == "qwen2"
    assert field(lm, "qwen2.rope.freq_base") == 1e6
    assert math.isclose(field(lm, "qwen2.attention.layer_norm_rms_epsilon"), 1e-6, rel_tol=1e-5)
    assert field(lm, "qwen2.attention.head_count_kv") == IMP15_KV["qwen2"]
    assert field(lm, "qwen2.rope.dimension_count") == IMP_LM["hidden"] // IMP_LM["heads"]
    # no Q/K permutation (NEOX rope): bit-equal to the checkpoint, biases kept
    for gname, hf in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                      ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight"),
                      ("blk.1.attn_k.bias", "model.layers.1.self_attn.k_proj.bias"),
                      ("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj.weight"),
                      ("output.weight", "lm_head.weight")):
        assert np.array_equal(tensor(lm, gname), src.get(hf).float().numpy()), gname
    assert not any(t.name.startswith(("v.", "mm.")) for t in lm.tensors)
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tokens = field(lm, "tokenizer.ggml.tokens")
    assert field(lm, "tokenizer.ggml.model") == "gpt2" and field(lm, "tokenizer.ggml.pre") == "qwen2"
    assert len(tokens) == src.get("model.embed_tokens.weight").shape[0] > tok.get_vocab_size()
    assert all(tokens[i] == t for t, i in tok.get_vocab().items())
    assert field(lm, "tokenizer.ggml.add_bos_token") is False
    mm = gguf.GGUFReader(str(res.mmproj.path))
    assert field(mm, gguf.Keys.Clip.PROJECTOR_TYPE) == "mlp" and res.mmproj.metadata["image_tokens"] == 729


def test_imp15_phi3_gguf_keeps_fused_qkv_and_gate_up(tmp_path):
    import sentencepiece as spm

    ckpt = make_tiny_imp15(tmp_path / "ckpt", lm="phi3")
    res = convert(ckpt, tmp_path / "out", outtype="f32", progress=False)
    lm = gguf.GGUFReader(str(res.lm.path))
    src = ref.StateReader(ckpt)
    assert field(lm, "general.architecture") == "phi3"
    d, h = IMP_LM["hidden"], IMP_LM["heads"]
    assert field(lm, "phi3.feed_forward_length") == IMP_LM["ffn"]  # F, while ffn_up holds 2F rows
    assert field(lm, "phi3.attention.head_count_kv") == IMP15_KV["phi3"]
    assert field(lm, "phi3.rope.dimension_count") == d // h
    assert field(lm, "phi3.rope.scaling.original_context_length") == 4096
    qkv = tensor(lm, "blk.1.attn_qkv.weight")
    assert qkv.shape == (d + 2 * IMP15_KV["phi3"] * d // h, d)
    assert np.array_equal(qkv, src.get("model.layers.1.self_attn.qkv_proj.weight").float().numpy())
    up = tensor(lm, "blk.0.ffn_up.weight")
    assert up.shape == (2 * IMP_LM["ffn"], d)
    assert np.array_equal(up, src.get("model.layers.0.mlp.gate_up_proj.weight").float().numpy())
    names = {t.name for t in lm.tensors}
    assert not names & {"blk.0.attn_q.weight", "blk.0.ffn_gate.weight"}
    # SentencePiece pieces, then the added chat tokens, then [PADn] up to the embedding rows
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    tokens = field(lm, "tokenizer.ggml.tokens")
    assert field(lm, "tokenizer.ggml.model") == "llama"
    assert tokens[: sp.vocab_size()] == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert tokens[sp.vocab_size(): sp.vocab_size() + len(PHI3_ADDED)] == PHI3_ADDED
    rows = src.get("model.embed_tokens.weight").shape[0]
    assert len(tokens) == rows and tokens[-1] == f"[PAD{rows - 1}]"
    assert field(lm, "tokenizer.ggml.eos_token_id") == sp.vocab_size()  # <|endoftext|>
    assert field(lm, "tokenizer.chat_template") is None  # not MobileVLM's: Imp's Phi-3 conversation differs


def test_imp15_rope_scaling_refused_in_one_line(tmp_path):
    ckpt = make_tiny_imp15(tmp_path / "ckpt", lm="phi3")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "longrope", "long_factor": [1.0] * 16, "short_factor": [1.0] * 16}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MvlmError, match="rope scaling") as e:
        convert(ckpt, tmp_path / "out", progress=False)
    assert "\n" not in str(e.value) and not list((tmp_path / "out").glob("*.gguf"))


def test_imp15_fused_qkv_with_wrong_rows_refused(tmp_path):
    ckpt = make_tiny_imp15(tmp_path / "ckpt", lm="phi3")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_key_value_heads"] = IMP_LM["heads"]  # config says MHA, the fused weight holds GQA rows
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MvlmError, match="qkv_proj shape"):
        convert(ckpt, tmp_path / "out", progress=False)


@pytest.mark.parametrize("lm", ["qwen2", "phi3"])
def test_reference_imp15_lm_matches_transformers_from_pretrained(tmp_path, lm):
    """The reference's LM (built from Imp's keys, loaded by name) == transformers' from_pretrained on a copy."""
    from safetensors.torch import load_file, save_file
    from transformers import Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    ckpt = make_tiny_imp15(tmp_path / "ckpt", lm=lm, dtype=torch.float32)
    cfg = json.loads((ckpt / "config.json").read_text())
    out = tmp_path / "plain"
    out.mkdir()
    save_file({k: v for k, v in load_file(str(ckpt / "model.safetensors")).items()
               if not k.startswith(("model.vision_tower.", "model.mm_projector."))}, str(out / "model.safetensors"))
    keys = {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta")}
    if lm == "qwen2":
        Qwen2Config(**keys, tie_word_embeddings=False).save_pretrained(out)
        theirs = Qwen2ForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    else:
        Phi3Config(**keys, tie_word_embeddings=False, pad_token_id=None, bos_token_id=1, eos_token_id=2,
                   sliding_window=None).save_pretrained(out)
        theirs = Phi3ForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert_reference_lm_matches(theirs, ckpt)


# ---------------------------------------------------------------------------------------------------------------
# parity through the host runtime
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["qwen2", "phi3"])
def imp15_f32(request, tmp_path_factory, host_runtime):
    root = tmp_path_factory.mktemp(f"imp15-{request.param}")
    ckpt = make_tiny_imp15(root / "ckpt", lm=request.param)
    return request.param, ckpt, convert(ckpt, root / "out", outtype="f32", progress=False)


@pytest.mark.slow
def test_imp15_verify_f32_parity(imp15_f32):
    lm, ckpt, res = imp15_f32
    verify_f32_parity(f"imp-v1.5 {lm} f32", ckpt, res, F32_IMAGE_BAR, F32_LOGITS_BAR, 729)


@pytest.mark.slow
def test_imp15_tokenization_matches_the_checkpoint_tokenizer(imp15_f32):
    from mvlm_core.backends import get_backend

    lm, ckpt, res = imp15_f32
    if lm == "qwen2":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
        encode = lambda s: tok.encode(s).ids  # noqa: E731
    else:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
        encode = sp.encode
    rt = get_backend("host")
    for text in ("What is in the picture?", "A chat between a curious user and an artificial intelligence assistant.",
                 "we'll see 2024 cats\n\n  and 31 dogs", "Building a website can be done in 10 simple steps",
                 "What is in the.picture.of.the.cat?"):  # ".c" is one Qwen pre-token (GPT-2's regex: two)
        assert rt.tokenize(res.lm.path, text) == encode(text), text
