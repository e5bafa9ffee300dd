"""Language-model GGUF (arch ``llama``) for MobileVLM / MobileLLaMA, streamed tensor by tensor.

Names come from ``gguf.TensorNameMap`` (MODEL_ARCH.LLAMA); vocabulary from ``gguf.vocab.SentencePieceVocab`` and
``gguf.vocab.SpecialVocab``. Q and K are permuted the way llama.cpp's own LLaMA converter does (HF stores rotary
halves, GGML's rope expects interleaved pairs), with ``num_key_value_heads`` for K.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch

from mvlm_convert.checkpoint import Checkpoint
from mvlm_convert.config_check import Dim, Fields, check_layer_count, check_shape, weight_hints
from mvlm_convert.gguf_stream import QT, FileSummary, PreparedGGUF, Progress, TensorPlan, add_lm_keys, matrix_type
from mvlm_core.conversation import CHAT_TEMPLATE
from mvlm_core.errors import MvlmError

LAYER_PATTERN = r"model\.layers\.(\d+)\."
# tensors of a VLM checkpoint that are not the language model's (every LM writer skips them)
NON_LM_PREFIXES = ("model.vision_tower.", "model.mm_projector.")


def is_lm_tensor(name: str) -> bool:
    return not name.startswith(NON_LM_PREFIXES)


@dataclass(frozen=True)
class LmHparams:
    """LLaMA hyper-parameters read from the HF keys only (never the lit-gpt ``n_head``/``n_embd`` leftovers)."""

    hidden_size: int
    n_layer: int
    n_head: int
    n_head_kv: int
    ffn: int
    vocab_size: int
    rms_eps: float
    rope_theta: float
    context_length: int
    tie_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head


def lm_hparams(config: dict[str, Any], reader: Any = None) -> LmHparams:
    """Typed, range-checked LLaMA hyper-parameters (``reader``: the checkpoint, to say what the weights imply)."""
    hints = weight_hints(reader, ffn=("model.layers.0.mlp.gate_proj.weight", 1))
    f = Fields(config, "the LLaMA language model", weights=hints)
    hidden = f.int("hidden_size")
    n_head = f.int("num_attention_heads")
    f.divides("hidden_size", hidden, "num_attention_heads", n_head)
    n_kv = f.int("num_key_value_heads", default=n_head)
    if n_head % n_kv:
        raise MvlmError(f"config.json: num_attention_heads = {n_head} is not a multiple of num_key_value_heads = {n_kv}; "
                        "fix config.json (the LLaMA language model)")
    head_dim = hidden // n_head
    if head_dim % 2:
        raise MvlmError(f"config.json: hidden_size {hidden} / num_attention_heads {n_head} gives {head_dim}-wide heads; "
                        "rotary embeddings need an even head size: fix num_attention_heads")
    explicit_hd = f.int("head_dim", default=None)
    if explicit_hd is not None and explicit_hd != head_dim:
        raise MvlmError(f"config.json: head_dim = {explicit_hd} differs from hidden_size / num_attention_heads = {head_dim}; "
                        "llama.cpp's llama architecture needs them equal: fix config.json")
    rope = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    rope_theta = f.number("rope_theta", default=None)
    if rope_theta is None:
        rope_theta = Fields(rope, "the rotary embedding", source="config.json rope_parameters").number(
            "rope_theta", default=10000.0)
    return LmHparams(
        hidden_size=hidden,
        n_layer=f.int("num_hidden_layers"),
        n_head=n_head,
        n_head_kv=n_kv,
        ffn=f.int("intermediate_size"),
        vocab_size=f.int("vocab_size"),
        rms_eps=f.number("rms_norm_eps", default=1e-6, maximum=1.0),
        rope_theta=rope_theta,
        context_length=f.int("max_position_embeddings", default=2048),
        tie_embeddings=f.flag("tie_word_embeddings", False),
    )


def lm_required_tensors(hp: LmHparams) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not hp.tie_embeddings:
        names.append("lm_head.weight")
    for i in range(hp.n_layer):
        p = f"model.layers.{i}."
        names += [
            p + "input_layernorm.weight",
            p + "post_attention_layernorm.weight",
            p + "self_attn.q_proj.weight",
            p + "self_attn.k_proj.weight",
            p + "self_attn.v_proj.weight",
            p + "self_attn.o_proj.weight",
            p + "mlp.gate_proj.weight",
            p + "mlp.up_proj.weight",
            p + "mlp.down_proj.weight",
        ]
    return names


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotary layout (two halves per head) -> GGML layout (interleaved pairs); same as llama.cpp's converter."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_dir(ckpt: Checkpoint) -> Path:
    if not (ckpt.root / "tokenizer.model").is_file():
        raise MvlmError(f"{ckpt.root}: no tokenizer.model (SentencePiece); MobileVLM/MobileLLaMA ship one with the weights")
    return ckpt.root


def add_vocab(
    writer: gguf.GGUFWriter, tok_dir: Path, n_rows: int, chat_template: str | None = CHAT_TEMPLATE
) -> dict[str, object]:
    """SentencePiece vocab padded to the embedding rows (as llama.cpp does), special ids, and a chat template.

    ``chat_template``: MobileVLM's conv "v1" by default; None keeps the checkpoint's own (tokenizer_config.json).
    """
    try:
        vocab = gguf.vocab.SentencePieceVocab(tok_dir)
    except Exception as e:  # noqa: BLE001 - sentencepiece raises plain RuntimeError/OSError on bad files
        raise MvlmError(f"cannot read {tok_dir / 'tokenizer.model'}: {e}") from e
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    if len(tokens) > n_rows:
        raise MvlmError(f"tokenizer has {len(tokens)} tokens but the model has only {n_rows} embedding rows (vocab_size)")
    for i in range(len(tokens), n_rows):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.vocab.SpecialVocab(tok_dir, load_merges=False, n_vocab=len(tokens))
    if chat_template is not None:
        special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)
    return {"vocab_size": len(tokens), "special_tokens": dict(special.special_token_ids)}


def write_lm_gguf(ckpt: Checkpoint, out_path: Path, outtype: str, name: str, progress: Progress | None = None) -> FileSummary:
    return prepare_lm_gguf(ckpt, outtype, name).write(out_path, progress)


def prepare_lm_gguf(ckpt: Checkpoint, outtype: str, name: str) -> PreparedGGUF:
    """Validate the LM part of the checkpoint and plan every tensor (reads metadata and the tokenizer only)."""
    hp = lm_hparams(ckpt.config, ckpt)
    check_lm_shapes(ckpt, hp)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp.n_layer)
    plans: list[TensorPlan] = []
    for hf in ckpt.names():
        if not is_lm_tensor(hf) or hf.endswith(".rotary_emb.inv_freq"):
            continue
        gname = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise MvlmError(f"{ckpt.root}: unexpected language-model tensor {hf}; not a plain LLaMA checkpoint?")
        shape = ckpt.shape(hf)
        qtype = QT.F32 if len(shape) == 1 or outtype == "f32" else matrix_type(outtype, shape)
        produce = _producer(ckpt, hf, hp)
        plans.append(TensorPlan(gname, shape, qtype, produce, source=hf))

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    add_lm_keys(writer, name, outtype, context_length=hp.context_length, hidden_size=hp.hidden_size, ffn=hp.ffn,
                n_layer=hp.n_layer, n_head=hp.n_head, n_head_kv=hp.n_head_kv, rope_dims=hp.head_dim,
                rope_theta=hp.rope_theta, vocab_size=hp.vocab_size, rms_eps=hp.rms_eps)
    vocab_meta = add_vocab(writer, _tokenizer_dir(ckpt), hp.vocab_size)

    metadata = {
        "arch": "llama",
        "n_layer": hp.n_layer,
        "n_head": hp.n_head,
        "n_head_kv": hp.n_head_kv,
        "hidden_size": hp.hidden_size,
        "head_dim": hp.head_dim,
        **vocab_meta,
    }
    return PreparedGGUF(writer, plans, "language model", metadata, release=lambda p: ckpt.release(p.source))


def check_lm_shapes(ckpt: Checkpoint, hp: LmHparams) -> None:
    """Every LLaMA tensor's shape against the config (hidden, vocab, layers, heads / KV heads, intermediate size)."""
    check_layer_count(ckpt, hp.n_layer, LAYER_PATTERN)
    ckpt.require(lm_required_tensors(hp), "language-model tensors")
    hd = hp.head_dim
    hid = Dim(hp.hidden_size, "hidden_size")
    voc = Dim(hp.vocab_size, "vocab_size")
    ffn = Dim(hp.ffn, "intermediate_size")
    q_rows = Dim(hp.n_head * hd, "num_attention_heads", hd, f"{hd}-wide heads")
    kv_rows = Dim(hp.n_head_kv * hd, "num_key_value_heads", hd, f"{hd}-wide heads (hidden_size / num_attention_heads)")
    check_shape(ckpt, "model.embed_tokens.weight", (voc, hid))
    if not hp.tie_embeddings:
        check_shape(ckpt, "lm_head.weight", (voc, hid))
    check_shape(ckpt, "model.norm.weight", (hid,))
    for i in range(hp.n_layer):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            check_shape(ckpt, f"{p}{norm}.weight", (hid,))
        check_shape(ckpt, p + "self_attn.q_proj.weight", (q_rows, hid))
        check_shape(ckpt, p + "self_attn.k_proj.weight", (kv_rows, hid))
        check_shape(ckpt, p + "self_attn.v_proj.weight", (kv_rows, hid))
        check_shape(ckpt, p + "self_attn.o_proj.weight", (hid, Dim(hp.n_head * hd, "hidden_size")))
        check_shape(ckpt, p + "mlp.gate_proj.weight", (ffn, hid))
        check_shape(ckpt, p + "mlp.up_proj.weight", (ffn, hid))
        check_shape(ckpt, p + "mlp.down_proj.weight", (hid, ffn))


def _producer(ckpt: Checkpoint, hf: str, hp: LmHparams) -> Callable[[], torch.Tensor]:
    if hf.endswith("self_attn.q_proj.weight"):
        return lambda: permute_qk(ckpt.get(hf), hp.n_head)
    if hf.endswith("self_attn.k_proj.weight"):
        return lambda: permute_qk(ckpt.get(hf), hp.n_head_kv)
    return lambda: ckpt.get(hf)
