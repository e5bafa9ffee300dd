"""mmproj GGUF (arch ``clip``): CLIP / SigLIP vision tower + the family's projector, streamed tensor by tensor.

Checked against the pinned llama.cpp (0c1e570) tools/mtmd:
- tensor names: clip-impl.h TN_* (via gguf.TensorNameMap(MODEL_ARCH.MMPROJ) for the CLIP part);
- ``v.patch_embd.weight`` and the depthwise 3x3 kernels go through ggml_conv_2d / ggml_conv_2d_dw, whose im2col
  result is f16 and whose CPU matmul then needs an f16 kernel: these are always f16. Depthwise kernels are stored
  [C, 3, 3] (the singleton in-channel dim squeezed), 1x1 convs as 2-D matrices (clip.cpp multiplies them with
  build_mm); 1-D tensors and the class/position embeddings are f32;
- layers: clip_graph_llava::build runs ``block_count - 1`` layers when no ``clip.vision.feature_layer`` is set
  (emulating hidden_states[-2]); see ``_layer_metadata``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch

from mvlm_convert.checkpoint import Checkpoint, open_checkpoint
from mvlm_convert.config_check import FIX, Dim, Fields, check_shape, weight_hints
from mvlm_convert.gguf_stream import QT, FileSummary, PreparedGGUF, Progress, TensorPlan, matrix_type
from mvlm_core.errors import MvlmError
from mvlm_core.filetypes import FILE_TYPES

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
CLIP_PREFIX_IN_CHECKPOINT = "model.vision_tower.vision_tower.vision_model."  # MobileVLM V2, Xmodel, Imp copies
OPENAI_CLIP_HEAD_DIM = 64  # every OpenAI CLIP ViT (B/16, B/32, L/14, L/14-336) uses 64-wide heads
# gguf-py's tensor-name table: the tower's embeddings (clip-impl.h TN_PATCH_EMBD, TN_CLASS_EMBD, TN_POS_EMBD)
_PATCH_EMBD = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_PATCH] + ".weight"  # "v.patch_embd.weight"
_CLASS_EMBD = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_CLS]  # "v.class_embd"
_POS_EMBD = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_POS] + ".weight"  # "v.position_embd.weight"
_TOWER = _CLASS_EMBD.split(".")[0] + "."  # "v.": every vision-tower tensor
_PROJ = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ].split(".")[0] + "."  # "mm.": every projector tensor


@dataclass
class ClipSource:
    """Where the vision tower's weights and hyper-parameters come from."""

    reader: Checkpoint
    prefix: str  # HF name prefix up to and including "vision_model."
    hidden: int
    ffn: int
    n_layer: int
    n_head: int
    image_size: int
    patch_size: int
    eps: float
    hidden_act: str
    projection_dim: int
    image_mean: list[float]
    image_std: list[float]
    origin: str  # human-readable: "checkpoint copy" or the CLIP directory
    siglip: bool = False  # SigLIP-style tower: no class embedding, no pre-layernorm, patch-embedding bias
    n_layer_full: int = 0  # layers of the tower as trained, when the file holds fewer (Imp cuts it); 0 = n_layer


def vision_select_layer(config: dict[str, Any]) -> int:
    return Fields(config, "the vision features the projector takes").int("mm_vision_select_layer", default=-2,
                                                                         minimum=None)


def vision_tower_dir(config: dict[str, Any], checkpoint_dir: Path) -> Path | None:
    """``mm_vision_tower`` when it names a local directory (absolute, relative to cwd, or to the checkpoint)."""
    ref = config.get("mm_vision_tower") or config.get("vision_tower")
    if not ref or not isinstance(ref, str):
        return None
    for cand in (Path(ref), checkpoint_dir / ref):
        if (cand / "config.json").is_file():
            return cand
    return None


