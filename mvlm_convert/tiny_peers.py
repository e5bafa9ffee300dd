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


# --- Imp (imp-v1-3b layout: Phi-2 + SigLIP-384 + mlp2x_gelu) ------------------------------------------------------
IMP_LM = {"hidden": 128, "layers": 2, "heads": 4, "ffn": 512, "rotary": 0.4}
# SigLIP: 72-wide heads like so400m, image 384 / patch 14 -> 27x27 = 729 tokens; 3 layers as trained, 2 stored
# (Imp deletes the layers after mm_vision_select_layer = -2 before saving).
IMP_SIGLIP = {"hidden": 144, "heads": 2, "ffn": 240, "layers": 3, "image": 384, "patch": 14}
IMP_BPE_VOCAB = 400
IMP_EOT = "<|endoftext|>"


# Qwen's tokenizer.json pre-tokenizer: this Split regex (llama.cpp pre "qwen2") then ByteLevel without its own regex.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def train_bpe_tokenizer(out: Path, vocab_size: int = IMP_BPE_VOCAB, seed: int = 0, qwen: bool = False) -> int:
    """A GPT-2-style byte-level BPE tokenizer.json trained here (``tokenizers``), ``<|endoftext|>`` = id 0;
    ``qwen``: Qwen's pre-tokenizer (split regex, single digits) instead of GPT-2's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from mvlm_convert.tiny import _corpus

    tok = Tokenizer(models.BPE())
    if qwen:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[IMP_EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = _corpus(seed)
    if qwen:  # words glued to a leading bracket / quote / dot: one pre-token for Qwen, two for GPT-2's regex
        corpus = corpus + [".".join(line.split()[:6] * 4) for line in corpus[:40]]
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CodeGenTokenizer", "bos_token": IMP_EOT, "eos_token": IMP_EOT, "unk_token": IMP_EOT,
         "add_bos_token": False, "model_max_length": 2048}))
    return tok.get_vocab_size()


def _phi2_state_dict(init: _Init, vocab: int) -> dict[str, torch.Tensor]:
    d, f = IMP_LM["hidden"], IMP_LM["ffn"]
    sd = {"model.embed_tokens.weight": init.normal(vocab, d, std=0.5)}
    for i in range(IMP_LM["layers"]):
        p = f"model.layers.{i}."
        for proj, (o, n) in {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, d), "self_attn.v_proj": (d, d),
                             "self_attn.dense": (d, d), "mlp.fc1": (f, d), "mlp.fc2": (d, f)}.items():
            sd[f"{p}{proj}.weight"] = init.linear(o, n)
            sd[f"{p}{proj}.bias"] = init.normal(o, std=0.1)
        sd[p + "input_layernorm.weight"] = init.norm_weight(d)
        sd[p + "input_layernorm.bias"] = init.normal(d, std=0.1)
    sd["model.final_layernorm.weight"] = init.norm_weight(d)
    sd["model.final_layernorm.bias"] = init.normal(d, std=0.1)
    sd["lm_head.weight"] = init.linear(vocab, d)
    sd["lm_head.bias"] = init.normal(vocab, std=0.1)
    return sd


def _siglip_state_dict(init: _Init, prefix: str, n_layers: int) -> dict[str, torch.Tensor]:
    c, f, p = IMP_SIGLIP["hidden"], IMP_SIGLIP["ffn"], IMP_SIGLIP["patch"]
    n_pos = (IMP_SIGLIP["image"] // p) ** 2
    sd = {
        prefix + "embeddings.patch_embedding.weight": init.normal(c, 3, p, p, std=1.0 / (3 * p * p) ** 0.5),
        prefix + "embeddings.patch_embedding.bias": init.normal(c, std=0.1),
        prefix + "embeddings.position_embedding.weight": init.normal(n_pos, c, std=0.5),
    }
    for i in range(n_layers):
        q = f"{prefix}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[f"{q}self_attn.{proj}.weight"] = init.linear(c, c)
            sd[f"{q}self_attn.{proj}.bias"] = init.normal(c, std=0.1)
        for ln in ("layer_norm1", "layer_norm2"):
            sd[f"{q}{ln}.weight"] = init.norm_weight(c)
            sd[f"{q}{ln}.bias"] = init.normal(c, std=0.1)
        sd[q + "mlp.fc1.weight"] = init.linear(f, c)
        sd[q + "mlp.fc1.bias"] = init.normal(f, std=0.1)
        sd[q + "mlp.fc2.weight"] = init.linear(c, f)
        sd[q + "mlp.fc2.bias"] = init.normal(c, std=0.1)
    sd[prefix + "post_layernorm.weight"] = init.norm_weight(c)  # kept by Imp (only the head is dropped), unused
    sd[prefix + "post_layernorm.bias"] = init.normal(c, std=0.1)
    return sd


def make_tiny_imp(outdir: str | Path, weights: str = "safetensors", dtype: torch.dtype = torch.float16,
                  seed: int = 0, stored_layers: int | None = None, with_tower_config: bool = True) -> Path:
    """A tiny imp-v1-3b-layout checkpoint: PhiForCausalLM names + BPE tokenizer.json, SigLIP copy (no CLS, patch
    bias) cut after mm_vision_select_layer like Imp saves it (``stored_layers`` overrides), mlp2x_gelu projector."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    n_tok = train_bpe_tokenizer(out, seed=seed)
    vocab = (n_tok + 63) // 64 * 64  # padded like Phi-2's 51200 rows for 50295 tokens
    init = _Init(seed, dtype)
    sd = _phi2_state_dict(init, vocab)
    stored = IMP_SIGLIP["layers"] - 1 if stored_layers is None else stored_layers
    sd.update(_siglip_state_dict(init, "model.vision_tower.vision_tower.vision_model.", stored))
    sd.update(_mlp_projector_to(init, IMP_LM["hidden"], IMP_SIGLIP["hidden"]))
    config: dict[str, object] = {
        "_name_or_path": "mvlm-tiny/imp-v1-tiny",
        "architectures": ["ImpForCausalLM"],
        "model_type": "imp",
        "vocab_size": vocab,
        "hidden_size": IMP_LM["hidden"],
        "intermediate_size": IMP_LM["ffn"],
        "num_hidden_layers": IMP_LM["layers"],
        "num_attention_heads": IMP_LM["heads"],
        "num_key_value_heads": IMP_LM["heads"],
        "partial_rotary_factor": IMP_LM["rotary"],
        "rope_theta": 10000.0,
        "layer_norm_eps": 1e-5,
        "hidden_act": "gelu_new",
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": str(dtype).replace("torch.", ""),
        "image_aspect_ratio": "square",
        "image_token": "<image>",
        "mm_hidden_size": IMP_SIGLIP["hidden"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "google/siglip-so400m-patch14-384",
    }
    if with_tower_config:
        config["vision_tower_config"] = {
            "model_type": "siglip_vision_model",
            "hidden_size": IMP_SIGLIP["hidden"],
            "intermediate_size": IMP_SIGLIP["ffn"],
            "num_attention_heads": IMP_SIGLIP["heads"],
            "num_hidden_layers": IMP_SIGLIP["layers"],
            "image_size": IMP_SIGLIP["image"],
            "patch_size": IMP_SIGLIP["patch"],
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
        }
    save_weights(sd, out, weights)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _mlp_projector_to(init: _Init, d: int, d_in: int) -> dict[str, torch.Tensor]:
    return {
        "model.mm_projector.0.weight": init.linear(d, d_in),
        "model.mm_projector.0.bias": init.normal(d, std=0.1),
        "model.mm_projector.2.weight": init.linear(d, d),
        "model.mm_projector.2.bias": init.normal(d, std=0.1),
    }


# --- Imp-v1.5 (Qwen1.5-1.8B or Phi-3-mini LM + the same SigLIP-384 / mlp2x_gelu) -----------------------------------
IMP15_LMS = {"qwen2": ("ImpQwen2ForCausalLM", "imp_qwen2"), "phi3": ("ImpPhi3ForCausalLM", "imp_phi3")}
IMP15_KV = {"qwen2": 4, "phi3": 2}  # Qwen1.5 is MHA; the Phi-3 tiny uses GQA to pin the fused qkv row split
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"]


def _imp15_lm_state_dict(init: _Init, lm: str, vocab: int) -> dict[str, torch.Tensor]:
    d, f, h = IMP_LM["hidden"], IMP_LM["ffn"], IMP_LM["heads"]
    kv = IMP15_KV[lm] * (d // h)
    sd = {"model.embed_tokens.weight": init.normal(vocab, d, std=0.5)}
    for i in range(IMP_LM["layers"]):
        p = f"model.layers.{i}."
        if lm == "qwen2":
            for proj, rows in (("q_proj", d), ("k_proj", kv), ("v_proj", kv)):
                sd[f"{p}self_attn.{proj}.weight"] = init.linear(rows, d)
                sd[f"{p}self_attn.{proj}.bias"] = init.normal(rows, std=0.1)
            sd[p + "mlp.gate_proj.weight"] = init.linear(f, d)
            sd[p + "mlp.up_proj.weight"] = init.linear(f, d)
        else:
            sd[p + "self_attn.qkv_proj.weight"] = init.linear(d + 2 * kv, d)
            sd[p + "mlp.gate_up_proj.weight"] = init.linear(2 * f, d)
        sd[p + "self_attn.o_proj.weight"] = init.linear(d, d)
        sd[p + "mlp.down_proj.weight"] = init.linear(d, f)
        sd[p + "input_layernorm.weight"] = init.norm_weight(d)
        sd[p + "post_attention_layernorm.weight"] = init.norm_weight(d)
    sd["model.norm.weight"] = init.norm_weight(d)
    sd["lm_head.weight"] = init.linear(vocab, d)
    return sd


def _phi3_tokenizer(out: Path, seed: int) -> int:
    """SentencePiece (LLaMA-style) + Phi-3's added chat tokens right after it, as Phi-3-mini ships them."""
    import sentencepiece as spm

    from mvlm_convert.tiny import train_tokenizer

    train_tokenizer(out / "tokenizer.model", VOCAB_SIZE, seed)
    n_sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).vocab_size()
    (out / "added_tokens.json").write_text(json.dumps({t: n_sp + i for i, t in enumerate(PHI3_ADDED)}))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False, "bos_token": "<s>",
         "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>", "legacy": False}))
    return n_sp + len(PHI3_ADDED)


