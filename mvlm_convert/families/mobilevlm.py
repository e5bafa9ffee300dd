"""MobileVLM V1 (LDP projector), MobileVLM V2 (LDPv2 projector) and MobileLLaMA (text-only LLaMA LM).

Facts encoded here (DESIGN.md §3, checked against the released checkpoints' key names and clip.cpp's loader):
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

from mvlm_convert.errors import MvlmError
from mvlm_convert.families import FamilyInfo

NAME = "mobilevlm"
# config mm_projector_type prefixes, most specific first (``ldpnetv2`` also starts with ``ldpnet``)
PROJECTOR_TYPES = ["ldpnetv2", "ldpnet"]
_GGUF_PROJECTOR = {"ldpnetv2": "ldpv2", "ldpnet": "ldp"}
GGUF_PROJECTORS = set(_GGUF_PROJECTOR.values())

LM_ARCHITECTURES = {"MobileLlamaForCausalLM", "MobileVLMForCausalLM", "LlamaForCausalLM", "MobileLLaMAForCausalLM"}
LM_MODEL_TYPES = {"mobilevlm", "llama", "mobilellama"}

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


def lm_hparams(config: dict[str, Any]) -> LmHparams:
    def need(key: str) -> Any:
        if key not in config:
            raise MvlmError(f"config.json has no {key!r}; cannot describe the language model")
        return config[key]

    n_head = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    if hidden % n_head:
        raise MvlmError(f"config.json: hidden_size {hidden} is not a multiple of num_attention_heads {n_head}")
    n_kv = int(config.get("num_key_value_heads") or n_head)
    if n_head % n_kv:
        raise MvlmError(f"config.json: num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_kv}")
    rope_theta = config.get("rope_theta")
    if rope_theta is None and isinstance(config.get("rope_parameters"), dict):
        rope_theta = config["rope_parameters"].get("rope_theta")
    return LmHparams(
        hidden_size=hidden,
        n_layer=int(need("num_hidden_layers")),
        n_head=n_head,
        n_head_kv=n_kv,
        ffn=int(need("intermediate_size")),
        vocab_size=int(need("vocab_size")),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
        context_length=int(config.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
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
    return int(config.get("mm_vision_select_layer", -2))


def vision_tower_dir(config: dict[str, Any], checkpoint_dir: Path) -> Path | None:
    """``mm_vision_tower`` when it names a local directory (absolute, relative to cwd, or to the checkpoint)."""
    ref = config.get("mm_vision_tower") or config.get("vision_tower")
    if not ref:
        return None
    for cand in (Path(ref), checkpoint_dir / ref):
        if (cand / "config.json").is_file():
            return cand
    return None