def _vision_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A CLIPModel config nests the tower under vision_config; a CLIPVisionModel config is the tower itself."""
    if not isinstance(cfg, dict):
        raise MvlmError("the vision tower's config.json is not a JSON object; re-download the vision tower")
    vc = cfg.get("vision_config")
    return vc if isinstance(vc, dict) else cfg


def _preprocessor(clip_dir: Path | None) -> tuple[list[float], list[float]]:
    if clip_dir is not None and (clip_dir / "preprocessor_config.json").is_file():
        try:
            pp = json.loads((clip_dir / "preprocessor_config.json").read_text())
            mean, std = pp.get("image_mean"), pp.get("image_std")
            if isinstance(mean, list) and isinstance(std, list) and len(mean) >= 3 and len(std) >= 3:
                return [float(x) for x in mean[:3]], [float(x) for x in std[:3]]
        except (OSError, ValueError) as e:
            raise MvlmError(f"cannot read {clip_dir / 'preprocessor_config.json'}: {e}") from e
    return list(CLIP_MEAN), list(CLIP_STD)


def _count_layers(reader: Checkpoint, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    ids = {int(m.group(1)) for n in reader.names() if (m := pat.match(n))}
    return max(ids) + 1 if ids else 0


def resolve_clip(ckpt: Checkpoint, override: Path | None, prefer_copy: bool = True) -> ClipSource:
    """The vision tower: ``--vision-tower``, else the checkpoint's own copy (V2: ``prefer_copy``) or a local
    ``mm_vision_tower`` directory (V1), else whichever of the two exists.

    Hyper-parameters come from a CLIP config when one is at hand (--vision-tower or a local mm_vision_tower);
    for a bare checkpoint copy they are read off the weight shapes, with OpenAI CLIP's 64-wide heads.
    """
    clip_dir = override if override is not None else vision_tower_dir(ckpt.config, ckpt.root)
    if override is not None and not (override / "config.json").is_file():
        raise MvlmError(f"--vision-tower {override}: no config.json there; give a local CLIP (HF transformers) directory")
    clip_cfg: dict[str, Any] = {}
    if clip_dir is not None:
        try:
            clip_cfg = _vision_config(json.loads((clip_dir / "config.json").read_text()))
        except (OSError, ValueError) as e:
            raise MvlmError(f"cannot read {clip_dir / 'config.json'}: {e}") from e

    has_copy = f"{CLIP_PREFIX_IN_CHECKPOINT}embeddings.patch_embedding.weight" in ckpt
    # V2 inference uses the copy in the checkpoint; V1 inference reloads CLIP from mm_vision_tower. --vision-tower
    # always wins.
    use_copy = has_copy and override is None and (prefer_copy or clip_dir is None)
    if use_copy:
        reader, prefix, origin = ckpt, CLIP_PREFIX_IN_CHECKPOINT, "checkpoint copy (model.vision_tower.*)"
    elif clip_dir is not None:
        reader = open_checkpoint(clip_dir)
        prefix = "vision_model."
        if f"{prefix}embeddings.patch_embedding.weight" not in reader:
            raise MvlmError(f"{clip_dir}: no vision_model.* tensors; is it a CLIP (CLIPModel / CLIPVisionModel) checkpoint?")
        origin = str(clip_dir)
    else:
        ref = ckpt.config.get("mm_vision_tower")
        raise MvlmError(
            f"no vision tower: the checkpoint has no model.vision_tower.* copy and mm_vision_tower={ref!r} is not a "
            "local directory; pass --vision-tower DIR (e.g. a download of openai/clip-vit-large-patch14-336)"
        )

    src_name = f"{clip_dir / 'config.json'}" if clip_dir is not None else "the vision tower"
    tw = read_tower(reader, prefix, origin, clip_cfg, "CLIP vision tower", src_name, layers_in_config=True)
    hidden, p, n_pos, f = tw.hidden, tw.patch, tw.n_pos, tw.fields
    grid = round((n_pos - 1) ** 0.5)
    n_head = f.int("num_attention_heads", default=max(1, hidden // OPENAI_CLIP_HEAD_DIM))
    mean, std = _preprocessor(clip_dir)
    src = tw.source(
        n_head=n_head,
        image_size=f.int("image_size", default=grid * p),
        patch_size=f.int("patch_size", default=p),
        eps=f.number("layer_norm_eps", default=1e-5, maximum=1.0),
        hidden_act=f.text("hidden_act", "quick_gelu", allowed=VISION_ACTS),
        projection_dim=f.int("projection_dim", default=0, minimum=0),
        image_mean=mean,
        image_std=std,
    )
    if src.patch_size != p or grid * grid + 1 != n_pos or src.image_size != grid * p:
        raise MvlmError(
            f"{origin}: CLIP config (image {src.image_size}, patch {src.patch_size}) does not match its weights "
            f"({n_pos} positions, {p}x{p} patches)"
        )
    if hidden % n_head:
        raise MvlmError(f"{src_name}: num_attention_heads = {n_head} does not divide the vision tower width {hidden} "
                        f"({origin}); fix num_attention_heads")
    return src


@dataclass(frozen=True)
class TowerWeights:
    """What a CLIP / SigLIP tower's weights say (width, patch, positions, layers, MLP width), checked against its
    config: ``fields`` reads the rest of that config, with the weights' view in its messages."""

    reader: Checkpoint
    prefix: str
    origin: str
    hidden: int
    patch: int
    n_pos: int
    n_layer: int
    ffn: int
    fields: Fields

    def source(self, **rest: Any) -> ClipSource:
        """The ``ClipSource`` of this tower, given what the weights cannot say (heads, image size, eps ...)."""
        return ClipSource(reader=self.reader, prefix=self.prefix, hidden=self.hidden, ffn=self.ffn, n_layer=self.n_layer,
                          origin=self.origin, **rest)