def make_tiny_imp15(outdir: str | Path, lm: str = "qwen2", weights: str = "safetensors",
                    dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """A tiny Imp-v1.5 checkpoint: ``lm`` = ``qwen2`` (Imp-v1.5-2B-Qwen1.5: Qwen2 names, q/k/v biases, Qwen BPE
    tokenizer.json, rope_theta 1e6) or ``phi3`` (Imp-v1.5-4B-Phi3: fused qkv_proj / gate_up_proj, SentencePiece +
    added chat tokens, 32064-style padded rows); SigLIP copy and projector as in make_tiny_imp."""
    if lm not in IMP15_LMS:
        raise ValueError(f"unknown Imp-v1.5 LM {lm!r}")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    if lm == "qwen2":
        n_tok = train_bpe_tokenizer(out, seed=seed, qwen=True)
        special: dict[str, object] = {"bos_token_id": 0, "eos_token_id": 0, "rope_theta": 1000000.0,
                                      "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
                                      "use_sliding_window": False, "sliding_window": 32768}
    else:
        n_tok = _phi3_tokenizer(out, seed)
        special = {"bos_token_id": 1, "eos_token_id": n_tok - len(PHI3_ADDED), "rope_theta": 10000.0,
                   "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
                   "sliding_window": 2047, "rope_scaling": None, "partial_rotary_factor": 1.0}
    vocab = (n_tok + 63) // 64 * 64
    init = _Init(seed, dtype)
    sd = _imp15_lm_state_dict(init, lm, vocab)
    sd.update(_siglip_state_dict(init, "model.vision_tower.vision_tower.vision_model.", IMP_SIGLIP["layers"] - 1))
    sd.update(_mlp_projector_to(init, IMP_LM["hidden"], IMP_SIGLIP["hidden"]))
    arch, mtype = IMP15_LMS[lm]
    config: dict[str, object] = {
        "_name_or_path": f"mvlm-tiny/imp-v1.5-tiny-{lm}",
        "architectures": [arch],
        "model_type": mtype,
        "vocab_size": vocab,
        "hidden_size": IMP_LM["hidden"],
        "intermediate_size": IMP_LM["ffn"],
        "num_hidden_layers": IMP_LM["layers"],
        "num_attention_heads": IMP_LM["heads"],
        "num_key_value_heads": IMP15_KV[lm],
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        **special,
        "torch_dtype": str(dtype).replace("torch.", ""),
        "image_aspect_ratio": "square",
        "mm_hidden_size": IMP_SIGLIP["hidden"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "vision_tower_config": {
            "model_type": "siglip_vision_model", "hidden_size": IMP_SIGLIP["hidden"],
            "intermediate_size": IMP_SIGLIP["ffn"], "num_attention_heads": IMP_SIGLIP["heads"],
            "num_hidden_layers": IMP_SIGLIP["layers"], "image_size": IMP_SIGLIP["image"],
            "patch_size": IMP_SIGLIP["patch"], "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
        },
    }
    save_weights(sd, out, weights)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
