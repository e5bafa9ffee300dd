"""Language-model GGUF (arch ``phi3``) for Imp-v1.5-4B (Phi-3-mini LM), streamed tensor by tensor.

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

import gguf

from mvlm_convert.checkpoint import Checkpoint
from mvlm_convert.config_check import FIX, Dim, Fields, check_layer_count, check_shape
from mvlm_convert.gguf_stream import PreparedGGUF
from mvlm_convert.lm_gguf import add_vocab
from mvlm_convert.lm_qwen2 import RmsLmHparams, add_common_keys, check_embeddings, plan_lm_tensors, rms_lm_hparams
from mvlm_core.errors import MvlmError


def phi3_required(hp: RmsLmHparams) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if hp.tied else ["lm_head.weight"])
    for i in range(hp.n_layer):
        p = f"model.layers.{i}."
        names += [f"{p}{x}.weight" for x in ("input_layernorm", "post_attention_layernorm", "self_attn.qkv_proj",
                                              "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    return names


def prepare_phi3_gguf(ckpt: Checkpoint, outtype: str, name: str) -> PreparedGGUF:
    """Validate the Phi-3 part of the checkpoint and plan every tensor (metadata and tokenizer only)."""
    hp = rms_lm_hparams(ckpt.config, "Phi-3", 10000.0, ckpt)
    check_layer_count(ckpt, hp.n_layer, r"model\.layers\.(\d+)\.")
    ckpt.require(phi3_required(hp), "Phi-3 (Phi3ForCausalLM) language-model tensors")
    rows = check_embeddings(ckpt, hp)
    hid, ffn = Dim(hp.hidden_size, "hidden_size"), Dim(hp.ffn, "intermediate_size")
    for i in range(hp.n_layer):
        qkv = ckpt.shape(f"model.layers.{i}.self_attn.qkv_proj.weight")
        want = ((hp.n_head + 2 * hp.n_head_kv) * hp.head_dim, hp.hidden_size)
        if qkv != want:
            kv_rows = qkv[0] - hp.hidden_size if len(qkv) == 2 else None
            implied = (kv_rows // (2 * hp.head_dim) if kv_rows is not None and kv_rows > 0 and kv_rows % (2 * hp.head_dim) == 0
                       else "no whole number")
            raise MvlmError(f"config.json: num_key_value_heads = {hp.n_head_kv} but the weights say {implied} (layer {i}: "
                            f"qkv_proj shape {list(qkv)} does not match {hp.n_head} heads + 2 x {hp.n_head_kv} KV heads of "
                            f"{hp.head_dim} = {list(want)}); {FIX}")
        check_shape(ckpt, f"model.layers.{i}.mlp.gate_up_proj.weight", (Dim(2 * hp.ffn, "intermediate_size", 2), hid))
        check_shape(ckpt, f"model.layers.{i}.mlp.down_proj.weight", (hid, ffn))
        check_shape(ckpt, f"model.layers.{i}.self_attn.o_proj.weight", (hid, hid))
    f = Fields(ckpt.config, "the Phi-3 language model")
    orig_ctx = f.int("original_max_position_embeddings", default=hp.context_length)
    sliding = f.int("sliding_window", default=0, minimum=0)
    plans = plan_lm_tensors(ckpt, gguf.MODEL_ARCH.PHI3, hp, outtype, "Phi3ForCausalLM")
    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.PHI3])
    add_common_keys(w, hp, name, outtype)
    w.add_rope_scaling_orig_ctx_len(orig_ctx)
    w.add_sliding_window(sliding)
    if not (ckpt.root / "tokenizer.model").is_file():
        raise MvlmError(f"{ckpt.root}: no tokenizer.model (SentencePiece); Phi-3 based checkpoints ship one")
    # the checkpoint's own chat template: Imp's Phi-3 conversation (<|user|> ... <|end|>) is not MobileVLM's
    vocab_meta = add_vocab(w, ckpt.root, rows, chat_template=None)
    metadata = {"arch": "phi3", "n_layer": hp.n_layer, "n_head": hp.n_head, "n_head_kv": hp.n_head_kv,
                "hidden_size": hp.hidden_size, "head_dim": hp.head_dim, "rope_dims": hp.rot_dims, **vocab_meta}
    return PreparedGGUF(w, plans, "language model", metadata, release=lambda p: ckpt.release(p.source))
