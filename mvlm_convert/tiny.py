"""Tiny MobileVLM-architecture checkpoints with real key names and file layouts, for tests and ``make demo``.

They reproduce what matters to a converter: ``config.json`` keys and values as MobileVLM releases them (including
the 3B lit-gpt leftovers on request), weights under the real HF names (LM, ``model.mm_projector.*``, V2's CLIP copy
under ``model.vision_tower.vision_tower.vision_model.*``, V1's separate CLIPVisionModel directory), the four file
layouts, and a LLaMA-style SentencePiece ``tokenizer.model`` trained on the spot (BPE, byte fallback, ids
unk/bos/eos = 0/1/2). Weights are random but deterministic by seed and scaled so activations stay O(1).

Sizes: LM hidden 128, 2 layers, 4 heads (2 KV heads with ``gqa=True``), ffn 352, vocab = tokenizer size (384).
CLIP: hidden 128, 2 heads (OpenAI CLIP's 64-wide heads, so head count is also recoverable from the weights alone),
3 layers, ffn 320, image 336, patch 14 -> the 24x24 grid LDP needs.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import torch

from mvlm_convert.mmproj_gguf import CLIP_MEAN, CLIP_STD
from mvlm_core.conversation import SYSTEM

LM = {"hidden": 128, "layers": 2, "heads": 4, "ffn": 352}
CLIP = {"hidden": 128, "layers": 3, "heads": 2, "ffn": 320, "patch": 14, "projection_dim": 64}
VOCAB_SIZE = 384
_CORPUS_WORDS = (
    "the a an is are was were be been picture image photo what where who how why which there here this that "
    "cat dog bird car tree house street people person man woman child table chair window door sky cloud sun "
    "red green blue white black yellow small large big little old new building website steps step simple done "
    "can could would should will may might have has had do does did make made see seen look looking show shows "
    "USER ASSISTANT chat between curious user artificial intelligence assistant gives helpful detailed polite "
    "answers questions question answer describe description hello world mobile vision language model"
).split()


def _corpus(seed: int) -> list[str]:
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
        sentence_iterator=iter(_corpus(seed)),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        num_threads=1,
        hard_vocab_limit=True,
        minloglevel=2,
    )
    path.write_bytes(buf.getvalue())


class _Init:
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


def _make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's _make_divisible, which sizes MobileNetV3's squeeze-excite (S for LDP's block.1)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def lm_state_dict(init: _Init, n_kv: int, vocab: int, with_inv_freq: bool) -> dict[str, torch.Tensor]:
    d, f, h = LM["hidden"], LM["ffn"], LM["heads"]
    hd = d // h
    sd = {"model.embed_tokens.weight": init.normal(vocab, d, std=0.5)}
    for i in range(LM["layers"]):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = init.linear(h * hd, d)
        sd[p + "self_attn.k_proj.weight"] = init.linear(n_kv * hd, d)
        sd[p + "self_attn.v_proj.weight"] = init.linear(n_kv * hd, d)
        sd[p + "self_attn.o_proj.weight"] = init.linear(d, h * hd)
        if with_inv_freq:
            sd[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        sd[p + "mlp.gate_proj.weight"] = init.linear(f, d)
        sd[p + "mlp.up_proj.weight"] = init.linear(f, d)
        sd[p + "mlp.down_proj.weight"] = init.linear(d, f)
        sd[p + "input_layernorm.weight"] = init.norm_weight(d)
        sd[p + "post_attention_layernorm.weight"] = init.norm_weight(d)
    sd["model.norm.weight"] = init.norm_weight(d)
    sd["lm_head.weight"] = init.linear(vocab, d)
    return sd


def clip_state_dict(init: _Init, prefix: str, image_size: int) -> dict[str, torch.Tensor]:
    c, f, p = CLIP["hidden"], CLIP["ffn"], CLIP["patch"]
    n_pos = (image_size // p) ** 2 + 1
    sd = {
        prefix + "embeddings.class_embedding": init.normal(c, std=0.5),
        prefix + "embeddings.patch_embedding.weight": init.normal(c, 3, p, p, std=1.0 / (3 * p * p) ** 0.5),
        prefix + "embeddings.position_embedding.weight": init.normal(n_pos, c, std=0.5),
        prefix + "pre_layrnorm.weight": init.norm_weight(c),
        prefix + "pre_layrnorm.bias": init.normal(c, std=0.1),
    }
    for i in range(CLIP["layers"]):
        q = f"{prefix}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[f"{q}self_attn.{proj}.weight"] = init.linear(c, c)
            sd[f"{q}self_attn.{proj}.bias"] = init.normal(c, std=0.1)
        sd[q + "layer_norm1.weight"] = init.norm_weight(c)
        sd[q + "layer_norm1.bias"] = init.normal(c, std=0.1)
        sd[q + "mlp.fc1.weight"] = init.linear(f, c)
        sd[q + "mlp.fc1.bias"] = init.normal(f, std=0.1)
        sd[q + "mlp.fc2.weight"] = init.linear(c, f)
        sd[q + "mlp.fc2.bias"] = init.normal(c, std=0.1)
        sd[q + "layer_norm2.weight"] = init.norm_weight(c)
        sd[q + "layer_norm2.bias"] = init.normal(c, std=0.1)
    sd[prefix + "post_layernorm.weight"] = init.norm_weight(c)
    sd[prefix + "post_layernorm.bias"] = init.normal(c, std=0.1)
    return sd


def projector_state_dict(init: _Init, variant: str) -> dict[str, torch.Tensor]:
    c, d = CLIP["hidden"], LM["hidden"]
    sd: dict[str, torch.Tensor] = {}
    if variant == "v2":
        p = "model.mm_projector."
        sd[p + "mlp.mlp.0.weight"] = init.linear(d, c)
        sd[p + "mlp.mlp.0.bias"] = init.normal(d, std=0.1)
        sd[p + "mlp.mlp.2.weight"] = init.linear(d, d)
        sd[p + "mlp.mlp.2.bias"] = init.normal(d, std=0.1)
        sd[p + "peg.peg.0.weight"] = init.normal(d, 1, 3, 3, std=1.0 / 3)
        sd[p + "peg.peg.0.bias"] = init.normal(d, std=0.1)
        return sd
    s = _make_divisible(d // 4, 8)
    p = "model.mm_projector.model."
    sd[p + "mlp.1.weight"] = init.linear(d, c)
    sd[p + "mlp.1.bias"] = init.normal(d, std=0.1)
    sd[p + "mlp.3.weight"] = init.linear(d, d)
    sd[p + "mlp.3.bias"] = init.normal(d, std=0.1)
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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


def write_clip_dir(clip_dir: Path, seed: int, image_size: int) -> None:
    """A CLIPVisionModel directory as HF writes it (config, preprocessor config, f32 weights with position_ids)."""
    clip_dir.mkdir(parents=True, exist_ok=True)
    init = _Init(seed + 7, torch.float32)
    sd = clip_state_dict(init, "vision_model.", image_size)
    n_pos = (image_size // CLIP["patch"]) ** 2 + 1
    sd["vision_model.embeddings.position_ids"] = torch.arange(n_pos).unsqueeze(0)
    torch.save(sd, clip_dir / "pytorch_model.bin")
    cfg = {
        "_name_or_path": "tiny-clip-vit-patch14-336",
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": CLIP["hidden"],
        "intermediate_size": CLIP["ffn"],
        "num_attention_heads": CLIP["heads"],
        "num_hidden_layers": CLIP["layers"],
        "image_size": image_size,
        "patch_size": CLIP["patch"],
        "num_channels": 3,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": CLIP["projection_dim"],
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
    if variant not in ("v1", "v2", "mobilellama"):
        raise ValueError(f"unknown variant {variant!r}")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out / "tokenizer.model", VOCAB_SIZE, seed)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).vocab_size()

    n_kv = 2 if gqa else LM["heads"]
    init = _Init(seed, dtype)
    sd = lm_state_dict(init, n_kv, vocab, with_inv_freq=variant == "v1")
    name = {"v1": "MobileVLM-Tiny", "v2": "MobileVLM_V2-Tiny", "mobilellama": "MobileLLaMA-Tiny"}[variant]
    config: dict[str, object] = {
        "_name_or_path": f"mvlm-tiny/{name}",
        "architectures": ["MobileLlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": LM["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": LM["ffn"],
        "max_position_embeddings": 2048,
        "model_type": "mobilevlm",
        "num_attention_heads": LM["heads"],
        "num_hidden_layers": LM["layers"],
        "num_key_value_heads": n_kv,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": _dtype_name(dtype),
        "transformers_version": "4.33.1",
        "use_cache": True,
        "vocab_size": vocab,
    }
    if variant == "mobilellama":
        config["architectures"] = ["LlamaForCausalLM"]
        config["model_type"] = "llama"
    else:
        sd.update(projector_state_dict(init, variant))
        cdir = Path(clip_dir) if clip_dir is not None else None
        if variant == "v1" and cdir is None:
            cdir = out / "clip-vit-tiny-patch14-336"
        if variant == "v2":
            sd.update(clip_state_dict(init, "model.vision_tower.vision_tower.vision_model.", image_size))
        if cdir is not None:
            write_clip_dir(cdir, seed, image_size)
        config.update(
            {
                "freeze_mm_mlp_adapter": False,
                "image_aspect_ratio": "pad",
                "mm_hidden_size": CLIP["hidden"],
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
        # MobileVLM-3B / MobileLLaMA-2.7B configs: lit-gpt leftovers that disagree with the HF keys.
        config.update(
            {
                "n_head": LM["heads"] // 2,
                "n_query_groups": LM["heads"] // 2,
                "n_embd": LM["hidden"] // 2,
                "n_layer": LM["layers"] + 1,
                "block_size": 2048,
                "padded_vocab_size": 32000,
                "norm_class": "RMSNorm",
                "_mlp_class": "LLaMAMLP",
                "rotary_percentage": 1.0,
                "parallel_residual": False,
                "bias": False,
            }
        )
    save_weights(sd, out, layout)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "transformers_version": "4.33.1"})
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"})
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<unk>",
                "clean_up_tokenization_spaces": False,
                "legacy": False,
                "model_max_length": 2048,
                "padding_side": "right",
                "sp_model_kwargs": {},
                "tokenizer_class": "LlamaTokenizer",
                "use_fast": False,
            },
            indent=2,
        )
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write a tiny MobileVLM-architecture checkpoint (random weights).")
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--variant", choices=["v2", "v1", "mobilellama"], default="v2")
    ap.add_argument("--layout", choices=["bin", "safetensors", "sharded-bin", "sharded-safetensors"], default="bin")
    ap.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gqa", action="store_true", help="2 key/value heads instead of 4")
    ap.add_argument("--trap-3b", action="store_true", help="add the stale lit-gpt keys of the 3B configs")
    ap.add_argument("--clip-dir", type=Path, default=None, help="where to write the separate CLIP directory")
    args = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    path = make_tiny_checkpoint(
        args.outdir,
        variant=args.variant,
        layout=args.layout,
        dtype=dtype,
        seed=args.seed,
        trap_3b=args.trap_3b,
        clip_dir=args.clip_dir,
        gqa=args.gqa,
    )
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