def read_tower(reader: Checkpoint, prefix: str, origin: str, cfg: dict[str, Any], what: str, source: str,
               layers_in_config: bool) -> TowerWeights:
    """Read a vision tower's shapes off its weights; the config's ``hidden_size`` / ``intermediate_size`` (and
    ``num_hidden_layers`` when ``layers_in_config``: a SigLIP copy Imp cut holds fewer) must agree with them."""
    reader.require([f"{prefix}embeddings.position_embedding.weight"], f"{what} tensors")
    hidden, p, n_pos = patch_geometry(reader, prefix, origin)
    n_layer = _count_layers(reader, prefix)
    if n_layer == 0:
        raise MvlmError(f"{origin}: the vision tower has no encoder layers")
    fc1 = f"{prefix}encoder.layers.0.mlp.fc1.weight"
    reader.require([fc1], f"{what} tensors")
    ffn = reader.shape(fc1)[0]
    weights = {"hidden_size": (hidden, f"{prefix}embeddings.patch_embedding.weight is {hidden} wide"),
               "intermediate_size": (ffn, f"{fc1} has {ffn} rows")}
    if layers_in_config:
        weights["num_hidden_layers"] = (n_layer, f"{prefix}encoder.layers.0 .. {n_layer - 1}")
    f = Fields(cfg, f"the {what}", source=source, weights=weights)
    for key, (value, _) in weights.items():
        check_config_matches(f, key, value)
    return TowerWeights(reader, prefix, origin, hidden, p, n_pos, n_layer, ffn, f)


VISION_ACTS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "gelu_new")


def patch_geometry(reader: Checkpoint, prefix: str, origin: str) -> tuple[int, int, int]:
    """(width, patch size, positions) read off the patch and position embeddings, which must fit together."""
    name = f"{prefix}embeddings.patch_embedding.weight"
    patch = reader.shape(name)
    if len(patch) != 4 or patch[1] != 3 or patch[2] != patch[3] or patch[2] < 1:
        raise MvlmError(f"{origin}: {name} is {list(patch)}, not a [width, 3, p, p] patch convolution; damaged tower?")
    hidden, p = patch[0], patch[2]
    pos = reader.shape(f"{prefix}embeddings.position_embedding.weight")
    if len(pos) != 2 or pos[1] != hidden:
        raise MvlmError(f"{origin}: {prefix}embeddings.position_embedding.weight is {list(pos)}, expected [positions, "
                        f"{hidden}] (the patch embedding is {hidden} wide); damaged or mixed tower?")
    return hidden, p, pos[0]


