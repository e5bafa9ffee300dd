"""Phi-3-mini (arch ``phi3``) for Imp-v1.5-4B: what differs from ``lm.base``.

Facts (transformers' Phi3ForCausalLM, which Imp's ``ImpPhi3ForCausalLM`` subclasses; the pinned llama.cpp
src/models/phi3.cpp and conversion/phi.py):
- names: ``model.layers.N.{input_layernorm, self_attn.qkv_proj, self_attn.o_proj, post_attention_layernorm,
  mlp.gate_up_proj, mlp.down_proj}``, ``model.embed_tokens``, ``model.norm``, ``lm_head``; no biases.
- the fused tensors go in as they are: ``qkv_proj`` [(H + 2*KV)*d, D] -> ``attn_qkv`` (llama.cpp splits Q, K, V by
  rows in that order) and ``gate_up_proj`` [2F, D] -> ``ffn_up`` of 2F rows, which llama.cpp's SwiGLU splits as
  silu(first half) * second half -- HF's ``gate, up = chunk(2)``; ``feed_forward_length`` is F.
- RMSNorm, NEOX rope (rotate-half) so no Q/K permutation; rope dims = int(partial_rotary_factor * D) / heads;
  ``rope.scaling.original_context_length`` and ``attention.sliding_window`` written as llama.cpp's converter does
  (it disables Phi's sliding window anyway; verify prompts are far shorter). LongRoPE (128k) checkpoints are refused.
- vocabulary: Phi-3's SentencePiece tokenizer.model (+ added_tokens.json: ``<|endoftext|>``, ``<|user|>`` ...)
  -> ``llama`` model, padded to ``vocab_size`` (32064); chat template from tokenizer_config.json as shipped.
"""

from __future__ import annotations

from typing import ClassVar

import gguf

from mvlm_convert.checkpoint import Checkpoint
from mvlm_convert.config_check import FIX, Dim, Fields, check_shape
from mvlm_convert.gguf_stream import PreparedGGUF
from mvlm_convert.lm.base import LmArch, LmHparams, RopeScalingRefused, add_sentencepiece_vocab, sentencepiece_dir
from mvlm_convert.lm.qwen2 import check_rms_norms, rms_required
from mvlm_core.errors import MvlmError


class Phi3(RopeScalingRefused, LmArch):
    arch: ClassVar[gguf.MODEL_ARCH] = gguf.MODEL_ARCH.PHI3
    label = "Phi-3"
    layout = "Phi3ForCausalLM layout"
    ffn_hint = ("model.layers.0.mlp.gate_up_proj.weight", 2)
    context_default = 4096
    rotary_default = 1.0

    def required(self, hp: LmHparams) -> list[str]:
        return rms_required(hp, tuple(f"{x}.weight" for x in ("input_layernorm", "post_attention_layernorm",
                                                              "self_attn.qkv_proj", "self_attn.o_proj",
                                                              "mlp.gate_up_proj", "mlp.down_proj")))

    def check_layers(self, ckpt: Checkpoint, hp: LmHparams) -> None:
        check_rms_norms(ckpt, hp)
        hid, ffn = Dim(hp.hidden_size, "hidden_size"), Dim(hp.ffn, "intermediate_size")
        for i in range(hp.n_layer):
            qkv = ckpt.shape(f"model.layers.{i}.self_attn.qkv_proj.weight")
            want = ((hp.n_head + 2 * hp.n_head_kv) * hp.head_dim, hp.hidden_size)
            if qkv != want:
                kv_rows = qkv[0] - hp.hidden_size if len(qkv) == 2 else None
                implied = (kv_rows // (2 * hp.head_dim)
                           if kv_rows is not None and kv_rows > 0 and kv_rows % (2 * hp.head_dim) == 0
                           else "no whole number")
                raise MvlmError(f"config.json: num_key_value_heads = {hp.n_head_kv} but the weights say {implied} "
                                f"(layer {i}: qkv_proj shape {list(qkv)} does not match {hp.n_head} heads + 2 x "
                                f"{hp.n_head_kv} KV heads of {hp.head_dim} = {list(want)}); {FIX}")
            check_shape(ckpt, f"model.layers.{i}.mlp.gate_up_proj.weight", (Dim(2 * hp.ffn, "intermediate_size", 2), hid))
            check_shape(ckpt, f"model.layers.{i}.mlp.down_proj.weight", (hid, ffn))
            check_shape(ckpt, f"model.layers.{i}.self_attn.o_proj.weight", (hid, hid))

    def add_keys(self, w: gguf.GGUFWriter, ckpt: Checkpoint, hp: LmHparams) -> None:
        f = Fields(ckpt.config, "the Phi-3 language model")
        w.add_rope_scaling_orig_ctx_len(f.int("original_max_position_embeddings", default=hp.context_length))
        w.add_sliding_window(f.int("sliding_window", default=0, minimum=0))

    def add_vocab(self, w: gguf.GGUFWriter, ckpt: Checkpoint, hp: LmHparams) -> dict[str, object]:
        # the checkpoint's own chat template: Imp's Phi-3 conversation (<|user|> ... <|end|>) is not MobileVLM's
        return add_sentencepiece_vocab(w, sentencepiece_dir(ckpt, "Phi-3 based checkpoints"), hp.vocab_size,
                                       chat_template=None)

    def metadata(self, hp: LmHparams) -> dict[str, object]:
        return {"rope_dims": hp.rot_dims}


PHI3 = Phi3()


def prepare_phi3_gguf(ckpt: Checkpoint, outtype: str, name: str) -> PreparedGGUF:
    return PHI3.prepare(ckpt, outtype, name)
