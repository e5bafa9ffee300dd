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
from mvlm_convert.config_check import Dim, Fields, check_layer_count, check_shape, weight_hints
from mvlm_convert.gguf_stream import QT, PreparedGGUF, TensorPlan, add_lm_keys, matrix_type
from mvlm_convert.lm_gguf import NON_LM_PREFIXES
from mvlm_core.errors import MvlmError

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


def rms_lm_hparams(config: dict[str, Any], what: str, default_theta: float, reader: Any = None,
                   ffn_tensor: tuple[str, int] = ("model.layers.0.mlp.down_proj.weight", 0)) -> RmsLmHparams:
    """Read the HF keys, typed and range-checked; a rope scaling llama.cpp would need extra metadata for is refused in
    one line. ``reader``: the checkpoint, to say what the weights imply in messages."""
    hints = weight_hints(reader)
    name, axis = ffn_tensor
    if reader is not None and name in reader and len(reader.shape(name)) == 2:
        hints["intermediate_size"] = (reader.shape(name)[1 - axis], f"{name} is {list(reader.shape(name))}")
    f = Fields(config, f"the {what} language model", weights=hints)
    hidden, n_head = f.int("hidden_size"), f.int("num_attention_heads")
    f.divides("hidden_size", hidden, "num_attention_heads", n_head)
    n_kv = f.int("num_key_value_heads", default=n_head)
    if n_head % n_kv:
        raise MvlmError(f"config.json: num_attention_heads = {n_head} is not a multiple of num_key_value_heads = {n_kv}; "
                        f"fix config.json ({what})")
    explicit_hd = f.int("head_dim", default=None)
    if explicit_hd is not None and explicit_hd != hidden // n_head:
        raise MvlmError(f"config.json: head_dim = {explicit_hd} differs from hidden_size / num_attention_heads = "
                        f"{hidden // n_head}; mvlm convert needs them equal for {what}: fix config.json")
    rope = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    scaling = config.get("rope_scaling") or ({} if rope.get("rope_type", "default") == "default" else rope)
    if scaling:
        raise MvlmError(f"{what}: rope scaling {scaling!r} is not supported by mvlm convert (use a checkpoint without "
                        "rope_scaling, e.g. the 4k-context one)")
    fr = Fields(rope, "the rotary embedding", source="config.json rope_parameters")
    factor = f.number("partial_rotary_factor", default=None, maximum=1.0)
    if factor is None:
        factor = fr.number("partial_rotary_factor", default=1.0, maximum=1.0)
    theta = f.number("rope_theta", default=None)
    if theta is None:
        theta = fr.number("rope_theta", default=default_theta)
    rot_dims = int(factor * hidden) // n_head
    if rot_dims < 2 or rot_dims % 2:
        raise MvlmError(f"config.json: partial_rotary_factor = {factor:g} gives {rot_dims} rotary dimensions per head; "
                        "rotary embeddings need an even number >= 2: fix partial_rotary_factor")
    return RmsLmHparams(
        hidden_size=hidden,
        n_layer=f.int("num_hidden_layers"),
        n_head=n_head,
        n_head_kv=n_kv,
        ffn=f.int("intermediate_size"),
        vocab_size=f.int("vocab_size"),
        rms_eps=f.number("rms_norm_eps", default=1e-6, maximum=1.0),
        rope_theta=theta,
        rot_dims=rot_dims,
        context_length=f.int("max_position_embeddings", default=4096),
        tied=f.flag("tie_word_embeddings", False),
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
    """Layer count, embeddings, output head and norms against the config; returns the embedding rows."""
    check_layer_count(ckpt, hp.n_layer, r"model\.layers\.(\d+)\.")
    hid, voc = Dim(hp.hidden_size, "hidden_size"), Dim(hp.vocab_size, "vocab_size")
    check_shape(ckpt, "model.embed_tokens.weight", (voc, hid))
    if not hp.tied:
        check_shape(ckpt, "lm_head.weight", (voc, hid))
    check_shape(ckpt, "model.norm.weight", (hid,))
    for i in range(hp.n_layer):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            check_shape(ckpt, f"model.layers.{i}.{norm}.weight", (hid,))
    return hp.vocab_size


def kv_dim(hp: RmsLmHparams) -> Dim:
    return Dim(hp.n_head_kv * hp.head_dim, "num_key_value_heads", hp.head_dim,
               f"{hp.head_dim}-wide heads (hidden_size / num_attention_heads)")


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

    hp = rms_lm_hparams(ckpt.config, "Qwen1.5", 1e6, ckpt)
    check_layer_count(ckpt, hp.n_layer, r"model\.layers\.(\d+)\.")
    ckpt.require(qwen2_required(hp), "Qwen1.5 (Qwen2ForCausalLM) language-model tensors")
    rows = check_embeddings(ckpt, hp)
    hid, ffn, kv = Dim(hp.hidden_size, "hidden_size"), Dim(hp.ffn, "intermediate_size"), kv_dim(hp)
    for i in range(hp.n_layer):
        p = f"model.layers.{i}."
        for proj, out_dim in (("q_proj", hid), ("k_proj", kv), ("v_proj", kv)):
            check_shape(ckpt, f"{p}self_attn.{proj}.weight", (out_dim, hid))
            check_shape(ckpt, f"{p}self_attn.{proj}.bias", (out_dim,))
        check_shape(ckpt, p + "self_attn.o_proj.weight", (hid, hid))
        check_shape(ckpt, p + "mlp.gate_proj.weight", (ffn, hid))
        check_shape(ckpt, p + "mlp.up_proj.weight", (ffn, hid))
        check_shape(ckpt, p + "mlp.down_proj.weight", (hid, ffn))
    plans = plan_lm_tensors(ckpt, gguf.MODEL_ARCH.QWEN2, hp, outtype, "Qwen2ForCausalLM")
    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
    add_common_keys(w, hp, name, outtype)
    vocab_meta = add_bpe_vocab(w, ckpt.root, rows, ckpt.config, pre=TOKENIZER_PRE)
    metadata = {"arch": "qwen2", "n_layer": hp.n_layer, "n_head": hp.n_head, "n_head_kv": hp.n_head_kv,
                "hidden_size": hp.hidden_size, "head_dim": hp.head_dim, "rope_theta": hp.rope_theta, **vocab_meta}
    return PreparedGGUF(w, plans, "language model", metadata, release=lambda p: ckpt.release(p.source))
