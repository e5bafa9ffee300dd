"""The papers' peers: LLaVA-1.5 (liuhaotian and llava-hf layouts, ``mlp``), Xmodel-VLM (XDP, runtime patch 0003), Imp.

Fast tests convert tiny checkpoints (each family's tiny_checkpoint maker) and read the GGUFs back with gguf.GGUFReader, check
the XDP reference against loops written here, and check the reference's llava-hf path against transformers' own
LlavaForConditionalGeneration. Slow tests run ``verify`` against the patched host runtime (fixture host_runtime).
"""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from gguf_read import field, tensor

from mvlm_convert import reference as ref
from mvlm_convert.convert import convert
from mvlm_convert.families import detect_family
from mvlm_convert.families.llava import make_tiny_llava
from mvlm_convert.families.tiny_parts import CLIP, LM
from mvlm_convert.families.xmodel import make_tiny_xmodel, xdp_forward
from mvlm_core.errors import MvlmError

F32_IMAGE_BAR = 2e-3
F32_LOGITS_BAR = 1e-5  # f32 weights + f32 KV cache: float32 rounding only


# ---------------------------------------------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------------------------------------------


def test_detection_of_each_peer():
    llava = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "mm_projector_type": "mlp2x_gelu"}
    assert (detect_family(llava).family, detect_family(llava).projector) == ("llava", "mlp")
    hf = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "text_config": {}}
    assert detect_family(hf).variant == "llava-hf"
    for name in ("xdpnet", "xdpnetv10_4"):
        x = {"architectures": ["XmodelLMForCausalLM"], "model_type": "xmodelvlm", "mm_projector_type": name}
        assert (detect_family(x).family, detect_family(x).projector) == ("xmodel", "xdp")
    # MobileVLM is unaffected
    assert detect_family({"architectures": ["MobileLlamaForCausalLM"], "mm_projector_type": "ldpnetv2"}).projector == "ldpv2"


def test_llava_linear_projector_refused():
    cfg = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "mm_projector_type": "mlp3x_gelu"}
    with pytest.raises(MvlmError, match="mlp3x_gelu"):
        detect_family(cfg)


# ---------------------------------------------------------------------------------------------------------------
# conversion (tensors read back from the written files)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["liuhaotian", "hf4", "hf5"])
def test_llava_layouts_convert(tmp_path, layout):
    ckpt = make_tiny_llava(tmp_path / "ckpt", layout=layout)
    res = convert(ckpt, tmp_path / "out", outtype="f32", progress=False)
    assert (res.family, res.mmproj.metadata["projector_type"]) == ("llava", "mlp")
    lm = gguf.GGUFReader(str(res.lm.path))
    mm = gguf.GGUFReader(str(res.mmproj.path))
    src = ref.StateReader(ckpt)  # the reference's own loader (maps llava-hf names independently)
    assert np.array_equal(tensor(lm, "token_embd.weight"), src.get("model.embed_tokens.weight").numpy())
    assert np.array_equal(tensor(lm, "output.weight"), src.get("lm_head.weight").numpy())
    assert np.array_equal(tensor(mm, "mm.0.weight"), src.get("model.mm_projector.0.weight").numpy())
    assert np.array_equal(tensor(mm, "mm.2.bias"), src.get("model.mm_projector.2.bias").numpy())
    assert field(mm, gguf.Keys.Clip.PROJECTOR_TYPE) == "mlp"
    # every CLIP layer written; select layer -2 = block_count - 1 layers run (no feature_layer key needed)
    assert field(mm, gguf.Keys.ClipVision.BLOCK_COUNT) == CLIP["layers"]
    assert field(mm, "clip.vision.feature_layer") is None
    assert field(lm, "llama.block_count") == LM["layers"]
    eps = field(lm, "llama.attention.layer_norm_rms_epsilon")
    # liuhaotian config says 1e-5; the llava-hf text_config leaves it out, so LlamaConfig's default 1e-6 applies
    assert math.isclose(eps, 1e-5 if layout == "liuhaotian" else 1e-6, rel_tol=1e-6)
    tmpl = field(lm, "tokenizer.chat_template")
    assert "USER: " in tmpl and "ASSISTANT:" in tmpl
    if layout != "liuhaotian":
        tokens = field(lm, "tokenizer.ggml.tokens")
        assert tokens[-1] == "<image>" and len(tokens) == src.get("model.embed_tokens.weight").shape[0]


