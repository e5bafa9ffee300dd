"""LLaVA-1.5 (``mlp2x_gelu`` projector): the original liuhaotian release and the llava-hf (transformers) release.

Facts encoded here (LLaVA-1.5 code and configs; transformers' Llava model; clip.cpp's loader at 0c1e570):
- liuhaotian (``LlavaLlamaForCausalLM``, ``model_type: llava``): LLaMA LM under ``model.*`` / ``lm_head``, projector
  ``model.mm_projector.{0,2}`` (Linear, GELU, Linear); the CLIP tower is *not* used from the checkpoint: inference
  loads ``mm_vision_tower`` (openai/clip-vit-large-patch14-336); ``mm_vision_select_layer: -2``, ``patch`` features.
- llava-hf (``LlavaForConditionalGeneration``): transformers 4 names ``language_model.model.*``,
  ``language_model.lm_head.weight``, ``vision_tower.vision_model.*``, ``multi_modal_projector.linear_{1,2}``;
  transformers >= 4.52 / 5 save ``model.language_model.*``, ``lm_head.weight``, ``model.vision_tower.vision_model.*``,
  ``model.multi_modal_projector.linear_{1,2}``. The LM config is ``text_config`` (often only the keys that differ
  from LlamaConfig's defaults), ``vision_feature_layer`` (-2) and ``vision_feature_select_strategy`` ("default" =
  drop CLS) describe the features.
- llama.cpp: projector type ``mlp``, tensors ``mm.0.*`` / ``mm.2.*`` (clip-impl.h TN_LLAVA_PROJ), built by
  clip_graph_llava with ggml's GELU. ``normalize`` maps both layouts onto the liuhaotian names, so the LM and mmproj
  writers need no LLaVA-specific code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import torch

from mvlm_convert.checkpoint import Checkpoint
from mvlm_convert.families import tiny_parts as tp
from mvlm_convert.families.base import Family, ProjTensor, Variant, register
from mvlm_convert.torch_ops import gelu_erf, linear
from mvlm_core.errors import MvlmError

ORIGINAL_ARCHS = {"LlavaLlamaForCausalLM"}
HF_ARCHS = {"LlavaForConditionalGeneration"}
MODEL_TYPES = {"llava", "llava_llama"}
_MM = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ]  # "mm.{bid}"

# transformers' LlamaConfig defaults: llava-hf text_config lists only what differs from them (7B values).
LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
CLIP_VISION_DEFAULT_WIDTH = 1024  # CLIPVisionConfig default used by llava-hf's vision_config (ViT-L/14)

# llava-hf name -> liuhaotian name, for both transformers generations (first match wins).
_HF_RENAMES = [
    (re.compile(r"^(?:model\.)?language_model\.model\.(.+)$"), r"model.\1"),
    (re.compile(r"^language_model\.lm_head\.(.+)$"), r"lm_head.\1"),
    (re.compile(r"^model\.language_model\.(.+)$"), r"model.\1"),
    (re.compile(r"^(?:model\.)?vision_tower\.vision_model\.(.+)$"), r"model.vision_tower.vision_tower.vision_model.\1"),
    (re.compile(r"^(?:model\.)?multi_modal_projector\.linear_1\.(.+)$"), r"model.mm_projector.0.\1"),
    (re.compile(r"^(?:model\.)?multi_modal_projector\.linear_2\.(.+)$"), r"model.mm_projector.2.\1"),
]


def _is_hf(config: dict[str, Any]) -> bool:
    return bool(set(config.get("architectures") or []) & HF_ARCHS) or (
        config.get("model_type") == "llava" and isinstance(config.get("text_config"), dict)
    )


def hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """A llava-hf config flattened to the liuhaotian keys (text_config over LlamaConfig defaults, mm_* keys)."""
    from mvlm_convert.config_check import Fields

    text_cfg = config.get("text_config") or {}
    if not isinstance(text_cfg, dict):
        raise MvlmError("config.json: text_config is not a JSON object; fix config.json (llava-hf layout)")
    text = dict(LLAMA_DEFAULTS)
    text.update({k: v for k, v in text_cfg.items() if v is not None})
    if text.get("model_type", "llama") not in ("llama",):
        raise MvlmError(f"llava-hf text_config model_type {text.get('model_type')!r}: only LLaMA language models")
    layer = config.get("vision_feature_layer", -2)
    if isinstance(layer, list):
        if len(layer) != 1:
            raise MvlmError(f"vision_feature_layer {layer}: several concatenated layers are not supported by llama.cpp")
        layer = layer[0]
    f = Fields({"vision_feature_layer": layer}, "the vision features the projector takes")
    layer = f.int("vision_feature_layer", default=-2, minimum=None)
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise MvlmError(f"vision_feature_select_strategy {strategy!r}: llama.cpp's llava graph always drops CLS")
    vision = config.get("vision_config") or {}
    if not isinstance(vision, dict):
        raise MvlmError("config.json: vision_config is not a JSON object; fix config.json (llava-hf layout)")
    width = Fields(vision, "the CLIP vision tower", source="config.json vision_config").int(
        "hidden_size", default=CLIP_VISION_DEFAULT_WIDTH)
    out = {k: v for k, v in text.items() if k not in ("architectures", "model_type")}
    out.update(
        {
            "_name_or_path": config.get("_name_or_path", ""),
            "architectures": ["LlavaLlamaForCausalLM"],
            "model_type": "llava",
            "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_layer": layer,
            "mm_vision_select_feature": "patch",
            "mm_hidden_size": width,
        }
    )
    return out


def _hf_rename(name: str) -> str | None:
    for pat, repl in _HF_RENAMES:
        if pat.match(name):
            return pat.sub(repl, name)
    return name


def mlp_tensors() -> list[ProjTensor]:
    """llama.cpp's ``mlp`` projector: ``model.mm_projector.{0,2}`` -> ``mm.0`` / ``mm.2`` (LLaVA-1.5 and Imp)."""
    out = []
    for i in (0, 2):
        for part, kind in (("weight", "matrix"), ("bias", "vector")):
            out.append(ProjTensor(f"model.mm_projector.{i}.{part}", f"{_MM.format(bid=i)}.{part}", kind))
    return out


