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

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import torch
import torch.nn.functional as F

from mvlm_convert.families import tiny_parts as tp
from mvlm_convert.families.base import Family, ProjTensor, Variant, register
from mvlm_convert.torch_ops import gelu_erf, hardsigmoid, hardswish, layer_norm_channels, linear, make_divisible
from mvlm_core.errors import MvlmError

LM_ARCHITECTURES = {"MobileLlamaForCausalLM", "MobileVLMForCausalLM", "LlamaForCausalLM", "MobileLLaMAForCausalLM"}
LM_MODEL_TYPES = {"mobilevlm", "llama", "mobilellama"}

# clip-impl.h TN_MVLM_PROJ_BLOCK ("mm.model.mb_block.%d.block.%d.%s"); gguf.constants has no entry for it.
_MB_BLOCK = "mm.model.mb_block.{k}.block.{i}.{rest}"
_MLP = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ_MLP]  # "mm.model.mlp.{bid}"
_PEG = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ_PEG]  # "mm.model.peg.{bid}"
LDP_GRID = 24  # clip.cpp hard-codes n_patch = 24 for PROJECTOR_TYPE_LDP / LDPV2
# MobileVLM's projector LayerNorms are timm LayerNormAct2d with its default eps.
LDP_LAYER_NORM_EPS = 1e-5


@register
class MobileVLM(Family):
    name = "mobilevlm"
    architectures = LM_ARCHITECTURES
    model_types = LM_MODEL_TYPES
    projectors = {"ldpnetv2": "ldpv2", "ldpnet": "ldp"}  # ``ldpnetv2`` also starts with ``ldpnet``

    def matches(self, config: dict[str, Any]) -> bool:
        archs = set(config.get("architectures") or [])
        is_llama = bool(archs & LM_ARCHITECTURES) or config.get("model_type") in LM_MODEL_TYPES
        proj = config.get("mm_projector_type")
        if proj is None:
            return is_llama
        return any(str(proj).startswith(p) for p in self.projectors)

    def describe(self, config: dict[str, Any]) -> Variant:
        proj = config.get("mm_projector_type")
        if proj is None:
            return self.variant("mobilellama", None)
        for prefix, gguf_projector in self.projectors.items():
            if str(proj).startswith(prefix):
                return self.variant("v2" if prefix == "ldpnetv2" else "v1", gguf_projector)
        raise MvlmError(f"unknown mm_projector_type {proj!r}; supported: {', '.join(p + '*' for p in self.projectors)}")

    def uses_tower_copy(self, projector: str) -> bool:
        return projector != "ldp"  # V1 inference reloads CLIP from mm_vision_tower; V2 uses its copy

    def check_vision(self, projector: str, vision: Any) -> None:
        grid = vision.image_size // vision.patch_size
        if grid != LDP_GRID or vision.image_size % vision.patch_size:
            raise MvlmError(
                f"{projector} needs a {LDP_GRID}x{LDP_GRID} patch grid (image 336, patch 14) but the vision tower "
                f"({vision.origin}) has image {vision.image_size}, patch {vision.patch_size}; llama.cpp hard-codes 24x24"
            )

    def n_image_tokens(self, projector: str, vision: Any, proj_in: int) -> int:
        return super().n_image_tokens(projector, vision, proj_in) // 4  # LDP / LDPv2 pool 2x2

    def projector_tensors(self, projector: str) -> list[ProjTensor]:
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

    def project(self, projector: str, feats: torch.Tensor, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        return ldpv2_forward(feats, get) if projector == "ldpv2" else ldp_forward(feats, get)

    def tiny_checkpoint(self, outdir: Path, **kw: Any) -> Path:
        return make_tiny_checkpoint(outdir, **kw)


# --------------------------------------------------------------------------------------------------------------
# The LDP / LDPv2 reference forwards (MobileVLM V1/V2 papers; the released code builds them from torchvision's
# MobileNetV3 ``InvertedResidual`` + ``SqueezeExcitation`` and timm's ``LayerNormAct2d`` -- neither library needed)
# --------------------------------------------------------------------------------------------------------------


def as_conv1x1(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1, 1, 1)


def as_depthwise(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], 1, w.shape[-2], w.shape[-1])


