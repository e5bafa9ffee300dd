"""Qwen1.5 (arch ``qwen2``) for Imp-v1.5-2B: what differs from ``lm.base``.

Facts (transformers' Qwen2ForCausalLM, which Imp's ``ImpQwen2ForCausalLM`` subclasses; the pinned llama.cpp
src/models/qwen2.cpp, llama-arch.cpp and conversion/qwen.py):
- names: ``model.embed_tokens``, ``model.layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj,
  post_attention_layernorm, mlp.{gate,up,down}_proj}``, ``model.norm``, ``lm_head`` (absent when
  ``tie_word_embeddings``); Q/K/V carry biases, O and the MLP do not. ``gguf.TensorNameMap(MODEL_ARCH.QWEN2)`` maps all.
- RMSNorm (``rms_norm_eps``), SwiGLU MLP, rotary over the whole head in rotate-half layout: llama.cpp runs qwen2 with
  NEOX rope, so Q/K are written *unpermuted* (the LLaMA converter's permutation would be wrong here).
- ``rope_theta`` from the config (Qwen1.5: 1e6; transformers 5 keeps it under ``rope_parameters``).
- vocabulary: byte-level BPE tokenizer.json -> ``gpt2`` model with pre-tokenizer ``qwen2`` (llama.cpp's Qwen2
  regex), padded to the embedding rows (Qwen1.5: 151646 tokens, 151936 rows); no BOS (Qwen uses none).
"""

from __future__ import annotations

from typing import ClassVar

import gguf

from mvlm_convert.checkpoint import Checkpoint
from mvlm_convert.config_check import Dim, check_shape
from mvlm_convert.gguf_stream import PreparedGGUF
from mvlm_convert.lm.base import BpeVocab, LmArch, LmHparams, RopeScalingRefused


def check_rms_norms(ckpt: Checkpoint, hp: LmHparams) -> None:
    """The final RMSNorm and each layer's two (Qwen1.5 and Phi-3 name them alike)."""
    hid = Dim(hp.hidden_size, "hidden_size")
    check_shape(ckpt, "model.norm.weight", (hid,))
    for i in range(hp.n_layer):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            check_shape(ckpt, f"model.layers.{i}.{norm}.weight", (hid,))


def rms_required(hp: LmHparams, per_layer: tuple[str, ...]) -> list[str]:
    """Embeddings, final norm, output head unless tied, and each layer's ``per_layer`` tensors."""
    names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if hp.tied else ["lm_head.weight"])
    for i in range(hp.n_layer):
        names += [f"model.layers.{i}.{x}" for x in per_layer]
    return names


class Qwen2(RopeScalingRefused, BpeVocab, LmArch):
    arch: ClassVar[gguf.MODEL_ARCH] = gguf.MODEL_ARCH.QWEN2
    label = "Qwen1.5"
    layout = "Qwen2ForCausalLM layout"
    tokenizer_pre = "qwen2"
    context_default = 4096
    theta_default = 1e6
    rotary_default = 1.0

    def required(self, hp: LmHparams) -> list[str]:
        return rms_required(hp, ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
                                 *(f"self_attn.{x}_proj.{k}" for x in "qkv" for k in ("weight", "bias")),
                                 *(f"mlp.{x}_proj.weight" for x in ("gate", "up", "down"))))

    def check_layers(self, ckpt: Checkpoint, hp: LmHparams) -> None:
        check_rms_norms(ckpt, hp)
        hid, ffn, kv = Dim(hp.hidden_size, "hidden_size"), Dim(hp.ffn, "intermediate_size"), self.kv_rows(hp)
        for i in range(hp.n_layer):
            p = f"model.layers.{i}."
            for proj, out_dim in (("q_proj", hid), ("k_proj", kv), ("v_proj", kv)):
                check_shape(ckpt, f"{p}self_attn.{proj}.weight", (out_dim, hid))
                check_shape(ckpt, f"{p}self_attn.{proj}.bias", (out_dim,))
            check_shape(ckpt, p + "self_attn.o_proj.weight", (hid, hid))
            check_shape(ckpt, p + "mlp.gate_proj.weight", (ffn, hid))
            check_shape(ckpt, p + "mlp.up_proj.weight", (ffn, hid))
            check_shape(ckpt, p + "mlp.down_proj.weight", (hid, ffn))

    def metadata(self, hp: LmHparams) -> dict[str, object]:
        return {"rope_theta": hp.rope_theta}


QWEN2 = Qwen2()


def prepare_qwen2_gguf(ckpt: Checkpoint, outtype: str, name: str) -> PreparedGGUF:
    return QWEN2.prepare(ckpt, outtype, name)