def mlp_forward(feats: torch.Tensor, get: Callable[[str], torch.Tensor], depth: int,
                prefix: str = "model.mm_projector.") -> torch.Tensor:
    """LLaVA ``mlp{depth}x_gelu``: Linear, then (GELU, Linear) x (depth-1); weights at indices 0, 2, 4, ..."""
    x = linear(feats, get(f"{prefix}0.weight"), get(f"{prefix}0.bias"))
    for i in range(1, depth):
        x = gelu_erf(x)
        x = linear(x, get(f"{prefix}{2 * i}.weight"), get(f"{prefix}{2 * i}.bias"))
    return x


@register
class Llava(Family):
    name = "llava"
    architectures = ORIGINAL_ARCHS | HF_ARCHS
    model_types = MODEL_TYPES
    projectors = {"mlp2x_gelu": "mlp"}

    def matches(self, config: dict[str, Any]) -> bool:
        archs = set(config.get("architectures") or [])
        if archs & HF_ARCHS:
            return True
        is_llava = bool(archs & ORIGINAL_ARCHS) or config.get("model_type") in ("llava", "llava_llama")
        return is_llava and str(config.get("mm_projector_type", "mlp2x_gelu")).startswith("mlp")

    def describe(self, config: dict[str, Any]) -> Variant:
        if _is_hf(config):
            if config.get("projector_hidden_act", "gelu") != "gelu":
                raise MvlmError(f"llava-hf projector_hidden_act {config.get('projector_hidden_act')!r}: only gelu is supported")
            return self.variant("llava-hf", "mlp")
        proj = str(config.get("mm_projector_type", "linear"))
        if proj != "mlp2x_gelu":
            raise MvlmError(f"LLaVA mm_projector_type {proj!r} is not supported; llama.cpp's mlp projector is mlp2x_gelu")
        return self.variant("liuhaotian", "mlp")

    def normalize(self, ckpt: Checkpoint) -> Checkpoint:
        """llava-hf -> a view under the liuhaotian names and config keys; liuhaotian checkpoints pass unchanged."""
        if not _is_hf(ckpt.config):
            return ckpt
        return ckpt.renamed(_hf_rename, hf_config(ckpt.config))

    def uses_tower_copy(self, projector: str) -> bool:
        return False  # LLaVA-1.5 reloads CLIP from mm_vision_tower at inference

    def projector_tensors(self, projector: str) -> list[ProjTensor]:
        if projector != "mlp":
            raise MvlmError(f"no projector mapping for {projector!r} in the LLaVA family")
        return mlp_tensors()

    def project(self, projector: str, feats: torch.Tensor, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        return mlp_forward(feats, get, 2)

    def tiny_checkpoint(self, outdir: Path, **kw: Any) -> Path:
        return make_tiny_llava(outdir, **kw)


# --------------------------------------------------------------------------------------------------------------
# The tiny checkpoint, in both release layouts (sizes and tokenizer of ``families.tiny_parts``):
# - ``layout="liuhaotian"``: ``LlavaLlamaForCausalLM`` config (mm_* keys), LM + ``model.mm_projector.{0,2}`` only;
#   the CLIP tower is a separate CLIPVisionModel directory named by an absolute ``mm_vision_tower``.
# - ``layout="hf4"`` / ``"hf5"``: ``LlavaForConditionalGeneration`` with ``text_config`` / ``vision_config`` (keys
#   equal to LlamaConfig defaults left out, as llava-hf does), ``vision_feature_layer``, an added ``<image>`` token,
#   and the transformers-4 (``language_model.model.*``, ``vision_tower.vision_model.*``,
#   ``multi_modal_projector.linear_N``) or transformers-5 (``model.language_model.*``, ``model.vision_tower.*``,
#   ``lm_head``) tensor names.
# --------------------------------------------------------------------------------------------------------------

LLAVA_LAYOUTS = ("liuhaotian", "hf4", "hf5")


def make_tiny_llava(outdir: str | Path, layout: str = "liuhaotian", weights: str = "safetensors",
                    dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """A tiny LLaVA-1.5 checkpoint in one of ``LLAVA_LAYOUTS``; returns its directory."""
    if layout not in LLAVA_LAYOUTS:
        raise ValueError(f"unknown LLaVA layout {layout!r}")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = tp.llama_tokenizer(out, seed)
    init = tp.Init(seed, dtype)
    if layout == "liuhaotian":
        sd = tp.lm_state_dict(init, tp.LM["heads"], vocab, with_inv_freq=False)
        sd.update(tp.mlp_projector(init, "model.mm_projector.0.", "model.mm_projector.2.", tp.CLIP["hidden"]))
        clip_dir = out / "clip-vit-tiny-patch14-336"
        tp.write_clip_dir(clip_dir, seed, 336)
        config: dict[str, object] = {
            "_name_or_path": "mvlm-tiny/llava-v1.5-tiny",
            "architectures": ["LlavaLlamaForCausalLM"],
            "model_type": "llava",
            **tp.llama_config_keys(tp.LM["heads"], vocab),
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "torch_dtype": tp.dtype_name(dtype),
            "image_aspect_ratio": "pad",
            "mm_hidden_size": tp.CLIP["hidden"],
            "mm_projector_type": "mlp2x_gelu",
            "mm_use_im_patch_token": False,
            "mm_use_im_start_end": False,
            "mm_vision_select_feature": "patch",
            "mm_vision_select_layer": -2,
            "mm_vision_tower": str(clip_dir.resolve()),
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        return tp.write_release(out, sd, weights, config)
    n_vocab = vocab + 1  # llava-hf adds "<image>" after the SentencePiece pieces
    (out / "added_tokens.json").write_text(json.dumps({"<image>": vocab}))
    lm = tp.lm_state_dict(init, tp.LM["heads"], n_vocab, with_inv_freq=False)
    clip_sd = tp.clip_state_dict(init, "", 336)
    if layout == "hf4":
        sd = {("language_model." + k): v for k, v in lm.items()}
        sd.update({"vision_tower.vision_model." + k: v for k, v in clip_sd.items()})
        sd.update(tp.mlp_projector(init, "multi_modal_projector.linear_1.", "multi_modal_projector.linear_2.",
                                tp.CLIP["hidden"]))
    else:
        sd = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v for k, v in lm.items()}
        sd.update({"model.vision_tower.vision_model." + k: v for k, v in clip_sd.items()})
        sd.update(tp.mlp_projector(init, "model.multi_modal_projector.linear_1.", "model.multi_modal_projector.linear_2.",
                                tp.CLIP["hidden"]))
    config = {
        "_name_or_path": f"mvlm-tiny/llava-1.5-tiny-{layout}",
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "ignore_index": -100,
        "image_token_index": vocab,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "text_config": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                        **tp.llama_config_keys(tp.LM["heads"], n_vocab)},
        "vision_config": {"model_type": "clip_vision_model", **tp.clip_config(tp.CLIP, 336),
                          "projection_dim": tp.CLIP["projection_dim"]},
        "torch_dtype": tp.dtype_name(dtype),
    }
    return tp.write_release(out, sd, weights, config)
