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

from mvlm_convert.checkpoint import Checkpoint, open_checkpoint
from mvlm_convert.families.base import Family, ProjTensor, Variant, register
from mvlm_convert.families.llava import mlp_forward, mlp_tensors
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
    from mvlm_convert.config_check import Fields
    from mvlm_convert.mmproj_gguf import (
        VISION_ACTS,
        ClipSource,
        _count_layers,
        check_config_matches,
        patch_geometry,
        vision_select_layer,
    )

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
    reader.require([f"{prefix}embeddings.position_embedding.weight", f"{prefix}encoder.layers.0.mlp.fc1.weight"],
                   "SigLIP tensors")
    hidden, p, n_pos = patch_geometry(reader, prefix, origin)
    grid = round(n_pos**0.5)
    if grid * grid != n_pos:
        raise MvlmError(f"{origin}: {n_pos} position embeddings are not a square patch grid (SigLIP has no CLS)")
    n_layer = _count_layers(reader, prefix)
    ffn = reader.shape(f"{prefix}encoder.layers.0.mlp.fc1.weight")[0]
    f = Fields(cfg, "the SigLIP vision tower", source=cfg_name, weights={
        "hidden_size": (hidden, f"{prefix}embeddings.patch_embedding.weight is {hidden} wide"),
        "intermediate_size": (ffn, f"{prefix}encoder.layers.0.mlp.fc1.weight has {ffn} rows"),
    })
    check_config_matches(f, "hidden_size", hidden)
    check_config_matches(f, "intermediate_size", ffn)
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
    return ClipSource(
        reader=reader,
        prefix=prefix,
        hidden=hidden,
        ffn=ffn,
        n_layer=n_layer,
        n_head=int(heads),
        image_size=image_size,
        patch_size=p,
        eps=eps,
        hidden_act=act,
        projection_dim=0,
        image_mean=list(SIGLIP_MEAN),
        image_std=list(SIGLIP_STD),
        origin=origin,
        siglip=True,
        n_layer_full=full,
    )


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
        return getattr(importlib.import_module(module), func)(ckpt, outtype, name)

    def vision_source(self, ckpt: Checkpoint, override: Path | None, variant: Variant):
        return resolve_siglip(ckpt, override)

    def projector_tensors(self, projector: str) -> list[ProjTensor]:
        if projector != "mlp":
            raise MvlmError(f"no projector mapping for {projector!r} in the Imp family")
        return mlp_tensors()  # LLaVA's mlp

    def project(self, projector: str, feats: Any, get: Callable[[str], Any]) -> Any:
        return mlp_forward(feats, get, 2)

    def tiny_checkpoint(self, outdir: Path, **kw: Any) -> Path:
        from mvlm_convert.tiny_peers import make_tiny_imp, make_tiny_imp15

        lm = kw.pop("lm", None)
        return make_tiny_imp15(outdir, lm=lm, **kw) if lm else make_tiny_imp(outdir, **kw)
