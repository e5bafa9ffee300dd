"""Imp (MILVLG): imp-v1-3b = Phi-2 + SigLIP-so400m-patch14-384 (27x27 = 729 tokens) + ``mlp2x_gelu``.

Facts (MILVLG/imp code: imp_llava/model/multimodal_encoder/clip_encoder.py, image_processing_imp.py; the HF
release's config keys; the pinned llama.cpp tools/mtmd):
- config: ``ImpForCausalLM`` / ``model_type: imp``, PhiConfig keys (``partial_rotary_factor`` 0.4,
  ``layer_norm_eps``), ``mm_projector_type: mlp2x_gelu``, ``mm_vision_tower: google/siglip-so400m-patch14-384``,
  ``mm_vision_select_layer: -2``, ``mm_hidden_size`` 1152; optionally ``vision_tower_config`` (SiglipVisionConfig).
- LM: transformers' PhiForCausalLM names (see mvlm_convert.lm.phi2) -> llama.cpp arch ``phi2``.
- vision: SigLIP copy under ``model.vision_tower.vision_tower.vision_model.*``: patch conv *with* bias, no class
  embedding, no pre-layernorm, ``gelu_pytorch_tanh``, LayerNorm eps 1e-6, heads of 72 (so400m: 1152 / 16). Imp
  deletes the encoder layers after ``mm_vision_select_layer`` and the pooling head before saving, then takes the
  last remaining hidden state (no post-LN): with -2, layers 0..n_full-2 run. The file may therefore hold
  n_full - 1 layers; the layers to run are counted from the tower's full depth (``vision_tower_config`` or a
  ``--vision-tower`` SigLIP directory), and with neither at hand the stored copy is taken as already cut.
- projector ``model.mm_projector.{0,2}`` = LLaVA's ``mlp`` (mm.0 / mm.2), GELU between (ggml: tanh form).
- prompt: LLaVA's v1 conversation with Phi-2's EOS as sep2; the LM GGUF gets that chat template
  (:data:`V1_CHAT_TEMPLATE`) unless tokenizer_config.json brings one.
- image: ImpImageProcessor squashes to 384x384 (bicubic, no aspect padding), mean = std = 0.5.
Imp-v1.5: same SigLIP / projector / preprocessing; the LM is Qwen1.5-1.8B (``ImpQwen2ForCausalLM`` / ``imp_qwen2``,
transformers Qwen2 names -> arch ``qwen2``, mvlm_convert.lm.qwen2) or Phi-3-mini (``ImpPhi3ForCausalLM`` /
``imp_phi3``, fused qkv / gate_up -> arch ``phi3``, mvlm_convert.lm.phi3). Imp-v1.5-3B-Phi2 is ``imp`` (v1 path).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import torch

from mvlm_convert.checkpoint import Checkpoint, open_checkpoint
from mvlm_convert.families import tiny_parts as tp
from mvlm_convert.families.base import Family, ProjTensor, Variant, register
from mvlm_convert.families.llava import mlp_forward, mlp_tensors
from mvlm_core.conversation import chat_template
from mvlm_core.errors import MvlmError

ARCHS = {"ImpForCausalLM", "ImpQwen2ForCausalLM", "ImpPhi3ForCausalLM"}
MODEL_TYPES = {"imp", "imp_qwen2", "imp_phi3"}
V1_ARCH, V1_TYPE = "ImpForCausalLM", "imp"
# variant -> (architecture, model_type, "module:function" of its LM writer)
LM_WRITERS = {
    "v1": (V1_ARCH, V1_TYPE, "mvlm_convert.lm.phi2:prepare_phi2_gguf"),
    "v1.5-qwen2": ("ImpQwen2ForCausalLM", "imp_qwen2", "mvlm_convert.lm.qwen2:prepare_qwen2_gguf"),
    "v1.5-phi3": ("ImpPhi3ForCausalLM", "imp_phi3", "mvlm_convert.lm.phi3:prepare_phi3_gguf"),
}
PHI2_EOS = "<|endoftext|>"
# Imp v1 (imp-v1-3b, Imp-v1.5-3B-196: Phi-2) is trained with LLaVA's v1 conversation and Phi-2's EOS as sep2:
# "{system} USER: <image>\n{q} ASSISTANT: {a}<|endoftext|>USER: ...". Written when tokenizer_config.json has none
# (the Imp releases ship none); Imp-v1.5 Qwen1.5 / Phi-3 keep the checkpoint's own (their own conversations).
V1_CHAT_TEMPLATE = chat_template(sep2=PHI2_EOS)
SIGLIP_PREFIX = "model.vision_tower.vision_tower.vision_model."
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]
SIGLIP_EPS = 1e-6
SO400M_HEAD_DIM = 72  # so400m: 1152 / 16; the base/large SigLIPs use 64-wide heads


def variant(config: dict[str, Any]) -> str | None:
    """``v1`` (Phi-2), ``v1.5-qwen2`` or ``v1.5-phi3`` from the architecture, else the model type; None if neither."""
    archs = set(config.get("architectures") or [])
    for name, (arch, _t, _) in LM_WRITERS.items():
        if arch in archs:
            return name
    return next((name for name, (_, mtype, _) in LM_WRITERS.items() if config.get("model_type") == mtype), None)


def siglip_heads(width: int) -> int | None:
    """Head count from the width alone (no config at hand): so400m's 72-wide heads, else the usual 64."""
    for head_dim in (SO400M_HEAD_DIM, 64):
        if width % head_dim == 0:
            return width // head_dim
    return None


