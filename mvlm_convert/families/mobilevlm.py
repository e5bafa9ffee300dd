"""MobileVLM V1 (LDP projector), MobileVLM V2 (LDPv2 projector) and MobileLLaMA (text-only LLaMA LM).

Facts encoded here (checked against the released checkpoints' key names and clip.cpp's loader):
- the LM is plain LLaMA under ``model.*`` / ``lm_head``; only the HF keys describe it (the 3B configs also carry
  stale lit-gpt keys ``n_head``/``n_query_groups``/``n_embd``/``n_layer`` that disagree with the real shapes);
- V1 projector lives under ``model.mm_projector.model.`` (``mlp.1``, ``mlp.3``, ``mb_block.{1,2}.block.*``);
- V2 projector lives under ``model.mm_projector.`` (``mlp.mlp.{0,2}``, ``peg.peg.0``);
- V2 checkpoints carry the CLIP tower under ``model.vision_tower.vision_tower.vision_model.*``; V1 inference
  reloads CLIP from ``mm_vision_tower``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from mvlm_convert.families.base import FamilyInfo
from mvlm_core.errors import MvlmError

NAME = "mobilevlm"
# config mm_projector_type prefixes, most specific first (``ldpnetv2`` also starts with ``ldpnet``)
PROJECTOR_TYPES = ["ldpnetv2", "ldpnet"]
_GGUF_PROJECTOR = {"ldpnetv2": "ldpv2", "ldpnet": "ldp"}
GGUF_PROJECTORS = set(_GGUF_PROJECTOR.values())

LM_ARCHITECTURES = {"MobileLlamaForCausalLM", "MobileVLMForCausalLM", "LlamaForCausalLM", "MobileLLaMAForCausalLM"}
LM_MODEL_TYPES = {"mobilevlm", "llama", "mobilellama"}
MODEL_TYPES = LM_MODEL_TYPES

CLIP_PREFIX_IN_CHECKPOINT = "model.vision_tower.vision_tower.vision_model."
NON_LM_PREFIXES = ("model.vision_tower.", "model.mm_projector.")

# clip-impl.h TN_MVLM_PROJ_BLOCK ("mm.model.mb_block.%d.block.%d.%s"); gguf.constants has no entry for it.
_MB_BLOCK = "mm.model.mb_block.{k}.block.{i}.{rest}"
_MLP = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ_MLP]  # "mm.model.mlp.{bid}"
_PEG = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ_PEG]  # "mm.model.peg.{bid}"


def matches(config: dict[str, Any]) -> bool:
    archs = set(config.get("architectures") or [])
    is_llama = bool(archs & LM_ARCHITECTURES) or config.get("model_type") in LM_MODEL_TYPES
    proj = config.get("mm_projector_type")
    if proj is None:
        return is_llama
    return any(str(proj).startswith(p) for p in PROJECTOR_TYPES)


def describe(config: dict[str, Any]) -> FamilyInfo:
    import sys

    proj = config.get("mm_projector_type")
    if proj is None:
        return FamilyInfo(family=NAME, variant="mobilellama", projector=None, module=sys.modules[__name__])
    for prefix in PROJECTOR_TYPES:
        if str(proj).startswith(prefix):
            variant = "v2" if prefix == "ldpnetv2" else "v1"
            return FamilyInfo(family=NAME, variant=variant, projector=_GGUF_PROJECTOR[prefix], module=sys.modules[__name__])
    raise MvlmError(f"unknown mm_projector_type {proj!r}; supported: {', '.join(p + '*' for p in PROJECTOR_TYPES)}")


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
    from mvlm_convert.config_check import Fields, weight_hints

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


@dataclass(frozen=True)
class ProjTensor:
    """One projector tensor: HF name, GGUF name, and how clip.cpp consumes it (decides dtype and shape)."""

    hf: str
    gguf: str
    kind: str  # "matrix" (Linear or 1x1 conv, 2-D), "vector" (bias / norm, f32), "dwconv" (depthwise 3x3, f16)


def projector_tensors(projector: str) -> list[ProjTensor]:
    """The exact tensor list clip.cpp loads for this projector (all required there)."""
    out: list[ProjTensor] = []
    if projector == "ldp":
        src = "model.mm_projector.model."
        for i in (1, 3):
            out.append(ProjTensor(f"{src}mlp.{i}.weight", _MLP.format(bid=i) + ".weight", "matrix"))
            out.append(ProjTensor(f"{src}mlp.{i}.bias", _MLP.format(bid=i) + ".bias", "vector"))
        for k in (1, 2):
            b = f"{src}mb_block.{k}.block."
            spec = [
                (0, "0.weight", "dwconv"),
                (0, "1.weight", "vector"),
                (0, "1.bias", "vector"),
                (1, "fc1.weight", "matrix"),
                (1, "fc1.bias", "vector"),
                (1, "fc2.weight", "matrix"),
                (1, "fc2.bias", "vector"),
                (2, "0.weight", "matrix"),
                (2, "1.weight", "vector"),
                (2, "1.bias", "vector"),
            ]
            for i, rest, kind in spec:
                out.append(ProjTensor(f"{b}{i}.{rest}", _MB_BLOCK.format(k=k, i=i, rest=rest), kind))
    elif projector == "ldpv2":
        src = "model.mm_projector."
        for i in (0, 2):
            out.append(ProjTensor(f"{src}mlp.mlp.{i}.weight", _MLP.format(bid=i) + ".weight", "matrix"))
            out.append(ProjTensor(f"{src}mlp.mlp.{i}.bias", _MLP.format(bid=i) + ".bias", "vector"))
        out.append(ProjTensor(f"{src}peg.peg.0.weight", _PEG.format(bid=0) + ".weight", "dwconv"))
        out.append(ProjTensor(f"{src}peg.peg.0.bias", _PEG.format(bid=0) + ".bias", "vector"))
    else:
        raise MvlmError(f"no projector mapping for {projector!r}")
    return out


def vision_select_layer(config: dict[str, Any]) -> int:
    from mvlm_convert.config_check import Fields

    return Fields(config, "the vision features the projector takes").int("mm_vision_select_layer", default=-2,
                                                                         minimum=None)


def vision_tower_dir(config: dict[str, Any], checkpoint_dir: Path) -> Path | None:
    """``mm_vision_tower`` when it names a local directory (absolute, relative to cwd, or to the checkpoint)."""
    ref = config.get("mm_vision_tower") or config.get("vision_tower")
    if not ref or not isinstance(ref, str):
        return None
    for cand in (Path(ref), checkpoint_dir / ref):
        if (cand / "config.json").is_file():
            return cand
    return None
