"""Xmodel-VLM: Xmodel-LM (LLaMA-like, GQA) + CLIP ViT-L/14-336 + the XDP projector.

Facts (Xmodel-VLM paper and public code, XiaoduoAILab/XmodelVLM):
- config ``architectures: [XmodelLMForCausalLM]``, ``model_type: xmodelvlm``; the LM uses LLaMA's key names
  (``model.layers.N.self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, RMSNorm, rotate-half RoPE θ=10000),
  with ``num_key_value_heads`` < ``num_attention_heads``. XModelConfig defaults that a config may omit:
  ``rms_norm_eps`` 1e-5, ``intermediate_size`` = multiple of 256 above 8/3·hidden.
- XDP (``mm_projector_type`` ``xdpnet*``), keys ``model.mm_projector.mlp.{0,2}``: the [N, D] CLIP features are
  viewed as [N/f, f·D] (f consecutive raster-order tokens concatenated), then Linear(f·D→H), Mish, Linear(H→H).
  f differs between code versions (``xdpnet`` was f=4 in the paper's code and f=1 later; ``xdpnetv10_N`` is f=N),
  so f is read from ``mlp.0.weight``'s input width, never from the name.
- llama.cpp has no XDP: the project's runtime patch 0003 adds projector type ``xdp`` (tensors ``mm.0.*``/``mm.2.*``).
"""

from __future__ import annotations

import sys
from typing import Any

import gguf

from mvlm_convert.checkpoint import Checkpoint
from mvlm_convert.families.base import FamilyInfo
from mvlm_convert.families.mobilevlm import ProjTensor
from mvlm_core.errors import MvlmError

NAME = "xmodel"
PROJECTOR_TYPES = ["xdpnet"]
GGUF_PROJECTORS = {"xdp"}
ARCHS = {"XmodelLMForCausalLM"}
MODEL_TYPES = {"xmodelvlm"}
_MM = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ]  # "mm.{bid}"
XDP_SRC = "model.mm_projector.mlp."


def matches(config: dict[str, Any]) -> bool:
    if str(config.get("mm_projector_type", "")).startswith("xdpnet"):
        return True
    return bool(set(config.get("architectures") or []) & ARCHS) or config.get("model_type") in MODEL_TYPES


def describe(config: dict[str, Any]) -> FamilyInfo:
    proj = config.get("mm_projector_type")
    if proj is None:
        raise MvlmError("Xmodel config without mm_projector_type: text-only Xmodel-LM checkpoints are not supported")
    if not str(proj).startswith("xdpnet"):
        raise MvlmError(f"Xmodel-VLM mm_projector_type {proj!r} is not supported; only xdpnet* (XDP)")
    return FamilyInfo(family=NAME, variant=str(proj), projector="xdp", module=sys.modules[__name__])


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def normalize(ckpt: Checkpoint) -> Checkpoint:
    """Fill the XModelConfig defaults the LM writer would otherwise guess wrongly (eps 1e-5, derived ffn)."""
    cfg = dict(ckpt.config)
    cfg.setdefault("rms_norm_eps", 1e-5)
    hidden = cfg.get("hidden_size")
    if cfg.get("intermediate_size") is None and isinstance(hidden, int) and not isinstance(hidden, bool) and hidden > 0:
        cfg["intermediate_size"] = _find_multiple(int(8 * hidden / 3), 256)
    cfg.setdefault("max_position_embeddings", 32768)
    return ckpt.renamed(lambda n: n, cfg)


def projector_tensors(projector: str) -> list[ProjTensor]:
    if projector != "xdp":
        raise MvlmError(f"no projector mapping for {projector!r} in the Xmodel family")
    out = []
    for i in (0, 2):
        for part, kind in (("weight", "matrix"), ("bias", "vector")):
            out.append(ProjTensor(f"{XDP_SRC}{i}.{part}", f"{_MM.format(bid=i)}.{part}", kind))
    return out
