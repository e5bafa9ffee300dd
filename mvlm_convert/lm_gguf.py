"""Language-model GGUF (arch ``llama``) for MobileVLM / MobileLLaMA, streamed tensor by tensor.

Names come from ``gguf.TensorNameMap`` (MODEL_ARCH.LLAMA); vocabulary from ``gguf.vocab.SentencePieceVocab`` and
``gguf.vocab.SpecialVocab``. Q and K are permuted the way llama.cpp's own LLaMA converter does (HF stores rotary
halves, GGML's rope expects interleaved pairs), with ``num_key_value_heads`` for K.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import torch

from mvlm_convert.checkpoint import Checkpoint
from mvlm_convert.config_check import Dim, check_layer_count, check_shape
from mvlm_convert.families.mobilevlm import LmHparams, is_lm_tensor, lm_hparams, lm_required_tensors
from mvlm_convert.gguf_stream import QT, FileSummary, PreparedGGUF, Progress, TensorPlan, add_lm_keys, matrix_type
from mvlm_core.conversation import CHAT_TEMPLATE
from mvlm_core.errors import MvlmError

LAYER_PATTERN = r"model\.layers\.(\d+)\."


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
