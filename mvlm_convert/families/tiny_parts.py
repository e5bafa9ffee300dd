"""What the families' tiny test checkpoints share: sizes, a trained SentencePiece tokenizer, deterministic random
tensors, the LLaMA LM and CLIP / SigLIP tower tensors under their HF names, and writing a release layout.

Each family's ``tiny_checkpoint`` (in its module under ``mvlm_convert/families/``) builds its own config and
projector from these; ``python -m mvlm_convert.tiny`` is the command-line front of MobileVLM's.

Sizes: LM hidden 128, 2 layers, 4 heads, ffn 352, vocab = tokenizer size (384). CLIP: hidden 128, 2 heads (OpenAI
CLIP's 64-wide heads, so the head count is also recoverable from the weights alone), 3 layers, ffn 320, image 336,
patch 14 -> the 24x24 grid LDP needs. Weights are random but deterministic by seed and scaled so activations stay
O(1). The tokenizer is LLaMA-style (BPE, byte fallback, ids unk/bos/eos = 0/1/2), trained on the spot.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mvlm_convert.mmproj_gguf import CLIP_MEAN, CLIP_STD
from mvlm_core.conversation import SYSTEM

LM = {"hidden": 128, "layers": 2, "heads": 4, "ffn": 352}
CLIP = {"hidden": 128, "layers": 3, "heads": 2, "ffn": 320, "patch": 14, "projection_dim": 64}
VOCAB_SIZE = 384
LAYOUTS = ("bin", "safetensors", "sharded-bin", "sharded-safetensors")
_CORPUS_WORDS = (
    "the a an is are was were be been picture image photo what where who how why which there here this that "
    "cat dog bird car tree house street people person man woman child table chair window door sky cloud sun "
    "red green blue white black yellow small large big little old new building website steps step simple done "
    "can could would should will may might have has had do does did make made see seen look looking show shows "
    "USER ASSISTANT chat between curious user artificial intelligence assistant gives helpful detailed polite "
    "answers questions question answer describe description hello world mobile vision language model"
).split()
SP_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}


def corpus(seed: int) -> list[str]:
    """The tokenizers' training text: MobileVLM's system prompt, a chat turn, and seeded random sentences."""
    g = torch.Generator().manual_seed(seed + 1234)
    lines = [SYSTEM, "USER: What is in the picture? ASSISTANT: A cat on a table.</s>"]
    lines.append("Building a website can be done in 10 simple steps:\nStep 1: Choose a domain name.")
    for _ in range(600):
        n = int(torch.randint(4, 14, (1,), generator=g))
        idx = torch.randint(0, len(_CORPUS_WORDS), (n,), generator=g).tolist()
        words = [_CORPUS_WORDS[i] for i in idx]
        if int(torch.randint(0, 4, (1,), generator=g)) == 0:
            words.append(str(int(torch.randint(0, 1000, (1,), generator=g))))
        lines.append(" ".join(words).capitalize() + ".")
    return lines


def train_tokenizer(path: Path, vocab_size: int = VOCAB_SIZE, seed: int = 0) -> None:
    """Train a LLaMA-style SentencePiece model (BPE, byte_fallback, unk/bos/eos = 0/1/2) and write it to ``path``."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(seed)), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # LLaMA's ids
        split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, character_coverage=1.0, num_threads=1, hard_vocab_limit=True, minloglevel=2,
    )
    path.write_bytes(buf.getvalue())


def sentencepiece_vocab(out: Path, seed: int) -> int:
    """Train ``out/tokenizer.model``; returns its size."""
    import sentencepiece as spm

    train_tokenizer(out / "tokenizer.model", VOCAB_SIZE, seed)
    return spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).vocab_size()


def write_sentencepiece_config(out: Path, indent: int | None = None, **extra: Any) -> None:
    """``special_tokens_map.json`` and ``tokenizer_config.json`` of a LLaMA tokenizer (BOS added, no EOS) + ``extra``."""
    (out / "special_tokens_map.json").write_text(json.dumps(SP_SPECIAL_TOKENS))
    cfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           **extra}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=indent))


