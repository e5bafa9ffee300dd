"""Independent PyTorch reference forward for MobileVLM-style checkpoints (float32 throughout).

Why a separate implementation: ``mvlm verify`` must prove the GGUFs compute what the released PyTorch model
computes, so nothing here shares code with the GGUF writers. The checkpoint is read by its own small loader;
each projector's forward is its family's ``project`` hook (``mvlm_convert.families``: LDP / LDPv2 in mobilevlm,
written from the MobileVLM papers without torchvision or timm; mlp in llava; Xmodel-VLM's in xmodel), found through the
registry from ``mm_projector_type``; CLIP is transformers' ``CLIPVisionModel`` and the language model is
transformers' ``LlamaForCausalLM`` built from the HF config keys only.

Image path: a 336x336 RGB uint8 image -> ``(x/255 - mean)/std`` (exactly what clip.cpp does for an image that is
already image_size square: its fixed-size preprocessor copies it without resizing) -> CLIP ViT hidden_states[-2]
(``mm_vision_select_layer``), CLS dropped -> projector -> [n_tokens, hidden_size].
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mvlm_core.errors import MvlmError

# OpenAI CLIP normalisation constants (used when no preprocessor_config.json is found).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

VISION_COPY_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."


# --------------------------------------------------------------------------------------------------------------
# Checkpoint reading (deliberately independent of mvlm_convert.checkpoint)
# --------------------------------------------------------------------------------------------------------------


class StateReader:
    """Lazy name -> float32 tensor access over a HF-style weights directory.

    Handles ``model.safetensors`` / ``pytorch_model.bin``, single or sharded with an ``*.index.json``. ``.bin`` files
    are opened with ``torch.load(weights_only=True, mmap=True)`` so nothing is materialised until asked for.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._where: dict[str, Path] = {}
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        self._st_cache: dict[Path, object] = {}
        self._stored: dict[str, str] = {}
        self._index()
        self._alias_llava_hf()

    def _alias_llava_hf(self) -> None:
        """Expose llava-hf tensors (transformers 4 or 5 names) under the original LLaVA names used below."""
        renamed: dict[str, Path] = {}
        for name, path in self._where.items():
            new = _llava_hf_to_original(name)
            if new != name:
                renamed[new] = path
                self._stored[new] = name
        if renamed:
            self._where = renamed | {n: p for n, p in self._where.items() if _llava_hf_to_original(n) == n}

    def _index(self) -> None:
        d = self.directory
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = d / index_name
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                self._where = {name: d / shard for name, shard in weight_map.items()}
                return
        for single in ("model.safetensors", "pytorch_model.bin"):
            path = d / single
            if path.is_file():
                for name in self._open(path):
                    self._where[name] = path
                return
        raise MvlmError(f"no model.safetensors or pytorch_model.bin (or sharded index) in {d}")

    def _open(self, path: Path) -> Iterator[str]:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            if path not in self._st_cache:
                self._st_cache[path] = safe_open(str(path), framework="pt")
            return iter(self._st_cache[path].keys())
        if path not in self._bin_cache:
            try:
                self._bin_cache[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
                raise MvlmError(f"cannot read {path}: {e}") from e
        return iter(self._bin_cache[path].keys())

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        """Return tensor ``name`` as a contiguous float32 CPU tensor (bf16/f16 upcast exactly)."""
        path = self._where.get(name)
        if path is None:
            raise MvlmError(f"tensor {name} is missing from the checkpoint in {self.directory}")
        name = self._stored.get(name, name)
        if path.suffix == ".safetensors":
            list(self._open(path))
            t = self._st_cache[path].get_tensor(name)
        else:
            list(self._open(path))
            t = self._bin_cache[path][name]
        return t.to(torch.float32).contiguous()


def _llava_hf_to_original(name: str) -> str:
    """llava-hf tensor name -> the original LLaVA name (``model.layers.*``, ``model.mm_projector.{0,2}``, ...)."""
    for old, new in (("model.language_model.", "model."), ("language_model.model.", "model."),
                     ("language_model.lm_head.", "lm_head."),
                     ("model.vision_tower.vision_model.", VISION_COPY_PREFIX + "vision_model."),
                     ("vision_tower.vision_model.", VISION_COPY_PREFIX + "vision_model."),
                     ("model.multi_modal_projector.linear_1.", PROJECTOR_PREFIX + "0."),
                     ("model.multi_modal_projector.linear_2.", PROJECTOR_PREFIX + "2."),
                     ("multi_modal_projector.linear_1.", PROJECTOR_PREFIX + "0."),
                     ("multi_modal_projector.linear_2.", PROJECTOR_PREFIX + "2.")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


def read_config(directory: Path) -> dict:
    """config.json in the original-LLaVA key style: llava-hf's text_config is expanded with transformers'
    LlamaConfig defaults (llava-hf lists only the keys that differ), Xmodel's XModelConfig defaults are filled."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise MvlmError(f"no config.json in {directory}: pass a HF checkpoint directory")
    config = json.loads(path.read_text())
    if isinstance(config.get("text_config"), dict) and "LlavaForConditionalGeneration" in (config.get("architectures") or []):
        from transformers import LlamaConfig

        text = LlamaConfig(**{k: v for k, v in config["text_config"].items() if k not in ("architectures", "model_type")})
        layer = config.get("vision_feature_layer", -2)
        config = {
            "vocab_size": text.vocab_size, "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size, "num_hidden_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
            "rms_norm_eps": text.rms_norm_eps, "max_position_embeddings": text.max_position_embeddings,
            "rope_theta": (getattr(text, "rope_parameters", None) or {}).get("rope_theta", getattr(text, "rope_theta", 1e4)),
            "tie_word_embeddings": bool(config["text_config"].get("tie_word_embeddings", False)),
            "mm_projector_type": "mlp2x_gelu" if config.get("projector_hidden_act", "gelu") == "gelu" else "unknown",
            "mm_vision_select_layer": layer[0] if isinstance(layer, list) else layer,
            "mm_vision_select_feature": "patch" if config.get("vision_feature_select_strategy") == "default" else "full",
        }
    elif config.get("model_type") == "xmodelvlm":
        config.setdefault("rms_norm_eps", 1e-5)  # XModelConfig default
    return config


# --------------------------------------------------------------------------------------------------------------
# Projectors: each family's own forward (``Family.project``), found through the registry
# --------------------------------------------------------------------------------------------------------------


def project(feats: torch.Tensor, projector_type: str, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The checkpoint's ``mm_projector_type`` -> the family that claims it -> its projector forward."""
    from mvlm_convert.families import family_for_projector

    family, projector = family_for_projector(projector_type)
    return family.project(projector, feats, get)


# --------------------------------------------------------------------------------------------------------------
# Vision tower (CLIP ViT) + preprocessing
# --------------------------------------------------------------------------------------------------------------


@dataclass
class VisionSource:
    """Where the CLIP weights come from: a prefix inside a StateReader, plus optional config/preprocessor files."""

    reader: StateReader
    prefix: str  # the part before "vision_model." in tensor names
    config: dict = field(default_factory=dict)  # CLIPVisionConfig-like keys, when a config.json is available
    preprocessor: dict = field(default_factory=dict)
    origin: str = ""


def _clip_dir_source(directory: Path) -> VisionSource:
    directory = Path(directory)
    reader = StateReader(directory)
    cfg = {}
    if (directory / "config.json").is_file():
        raw = json.loads((directory / "config.json").read_text())
        cfg = raw.get("vision_config", raw) if isinstance(raw, dict) else {}
    pre = {}
    if (directory / "preprocessor_config.json").is_file():
        pre = json.loads((directory / "preprocessor_config.json").read_text())
    prefix = ""
    if not any(n.startswith("vision_model.") for n in reader.names()):
        raise MvlmError(f"{directory} holds no vision_model.* tensors: not a CLIP checkpoint")
    return VisionSource(reader, prefix, cfg, pre, origin=str(directory))


def _local_tower_dir(config: dict, checkpoint_dir: Path) -> Path | None:
    name = config.get("mm_vision_tower") or config.get("vision_tower")
    if not name:
        return None
    for cand in (Path(name), Path(checkpoint_dir) / name):
        if (cand / "config.json").is_file() or (cand / "preprocessor_config.json").is_file():
            return cand
    return None


def resolve_vision_source(checkpoint_dir: Path, config: dict, reader: StateReader,
                          vision_tower: Path | None) -> VisionSource:
    """Pick the CLIP tower MobileVLM itself uses at inference.

    An explicit ``vision_tower`` directory wins. V1 (``ldpnet``) reloads CLIP from ``mm_vision_tower``, so a local
    directory of that name comes first; V2 uses the copy inside its checkpoint. Image mean/std come from the CLIP
    directory's preprocessor_config.json (MobileVLM builds its CLIPImageProcessor from ``mm_vision_tower``), else
    the OpenAI CLIP constants.
    """
    if vision_tower is not None:
        return _clip_dir_source(Path(vision_tower))
    local = _local_tower_dir(config, checkpoint_dir)
    from mvlm_convert.families import family_for_projector

    # MobileVLM V1 and LLaVA-1.5 reload the tower from mm_vision_tower; V2 / Xmodel use their copy (the family says).
    family, projector = family_for_projector(str(config.get("mm_projector_type", "")))
    is_v1 = not family.uses_tower_copy(projector)
    has_copy = any(n.startswith(VISION_COPY_PREFIX + "vision_model.") for n in reader.names())
    if local is not None and (is_v1 or not has_copy):
        return _clip_dir_source(local)
    if has_copy:
        pre = {}
        if local is not None and (local / "preprocessor_config.json").is_file():
            pre = json.loads((local / "preprocessor_config.json").read_text())
        return VisionSource(reader, VISION_COPY_PREFIX, {}, pre, origin=f"{checkpoint_dir} ({VISION_COPY_PREFIX}*)")
    raise MvlmError(
        f"no vision tower: the checkpoint has no {VISION_COPY_PREFIX}* copy and "
        f"mm_vision_tower={config.get('mm_vision_tower')!r} is not a local directory; pass --vision-tower DIR "
        "(e.g. a clone of openai/clip-vit-large-patch14-336)"
    )


def _clip_config_from_weights(src: VisionSource):
    """Build a CLIPVisionConfig from tensor shapes; heads = width/64 (OpenAI CLIP rule) unless a config says."""
    from transformers import CLIPVisionConfig

    names = src.reader.names()
    p = src.prefix + "vision_model."
    patch_w = src.reader.get(p + "embeddings.patch_embedding.weight")
    pos = src.reader.get(p + "embeddings.position_embedding.weight")
    hidden = patch_w.shape[0]
    patch = patch_w.shape[-1]
    grid = math.isqrt(pos.shape[0] - 1)
    if grid * grid != pos.shape[0] - 1:
        raise MvlmError(f"CLIP position embedding has {pos.shape[0]} rows: not 1 + a square grid")
    layer_ids = {int(m.group(1)) for n in names if (m := re.match(re.escape(p) + r"encoder\.layers\.(\d+)\.", n))}
    n_layers = max(layer_ids) + 1 if layer_ids else 0
    ffn = src.reader.get(p + "encoder.layers.0.mlp.fc1.weight").shape[0]
    cfg = src.config
    heads = int(cfg.get("num_attention_heads", max(1, hidden // 64)))
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_channels=3,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act=cfg.get("hidden_act", "quick_gelu"),
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
    )


@dataclass
class VisionReference:
    """CLIP tower + projector of one checkpoint, ready to embed a square RGB image."""

    clip: torch.nn.Module
    projector_type: str
    projector_get: Callable[[str], torch.Tensor]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    select_layer: int = -2
    select_feature: str = "patch"
    origin: str = ""

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 [S,S,3] -> normalised [1,3,S,S] float32: clip.cpp's arithmetic (f32, /255, then -mean, /std)."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise MvlmError("reference image must be uint8 RGB [H, W, 3]")
        if rgb.shape[0] != self.image_size or rgb.shape[1] != self.image_size:
            raise MvlmError(f"reference image must be {self.image_size}x{self.image_size}; use square_image() first")
        x = rgb.astype(np.float32) / np.float32(255.0)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP hidden_states[select_layer] (no post-layernorm), CLS dropped for 'patch' -> [N, Dv]."""
        out = self.clip(pixel_values=pixels, output_hidden_states=True)
        n_layers = self.clip.config.num_hidden_layers
        if len(out.hidden_states) != n_layers + 1:  # [embeddings after pre-LN, layer 1 out, ..., layer n out]
            raise RuntimeError(f"CLIP returned {len(out.hidden_states)} hidden states for {n_layers} layers")
        h = out.hidden_states[self.select_layer][0]
        return h[1:] if self.select_feature == "patch" else h

    @torch.no_grad()
    def embed(self, rgb: np.ndarray) -> np.ndarray:
        feats = self.features(self.preprocess(rgb))
        return project(feats, self.projector_type, self.projector_get).numpy()


def load_vision(checkpoint_dir: Path, vision_tower: Path | None = None) -> VisionReference:
    """Build the float32 vision reference (CLIP + projector) from a checkpoint exactly as released."""
    from transformers import CLIPVisionModel

    checkpoint_dir = Path(checkpoint_dir)
    config = read_config(checkpoint_dir)
    reader = StateReader(checkpoint_dir)
    ptype = config.get("mm_projector_type")
    if not ptype:
        raise MvlmError(f"{checkpoint_dir}/config.json has no mm_projector_type: not a vision-language checkpoint")
    if is_imp(config):
        return load_siglip_vision(checkpoint_dir, config, reader, vision_tower)
    src = resolve_vision_source(checkpoint_dir, config, reader, vision_tower)
    clip_cfg = _clip_config_from_weights(src)
    clip_cfg._attn_implementation = "eager"
    with torch.device("meta"):
        clip = CLIPVisionModel(clip_cfg)
    load_tower(clip, src.reader, src.prefix + "vision_model.", "CLIP", src.origin, skip_optional=False)
    clip.eval().float()

    pre = src.preprocessor
    mean = tuple(float(v) for v in pre.get("image_mean", OPENAI_CLIP_MEAN))
    std = tuple(float(v) for v in pre.get("image_std", OPENAI_CLIP_STD))
    return VisionReference(
        clip=clip,
        projector_type=str(ptype),
        projector_get=reader.get,
        image_size=clip_cfg.image_size,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        select_layer=int(config.get("mm_vision_select_layer", -2)),
        select_feature=str(config.get("mm_vision_select_feature", "patch")),
        origin=src.origin,
    )


def square_image(img, size: int, pad_rgb: tuple[int, int, int] = (122, 116, 104)) -> np.ndarray:
    """MobileVLM ``image_aspect_ratio: pad``: centre on a square of the CLIP mean colour, bicubic resize to size.

    Used to turn any user image into the one size x size bitmap that both sides then receive unchanged.
    """
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    if w != h:
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), pad_rgb)
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8).copy()


def synthetic_image(size: int = 336) -> np.ndarray:
    """Deterministic structured test image: colour gradients, a disc, rectangles, stripes and a checker patch.

    Structure matters: a noise-only image would hide mistakes in patch order / positions that a real picture exposes.
    """
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    r = 255 * xx
    g = 255 * yy
    b = 255 * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * np.hypot(xx - 0.3, yy - 0.6)))
    arr = np.stack([r, g, b], axis=-1).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    s = size / 336
    d.ellipse([40 * s, 40 * s, 150 * s, 150 * s], fill=(230, 40, 30))
    d.rectangle([200 * s, 30 * s, 310 * s, 90 * s], fill=(20, 20, 200))
    d.rectangle([180 * s, 200 * s, 320 * s, 320 * s], outline=(255, 255, 255), width=max(1, int(6 * s)))
    for i in range(0, int(120 * s), max(1, int(12 * s))):
        d.line([(20 * s + i, 330 * s), (20 * s + i + 60 * s, 200 * s)], fill=(0, 0, 0), width=max(1, int(3 * s)))
    cell = max(1, int(14 * s))
    for cy in range(4):
        for cx in range(4):
            if (cx + cy) % 2 == 0:
                x0, y0 = int(220 * s) + cx * cell, int(220 * s) + cy * cell
                d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=(250, 250, 0))
    return np.asarray(img, dtype=np.uint8).copy()


# --------------------------------------------------------------------------------------------------------------
# Language model
# --------------------------------------------------------------------------------------------------------------

LM_SKIP_PREFIXES = ("model.mm_projector.", "model.vision_tower.")


def llama_config(config: dict):
    """LlamaConfig from the HF keys only (stale lit-gpt keys such as n_head/n_query_groups are ignored on purpose)."""
    from transformers import LlamaConfig

    heads = int(config["num_attention_heads"])
    rope_scaling = config.get("rope_scaling")
    if rope_scaling:
        raise MvlmError(f"rope_scaling={rope_scaling!r} is not supported by the reference (MobileVLM has none)")
    cfg = LlamaConfig(
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]),
        num_hidden_layers=int(config["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(config.get("num_key_value_heads") or heads),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=False,
        mlp_bias=False,
    )
    cfg._attn_implementation = "eager"
    return cfg


def load_lm(checkpoint_dir: Path):
    """transformers LlamaForCausalLM in float32, LM weights loaded by name (vision/projector tensors skipped)."""
    from transformers import LlamaForCausalLM

    checkpoint_dir = Path(checkpoint_dir)
    config = read_config(checkpoint_dir)
    reader = StateReader(checkpoint_dir)
    kind = imp_kind(config)
    if kind == "imp":
        return load_phi2(config, reader, checkpoint_dir)
    if kind in ("imp_qwen2", "imp_phi3"):
        return load_imp15_lm(kind, config, reader, checkpoint_dir)
    cfg = llama_config(config)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    expected = [k for k in model.state_dict() if not k.endswith("rotary_emb.inv_freq")]
    missing = [k for k in expected if k not in reader and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise MvlmError(f"{len(missing)} language-model tensors missing from {checkpoint_dir}: {shown}")
    state = {k: reader.get(k) for k in expected if k in reader}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    # Rotary inverse frequencies are a computed (non-persistent) buffer: rebuild the module on the CPU.
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.model.rotary_emb = LlamaRotaryEmbedding(cfg)
    return model.eval().float()


@torch.no_grad()
def lm_logits(model, token_ids: list[int], inputs_embeds: torch.Tensor | None = None) -> np.ndarray:
    """Logits [n, vocab] for every position of ``token_ids`` (or of ``inputs_embeds`` [n, D] when given)."""
    if inputs_embeds is not None:
        out = model(inputs_embeds=inputs_embeds[None].float(), use_cache=False)
    else:
        out = model(input_ids=torch.tensor([token_ids], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()


# --------------------------------------------------------------------------------------------------------------
# Imp v1: Phi-2 LM (transformers PhiForCausalLM) + SigLIP tower (transformers SiglipVisionModel)
# --------------------------------------------------------------------------------------------------------------

IMP_SIGLIP_MEAN = (0.5, 0.5, 0.5)  # ImpImageProcessor defaults
IMP_SIGLIP_STD = (0.5, 0.5, 0.5)


IMP_LMS = {"ImpForCausalLM": "imp", "ImpQwen2ForCausalLM": "imp_qwen2", "ImpPhi3ForCausalLM": "imp_phi3"}


def imp_kind(config: dict) -> str | None:
    """``imp`` (Phi-2), ``imp_qwen2`` (Qwen1.5) or ``imp_phi3`` (Phi-3) from architectures / model_type."""
    for arch in config.get("architectures") or []:
        if arch in IMP_LMS:
            return IMP_LMS[arch]
    return config.get("model_type") if config.get("model_type") in IMP_LMS.values() else None


def is_imp(config: dict) -> bool:
    return imp_kind(config) is not None


def load_phi2(config: dict, reader: StateReader, checkpoint_dir: Path):
    """transformers PhiForCausalLM in float32 from Imp's config keys; weights loaded by name."""
    from transformers import PhiConfig, PhiForCausalLM
    from transformers.models.phi.modeling_phi import PhiRotaryEmbedding

    cfg = PhiConfig(
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]),
        num_hidden_layers=int(config["num_hidden_layers"]),
        num_attention_heads=int(config["num_attention_heads"]),
        num_key_value_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
        partial_rotary_factor=float(config.get("partial_rotary_factor", 0.5)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        hidden_act=str(config.get("hidden_act", "gelu_new")),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, qk_layernorm=False, tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        model = PhiForCausalLM(cfg)
    expected = list(model.state_dict())
    missing = [k for k in expected if k not in reader]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise MvlmError(f"{len(missing)} Phi-2 tensors missing from {checkpoint_dir}: {shown}")
    model.load_state_dict({k: reader.get(k) for k in expected}, strict=True, assign=True)
    model.model.rotary_emb = PhiRotaryEmbedding(cfg)
    return model.eval().float()


def load_imp15_lm(kind: str, config: dict, reader: StateReader, checkpoint_dir: Path):
    """Imp-v1.5's LM as transformers builds it: Qwen2ForCausalLM (Qwen1.5) or Phi3ForCausalLM, float32, by name."""
    from transformers import Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if config.get("rope_scaling"):
        raise MvlmError(f"rope_scaling={config['rope_scaling']!r} is not supported by the reference")
    heads = int(config["num_attention_heads"])
    common = dict(
        vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]), num_hidden_layers=int(config["num_hidden_layers"]),
        num_attention_heads=heads, num_key_value_heads=int(config.get("num_key_value_heads") or heads),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), hidden_act=str(config.get("hidden_act", "silu")),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), attention_dropout=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    if kind == "imp_qwen2":
        cls = Qwen2ForCausalLM
        cfg = Qwen2Config(rope_theta=float(config.get("rope_theta", 1e6)), use_sliding_window=False, **common)
    else:
        cls = Phi3ForCausalLM
        cfg = Phi3Config(rope_theta=float(config.get("rope_theta", 10000.0)), sliding_window=None,
                         partial_rotary_factor=float(config.get("partial_rotary_factor", 1.0)),
                         resid_pdrop=0.0, embd_pdrop=0.0, **common)
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        model = cls(cfg)
    expected = [k for k in model.state_dict() if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    missing = [k for k in expected if k not in reader]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise MvlmError(f"{len(missing)} {cls.__name__} tensors missing from {checkpoint_dir}: {shown}")
    model.load_state_dict({k: reader.get(k) for k in expected}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    rotary = getattr(importlib.import_module(cls.__module__), cls.__name__.replace("ForCausalLM", "RotaryEmbedding"))
    model.model.rotary_emb = rotary(cfg)  # inverse frequencies are a computed buffer: rebuild on the CPU
    return model.eval().float()


def load_tower(model: torch.nn.Module, reader: StateReader, prefix: str, what: str, origin: str,
               skip_optional: bool) -> torch.nn.Module:
    """Fill a CLIP / SigLIP vision model built on the meta device from ``reader`` (``prefix`` + the HF names below
    ``vision_model.``; transformers 5 names the parameters without that level, 4 with it: either is accepted).

    ``post_layernorm`` (unused: the features are taken before it) and ``position_ids`` are loaded when present unless
    ``skip_optional``; position_ids become a real buffer and a missing post-LN gets identity values. Returns the
    inner vision model.
    """
    vm = getattr(model, "vision_model", model)
    mp = "vision_model." if vm is not model else ""
    state = {}
    for k in model.state_dict():
        rel = k[len(mp):] if mp and k.startswith(mp) else k
        name = prefix + rel
        if (rel.startswith("post_layernorm.") or rel.endswith("position_ids")) and (skip_optional or name not in reader):
            continue
        if name not in reader:
            raise MvlmError(f"{what} tensor {name} is missing in {origin}")
        state[k] = reader.get(name)
    model.load_state_dict(state, strict=False, assign=True)
    # Buffers that are not in the checkpoint (position_ids) must be real tensors, not meta.
    emb = vm.embeddings
    emb.register_buffer("position_ids", torch.arange(emb.num_positions)[None], persistent=False)
    if vm.post_layernorm.weight.is_meta:  # unused by the features taken; give it values
        vm.post_layernorm.weight = torch.nn.Parameter(torch.ones(model.config.hidden_size))
        vm.post_layernorm.bias = torch.nn.Parameter(torch.zeros(model.config.hidden_size))
    return vm


def load_siglip_vision(checkpoint_dir: Path, config: dict, reader: StateReader,
                       vision_tower: Path | None = None) -> VisionReference:
    """Imp's vision path: SigLIP cut as Imp cuts it (layers after mm_vision_select_layer deleted), last hidden
    state without post-LN, no CLS to drop; then the mlp2x_gelu projector."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    if vision_tower is not None:
        reader = StateReader(Path(vision_tower))
        prefix = "vision_model."
        raw = json.loads((Path(vision_tower) / "config.json").read_text())
        vcfg = raw.get("vision_config", raw)
    else:
        prefix = VISION_COPY_PREFIX + "vision_model."
        vcfg = config.get("vision_tower_config") or {}
        vcfg = vcfg.get("vision_config", vcfg)
    names = reader.names()
    patch_w = reader.get(prefix + "embeddings.patch_embedding.weight")
    n_pos = reader.get(prefix + "embeddings.position_embedding.weight").shape[0]
    stored = len({int(m.group(1)) for n in names if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", n))})
    hidden, patch = patch_w.shape[0], patch_w.shape[-1]
    grid = math.isqrt(n_pos)
    select = int(config.get("mm_vision_select_layer", -2))
    full = int(vcfg.get("num_hidden_layers") or 0)
    kept = (full + 1 + select if select < 0 else select) if full else stored  # Imp: del layers[select + 1:]
    if not 0 < kept <= stored:
        raise MvlmError(f"SigLIP: {kept} layers needed but {stored} stored in {checkpoint_dir}")
    heads = int(vcfg.get("num_attention_heads") or next((hidden // d for d in (72, 64) if hidden % d == 0), 0))
    if not heads:
        raise MvlmError("SigLIP head count unknown: add vision_tower_config or pass --vision-tower")
    scfg = SiglipVisionConfig(
        hidden_size=hidden, intermediate_size=reader.get(prefix + "encoder.layers.0.mlp.fc1.weight").shape[0],
        num_hidden_layers=kept, num_attention_heads=heads, num_channels=3,
        image_size=int(vcfg.get("image_size") or grid * patch), patch_size=patch,
        hidden_act=str(vcfg.get("hidden_act", "gelu_pytorch_tanh")),
        layer_norm_eps=float(vcfg.get("layer_norm_eps", 1e-6)), vision_use_head=False,
    )
    scfg._attn_implementation = "eager"
    with torch.device("meta"):
        model = SiglipVisionModel(scfg)
    load_tower(model, reader, prefix, "SigLIP", str(vision_tower or checkpoint_dir), skip_optional=True)
    model.eval().float()
    return VisionReference(
        clip=model, projector_type=str(config.get("mm_projector_type", "mlp2x_gelu")),
        projector_get=StateReader(checkpoint_dir).get if vision_tower is not None else reader.get,
        image_size=scfg.image_size, mean=IMP_SIGLIP_MEAN, std=IMP_SIGLIP_STD, select_layer=-1,
        select_feature="full", origin=str(vision_tower or f"{checkpoint_dir} ({VISION_COPY_PREFIX}*)"),
    )


def squash_image(img, size: int) -> np.ndarray:
    """Imp v1's ImpImageProcessor: bicubic resize straight to size x size (aspect ratio not kept, no padding)."""
    from PIL import Image

    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8).copy()
