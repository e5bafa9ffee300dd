"""Phi-2 (arch ``phi2``) for Imp v1: what differs from ``lm.base``.

Facts (transformers' PhiForCausalLM, checked against the pinned llama.cpp src/models/phi2.cpp and gguf-py):
- names: ``model.embed_tokens``, ``model.layers.N.{input_layernorm, self_attn.{q,k,v}_proj, self_attn.dense,
  mlp.fc1, mlp.fc2}``, ``model.final_layernorm``, ``lm_head`` (weight *and* bias); every Linear and LayerNorm has a
  bias. ``gguf.TensorNameMap(MODEL_ARCH.PHI2)`` maps them all; llama.cpp takes separate Q/K/V with biases.
- block: one LayerNorm feeds attention and MLP in parallel (x + attn(ln(x)) + mlp(ln(x))); MLP act ``gelu_new``
  (tanh GELU, what ggml's GELU computes); rotary on the first ``partial_rotary_factor * head_dim`` dims of each
  head, rotate-half layout (llama.cpp's NEOX rope for phi2), so Q/K are written unpermuted and
  ``rope.dimension_count`` = int(factor * head_dim) (HF: ``int(head_dim * partial_rotary_factor)``).
- vocabulary: tokenizer.json (byte-level BPE) -> ``tokenizer.ggml.model = gpt2``, ``pre = phi-2`` (llama.cpp maps
  it to the GPT-2 pre-tokenizer regex), tokens padded with ``[PADn]`` to the embedding rows (Phi-2: 50295 tokens,
  51200 rows), merges via gguf.SpecialVocab; no BOS is added (Phi-2 does not use one).
"""

from __future__ import annotations

from typing import ClassVar

import gguf

from mvlm_convert.checkpoint import Checkpoint
from mvlm_convert.config_check import Dim, Fields, check_shape
from mvlm_convert.gguf_stream import PreparedGGUF
from mvlm_convert.lm.base import BpeVocab, LmArch, LmHparams
from mvlm_core.errors import MvlmError

PARTS = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1",
         "mlp.fc2")


class Phi2(BpeVocab, LmArch):
    arch: ClassVar[gguf.MODEL_ARCH] = gguf.MODEL_ARCH.PHI2
    label = "Phi-2"
    layout = "Phi-2 (PhiForCausalLM) layout"
    tokenizer_pre = "phi-2"
    skip_suffixes = (".rotary_emb.inv_freq", ".masked_bias", ".attn.bias")
    # PhiConfig names; the old ``n_embd`` / ``n_head`` names as fallback
    keys = {"hidden_size": ("hidden_size", "n_embd"), "num_attention_heads": ("num_attention_heads", "n_head"),
            "num_hidden_layers": ("num_hidden_layers", "n_layer"),
            "max_position_embeddings": ("max_position_embeddings", "n_positions")}
    ffn_hint = ("model.layers.0.mlp.fc1.weight", 1)
    eps_keys = ("layer_norm_eps", "layer_norm_epsilon")
    eps_default = 1e-5
    rms = False
    rotary_default = 0.5
    ties = False

    def ffn_default(self, hidden: int) -> int:
        return 4 * hidden

    def rotary_dims(self, factor: float, hidden: int, n_head: int) -> int:
        return int(factor * (hidden // n_head))

    def check_heads(self, f: Fields, hidden: int, n_head: int, n_kv: int) -> None:
        if n_kv != n_head:
            raise MvlmError(f"config.json: num_key_value_heads {n_kv} != {n_head}; Phi-2 has no grouped-query attention")

    def required(self, hp: LmHparams) -> list[str]:
        names = ["model.embed_tokens.weight", "model.final_layernorm.weight", "model.final_layernorm.bias",
                 "lm_head.weight", "lm_head.bias"]
        for i in range(hp.n_layer):
            names += [f"model.layers.{i}.{part}.{k}" for part in PARTS for k in ("weight", "bias")]
        return names

    def check_layers(self, ckpt: Checkpoint, hp: LmHparams) -> None:
        hid, voc, ffn = Dim(hp.hidden_size, "hidden_size"), Dim(hp.vocab_size, "vocab_size"), Dim(hp.ffn, "intermediate_size")
        check_shape(ckpt, "lm_head.bias", (voc,))
        for part in ("weight", "bias"):
            check_shape(ckpt, f"model.final_layernorm.{part}", (hid,))
        for i in range(hp.n_layer):
            p = f"model.layers.{i}."
            for part in PARTS:
                out_dim = ffn if part == "mlp.fc1" else hid
                if part != "input_layernorm":
                    check_shape(ckpt, f"{p}{part}.weight", (out_dim, ffn if part == "mlp.fc2" else hid))
                else:
                    check_shape(ckpt, f"{p}{part}.weight", (hid,))
                check_shape(ckpt, f"{p}{part}.bias", (out_dim,))

    def metadata(self, hp: LmHparams) -> dict[str, object]:
        return {"rope_dims": hp.rot_dims}


PHI2 = Phi2()


def prepare_phi2_gguf(ckpt: Checkpoint, outtype: str, name: str) -> PreparedGGUF:
    return PHI2.prepare(ckpt, outtype, name)
