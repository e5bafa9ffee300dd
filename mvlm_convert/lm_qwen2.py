"""Language-model GGUF (arch ``qwen2``) for Imp-v1.5-2B (Qwen1.5-1.8B LM), streamed tensor by tensor.

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf

from mvlm_convert.checkpoint import Checkpoint
from mvlm_convert.errors import MvlmError
from mvlm_convert.gguf_stream import QT, PreparedGGUF, TensorPlan, add_lm_keys, matrix_type

NON_LM_PREFIXES = ("model.vision_tower.", "model.mm_projector.")
TOKENIZER_PRE = "qwen2"


@dataclass(frozen=True)
class RmsLmHparams:
    """Hyper-parameters shared by the RMSNorm / SwiGLU LMs of Imp-v1.5 (Qwen1.5 and Phi-3)."""

    hidden_size: int
    n_layer: int
    n_head: int
    n_head_kv: int
    ffn: int
    vocab_size: int
    rms_eps: float
    rope_theta: float
    rot_dims: int
    context_length: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head


def rms_lm_hparams(config: dict[str, Any], what: str, default_theta: float) -> RmsLmHparams:
    """Read the HF keys; a rope scaling llama.cpp would need extra metadata for is refused in one line."""

    def need(key: str) -> Any:
        if config.get(key) is None:
            raise MvlmError(f"config.json has no {key!r}; cannot describe the {what} language model")
        return config[key]

    hidden, n_head = int(need("hidden_size")), int(need("num_attention_heads"))
    n_kv = int(config.get("num_key_value_heads") or n_head)
    if hidden % n_head or n_head % n_kv:
        raise MvlmError(f"config.json: hidden_size {hidden}, {n_head} heads, {n_kv} KV heads do not divide evenly")
    rope = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    scaling = config.get("rope_scaling") or ({} if rope.get("rope_type", "default") == "default" else rope)
    if scaling:
        raise MvlmError(f"{what}: rope scaling {scaling!r} is not supported by mvlm convert (use a checkpoint without "
                        "rope_scaling, e.g. the 4k-context one)")
    factor = float(config.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)))
    return RmsLmHparams(
        hidden_size=hidden,
        n_layer=int(need("num_hidden_layers")),
        n_head=n_head,
        n_head_kv=n_kv,
        ffn=int(need("intermediate_size")),
        vocab_size=int(need("vocab_size")),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(config.get("rope_theta", rope.get("rope_theta", default_theta))),
        rot_dims=int(factor * hidden) // n_head,
        context_length=int(config.get("max_position_embeddings", 4096)),
        tied=bool(config.get("tie_word_embeddings", False)),
    )


def plan_lm_tensors(ckpt: Checkpoint, arch: gguf.MODEL_ARCH, hp: RmsLmHparams, outtype: str,
                    what: str) -> list[TensorPlan]:
    """Every LM tensor mapped by gguf's TensorNameMap for ``arch``, written as stored (no permutation)."""
    name_map = gguf.get_tensor_name_map(arch, hp.n_layer)
    plans: list[TensorPlan] = []
    for hf in ckpt.names():
        if hf.startswith(NON_LM_PREFIXES) or hf.endswith(".rotary_emb.inv_freq"):
            continue
        gname = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise MvlmError(f"{ckpt.root}: unexpected language-model tensor {hf}; not a {what} layout?")
        shape = ckpt.shape(hf)
        qtype = QT.F32 if len(shape) == 1 or outtype == "f32" else matrix_type(outtype, shape)
        produce: Callable[[], Any] = lambda h=hf: ckpt.get(h)  # noqa: E731
        plans.append(TensorPlan(gname, shape, qtype, produce, source=hf))
    return plans


def check_embeddings(ckpt: Checkpoint, hp: RmsLmHparams) -> int:
    rows = ckpt.shape("model.embed_tokens.weight")[0]
    if rows != hp.vocab_size or (not hp.tied and ckpt.shape("lm_head.weight")[0] != rows):
        raise MvlmError(f"model.embed_tokens / lm_head rows ({rows}) do not match config vocab_size {hp.vocab_size}")
    return rows


def add_common_keys(w: gguf.GGUFWriter, hp: RmsLmHparams, name: str, outtype: str) -> None:
    add_lm_keys(w, name, outtype, context_length=hp.context_length, hidden_size=hp.hidden_size, ffn=hp.ffn,
                n_layer=hp.n_layer, n_head=hp.n_head, n_head_kv=hp.n_head_kv, rope_dims=hp.rot_dims,
                rope_theta=hp.rope_theta, vocab_size=hp.vocab_size, rms_eps=hp.rms_eps)

def qwen2_required(hp: RmsLmHparams) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if hp.tied else ["lm_head.weight"])
    for i in range(hp.n_layer):
        p = f"model.layers.{i}."
        names += [f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight", f"{p}self_attn.o_proj.weight"]
        names += [f"{p}self_attn.{x}_proj.{k}" for x in "qkv" for k in ("weight", "bias")]
        names += [f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    return names


def prepare_qwen2_gguf(ckpt: Checkpoint, outtype: str, name: str) -> PreparedGGUF:
    """Validate the Qwen1.5 part of the checkpoint and plan every tensor (metadata and tokenizer only)."""
    from mvlm_convert.lm_phi2 import add_bpe_vocab

    hp = rms_lm_hparams(ckpt.config, "Qwen1.5", 1e6)
    ckpt.require(qwen2_required(hp), "Qwen1.5 (Qwen2ForCausalLM) language-model tensors")
    rows = check_embeddings(ckpt, hp)
    for i in range(hp.n_layer):
        k = ckpt.shape(f"model.layers.{i}.self_attn.k_proj.weight")
        if k != (hp.n_head_kv * hp.head_dim, hp.hidden_size):
            raise MvlmError(f"layer {i}: k_proj shape {k} does not match {hp.n_head_kv} KV heads of {hp.head_dim}")
    plans = plan_lm_tensors(ckpt, gguf.MODEL_ARCH.QWEN2, hp, outtype, "Qwen2ForCausalLM")
    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
    add_common_keys(w, hp, name, outtype)
    vocab_meta = add_bpe_vocab(w, ckpt.root, rows, ckpt.config, pre=TOKENIZER_PRE)
    metadata = {"arch": "qwen2", "n_layer": hp.n_layer, "n_head": hp.n_head, "n_head_kv": hp.n_head_kv,
                "hidden_size": hp.hidden_size, "head_dim": hp.head_dim, "rope_theta": hp.rope_theta, **vocab_meta}
    return PreparedGGUF(w, plans, "language model", metadata, release=lambda p: ckpt.release(p.source))