class Init:
    """Deterministic random tensors with sane scales."""

    def __init__(self, seed: int, dtype: torch.dtype):
        self.g = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def normal(self, *shape: int, std: float = 0.05) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.g) * std).to(self.dtype)

    def norm_weight(self, n: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(n, generator=self.g)).to(self.dtype)

    def linear(self, out_f: int, in_f: int) -> torch.Tensor:
        return self.normal(out_f, in_f, std=1.0 / in_f**0.5)

    def linear_bias(self, sd: dict[str, torch.Tensor], prefix: str, out_f: int, in_f: int) -> None:
        """``prefix`` + weight and bias of a Linear (in this order of draws)."""
        sd[prefix + "weight"] = self.linear(out_f, in_f)
        sd[prefix + "bias"] = self.normal(out_f, std=0.1)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def rms_lm_state_dict(init: Init, d: int, n_layers: int, vocab: int,
                      layer: Callable[[str], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A LLaMA-shaped LM (embeddings, per layer ``layer(prefix)``'s attention and MLP tensors then the two RMSNorms,
    final norm, untied output head) under transformers' names."""
    sd = {"model.embed_tokens.weight": init.normal(vocab, d, std=0.5)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sd.update(layer(p))
        sd[p + "input_layernorm.weight"] = init.norm_weight(d)
        sd[p + "post_attention_layernorm.weight"] = init.norm_weight(d)
    sd["model.norm.weight"] = init.norm_weight(d)
    sd["lm_head.weight"] = init.linear(vocab, d)
    return sd


def lm_state_dict(init: Init, n_kv: int, vocab: int, with_inv_freq: bool) -> dict[str, torch.Tensor]:
    """The tiny LLaMA LM (MobileLLaMA, LLaVA's Vicuna, Xmodel's LM); ``with_inv_freq``: the rotary buffers too."""
    d, f, h = LM["hidden"], LM["ffn"], LM["heads"]
    hd = d // h

    def layer(p: str) -> dict[str, torch.Tensor]:
        sd = {p + "self_attn.q_proj.weight": init.linear(h * hd, d)}
        sd[p + "self_attn.k_proj.weight"] = init.linear(n_kv * hd, d)
        sd[p + "self_attn.v_proj.weight"] = init.linear(n_kv * hd, d)
        sd[p + "self_attn.o_proj.weight"] = init.linear(d, h * hd)
        if with_inv_freq:
            sd[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        sd[p + "mlp.gate_proj.weight"] = init.linear(f, d)
        sd[p + "mlp.up_proj.weight"] = init.linear(f, d)
        sd[p + "mlp.down_proj.weight"] = init.linear(d, f)
        return sd

    return rms_lm_state_dict(init, d, LM["layers"], vocab, layer)


def encoder_layers(init: Init, prefix: str, n_layers: int, c: int, f: int, norms_first: bool) -> dict[str, torch.Tensor]:
    """A CLIP / SigLIP encoder's layers (``norms_first``: SigLIP's draw order, both LayerNorms before the MLP)."""
    sd: dict[str, torch.Tensor] = {}

    def norm(name: str) -> None:
        sd[name + "weight"] = init.norm_weight(c)
        sd[name + "bias"] = init.normal(c, std=0.1)

    for i in range(n_layers):
        q = f"{prefix}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            init.linear_bias(sd, f"{q}self_attn.{proj}.", c, c)
        norm(q + "layer_norm1.")
        if norms_first:
            norm(q + "layer_norm2.")
        init.linear_bias(sd, q + "mlp.fc1.", f, c)
        init.linear_bias(sd, q + "mlp.fc2.", c, f)
        if not norms_first:
            norm(q + "layer_norm2.")
    sd[prefix + "post_layernorm.weight"] = init.norm_weight(c)  # Imp keeps it too (only the head is dropped), unused
    sd[prefix + "post_layernorm.bias"] = init.normal(c, std=0.1)
    return sd


def clip_state_dict(init: Init, prefix: str, image_size: int, dims: dict[str, int] = CLIP) -> dict[str, torch.Tensor]:
    """A CLIP vision tower (class embedding, pre-layernorm) under ``prefix``."""
    c, f, p = dims["hidden"], dims["ffn"], dims["patch"]
    n_pos = (image_size // p) ** 2 + 1
    sd = {
        prefix + "embeddings.class_embedding": init.normal(c, std=0.5),
        prefix + "embeddings.patch_embedding.weight": init.normal(c, 3, p, p, std=1.0 / (3 * p * p) ** 0.5),
        prefix + "embeddings.position_embedding.weight": init.normal(n_pos, c, std=0.5),
        prefix + "pre_layrnorm.weight": init.norm_weight(c),
        prefix + "pre_layrnorm.bias": init.normal(c, std=0.1),
    }
    sd.update(encoder_layers(init, prefix, dims["layers"], c, f, norms_first=False))
    return sd


def siglip_state_dict(init: Init, prefix: str, dims: dict[str, int], n_layers: int) -> dict[str, torch.Tensor]:
    """A SigLIP vision tower (no class embedding, patch-embedding bias, no pre-layernorm) with ``n_layers`` stored."""
    c, f, p = dims["hidden"], dims["ffn"], dims["patch"]
    n_pos = (dims["image"] // p) ** 2
    sd = {prefix + "embeddings.patch_embedding.weight": init.normal(c, 3, p, p, std=1.0 / (3 * p * p) ** 0.5)}
    sd[prefix + "embeddings.patch_embedding.bias"] = init.normal(c, std=0.1)
    sd[prefix + "embeddings.position_embedding.weight"] = init.normal(n_pos, c, std=0.5)
    sd.update(encoder_layers(init, prefix, n_layers, c, f, norms_first=True))
    return sd


def mlp_projector(init: Init, prefix_0: str, prefix_2: str, d_in: int, d: int = LM["hidden"]) -> dict[str, torch.Tensor]:
    """A two-Linear projector ``d_in`` -> ``d`` -> ``d`` (LLaVA's mlp2x_gelu, Xmodel's XDP, Imp's)."""
    sd: dict[str, torch.Tensor] = {}
    init.linear_bias(sd, prefix_0, d, d_in)
    init.linear_bias(sd, prefix_2, d, d)
    return sd


def save_weights(sd: dict[str, torch.Tensor], outdir: Path, layout: str) -> None:
    """Write a state dict the way HF does: single .bin / .safetensors, or two shards plus an index."""
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in sd.items()}
    if layout == "bin":
        torch.save(sd, outdir / "pytorch_model.bin")
        return
    if layout == "safetensors":
        save_file(sd, str(outdir / "model.safetensors"), metadata={"format": "pt"})
        return
    if layout not in ("sharded-bin", "sharded-safetensors"):
        raise ValueError(f"unknown layout {layout!r}")
    names = list(sd)
    half = len(names) // 2
    shards = [names[:half], names[half:]]
    ext = "bin" if layout == "sharded-bin" else "safetensors"
    stem = "pytorch_model" if ext == "bin" else "model"
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        fname = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
        part = {k: sd[k] for k in shard}
        if ext == "bin":
            torch.save(part, outdir / fname)
        else:
            save_file(part, str(outdir / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (outdir / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))


def write_release(out: Path, sd: dict[str, torch.Tensor], layout: str, config: dict[str, Any]) -> Path:
    """The weights in ``layout`` and ``config.json``, as a release on the HF hub has them; returns ``out``."""
    save_weights(sd, out, layout)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def write_clip_dir(clip_dir: Path, seed: int, image_size: int, dims: dict[str, int] = CLIP) -> None:
    """A CLIPVisionModel directory as HF writes it (config, preprocessor config, f32 weights with position_ids)."""
    clip_dir.mkdir(parents=True, exist_ok=True)
    init = Init(seed + 7, torch.float32)
    sd = clip_state_dict(init, "vision_model.", image_size, dims)
    n_pos = (image_size // dims["patch"]) ** 2 + 1
    sd["vision_model.embeddings.position_ids"] = torch.arange(n_pos).unsqueeze(0)
    torch.save(sd, clip_dir / "pytorch_model.bin")
    cfg = {
        "_name_or_path": "tiny-clip-vit-patch14-336",
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        **clip_config(dims, image_size),
        "num_channels": 3,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": dims["projection_dim"],
        "attention_dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }
    (clip_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    pp = {
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": image_size},
    }
    (clip_dir / "preprocessor_config.json").write_text(json.dumps(pp, indent=2))


def clip_config(dims: dict[str, int], image_size: int) -> dict[str, int]:
    """A vision tower's size keys as transformers' CLIP / SigLIP configs name them."""
    return {"hidden_size": dims["hidden"], "intermediate_size": dims["ffn"], "num_attention_heads": dims["heads"],
            "num_hidden_layers": dims["layers"], "image_size": image_size, "patch_size": dims["patch"]}


def llama_tokenizer(out: Path, seed: int) -> int:
    """The SentencePiece tokenizer files of a LLaMA-based release (LLaVA, Xmodel); returns the vocab size."""
    vocab = sentencepiece_vocab(out, seed)
    write_sentencepiece_config(out, tokenizer_class="LlamaTokenizer", legacy=False)
    return vocab


def llama_config_keys(n_kv: int, vocab: int) -> dict[str, object]:
    """The tiny LLaMA LM's size keys as LlamaConfig names them."""
    return {
        "hidden_size": LM["hidden"],
        "intermediate_size": LM["ffn"],
        "num_attention_heads": LM["heads"],
        "num_hidden_layers": LM["layers"],
        "num_key_value_heads": n_kv,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
    }
