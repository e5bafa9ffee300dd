"""Language-model GGUF (arch ``phi2``) for Imp v1 (Phi-2 LM), streamed tensor by tensor; GPT-2 BPE vocabulary.

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

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from mvlm_convert.checkpoint import Checkpoint
from mvlm_convert.config_check import Dim, Fields, check_layer_count, check_shape, weight_hints
from mvlm_convert.gguf_stream import QT, PreparedGGUF, TensorPlan, add_lm_keys, matrix_type
from mvlm_convert.lm_gguf import NON_LM_PREFIXES
from mvlm_core.errors import MvlmError

ARCH = gguf.MODEL_ARCH.PHI2
TOKENIZER_PRE = "phi-2"


@dataclass(frozen=True)
class Phi2Hparams:
    hidden_size: int
    n_layer: int
    n_head: int
    ffn: int
    vocab_size: int
    eps: float
    rope_theta: float
    rot_dims: int
    context_length: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head


def phi2_hparams(config: dict[str, Any], reader: Any = None) -> Phi2Hparams:
    """Phi-2 hyper-parameters from the HF keys (PhiConfig names; the old ``n_embd``/``n_head`` names as fallback),
    typed and range-checked (``reader``: the checkpoint, to say what the weights imply)."""
    hints = weight_hints(reader, ffn=("model.layers.0.mlp.fc1.weight", 1))
    f = Fields(config, "the Phi-2 language model", weights=hints)
    hidden = f.int("hidden_size", "n_embd")
    n_head = f.int("num_attention_heads", "n_head")
    f.divides("hidden_size", hidden, "num_attention_heads", n_head)
    n_kv = f.int("num_key_value_heads", default=n_head)
    if n_kv != n_head:
        raise MvlmError(f"config.json: num_key_value_heads {n_kv} != {n_head}; Phi-2 has no grouped-query attention")
    rope = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    fr = Fields(rope, "the rotary embedding", source="config.json rope_parameters")
    factor = f.number("partial_rotary_factor", default=None, maximum=1.0)
    if factor is None:
        factor = fr.number("partial_rotary_factor", default=0.5, maximum=1.0)
    theta = f.number("rope_theta", default=None)
    if theta is None:
        theta = fr.number("rope_theta", default=10000.0)
    head_dim = hidden // n_head
    rot_dims = int(factor * head_dim)
    if rot_dims < 2 or rot_dims % 2:
        raise MvlmError(f"config.json: partial_rotary_factor = {factor:g} of {head_dim}-wide heads gives {rot_dims} rotary "
                        "dimensions; rotary embeddings need an even number >= 2: fix partial_rotary_factor")
    return Phi2Hparams(
        hidden_size=hidden,
        n_layer=f.int("num_hidden_layers", "n_layer"),
        n_head=n_head,
        ffn=f.int("intermediate_size", default=4 * hidden),
        vocab_size=f.int("vocab_size"),
        eps=f.number("layer_norm_eps", "layer_norm_epsilon", default=1e-5, maximum=1.0),
        rope_theta=theta,
        rot_dims=rot_dims,
        context_length=f.int("max_position_embeddings", "n_positions", default=2048),
    )


def phi2_required(hp: Phi2Hparams) -> list[str]:
    names = ["model.embed_tokens.weight", "model.final_layernorm.weight", "model.final_layernorm.bias",
             "lm_head.weight", "lm_head.bias"]
    for i in range(hp.n_layer):
        p = f"model.layers.{i}."
        for part in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense",
                     "mlp.fc1", "mlp.fc2"):  # fmt: skip
            names += [f"{p}{part}.weight", f"{p}{part}.bias"]
    return names


def _bpe_tokens(tok_dir: Path, n_rows: int) -> tuple[list[str], list[int]]:
    """Tokens by id from tokenizer.json (BPE vocab + added tokens), padded to ``n_rows``; added special = CONTROL."""
    path = tok_dir / "tokenizer.json"
    if not path.is_file():
        raise MvlmError(f"{tok_dir}: no tokenizer.json; Phi-2 / Qwen based checkpoints ship a byte-level BPE one")
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
        model = tj["model"]
        vocab: dict[str, int] = dict(model["vocab"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MvlmError(f"cannot read {path}: {e}") from e
    if model.get("type", "BPE") != "BPE":
        raise MvlmError(f"{path}: tokenizer model {model.get('type')!r}; this LM writer needs byte-level BPE")
    by_id: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in vocab.items()}
    for added in tj.get("added_tokens") or []:
        ttype = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[int(added["id"])] = (str(added["content"]), ttype)
    if not by_id:
        raise MvlmError(f"{path}: empty vocabulary")
    top = max(by_id)
    if top >= n_rows:
        raise MvlmError(f"tokenizer.json has token id {top} but the embedding has only {n_rows} rows")
    tokens, types = [], []
    for i in range(n_rows):
        text, ttype = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(int(ttype))
    return tokens, types


def add_bpe_vocab(writer: gguf.GGUFWriter, tok_dir: Path, n_rows: int, config: dict[str, Any],
                  pre: str = TOKENIZER_PRE) -> dict[str, object]:
    """GPT-2-style vocab (shared by the Phi-2 and Qwen2 writers); ``pre`` names llama.cpp's pre-tokenizer regex."""
    tokens, types = _bpe_tokens(tok_dir, n_rows)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.vocab.SpecialVocab(tok_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise MvlmError(f"{tok_dir / 'tokenizer.json'}: no BPE merges found")
    # config.json's ids win over tokenizer_config guesses (Phi-2: bos = eos = <|endoftext|>; Qwen1.5 the same).
    for key in ("bos", "eos", "pad"):
        val = config.get(f"{key}_token_id")
        if isinstance(val, int) and 0 <= val < len(tokens):
            special.special_token_ids[key] = val
    special.add_special_token["bos"] = False
    special.add_to_gguf(writer, quiet=True)
    return {"vocab_size": len(tokens), "n_merges": len(special.merges), "special_tokens": dict(special.special_token_ids)}


def prepare_phi2_gguf(ckpt: Checkpoint, outtype: str, name: str) -> PreparedGGUF:
    """Validate the Phi-2 part of the checkpoint and plan every tensor (metadata and tokenizer only)."""
    hp = phi2_hparams(ckpt.config, ckpt)
    check_layer_count(ckpt, hp.n_layer, r"model\.layers\.(\d+)\.")
    ckpt.require(phi2_required(hp), "Phi-2 language-model tensors")
    rows = hp.vocab_size
    hid, voc, ffn = Dim(hp.hidden_size, "hidden_size"), Dim(hp.vocab_size, "vocab_size"), Dim(hp.ffn, "intermediate_size")
    check_shape(ckpt, "model.embed_tokens.weight", (voc, hid))
    check_shape(ckpt, "lm_head.weight", (voc, hid))
    check_shape(ckpt, "lm_head.bias", (voc,))
    for part in ("weight", "bias"):
        check_shape(ckpt, f"model.final_layernorm.{part}", (hid,))
    for i in range(hp.n_layer):
        p = f"model.layers.{i}."
        for part in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense",
                     "mlp.fc1", "mlp.fc2"):  # fmt: skip
            out_dim = ffn if part == "mlp.fc1" else hid
            if part != "input_layernorm":
                check_shape(ckpt, f"{p}{part}.weight", (out_dim, ffn if part == "mlp.fc2" else hid))
            else:
                check_shape(ckpt, f"{p}{part}.weight", (hid,))
            check_shape(ckpt, f"{p}{part}.bias", (out_dim,))
    name_map = gguf.get_tensor_name_map(ARCH, hp.n_layer)
    plans: list[TensorPlan] = []
    for hf in ckpt.names():
        if hf.startswith(NON_LM_PREFIXES) or hf.endswith((".rotary_emb.inv_freq", ".masked_bias", ".attn.bias")):
            continue
        gname = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise MvlmError(f"{ckpt.root}: unexpected language-model tensor {hf}; not a Phi-2 (PhiForCausalLM) layout?")
        shape = ckpt.shape(hf)
        qtype = QT.F32 if len(shape) == 1 or outtype == "f32" else matrix_type(outtype, shape)
        plans.append(TensorPlan(gname, shape, qtype, (lambda h=hf: ckpt.get(h)), source=hf))

    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[ARCH])
    add_lm_keys(w, name, outtype, context_length=hp.context_length, hidden_size=hp.hidden_size, ffn=hp.ffn,
                n_layer=hp.n_layer, n_head=hp.n_head, n_head_kv=hp.n_head, rope_dims=hp.rot_dims,
                rope_theta=hp.rope_theta, vocab_size=hp.vocab_size, norm_eps=hp.eps)
    vocab_meta = add_bpe_vocab(w, ckpt.root, rows, ckpt.config)
    metadata = {"arch": "phi2", "n_layer": hp.n_layer, "n_head": hp.n_head, "n_head_kv": hp.n_head,
                "hidden_size": hp.hidden_size,
                "head_dim": hp.head_dim, "rope_dims": hp.rot_dims, **vocab_meta}
    return PreparedGGUF(w, plans, "language model", metadata, release=lambda p: ckpt.release(p.source))