def check_config_matches(f: Fields, key: str, from_weights: int) -> None:
    """A vision-config value, when given, must equal what the weights say."""
    val = f.int(key, default=None)
    if val is not None and val != from_weights:
        _, evidence = f.weights[key]
        raise MvlmError(f"{f.source}: {key} = {val} but the weights say {from_weights} ({evidence}); fix {key} or use "
                        "the matching vision tower")


def check_clip_shapes(clip: ClipSource) -> None:
    """Every vision-tower tensor's shape against the tower's width and MLP size."""
    reader, pre = clip.reader, clip.prefix
    hid, ffn = Dim(clip.hidden), Dim(clip.ffn)
    kw = {"source": clip.origin, "what": "vision-tower"}
    if not clip.siglip:
        check_shape(reader, pre + "embeddings.class_embedding", (hid,), **kw)
        for part in ("weight", "bias"):
            check_shape(reader, f"{pre}pre_layrnorm.{part}", (hid,), **kw)
    else:
        check_shape(reader, pre + "embeddings.patch_embedding.bias", (hid,), **kw)
    for i in range(clip.n_layer):
        q = f"{pre}encoder.layers.{i}."
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
            check_shape(reader, f"{q}{part}.weight", (hid, hid), **kw)
            check_shape(reader, f"{q}{part}.bias", (hid,), **kw)
        for part in ("layer_norm1", "layer_norm2"):
            check_shape(reader, f"{q}{part}.weight", (hid,), **kw)
            check_shape(reader, f"{q}{part}.bias", (hid,), **kw)
        check_shape(reader, f"{q}mlp.fc1.weight", (ffn, hid), **kw)
        check_shape(reader, f"{q}mlp.fc1.bias", (ffn,), **kw)
        check_shape(reader, f"{q}mlp.fc2.weight", (hid, ffn), **kw)
        check_shape(reader, f"{q}mlp.fc2.bias", (hid,), **kw)


def _layer_metadata(clip: ClipSource, select: int) -> tuple[int, list[int] | None]:
    """(clip.vision.block_count, clip.vision.feature_layer or None) so llama.cpp stops at hidden_states[select].

    clip_graph_llava::build (tools/mtmd/models/llava.cpp) runs ``n_layer - 1`` layers when no feature layer is
    set: it assumes the file holds the whole tower and emulates LLaVA's hidden_states[-2]. The legacy converter
    also drops the last layer from the file, so only n-2 ran (docs/convert.md). We write every layer and
    ``block_count = n``: for the standard ``mm_vision_select_layer = -2`` exactly n-1 layers run, on every
    llama.cpp version (no feature_layer key needed, so builds that predate it agree). Any other select layer is
    expressed as ``clip.vision.feature_layer = [k]`` (k = number of layers to run, the non-negative
    hidden_states index), which that same function honours by running k layers.
    """
    n = clip.n_layer
    # A tower stored already cut (Imp deletes the unused last layers before saving) counts from its full depth.
    full = clip.n_layer_full or n
    k = select if select >= 0 else full + 1 + select
    if not 0 < k <= n:
        raise MvlmError(f"mm_vision_select_layer {select} is out of range for a {n}-layer vision tower")
    return n, (None if k == n - 1 else [k])


def clip_required(prefix: str, n_layer: int, siglip: bool = False) -> list[str]:
    """The tensors an image encoder needs: OpenAI CLIP (class embedding, pre-LN, no patch bias) or SigLIP (patch
    bias instead of both)."""
    names = [prefix + "embeddings.patch_embedding.weight", prefix + "embeddings.position_embedding.weight"]
    if siglip:
        names.append(prefix + "embeddings.patch_embedding.bias")
    else:
        names += [prefix + "embeddings.class_embedding", prefix + "pre_layrnorm.weight", prefix + "pre_layrnorm.bias"]
    for i in range(n_layer):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):  # fmt: skip
            names += [f"{prefix}encoder.layers.{i}.{part}.weight", f"{prefix}encoder.layers.{i}.{part}.bias"]
    return names