def squeeze_excite(x: torch.Tensor, fc1_w, fc1_b, fc2_w, fc2_b) -> torch.Tensor:
    """torchvision SqueezeExcitation with ReLU inside and hardsigmoid gate: x * gate(fc2(relu(fc1(avgpool(x)))))."""
    s = x.mean(dim=(2, 3), keepdim=True)
    s = torch.relu(F.conv2d(s, as_conv1x1(fc1_w), fc1_b))
    s = hardsigmoid(F.conv2d(s, as_conv1x1(fc2_w), fc2_b))
    return x * s


def inverted_residual(
    x: torch.Tensor, get: Callable[[str], torch.Tensor], prefix: str, stride: int, eps: float = LDP_LAYER_NORM_EPS
) -> torch.Tensor:
    """MobileNetV3 inverted-residual block without expansion (expanded channels == input channels).

    depthwise 3x3 (pad 1, no bias) -> LN -> hardswish -> SE -> pointwise 1x1 (no bias) -> LN; residual only when
    stride is 1 and channels are kept (torchvision's ``use_res_connect``).
    """
    c = x.shape[1]
    y = F.conv2d(x, as_depthwise(get(prefix + "block.0.0.weight")), None, stride=stride, padding=1, groups=c)
    y = layer_norm_channels(y, get(prefix + "block.0.1.weight"), get(prefix + "block.0.1.bias"), eps)
    y = hardswish(y)
    fc1_w = get(prefix + "block.1.fc1.weight")
    expected_squeeze = make_divisible(c // 4, 8)
    if fc1_w.shape[0] != expected_squeeze:
        raise MvlmError(
            f"{prefix}block.1.fc1 has {fc1_w.shape[0]} squeeze channels, MobileNetV3 SE expects "
            f"make_divisible({c}//4, 8) = {expected_squeeze}: not an LDP projector"
        )
    y = squeeze_excite(y, fc1_w, get(prefix + "block.1.fc1.bias"), get(prefix + "block.1.fc2.weight"),
                       get(prefix + "block.1.fc2.bias"))
    out_w = get(prefix + "block.2.0.weight")
    y = F.conv2d(y, as_conv1x1(out_w), None)
    y = layer_norm_channels(y, get(prefix + "block.2.1.weight"), get(prefix + "block.2.1.bias"), eps)
    if stride == 1 and out_w.shape[0] == c:
        y = y + x
    return y


def tokens_to_map(x: torch.Tensor) -> torch.Tensor:
    """[N, C] row-major tokens (N = side*side) -> [1, C, side, side]."""
    n, c = x.shape
    side = math.isqrt(n)
    if side * side != n:
        raise MvlmError(f"{n} vision tokens are not a square grid: LDP/LDPv2 need a square patch grid")
    return x.t().reshape(1, c, side, side)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2)[0].t().contiguous()


def ldp_forward(feats: torch.Tensor, get: Callable[[str], torch.Tensor], prefix: str = "model.mm_projector.model.",
                eps: float = LDP_LAYER_NORM_EPS) -> torch.Tensor:
    """MobileVLM V1 LDP: Linear-GELU-Linear, two inverted-residual blocks (stride 1, 2). [N,Dv] -> [N/4,Dt]."""
    x = linear(feats, get(prefix + "mlp.1.weight"), get(prefix + "mlp.1.bias"))
    x = gelu_erf(x)
    x = linear(x, get(prefix + "mlp.3.weight"), get(prefix + "mlp.3.bias"))
    x = tokens_to_map(x)
    x = inverted_residual(x, get, prefix + "mb_block.1.", stride=1, eps=eps)
    x = inverted_residual(x, get, prefix + "mb_block.2.", stride=2, eps=eps)
    return map_to_tokens(x)