def _siglip_config(ckpt: Checkpoint, tower_dir: Path | None) -> dict[str, Any]:
    if tower_dir is not None:
        try:
            raw = json.loads((tower_dir / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise MvlmError(f"--vision-tower {tower_dir}: cannot read config.json ({e})") from e
        if not isinstance(raw, dict):
            raise MvlmError(f"--vision-tower {tower_dir}: config.json is not a JSON object")
        return raw.get("vision_config", raw) if isinstance(raw.get("vision_config"), dict) else raw
    vtc = ckpt.config.get("vision_tower_config")
    if isinstance(vtc, dict):
        return vtc.get("vision_config", vtc) if isinstance(vtc.get("vision_config"), dict) else vtc
    return {}


def resolve_siglip(ckpt: Checkpoint, vision_tower: Path | None):
    """The SigLIP tower as a ClipSource: the checkpoint copy, or ``--vision-tower`` (a SigLIP HF directory)."""
    from mvlm_convert.mmproj_gguf import VISION_ACTS, read_tower, vision_select_layer

    if vision_tower is not None:
        if not (vision_tower / "config.json").is_file():
            raise MvlmError(f"--vision-tower {vision_tower}: no config.json; give a local SigLIP (HF) directory")
        reader, prefix, origin = open_checkpoint(vision_tower), "vision_model.", str(vision_tower)
    else:
        reader, prefix, origin = ckpt, SIGLIP_PREFIX, "checkpoint copy (model.vision_tower.*)"
    if f"{prefix}embeddings.patch_embedding.weight" not in reader:
        raise MvlmError(
            f"no SigLIP tower: {origin} has no {prefix}* tensors; pass --vision-tower DIR "
            "(a download of google/siglip-so400m-patch14-384)"
        )
    if f"{prefix}embeddings.class_embedding" in reader:
        raise MvlmError(f"{origin}: the vision tower has a class embedding; Imp's SigLIP tower has none")
    cfg = _siglip_config(ckpt, vision_tower)
    cfg_name = f"{vision_tower / 'config.json'}" if vision_tower is not None else "config.json vision_tower_config"
    tw = read_tower(reader, prefix, origin, cfg, "SigLIP vision tower", cfg_name, layers_in_config=False)
    hidden, p, n_pos, n_layer, f = tw.hidden, tw.patch, tw.n_pos, tw.n_layer, tw.fields
    grid = round(n_pos**0.5)
    if grid * grid != n_pos:
        raise MvlmError(f"{origin}: {n_pos} position embeddings are not a square patch grid (SigLIP has no CLS)")
    heads = f.int("num_attention_heads", default=None) or siglip_heads(hidden)
    if not heads:
        raise MvlmError(f"{origin}: cannot tell the SigLIP head count from the weights (width {hidden}); add "
                        "vision_tower_config to config.json or pass --vision-tower DIR")
    image_size = f.int("image_size", default=grid * p)
    patch_size = f.int("patch_size", default=p)
    if image_size // p != grid or patch_size != p:  # 384 // 14 = 27: the conv drops 6 px
        raise MvlmError(f"{origin}: SigLIP config (image {image_size}, patch {patch_size}) does not match "
                        f"its weights ({n_pos} positions, {p}x{p} patches)")
    full = f.int("num_hidden_layers", default=0, minimum=0)
    if vision_tower is None and not full:
        # Imp saves the tower already cut at mm_vision_select_layer: everything stored runs.
        select = vision_select_layer(ckpt.config)
        full = n_layer - 1 - select if select < 0 else 0
    if full and full < n_layer:
        raise MvlmError(f"{origin}: {n_layer} encoder layers stored but the SigLIP config says {full}")
    if hidden % int(heads):
        raise MvlmError(f"{cfg_name}: num_attention_heads = {heads} does not divide the SigLIP width {hidden} ({origin}); "
                        "fix num_attention_heads")
    eps = f.number("layer_norm_eps", default=SIGLIP_EPS, maximum=1.0)
    act = f.text("hidden_act", "gelu_pytorch_tanh", allowed=VISION_ACTS)
    return tw.source(n_head=int(heads), image_size=image_size, patch_size=p, eps=eps, hidden_act=act, projection_dim=0,
                     image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD), siglip=True, n_layer_full=full)


@register
class Imp(Family):
    name = "imp"
    architectures = ARCHS
    model_types = MODEL_TYPES
    projectors: dict[str, str] = {}  # mlp2x_gelu is LLaVA's entry; Imp is told apart by architecture / model_type

    def matches(self, config: dict[str, Any]) -> bool:
        return bool(set(config.get("architectures") or []) & ARCHS) or config.get("model_type") in MODEL_TYPES

    def describe(self, config: dict[str, Any]) -> Variant:
        archs = ",".join(config.get("architectures") or []) or config.get("model_type")
        var = variant(config)
        if var is None:
            raise MvlmError(f"Imp ({archs}, model_type {config.get('model_type')!r}) is recognised but its language "
                            f"model has no writer in mvlm convert; supported: {', '.join(sorted(MODEL_TYPES))}")
        proj = str(config.get("mm_projector_type", "mlp2x_gelu"))
        if proj != "mlp2x_gelu":
            raise MvlmError(f"Imp mm_projector_type {proj!r} is not supported; llama.cpp's mlp projector is mlp2x_gelu")
        if config.get("mm_vision_select_feature", "patch") != "patch":
            raise MvlmError("Imp mm_vision_select_feature other than 'patch' is not supported (SigLIP has no CLS)")
        return self.variant(var, "mlp")

    def lm_writer(self, ckpt: Checkpoint, outtype: str, name: str):
        """The variant's LM writer: Phi-2 (arch ``phi2``), Qwen1.5 (``qwen2``) or Phi-3 (``phi3``)."""
        var = variant(ckpt.config)
        if var is None:
            raise MvlmError(f"{ckpt.root}: not an Imp config with a known language model; supported: "
                            f"{', '.join(sorted(MODEL_TYPES))}")
        module, func = LM_WRITERS[var][2].split(":")
        prepared = getattr(importlib.import_module(module), func)(ckpt, outtype, name)
        kv = prepared.writer.kv_data[0]
        if var == "v1" and gguf.Keys.Tokenizer.CHAT_TEMPLATE not in kv:  # the checkpoint's own template (tokenizer_config) wins
            prepared.writer.add_chat_template(V1_CHAT_TEMPLATE)
        return prepared

    def vision_source(self, ckpt: Checkpoint, override: Path | None, variant: Variant):
        return resolve_siglip(ckpt, override)

    def projector_tensors(self, projector: str) -> list[ProjTensor]:
        if projector != "mlp":
            raise MvlmError(f"no projector mapping for {projector!r} in the Imp family")
        return mlp_tensors()  # LLaVA's mlp

    def project(self, projector: str, feats: Any, get: Callable[[str], Any]) -> Any:
        return mlp_forward(feats, get, 2)

    def tiny_checkpoint(self, outdir: Path, **kw: Any) -> Path:
        lm = kw.pop("lm", None)
        return make_tiny_imp15(outdir, lm=lm, **kw) if lm else make_tiny_imp(outdir, **kw)


# --------------------------------------------------------------------------------------------------------------
# The tiny checkpoints: imp-v1-3b layout (Phi-2 + SigLIP-384 + mlp2x_gelu) and Imp-v1.5 (Qwen1.5-1.8B or
# Phi-3-mini LM + the same SigLIP / projector), with BPE or SentencePiece tokenizers trained here.
# --------------------------------------------------------------------------------------------------------------
IMP_LM = {"hidden": 128, "layers": 2, "heads": 4, "ffn": 512, "rotary": 0.4}
# SigLIP: 72-wide heads like so400m, image 384 / patch 14 -> 27x27 = 729 tokens; 3 layers as trained, 2 stored
# (Imp deletes the layers after mm_vision_select_layer = -2 before saving).
IMP_SIGLIP = {"hidden": 144, "heads": 2, "ffn": 240, "layers": 3, "image": 384, "patch": 14}
IMP_BPE_VOCAB = 400
IMP_EOT = PHI2_EOS
IMP15_LMS = {"qwen2": ("ImpQwen2ForCausalLM", "imp_qwen2"), "phi3": ("ImpPhi3ForCausalLM", "imp_phi3")}
IMP15_KV = {"qwen2": 4, "phi3": 2}  # Qwen1.5 is MHA; the Phi-3 tiny uses GQA to pin the fused qkv row split
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"]

# Qwen's tokenizer.json pre-tokenizer: this Split regex (llama.cpp pre "qwen2") then ByteLevel without its own regex.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def train_bpe_tokenizer(out: Path, vocab_size: int = IMP_BPE_VOCAB, seed: int = 0, qwen: bool = False) -> int:
    """A GPT-2-style byte-level BPE tokenizer.json trained here (``tokenizers``), ``<|endoftext|>`` = id 0;
    ``qwen``: Qwen's pre-tokenizer (split regex, single digits) instead of GPT-2's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

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
    lines = tp.corpus(seed)
    if qwen:  # words glued to a leading bracket / quote / dot: one pre-token for Qwen, two for GPT-2's regex
        lines = lines + [".".join(line.split()[:6] * 4) for line in lines[:40]]
    tok.train_from_iterator(lines, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CodeGenTokenizer", "bos_token": IMP_EOT, "eos_token": IMP_EOT, "unk_token": IMP_EOT,
         "add_bos_token": False, "model_max_length": 2048}))
    return tok.get_vocab_size()


def _phi2_state_dict(init: tp.Init, vocab: int) -> dict[str, torch.Tensor]:
    d, f = IMP_LM["hidden"], IMP_LM["ffn"]
    sd = {"model.embed_tokens.weight": init.normal(vocab, d, std=0.5)}
    for i in range(IMP_LM["layers"]):
        p = f"model.layers.{i}."
        for proj, (o, n) in {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, d), "self_attn.v_proj": (d, d),
                             "self_attn.dense": (d, d), "mlp.fc1": (f, d), "mlp.fc2": (d, f)}.items():
            init.linear_bias(sd, f"{p}{proj}.", o, n)
        sd[p + "input_layernorm.weight"] = init.norm_weight(d)
        sd[p + "input_layernorm.bias"] = init.normal(d, std=0.1)
    sd["model.final_layernorm.weight"] = init.norm_weight(d)
    sd["model.final_layernorm.bias"] = init.normal(d, std=0.1)
    init.linear_bias(sd, "lm_head.", vocab, d)
    return sd


def _imp15_lm_state_dict(init: tp.Init, lm: str, vocab: int) -> dict[str, torch.Tensor]:
    d, f, h = IMP_LM["hidden"], IMP_LM["ffn"], IMP_LM["heads"]
    kv = IMP15_KV[lm] * (d // h)

    def layer(p: str) -> dict[str, torch.Tensor]:
        sd: dict[str, torch.Tensor] = {}
        if lm == "qwen2":
            for proj, rows in (("q_proj", d), ("k_proj", kv), ("v_proj", kv)):
                init.linear_bias(sd, f"{p}self_attn.{proj}.", rows, d)
            sd[p + "mlp.gate_proj.weight"] = init.linear(f, d)
            sd[p + "mlp.up_proj.weight"] = init.linear(f, d)
        else:
            sd[p + "self_attn.qkv_proj.weight"] = init.linear(d + 2 * kv, d)
            sd[p + "mlp.gate_up_proj.weight"] = init.linear(2 * f, d)
        sd[p + "self_attn.o_proj.weight"] = init.linear(d, d)
        sd[p + "mlp.down_proj.weight"] = init.linear(d, f)
        return sd

    return tp.rms_lm_state_dict(init, d, IMP_LM["layers"], vocab, layer)


def _phi3_tokenizer(out: Path, seed: int) -> int:
    """SentencePiece (LLaMA-style) + Phi-3's added chat tokens right after it, as Phi-3-mini ships them."""
    n_sp = tp.sentencepiece_vocab(out, seed)
    (out / "added_tokens.json").write_text(json.dumps({t: n_sp + i for i, t in enumerate(PHI3_ADDED)}))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False, "bos_token": "<s>",
         "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>", "legacy": False}))
    return n_sp + len(PHI3_ADDED)


