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

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import torch
import torch.nn.functional as F

from mvlm_convert.checkpoint import Checkpoint
from mvlm_convert.families import tiny_parts as tp
from mvlm_convert.families.base import Family, ProjTensor, Variant, register
from mvlm_convert.torch_ops import linear
from mvlm_core.errors import MvlmError

ARCHS = {"XmodelLMForCausalLM"}
MODEL_TYPES = {"xmodelvlm"}
_MM = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ]  # "mm.{bid}"
XDP_SRC = "model.mm_projector.mlp."


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@register
class Xmodel(Family):
    name = "xmodel"
    architectures = ARCHS
    model_types = MODEL_TYPES
    projectors = {"xdpnet": "xdp"}

    def matches(self, config: dict[str, Any]) -> bool:
        if str(config.get("mm_projector_type", "")).startswith("xdpnet"):
            return True
        return bool(set(config.get("architectures") or []) & ARCHS) or config.get("model_type") in MODEL_TYPES

    def describe(self, config: dict[str, Any]) -> Variant:
        proj = config.get("mm_projector_type")
        if proj is None:
            raise MvlmError("Xmodel config without mm_projector_type: text-only Xmodel-LM checkpoints are not supported")
        if not str(proj).startswith("xdpnet"):
            raise MvlmError(f"Xmodel-VLM mm_projector_type {proj!r} is not supported; only xdpnet* (XDP)")
        return self.variant(str(proj), "xdp")

    def normalize(self, ckpt: Checkpoint) -> Checkpoint:
        """Fill the XModelConfig defaults the LM writer would otherwise guess wrongly (eps 1e-5, derived ffn)."""
        cfg = dict(ckpt.config)
        cfg.setdefault("rms_norm_eps", 1e-5)
        hidden = cfg.get("hidden_size")
        if cfg.get("intermediate_size") is None and isinstance(hidden, int) and not isinstance(hidden, bool) and hidden > 0:
            cfg["intermediate_size"] = _find_multiple(int(8 * hidden / 3), 256)
        cfg.setdefault("max_position_embeddings", 32768)
        return ckpt.renamed(lambda n: n, cfg)

    def projector_tensors(self, projector: str) -> list[ProjTensor]:
        if projector != "xdp":
            raise MvlmError(f"no projector mapping for {projector!r} in the Xmodel family")
        out = []
        for i in (0, 2):
            for part, kind in (("weight", "matrix"), ("bias", "vector")):
                out.append(ProjTensor(f"{XDP_SRC}{i}.{part}", f"{_MM.format(bid=i)}.{part}", kind))
        return out

    def n_image_tokens(self, projector: str, vision: Any, proj_in: int) -> int:
        # XDP concatenates f consecutive patch tokens: f comes from mm.0's input width, never from the config name.
        grid = vision.image_size // vision.patch_size
        factor = proj_in // vision.hidden
        if factor < 1 or proj_in % vision.hidden or (grid * grid) % factor:
            raise MvlmError(
                f"XDP input width {proj_in} is not a whole number of {vision.hidden}-wide vision tokens dividing "
                f"the {grid * grid} patches; wrong --vision-tower?"
            )
        return grid * grid // factor

    def project(self, projector: str, feats: torch.Tensor, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        return xdp_forward(feats, get)

    def tiny_checkpoint(self, outdir: Path, **kw: Any) -> Path:
        return make_tiny_xmodel(outdir, **kw)


def mish(x: torch.Tensor) -> torch.Tensor:
    """x * tanh(softplus(x)) (Misra 2019; torch.nn.Mish)."""
    return x * torch.tanh(F.softplus(x))


def xdp_forward(feats: torch.Tensor, get: Callable[[str], torch.Tensor],
                prefix: str = XDP_SRC) -> torch.Tensor:
    """Xmodel-VLM XDP: [N, D] viewed as [N/f, f*D] (f consecutive tokens), Linear - Mish - Linear.

    f is the first Linear's input width over D (the released code's factor differs between versions).
    """
    w0 = get(prefix + "0.weight")
    n, d = feats.shape
    if w0.shape[1] % d or n % (w0.shape[1] // d):
        raise MvlmError(f"XDP input width {w0.shape[1]} does not fit {n} tokens of width {d}")
    f = w0.shape[1] // d
    x = feats.reshape(n // f, f * d)
    x = mish(linear(x, w0, get(prefix + "0.bias")))
    return linear(x, get(prefix + "2.weight"), get(prefix + "2.bias"))


def make_tiny_xmodel(outdir: str | Path, factor: int = 4, projector_type: str = "xdpnet",
                     weights: str = "bin", dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A tiny Xmodel-VLM checkpoint (sizes and tokenizer of ``families.tiny_parts``): ``XmodelLMForCausalLM`` /
    ``xmodelvlm`` with GQA (2 KV heads), the CLIP copy under ``model.vision_tower.vision_tower.vision_model.*`` and
    XDP ``model.mm_projector.mlp.{0,2}`` whose input width is ``factor`` x the CLIP width; returns its directory."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = tp.llama_tokenizer(out, seed)
    init = tp.Init(seed, dtype)
    n_kv = 2
    sd = tp.lm_state_dict(init, n_kv, vocab, with_inv_freq=True)
    sd.update(tp.clip_state_dict(init, "model.vision_tower.vision_tower.vision_model.", 336))
    sd.update(tp.mlp_projector(init, "model.mm_projector.mlp.0.", "model.mm_projector.mlp.2.", tp.CLIP["hidden"] * factor))
    config = {
        "_name_or_path": "mvlm-tiny/Xmodel_VLM-tiny",
        "architectures": ["XmodelLMForCausalLM"],
        "model_type": "xmodelvlm",
        **tp.llama_config_keys(n_kv, vocab),
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": tp.dtype_name(dtype),
        "image_aspect_ratio": "pad",
        "mm_hidden_size": tp.CLIP["hidden"],
        "mm_projector_type": projector_type,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }  # no rms_norm_eps: XModelConfig's default (1e-5) applies
    return tp.write_release(out, sd, weights, config)
