"""What every language-model writer shares: the hyper-parameters, the tensor-planning loop and the vocab writers.

An architecture (``llama``, ``phi2``, ``qwen2``, ``phi3``) is an ``LmArch`` subclass that only says what differs:
its gguf ``MODEL_ARCH`` (names come from ``gguf.TensorNameMap`` of it), which config keys and defaults it reads,
its required tensors and their shapes, how a tensor is produced (LLaMA permutes Q/K), extra GGUF keys and its
vocabulary (SentencePiece ``tokenizer.model`` or GPT-2 byte-level BPE ``tokenizer.json``). ``LmArch.prepare``
is the one flow: hyper-parameters -> shape checks -> one ``TensorPlan`` per LM tensor -> keys -> vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import gguf
import torch

from mvlm_convert.checkpoint import Checkpoint
from mvlm_convert.config_check import REQUIRED, Dim, Fields, check_layer_count, check_shape, weight_hints
from mvlm_convert.gguf_stream import QT, PreparedGGUF, TensorPlan, add_lm_keys, matrix_type
from mvlm_core.conversation import CHAT_TEMPLATE
from mvlm_core.errors import MvlmError

LAYER_PATTERN = r"model\.layers\.(\d+)\."
# tensors of a VLM checkpoint that are not the language model's (every LM writer skips them)
NON_LM_PREFIXES = ("model.vision_tower.", "model.mm_projector.")


def is_lm_tensor(name: str) -> bool:
    return not name.startswith(NON_LM_PREFIXES)


@dataclass(frozen=True)
class LmHparams:
    """Hyper-parameters of any of the LMs, read from the HF keys (never the lit-gpt ``n_head``/``n_embd`` leftovers
    of the LLaMA configs; Phi-2's old names only as fallback). ``eps``: RMSNorm or LayerNorm epsilon per ``LmArch.rms``."""

    hidden_size: int
    n_layer: int
    n_head: int
    n_head_kv: int
    ffn: int
    vocab_size: int
    eps: float
    rope_theta: float
    rot_dims: int
    context_length: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head


class LmArch:
    """One LM architecture; subclasses set the class attributes and override the hooks where theirs differ."""

    arch: ClassVar[gguf.MODEL_ARCH]
    label: ClassVar[str]  # "LLaMA": "the LLaMA language model" in messages
    layout: ClassVar[str]  # "plain LLaMA checkpoint": "unexpected language-model tensor ...; not a <layout>?"
    skip_suffixes: ClassVar[tuple[str, ...]] = (".rotary_emb.inv_freq",)
    # config keys (first present wins) and defaults
    keys: ClassVar[dict[str, tuple[str, ...]]] = {}
    ffn_hint: ClassVar[tuple[str, int]] = ("model.layers.0.mlp.gate_proj.weight", 1)  # (tensor, rows per ffn)
    eps_keys: ClassVar[tuple[str, ...]] = ("rms_norm_eps",)
    eps_default: ClassVar[float] = 1e-6
    rms: ClassVar[bool] = True  # RMSNorm (else LayerNorm)
    context_default: ClassVar[int] = 2048
    theta_default: ClassVar[float] = 10000.0
    rotary_default: ClassVar[float | None] = None  # partial_rotary_factor default; None: the whole head, not read
    ties: ClassVar[bool] = True  # reads tie_word_embeddings

    # -- hyper-parameters ----------------------------------------------------------------------------------------

    def _keys(self, field: str) -> tuple[str, ...]:
        return self.keys.get(field, (field,))

    def hparams(self, config: dict[str, Any], reader: Any = None) -> LmHparams:
        """Typed, range-checked hyper-parameters (``reader``: the checkpoint, to say what the weights imply)."""
        f = Fields(config, f"the {self.label} language model", weights=weight_hints(reader, ffn=self.ffn_hint))
        hidden = f.int(*self._keys("hidden_size"))
        n_head = f.int(*self._keys("num_attention_heads"))
        f.divides("hidden_size", hidden, "num_attention_heads", n_head)
        n_kv = f.int("num_key_value_heads", default=n_head)
        self.check_heads(f, hidden, n_head, n_kv)
        rope = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
        self.check_rope(config, rope)
        fr = Fields(rope, "the rotary embedding", source="config.json rope_parameters")
        factor = None
        if self.rotary_default is not None:
            factor = f.number("partial_rotary_factor", default=None, maximum=1.0)
            if factor is None:
                factor = fr.number("partial_rotary_factor", default=self.rotary_default, maximum=1.0)
        theta = f.number("rope_theta", default=None)
        if theta is None:
            theta = fr.number("rope_theta", default=self.theta_default)
        rot_dims = hidden // n_head if factor is None else self.rotary_dims(factor, hidden, n_head)
        if rot_dims < 2 or rot_dims % 2:
            raise MvlmError(f"config.json: {self.rotary_source(factor, hidden, n_head)} gives {rot_dims} rotary "
                            "dimensions per head; rotary embeddings need an even number >= 2: fix "
                            f"{'num_attention_heads' if factor is None else 'partial_rotary_factor'}")
        return LmHparams(
            hidden_size=hidden,
            n_layer=f.int(*self._keys("num_hidden_layers")),
            n_head=n_head,
            n_head_kv=n_kv,
            ffn=f.int("intermediate_size", default=self.ffn_default(hidden)),
            vocab_size=f.int("vocab_size"),
            eps=f.number(*self.eps_keys, default=self.eps_default, maximum=1.0),
            rope_theta=theta,
            rot_dims=rot_dims,
            context_length=f.int(*self._keys("max_position_embeddings"), default=self.context_default),
            tied=f.flag("tie_word_embeddings", False) if self.ties else False,
        )

    def ffn_default(self, hidden: int) -> Any:
        return REQUIRED

    def rotary_dims(self, factor: float, hidden: int, n_head: int) -> int:
        return int(factor * hidden) // n_head

    @staticmethod
    def rotary_source(factor: float | None, hidden: int, n_head: int) -> str:
        if factor is None:
            return f"hidden_size {hidden} / num_attention_heads {n_head}"
        return f"partial_rotary_factor = {factor:g}"

    def check_heads(self, f: Fields, hidden: int, n_head: int, n_kv: int) -> None:
        """Grouped-query attention: KV heads divide the heads; an explicit ``head_dim`` must be hidden / heads."""
        if n_head % n_kv:
            raise MvlmError(f"config.json: num_attention_heads = {n_head} is not a multiple of num_key_value_heads = "
                            f"{n_kv}; fix config.json (the {self.label} language model)")
        explicit_hd = f.int("head_dim", default=None)
        if explicit_hd is not None and explicit_hd != hidden // n_head:
            raise MvlmError(f"config.json: head_dim = {explicit_hd} differs from hidden_size / num_attention_heads = "
                            f"{hidden // n_head}; llama.cpp's {self.arch_name} architecture needs them equal: "
                            "fix config.json")

    def check_rope(self, config: dict[str, Any], rope: dict[str, Any]) -> None:
        """Refuse what the rotary embedding needs beyond theta and a partial factor (nothing by default)."""

    # -- tensors -------------------------------------------------------------------------------------------------

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    def required(self, hp: LmHparams) -> list[str]:
        """Every tensor this architecture needs (layer by layer)."""
        raise NotImplementedError

    def check_layers(self, ckpt: Checkpoint, hp: LmHparams) -> None:
        """Each layer's tensors against the config (the embeddings and the output head are checked for all)."""
        raise NotImplementedError

    def check_shapes(self, ckpt: Checkpoint, hp: LmHparams) -> None:
        check_layer_count(ckpt, hp.n_layer, LAYER_PATTERN)
        ckpt.require(self.required(hp), f"{self.label} language-model tensors")
        hid, voc = Dim(hp.hidden_size, "hidden_size"), Dim(hp.vocab_size, "vocab_size")
        check_shape(ckpt, "model.embed_tokens.weight", (voc, hid))
        if not hp.tied:
            check_shape(ckpt, "lm_head.weight", (voc, hid))
        self.check_layers(ckpt, hp)

    def kv_rows(self, hp: LmHparams) -> Dim:
        return Dim(hp.n_head_kv * hp.head_dim, "num_key_value_heads", hp.head_dim,
                   f"{hp.head_dim}-wide heads (hidden_size / num_attention_heads)")

    def produce(self, ckpt: Checkpoint, hf: str, hp: LmHparams) -> Callable[[], torch.Tensor]:
        """How one tensor's values are made (as stored, by default)."""
        return lambda: ckpt.get(hf)

    def plan(self, ckpt: Checkpoint, hp: LmHparams, outtype: str) -> list[TensorPlan]:
        """Every LM tensor, named by gguf's TensorNameMap of ``arch``; vectors f32, matrices ``outtype``."""
        name_map = gguf.get_tensor_name_map(self.arch, hp.n_layer)
        plans: list[TensorPlan] = []
        for hf in ckpt.names():
            if not is_lm_tensor(hf) or hf.endswith(self.skip_suffixes):
                continue
            gname = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise MvlmError(f"{ckpt.root}: unexpected language-model tensor {hf}; not a {self.layout}?")
            shape = ckpt.shape(hf)
            qtype = QT.F32 if len(shape) == 1 or outtype == "f32" else matrix_type(outtype, shape)
            plans.append(TensorPlan(gname, shape, qtype, self.produce(ckpt, hf, hp), source=hf))
        return plans

    # -- keys and vocabulary -------------------------------------------------------------------------------------

    def add_keys(self, w: gguf.GGUFWriter, ckpt: Checkpoint, hp: LmHparams) -> None:
        """Keys beyond the common hyper-parameters (none by default)."""

    def add_vocab(self, w: gguf.GGUFWriter, ckpt: Checkpoint, hp: LmHparams) -> dict[str, object]:
        raise NotImplementedError

    def metadata(self, hp: LmHparams) -> dict[str, object]:
        """The summary's architecture facts (beyond arch, layers, heads, widths)."""
        return {}

    def prepare(self, ckpt: Checkpoint, outtype: str, name: str) -> PreparedGGUF:
        """Validate the LM part of the checkpoint and plan every tensor (reads metadata and the tokenizer only)."""
        hp = self.hparams(ckpt.config, ckpt)
        self.check_shapes(ckpt, hp)
        plans = self.plan(ckpt, hp, outtype)
        w = gguf.GGUFWriter(path=None, arch=self.arch_name)
        eps = {"rms_eps": hp.eps} if self.rms else {"norm_eps": hp.eps}
        add_lm_keys(w, name, outtype, context_length=hp.context_length, hidden_size=hp.hidden_size, ffn=hp.ffn,
                    n_layer=hp.n_layer, n_head=hp.n_head, n_head_kv=hp.n_head_kv, rope_dims=hp.rot_dims,
                    rope_theta=hp.rope_theta, vocab_size=hp.vocab_size, **eps)
        self.add_keys(w, ckpt, hp)
        vocab_meta = self.add_vocab(w, ckpt, hp)
        metadata = {"arch": self.arch_name, "n_layer": hp.n_layer, "n_head": hp.n_head, "n_head_kv": hp.n_head_kv,
                    "hidden_size": hp.hidden_size, "head_dim": hp.head_dim, **self.metadata(hp), **vocab_meta}
        return PreparedGGUF(w, plans, "language model", metadata, release=lambda p: ckpt.release(p.source))


# -- vocabularies ----------------------------------------------------------------------------------------------


def sentencepiece_dir(ckpt: Checkpoint, who: str) -> Path:
    if not (ckpt.root / "tokenizer.model").is_file():
        raise MvlmError(f"{ckpt.root}: no tokenizer.model (SentencePiece); {who} ship one")
    return ckpt.root


def add_sentencepiece_vocab(
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
                  pre: str) -> dict[str, object]:
    """GPT-2-style byte-level BPE vocab; ``pre`` names llama.cpp's pre-tokenizer regex (``phi-2``, ``qwen2``)."""
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


class BpeVocab:
    """Mixin: the GPT-2 byte-level BPE vocabulary of tokenizer.json with llama.cpp pre-tokenizer ``tokenizer_pre``."""

    tokenizer_pre: ClassVar[str]

    def add_vocab(self, w: gguf.GGUFWriter, ckpt: Checkpoint, hp: LmHparams) -> dict[str, object]:
        return add_bpe_vocab(w, ckpt.root, hp.vocab_size, ckpt.config, pre=self.tokenizer_pre)


class RopeScalingRefused:
    """Mixin: a rope scaling llama.cpp would need extra metadata for is refused in one line (Qwen1.5, Phi-3)."""

    label: ClassVar[str]

    def check_rope(self, config: dict[str, Any], rope: dict[str, Any]) -> None:
        scaling = config.get("rope_scaling") or ({} if rope.get("rope_type", "default") == "default" else rope)
        if scaling:
            raise MvlmError(f"{self.label}: rope scaling {scaling!r} is not supported by mvlm convert (use a checkpoint "
                            "without rope_scaling, e.g. the 4k-context one)")