def _imp_lm_keys(vocab: int, n_kv: int) -> dict[str, object]:
    return {"vocab_size": vocab, "hidden_size": IMP_LM["hidden"], "intermediate_size": IMP_LM["ffn"],
            "num_hidden_layers": IMP_LM["layers"], "num_attention_heads": IMP_LM["heads"], "num_key_value_heads": n_kv}


def _imp_vision_keys(with_tower_config: bool, siglip: dict[str, int] = IMP_SIGLIP) -> dict[str, object]:
    """The SigLIP tower and mlp2x_gelu projector keys of every Imp release (the tower name stays the 384 one even
    in Imp-3B@196, whose tower config and position embeddings say 196)."""
    keys: dict[str, object] = {
        "mm_hidden_size": siglip["hidden"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "google/siglip-so400m-patch14-384",
    }
    if with_tower_config:
        keys["vision_tower_config"] = {"model_type": "siglip_vision_model", **tp.clip_config(siglip, siglip["image"]),
                                       "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
    return keys


def _imp_tower(init: tp.Init, stored_layers: int | None = None, siglip: dict[str, int] = IMP_SIGLIP
               ) -> dict[str, torch.Tensor]:
    """The SigLIP copy cut after mm_vision_select_layer as Imp saves it (``stored_layers`` overrides), and the projector."""
    stored = siglip["layers"] - 1 if stored_layers is None else stored_layers
    sd = tp.siglip_state_dict(init, SIGLIP_PREFIX, siglip, stored)
    sd.update(tp.mlp_projector(init, "model.mm_projector.0.", "model.mm_projector.2.", siglip["hidden"], IMP_LM["hidden"]))
    return sd


def make_tiny_imp(outdir: str | Path, weights: str = "safetensors", dtype: torch.dtype = torch.float16,
                  seed: int = 0, stored_layers: int | None = None, with_tower_config: bool = True,
                  image_size: int = 384) -> Path:
    """A tiny imp-v1-3b-layout checkpoint: PhiForCausalLM names + BPE tokenizer.json, SigLIP copy (no CLS, patch
    bias) cut after mm_vision_select_layer like Imp saves it (``stored_layers`` overrides), mlp2x_gelu projector.
    ``image_size=196``: Imp-3B@196 (Imp-v1.5-3B-196), SigLIP retrained at 196 px, 14x14 = 196 position embeddings."""
    siglip = {**IMP_SIGLIP, "image": image_size}
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    n_tok = train_bpe_tokenizer(out, seed=seed)
    vocab = (n_tok + 63) // 64 * 64  # padded like Phi-2's 51200 rows for 50295 tokens
    init = tp.Init(seed, dtype)
    sd = _phi2_state_dict(init, vocab)
    sd.update(_imp_tower(init, stored_layers, siglip))
    config: dict[str, object] = {
        "_name_or_path": "mvlm-tiny/imp-v1-tiny" + ("" if image_size == 384 else f"-{image_size}"),
        "architectures": ["ImpForCausalLM"],
        "model_type": "imp",
        **_imp_lm_keys(vocab, IMP_LM["heads"]),
        "partial_rotary_factor": IMP_LM["rotary"],
        "rope_theta": 10000.0,
        "layer_norm_eps": 1e-5,
        "hidden_act": "gelu_new",
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": tp.dtype_name(dtype),
        "image_aspect_ratio": "square",
        "image_token": "<image>",
        **_imp_vision_keys(with_tower_config, siglip),
    }
    return tp.write_release(out, sd, weights, config)


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
    init = tp.Init(seed, dtype)
    sd = _imp15_lm_state_dict(init, lm, vocab)
    sd.update(_imp_tower(init))
    arch, mtype = IMP15_LMS[lm]
    config: dict[str, object] = {
        "_name_or_path": f"mvlm-tiny/imp-v1.5-tiny-{lm}",
        "architectures": [arch],
        "model_type": mtype,
        **_imp_lm_keys(vocab, IMP15_KV[lm]),
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        **special,
        "torch_dtype": tp.dtype_name(dtype),
        "image_aspect_ratio": "square",
        **_imp_vision_keys(True),
    }
    return tp.write_release(out, sd, weights, config)