def ldpv2_forward(feats: torch.Tensor, get: Callable[[str], torch.Tensor], prefix: str = "model.mm_projector.",
                  out_side: int = 12) -> torch.Tensor:
    """MobileVLM V2 LDPv2: Linear-GELU-Linear, avg-pool to out_side^2, PEG (depthwise 3x3 + bias) + residual."""
    x = linear(feats, get(prefix + "mlp.mlp.0.weight"), get(prefix + "mlp.mlp.0.bias"))
    x = gelu_erf(x)
    x = linear(x, get(prefix + "mlp.mlp.2.weight"), get(prefix + "mlp.mlp.2.bias"))
    x = tokens_to_map(x)
    x = F.adaptive_avg_pool2d(x, (out_side, out_side))
    c = x.shape[1]
    peg = F.conv2d(x, as_depthwise(get(prefix + "peg.peg.0.weight")), get(prefix + "peg.peg.0.bias"),
                   stride=1, padding=1, groups=c)
    return map_to_tokens(peg + x)


# --------------------------------------------------------------------------------------------------------------
# The tiny checkpoint (tests, ``make demo`` through ``python -m mvlm_convert.tiny``): MobileVLM's config keys and
# values (including the 3B lit-gpt leftovers on request), weights under the real HF names (LM,
# ``model.mm_projector.*``, V2's CLIP copy, V1's separate CLIPVisionModel directory) in any of the four layouts.
# --------------------------------------------------------------------------------------------------------------

VARIANTS = ("v2", "v1", "mobilellama")