def test_llava_liuhaotian_without_a_local_tower_names_the_fix(tmp_path):
    import json

    ckpt = make_tiny_llava(tmp_path / "ckpt", layout="liuhaotian")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MvlmError, match="--vision-tower"):
        convert(ckpt, tmp_path / "out", progress=False)
    assert not list(tmp_path.glob("out/*.gguf"))
    # the fix the message names works
    res = convert(ckpt, tmp_path / "out", vision_tower=ckpt / "clip-vit-tiny-patch14-336", progress=False)
    assert res.mmproj.metadata["vision_tower"] == str(ckpt / "clip-vit-tiny-patch14-336")


@pytest.mark.parametrize(("key", "value", "match"), [("vision_feature_select_strategy", "full", "drops CLS"),
                                                     ("vision_feature_layer", [-2, -5], "several")])
def test_llava_hf_features_llama_cpp_cannot_take_are_refused(tmp_path, key, value, match):
    import json

    ckpt = make_tiny_llava(tmp_path / "ckpt", layout="hf5")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[key] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MvlmError, match=match):
        convert(ckpt, tmp_path / "out", progress=False)


@pytest.mark.parametrize(("name", "factor", "tokens"), [("xdpnet", 4, 144), ("xdpnet", 1, 576), ("xdpnetv10_2", 2, 288)])
def test_xmodel_factor_comes_from_the_weight_shape(tmp_path, name, factor, tokens):
    ckpt = make_tiny_xmodel(tmp_path / "ckpt", factor=factor, projector_type=name)
    res = convert(ckpt, tmp_path / "out", outtype="f32", progress=False)
    assert res.family == "xmodel" and res.mmproj.metadata["image_tokens"] == tokens
    mm = gguf.GGUFReader(str(res.mmproj.path))
    assert field(mm, gguf.Keys.Clip.PROJECTOR_TYPE) == "xdp"
    assert tensor(mm, "mm.0.weight").shape == (LM["hidden"], factor * CLIP["hidden"])
    lm = gguf.GGUFReader(str(res.lm.path))
    assert field(lm, "llama.attention.head_count_kv") == 2  # GQA
    assert math.isclose(field(lm, "llama.attention.layer_norm_rms_epsilon"), 1e-5, rel_tol=1e-6)  # XModelConfig


def test_xdp_width_that_is_not_whole_tokens_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = make_tiny_xmodel(tmp_path / "ckpt", factor=1, weights="safetensors")
    sd = load_file(str(ckpt / "model.safetensors"))
    sd["model.mm_projector.mlp.0.weight"] = torch.zeros(LM["hidden"], CLIP["hidden"] + 8, dtype=torch.bfloat16)
    save_file(sd, str(ckpt / "model.safetensors"))
    with pytest.raises(MvlmError, match="XDP input width") as e:
        convert(ckpt, tmp_path / "out", progress=False)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------------------------