def _clip_plans(clip: ClipSource, outtype: str) -> list[TensorPlan]:
    clip.reader.require(clip_required(clip.prefix, clip.n_layer, clip.siglip), "vision-tower tensors")
    check_clip_shapes(clip)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, clip.n_layer)
    # clip.cpp swaps ffn_up/ffn_down back for files from the legacy converter when ffn_down's input width equals
    # n_embd. With the correct names that test is false unless ffn == hidden; then write the legacy (swapped) names
    # so that clip.cpp's swap restores the right order.
    swap_ffn = clip.ffn == clip.hidden
    plans: list[TensorPlan] = []
    reader = clip.reader
    for hf in reader.names():
        if not hf.startswith(clip.prefix):
            continue
        rel = hf[len(clip.prefix) :]
        if rel.startswith("post_layernorm") or rel.endswith("position_ids"):
            continue  # hidden_states[-2] is taken before post_layernorm; position_ids is a buffer
        m = re.match(r"encoder\.layers\.(\d+)\.", rel)
        if m and int(m.group(1)) >= clip.n_layer:
            continue
        gname = name_map.get_name("vision_tower.vision_model." + rel, try_suffixes=(".weight", ".bias"))
        if gname is None:
            continue
        if swap_ffn and ".ffn_" in gname:
            gname = gname.replace(".ffn_up", ".ffn_tmp").replace(".ffn_down", ".ffn_up").replace(".ffn_tmp", ".ffn_down")
        shape = reader.shape(hf)
        if gname == _PATCH_EMBD:
            qtype = QT.F16
        elif gname in (_CLASS_EMBD, _POS_EMBD) or len(shape) == 1 or outtype == "f32":
            qtype = QT.F32
        else:
            qtype = matrix_type(outtype, shape)
        plans.append(TensorPlan(gname, shape, qtype, _getter(reader, hf), source=hf))
    return plans


def _getter(reader: Checkpoint, hf: str, reshape: tuple[int, ...] | None = None) -> Callable[[], torch.Tensor]:
    if reshape is None:
        return lambda: reader.get(hf)
    return lambda: reader.get(hf).reshape(reshape)


def _projector_plans(ckpt: Checkpoint, spec: list[Any], outtype: str) -> list[TensorPlan]:
    ckpt.require([t.hf for t in spec], "projector tensors")
    plans = []
    for t in spec:
        shape = ckpt.shape(t.hf)
        if t.kind == "dwconv":
            if len(shape) != 4 or shape[1] != 1 or shape[2:] != (3, 3):
                raise MvlmError(f"{t.hf}: expected a depthwise 3x3 kernel [C,1,3,3], got {list(shape)}")
            out_shape = (shape[0], 3, 3)
            qtype = QT.F16
        elif t.kind == "matrix":
            out_shape = shape[:2]
            if len(shape) == 4 and shape[2:] != (1, 1) or len(shape) not in (2, 4):
                raise MvlmError(f"{t.hf}: expected a Linear or 1x1 conv weight, got {list(shape)}")
            qtype = QT.F32 if outtype == "f32" else matrix_type(outtype, out_shape)
        else:
            out_shape = shape
            qtype = QT.F32
        reshape = out_shape if out_shape != shape else None
        plans.append(TensorPlan(t.gguf, out_shape, qtype, _getter(ckpt, t.hf, reshape), source=t.hf))
    return plans


def write_mmproj_gguf(
    ckpt: Checkpoint,
    variant: Any,
    out_path: Path,
    outtype: str,
    name: str,
    vision_tower: Path | None = None,
    progress: Progress | None = None,
) -> FileSummary:
    return prepare_mmproj_gguf(ckpt, variant, outtype, name, vision_tower).write(out_path, progress)


