"""Tiny checkpoints of the papers' peers (LLaVA-1.5 in both release layouts, Xmodel-VLM), for tests.

Same sizes and SentencePiece tokenizer as mvlm_convert.tiny (LM hidden 128 / 2 layers, CLIP hidden 128 / 3 layers,
image 336 / patch 14 -> 576 patches); what differs is what a converter must get right per family:
- ``llava`` ``layout="liuhaotian"``: ``LlavaLlamaForCausalLM`` config (mm_* keys), LM + ``model.mm_projector.{0,2}``
  only; the CLIP tower is a separate CLIPVisionModel directory named by an absolute ``mm_vision_tower``.
- ``layout="hf4"`` / ``"hf5"``: ``LlavaForConditionalGeneration`` with ``text_config`` / ``vision_config`` (keys equal
  to LlamaConfig defaults left out, as llava-hf does), ``vision_feature_layer``, an added ``<image>`` token, and the
  transformers-4 (``language_model.model.*``, ``vision_tower.vision_model.*``, ``multi_modal_projector.linear_N``)
  or transformers-5 (``model.language_model.*``, ``model.vision_tower.*``, ``lm_head``) tensor names.
- ``xmodel``: ``XmodelLMForCausalLM`` / ``xmodelvlm`` with GQA (2 KV heads), no ``intermediate_size``-independent
  surprises, CLIP copy under ``model.vision_tower.vision_tower.vision_model.*`` and XDP ``model.mm_projector.mlp.{0,2}``
  whose input width is ``factor`` x the CLIP width.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mvlm_convert.tiny import (
    CLIP,
    LM,
    VOCAB_SIZE,
    _Init,
    clip_state_dict,
    lm_state_dict,
    save_weights,
    train_tokenizer,
    write_clip_dir,
)

LLAVA_LAYOUTS = ("liuhaotian", "hf4", "hf5")


def _tokenizer(out: Path, seed: int) -> int:
    import sentencepiece as spm

    train_tokenizer(out / "tokenizer.model", VOCAB_SIZE, seed)
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"})
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                    "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer", "legacy": False})
    )
    return spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).vocab_size()


def _lm_keys(n_kv: int, vocab: int) -> dict[str, object]:
    return {
        "hidden_size": LM["hidden"],
        "intermediate_size": LM["ffn"],
        "num_attention_heads": LM["heads"],
        "num_hidden_layers": LM["layers"],
        "num_key_value_heads": n_kv,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
    }


def _mlp_projector(init: _Init, prefix_0: str, prefix_2: str, d_in: int) -> dict[str, torch.Tensor]:
    d = LM["hidden"]
    return {
        prefix_0 + "weight": init.linear(d, d_in),
        prefix_0 + "bias": init.normal(d, std=0.1),
        prefix_2 + "weight": init.linear(d, d),
        prefix_2 + "bias": init.normal(d, std=0.1),
    }


def make_tiny_llava(outdir: str | Path, layout: str = "liuhaotian", weights: str = "safetensors",
                    dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """A tiny LLaVA-1.5 checkpoint in one of ``LLAVA_LAYOUTS``; returns its directory."""
    if layout not in LLAVA_LAYOUTS:
        raise ValueError(f"unknown LLaVA layout {layout!r}")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _tokenizer(out, seed)
    init = _Init(seed, dtype)
    if layout == "liuhaotian":
        sd = lm_state_dict(init, LM["heads"], vocab, with_inv_freq=False)
        sd.update(_mlp_projector(init, "model.mm_projector.0.", "model.mm_projector.2.", CLIP["hidden"]))
        clip_dir = out / "clip-vit-tiny-patch14-336"
        write_clip_dir(clip_dir, seed, 336)
        config: dict[str, object] = {
            "_name_or_path": "mvlm-tiny/llava-v1.5-tiny",
            "architectures": ["LlavaLlamaForCausalLM"],
            "model_type": "llava",
            **_lm_keys(LM["heads"], vocab),
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "torch_dtype": str(dtype).replace("torch.", ""),
            "image_aspect_ratio": "pad",
            "mm_hidden_size": CLIP["hidden"],
            "mm_projector_type": "mlp2x_gelu",
            "mm_use_im_patch_token": False,
            "mm_use_im_start_end": False,
            "mm_vision_select_feature": "patch",
            "mm_vision_select_layer": -2,
            "mm_vision_tower": str(clip_dir.resolve()),
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
    else:
        n_vocab = vocab + 1  # llava-hf adds "<image>" after the SentencePiece pieces
        (out / "added_tokens.json").write_text(json.dumps({"<image>": vocab}))
        lm = lm_state_dict(init, LM["heads"], n_vocab, with_inv_freq=False)
        clip_sd = clip_state_dict(init, "", 336)
        if layout == "hf4":
            sd = {("language_model." + k): v for k, v in lm.items()}
            sd.update({"vision_tower.vision_model." + k: v for k, v in clip_sd.items()})
            sd.update(_mlp_projector(init, "multi_modal_projector.linear_1.", "multi_modal_projector.linear_2.",
                                     CLIP["hidden"]))
        else:
            sd = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
                  for k, v in lm.items()}
            sd.update({"model.vision_tower.vision_model." + k: v for k, v in clip_sd.items()})
            sd.update(_mlp_projector(init, "model.multi_modal_projector.linear_1.",
                                     "model.multi_modal_projector.linear_2.", CLIP["hidden"]))
        text = {k: v for k, v in _lm_keys(LM["heads"], n_vocab).items()}
        config = {
            "_name_or_path": f"mvlm-tiny/llava-1.5-tiny-{layout}",
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "ignore_index": -100,
            "image_token_index": vocab,
            "projector_hidden_act": "gelu",
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "text_config": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **text},
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": CLIP["hidden"],
                "intermediate_size": CLIP["ffn"],
                "num_attention_heads": CLIP["heads"],
                "num_hidden_layers": CLIP["layers"],
                "image_size": 336,
                "patch_size": CLIP["patch"],
                "projection_dim": CLIP["projection_dim"],
            },
            "torch_dtype": str(dtype).replace("torch.", ""),
        }
    save_weights(sd, out, weights)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def make_tiny_xmodel(outdir: str | Path, factor: int = 4, projector_type: str = "xdpnet",
                     weights: str = "bin", dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A tiny Xmodel-VLM checkpoint (GQA LM, CLIP copy, XDP with ``factor`` tokens merged); returns its directory."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _tokenizer(out, seed)
    init = _Init(seed, dtype)
    n_kv = 2
    sd = lm_state_dict(init, n_kv, vocab, with_inv_freq=True)
    sd.update(clip_state_dict(init, "model.vision_tower.vision_tower.vision_model.", 336))
    sd.update(_mlp_projector(init, "model.mm_projector.mlp.0.", "model.mm_projector.mlp.2.", CLIP["hidden"] * factor))
    config = {
        "_name_or_path": "mvlm-tiny/Xmodel_VLM-tiny",
        "architectures": ["XmodelLMForCausalLM"],
        "model_type": "xmodelvlm",
        **_lm_keys(n_kv, vocab),
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).replace("torch.", ""),
        "image_aspect_ratio": "pad",
        "mm_hidden_size": CLIP["hidden"],
        "mm_projector_type": projector_type,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }  # no rms_norm_eps: XModelConfig's default (1e-5) applies
    save_weights(sd, out, weights)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