def tiny_projector_state_dict(init: tp.Init, variant: str) -> dict[str, torch.Tensor]:
    """LDPv2 (``v2``) or LDP (``v1``) at the tiny sizes, in the draw order the tests' seeds pin."""
    c, d = tp.CLIP["hidden"], tp.LM["hidden"]
    sd: dict[str, torch.Tensor] = {}
    if variant == "v2":
        p = "model.mm_projector."
        init.linear_bias(sd, p + "mlp.mlp.0.", d, c)
        init.linear_bias(sd, p + "mlp.mlp.2.", d, d)
        sd[p + "peg.peg.0.weight"] = init.normal(d, 1, 3, 3, std=1.0 / 3)
        sd[p + "peg.peg.0.bias"] = init.normal(d, std=0.1)
        return sd
    s = make_divisible(d // 4, 8)
    p = "model.mm_projector.model."
    init.linear_bias(sd, p + "mlp.1.", d, c)
    init.linear_bias(sd, p + "mlp.3.", d, d)
    for k in (1, 2):
        b = f"{p}mb_block.{k}.block."
        sd[b + "0.0.weight"] = init.normal(d, 1, 3, 3, std=1.0 / 3)
        sd[b + "0.1.weight"] = init.norm_weight(d)
        sd[b + "0.1.bias"] = init.normal(d, std=0.1)
        sd[b + "1.fc1.weight"] = init.normal(s, d, 1, 1, std=1.0 / d**0.5)
        sd[b + "1.fc1.bias"] = init.normal(s, std=0.1)
        sd[b + "1.fc2.weight"] = init.normal(d, s, 1, 1, std=1.0 / s**0.5)
        sd[b + "1.fc2.bias"] = init.normal(d, std=0.1)
        sd[b + "2.0.weight"] = init.normal(d, d, 1, 1, std=1.0 / d**0.5)
        sd[b + "2.1.weight"] = init.norm_weight(d)
        sd[b + "2.1.bias"] = init.normal(d, std=0.1)
    return sd


# MobileVLM-3B / MobileLLaMA-2.7B configs: lit-gpt leftovers that disagree with the HF keys.
_TRAP_3B = {
    "n_head": tp.LM["heads"] // 2, "n_query_groups": tp.LM["heads"] // 2, "n_embd": tp.LM["hidden"] // 2,
    "n_layer": tp.LM["layers"] + 1, "block_size": 2048, "padded_vocab_size": 32000, "norm_class": "RMSNorm",
    "_mlp_class": "LLaMAMLP", "rotary_percentage": 1.0, "parallel_residual": False, "bias": False,
}


def _tiny_lm_config(variant: str, n_kv: int, vocab: int, dtype: torch.dtype) -> dict[str, object]:
    """The LM part of a tiny release's config.json (MobileLLaMA's keys and values, at the tiny sizes)."""
    name = {"v1": "MobileVLM-Tiny", "v2": "MobileVLM_V2-Tiny", "mobilellama": "MobileLLaMA-Tiny"}[variant]
    return {
        "_name_or_path": f"mvlm-tiny/{name}",
        "architectures": ["MobileLlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": tp.LM["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": tp.LM["ffn"],
        "max_position_embeddings": 2048,
        "model_type": "mobilevlm",
        "num_attention_heads": tp.LM["heads"],
        "num_hidden_layers": tp.LM["layers"],
        "num_key_value_heads": n_kv,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": tp.dtype_name(dtype),
        "transformers_version": "4.33.1",
        "use_cache": True,
        "vocab_size": vocab,
    }


def make_tiny_checkpoint(
    outdir: str | Path,
    variant: str = "v2",
    layout: str = "bin",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    trap_3b: bool = False,
    clip_dir: str | Path | None = None,
    gqa: bool = False,
    image_size: int = 336,
) -> Path:
    """Write a tiny checkpoint; returns its directory.

    variant: ``v2`` (LDPv2 + CLIP copy in the weights), ``v1`` (LDP; CLIP in a separate directory, ``clip_dir`` or
    ``<outdir>/clip-vit-tiny-patch14-336``, referenced by an absolute ``mm_vision_tower``), ``mobilellama`` (LM only).
    For ``v2`` a ``clip_dir`` is optional: when given, a CLIP directory is written there too and referenced.
    ``trap_3b`` adds the stale lit-gpt keys the 3B configs carry (with wrong values); ``gqa`` uses 2 KV heads;
    ``image_size`` other than 336 makes a tower LDP cannot use (for error tests).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = tp.sentencepiece_vocab(out, seed)
    n_kv = 2 if gqa else tp.LM["heads"]
    init = tp.Init(seed, dtype)
    sd = tp.lm_state_dict(init, n_kv, vocab, with_inv_freq=variant == "v1")
    config = _tiny_lm_config(variant, n_kv, vocab, dtype)
    if variant == "mobilellama":
        config["architectures"] = ["LlamaForCausalLM"]
        config["model_type"] = "llama"
    else:
        sd.update(tiny_projector_state_dict(init, variant))
        cdir = Path(clip_dir) if clip_dir is not None else None
        if variant == "v1" and cdir is None:
            cdir = out / "clip-vit-tiny-patch14-336"
        if variant == "v2":
            sd.update(tp.clip_state_dict(init, "model.vision_tower.vision_tower.vision_model.", image_size))
        if cdir is not None:
            tp.write_clip_dir(cdir, seed, image_size)
        config.update(
            {
                "freeze_mm_mlp_adapter": False,
                "image_aspect_ratio": "pad",
                "mm_hidden_size": tp.CLIP["hidden"],
                "mm_projector_type": "ldpnetv2" if variant == "v2" else "ldpnet",
                "mm_use_im_patch_token": False,
                "mm_use_im_start_end": False,
                "mm_vision_select_feature": "patch",
                "mm_vision_select_layer": -2,
                "mm_vision_tower": str(cdir.resolve()) if cdir is not None else "openai/clip-vit-large-patch14-336",
                "tune_mm_mlp_adapter": False,
                "use_mm_proj": True,
                "vision_tower_type": "clip",
            }
        )
    if trap_3b:
        config.update(_TRAP_3B)
    tp.write_release(out, sd, layout, config)
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "transformers_version": "4.33.1"})
    )
    tp.write_sentencepiece_config(
        out, indent=2, pad_token="<unk>", clean_up_tokenization_spaces=False, legacy=False, model_max_length=2048,
        padding_side="right", sp_model_kwargs={}, tokenizer_class="LlamaTokenizer", use_fast=False,
    )
    return out