def prepare_mmproj_gguf(
    ckpt: Checkpoint, variant: Any, outtype: str, name: str, vision_tower: Path | None = None
) -> PreparedGGUF:
    """Find and validate the vision tower and projector; plan every tensor (metadata only, no tensor data).

    ``variant``: what ``families.detect_family`` said the checkpoint is; its family's hooks find the tower, map the
    projector's tensors, check the tower against the projector and count the image tokens.
    """
    family, projector = variant.impl, variant.projector
    clip = family.vision_source(ckpt, vision_tower, variant)
    family.check_vision(projector, clip)
    cfg = Fields(ckpt.config, "the language model the projector feeds", weights=weight_hints(ckpt))
    lm_hidden = cfg.int("hidden_size")
    mm_hidden = cfg.int("mm_hidden_size", default=None)
    if mm_hidden is not None and mm_hidden != clip.hidden:
        raise MvlmError(
            f"config.json: mm_hidden_size = {mm_hidden} but the vision tower is {clip.hidden} wide ({clip.origin}); "
            "fix mm_hidden_size, or pass the right --vision-tower"
        )
    block_count, feature_layer = _layer_metadata(clip, vision_select_layer(ckpt.config))
    plans = _clip_plans(clip, outtype) + _projector_plans(ckpt, family.projector_tensors(projector), outtype)
    proj_in = next(p for p in plans if p.name.startswith(_PROJ) and p.name.endswith(".weight")).shape
    out_name = family.projector_output(projector)
    if ckpt.shape(out_name)[0] != lm_hidden:
        raise MvlmError(f"config.json: hidden_size = {lm_hidden} but the projector makes {ckpt.shape(out_name)[0]}-wide "
                        f"embeddings ({out_name} is {list(ckpt.shape(out_name))}); {FIX}")
    n_tokens = family.n_image_tokens(projector, clip, proj_in[1])
    keys = family.mmproj_keys(projector, clip)

    w = gguf.GGUFWriter(path=None, arch="clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(name)
    tower = "SigLIP" if clip.siglip else "CLIP"
    w.add_description(f"image encoder: {tower} ({clip.origin}) + {projector.upper()} projector")
    w.add_file_type(FILE_TYPES[outtype])
    if outtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_clip_has_vision_encoder(True)
    w.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)  # no typed method for this legacy key
    w.add_clip_projector_type(keys["projector_type"])
    w.add_vision_image_size(clip.image_size)
    w.add_vision_patch_size(clip.patch_size)
    w.add_vision_embedding_length(clip.hidden)
    w.add_vision_feed_forward_length(clip.ffn)
    # clip.cpp requires projection_dim but LDP/LDPv2 take their output width from the projector tensors.
    w.add_vision_projection_dim(clip.projection_dim or lm_hidden)
    w.add_vision_block_count(block_count)
    if feature_layer is not None:
        w.add_array("clip.vision.feature_layer", feature_layer)  # gguf-py 0.19 has no key constant for it
    w.add_vision_head_count(clip.n_head)
    w.add_vision_attention_layernorm_eps(clip.eps)
    w.add_vision_image_mean(clip.image_mean)
    w.add_vision_image_std(clip.image_std)
    # OpenAI CLIP uses quick_gelu (clip.cpp's default when use_gelu is false); "gelu" selects ggml's GELU (the tanh
    # form, exactly SigLIP's gelu_pytorch_tanh).
    w.add_vision_use_gelu(clip.hidden_act in ("gelu", "gelu_pytorch_tanh", "gelu_new"))

    metadata = {
        "arch": "clip",
        "projector_type": projector,
        "vision_tower": clip.origin,
        "vision_layers_in_file": clip.n_layer,
        "vision_layers_run": feature_layer[0] if feature_layer else block_count - 1,
        "vision_heads": clip.n_head,
        "image_size": clip.image_size,
        "patch_size": clip.patch_size,
        "image_mean": clip.image_mean,
        "image_std": clip.image_std,
        "image_tokens": n_tokens,
    }
    return PreparedGGUF(
        w,
        plans,
        "mmproj",
        metadata,
        release=lambda p: clip.reader.release(p.source) if p.name.startswith(_TOWER) else ckpt.release(p.source),
    )