def test_xdp_reference_by_hand():
    rng = np.random.default_rng(7)
    n, d, h, f = 8, 3, 5, 4
    feats = rng.standard_normal((n, d))
    w0, b0 = rng.standard_normal((h, f * d)), rng.standard_normal(h)
    w2, b2 = rng.standard_normal((h, h)), rng.standard_normal(h)
    want = []
    for j in range(n // f):
        row = [feats[j * f + k, c] for k in range(f) for c in range(d)]  # f consecutive tokens, concatenated
        y = [sum(w0[o, i] * row[i] for i in range(f * d)) + b0[o] for o in range(h)]
        y = [v * math.tanh(math.log1p(math.exp(v))) for v in y]  # Mish
        want.append([sum(w2[o, i] * y[i] for i in range(h)) + b2[o] for o in range(h)])
    t = {"p.0.weight": w0, "p.0.bias": b0, "p.2.weight": w2, "p.2.bias": b2}
    got = xdp_forward(torch.tensor(feats), lambda k: torch.tensor(t[k]), prefix="p.")
    np.testing.assert_allclose(got.numpy(), np.array(want), rtol=1e-10, atol=1e-10)


@pytest.mark.slow  # more than ~3 s here (fast lane: pytest -m 'not slow')
def test_reference_llava_hf_matches_transformers(tmp_path):
    """The reference's llava-hf path (own renaming, hand-written MLP) == transformers' LlavaForConditionalGeneration."""
    from transformers import LlavaForConditionalGeneration

    ckpt = make_tiny_llava(tmp_path / "ckpt", layout="hf5", dtype=torch.float32)
    model = LlavaForConditionalGeneration.from_pretrained(str(ckpt), torch_dtype=torch.float32).eval()
    vis = ref.load_vision(ckpt)
    pixels = vis.preprocess(ref.synthetic_image(336))
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                       vision_feature_select_strategy="default")
    theirs = out if isinstance(out, torch.Tensor) else getattr(out, "pooler_output", out)
    if isinstance(theirs, (list, tuple)):
        theirs = theirs[0]
    theirs = theirs.reshape(-1, LM["hidden"]).numpy()
    mine = vis.embed(ref.synthetic_image(336))
    np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# parity through the patched host runtime
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peers(tmp_path_factory, host_runtime):
    root = tmp_path_factory.mktemp("peers")
    made = {}
    for layout in ("liuhaotian", "hf4", "hf5"):
        made[layout] = make_tiny_llava(root / layout, layout=layout, weights="bin" if layout == "hf4" else "safetensors")
    for factor in (4, 1):
        made[f"xdp{factor}"] = make_tiny_xmodel(root / f"xdp{factor}", factor=factor)
    return root, made


def _show(tag, r):
    keys = ("image_rel_err", "image_min_cos", "logits_rel_err", "top1_agree", "n_image_tokens_ref",
            "n_image_tokens_llama", "mm_last_logits_rel_err")
    print(f"\n[{tag}] " + " ".join(f"{k}={r.get(k)!r}" for k in keys))


@pytest.mark.slow
@pytest.mark.parametrize(("key", "n_tokens"), [("liuhaotian", 576), ("hf4", 576), ("hf5", 576), ("xdp4", 144),
                                               ("xdp1", 576)])
def test_verify_f32_parity(peers, key, n_tokens):
    from mvlm_convert.verify import verify

    root, made = peers
    res = convert(made[key], root / f"{key}-f32", outtype="f32", progress=False)
    r = verify(made[key], res.lm.path, res.mmproj.path)
    _show(key, r)
    assert r["passed"], r["problems"]
    assert r["n_image_tokens_ref"] == r["n_image_tokens_llama"] == n_tokens
    assert r["image_rel_err"] <= F32_IMAGE_BAR and r["image_min_cos"] > 0.9999
    assert r["logits_rel_err"] <= F32_LOGITS_BAR and r["top1_agree"] == 1.0
    assert r["mm_last_logits_rel_err"] <= 1e-2


@pytest.mark.slow
def test_xdp_token_order_matters(peers):
    """Negative control: grouping f tokens any other way (strided) than consecutive raster order must not match."""
    from mvlm_convert.verify import image_embedding, rel_err

    root, made = peers
    res = convert(made["xdp4"], root / "xdp4-neg", outtype="f32", progress=False)
    got = image_embedding(res.mmproj.path, res.lm.path)
    vis = ref.load_vision(made["xdp4"])
    feats = vis.features(vis.preprocess(ref.synthetic_image(336)))
    right = xdp_forward(feats, vis.projector_get).numpy()
    n, d = feats.shape
    strided = feats.reshape(4, n // 4, d).transpose(0, 1).reshape(n, d)  # tokens i, i+144, i+288, i+432 together
    wrong = xdp_forward(strided, vis.projector_get).numpy()
    assert rel_err(got, right) <= F32_IMAGE_BAR
    assert rel_err(got, wrong) > 0.1


@pytest.mark.slow
def test_verify_f16_llava_and_xdp_within_defaults(peers):
    from mvlm_convert.verify import verify

    root, made = peers
    for key in ("hf5", "xdp4"):
        res = convert(made[key], root / f"{key}-f16", outtype="f16", progress=False)
        r = verify(made[key], res.lm.path, res.mmproj.path, kv_cache="f16")
        _show(f"{key} f16", r)
        assert r["passed"], r["problems"]
