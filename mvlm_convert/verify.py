"""``mvlm verify``: run the independent PyTorch reference and llama.cpp on the same input and compare.

Two comparisons, each against float32 PyTorch (mvlm_convert.reference):
- image: one square RGB bitmap (image_size, default a deterministic synthetic picture) goes unchanged to both
  sides; the full [n_tokens, D] projector output is compared (relative L2 error, per-token cosine).
- logits: a fixed token sequence (the MobileVLM conversation "v1" prompt, tokenized by the GGUF's own tokenizer)
  goes to both sides; the [n_tokens, vocab] logits are compared (relative L2, max abs, argmax agreement).
Informational, not gated: the logits at the last position of the full multimodal prompt (text + image + text),
where llama.cpp uses its own image embeddings — the end-to-end path a user runs.

The llama.cpp side runs through a backend (``mvlm_core.backends``), named by ``--runtime``: "host" uses
llama-cpp-python's bindings in this process on the project's patched build; "linux-arm64" / "android-arm64" run the
target's ``mvlm-dump`` tool as a process (through ``qemu-aarch64-static`` on a non-arm64 machine); "host-bin" runs
the host build's ``mvlm-dump`` the same way.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from mvlm_convert.verify_limits import DEFAULT_IMAGE_THRESHOLD, DEFAULT_LOGITS_THRESHOLD
from mvlm_core.backends import Backend, get_backend
from mvlm_core.conversation import DEFAULT_QUESTION, IMAGE_PLACEHOLDER, v1_prompt
from mvlm_core.errors import MvlmError

# ------------------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------------------


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """||got - ref||_F / ||ref||_F over the whole matrix (float64 accumulation)."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(got - ref) / denom) if denom > 0 else float(np.linalg.norm(got - ref))


def row_cosines(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    num = (got * ref).sum(axis=1)
    den = np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1)
    return num / np.maximum(den, 1e-300)


def compare_embeddings(got: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """Figures for two [n_tokens, D] embedding matrices; shapes must agree."""
    if got.shape != ref.shape:
        return {"image_shape_llama": list(got.shape), "image_shape_ref": list(ref.shape),
                "image_rel_err": None, "image_min_cos": None, "image_mean_cos": None, "image_max_abs": None}
    cos = row_cosines(got, ref)
    return {
        "image_rel_err": rel_err(got, ref),
        "image_min_cos": float(cos.min()),
        "image_mean_cos": float(cos.mean()),
        "image_max_abs": float(np.abs(np.asarray(got, np.float64) - ref).max()),
    }


def compare_logits(got: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    if got.shape != ref.shape:
        raise MvlmError(f"logits shapes differ: llama.cpp {got.shape} vs reference {ref.shape}: vocab mismatch?")
    return {
        "logits_rel_err": rel_err(got, ref),
        "logits_max_abs": float(np.abs(np.asarray(got, np.float64) - ref).max()),
        "top1_agree": float((got.argmax(axis=1) == ref.argmax(axis=1)).mean()),
    }


# ------------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------------


def mmproj_info(mmproj_path: Path) -> dict[str, Any]:
    """image_size / mean / std / projector type written in an mmproj GGUF."""
    import gguf

    from mvlm_core.gguf_header import check_gguf

    if not Path(mmproj_path).is_file():
        raise MvlmError(f"mmproj GGUF not found: {mmproj_path}")
    check_gguf(Path(mmproj_path), "--mmproj")  # the bounded reader first: gguf-py believes whatever a header claims
    try:
        reader = gguf.GGUFReader(str(mmproj_path))
    except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
        raise MvlmError(f"cannot read {mmproj_path} as GGUF: {e}") from e

    def val(key: str):
        f = reader.get_field(key)
        if f is None:
            return None
        v = f.contents()
        return v

    return {
        "image_size": val(gguf.Keys.ClipVision.IMAGE_SIZE),
        "image_mean": val(gguf.Keys.ClipVision.IMAGE_MEAN),
        "image_std": val(gguf.Keys.ClipVision.IMAGE_STD),
        "projector_type": val(gguf.Keys.Clip.PROJECTOR_TYPE),
    }


def load_image(image, size: int) -> np.ndarray:
    """None -> synthetic; path / PIL image / uint8 array -> the one size x size RGB bitmap both sides receive."""
    from PIL import Image

    from mvlm_convert.reference import square_image, synthetic_image

    if image is None:
        return synthetic_image(size)
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8 and image.shape == (size, size, 3):
            return np.ascontiguousarray(image)
        image = Image.fromarray(np.asarray(image, np.uint8))
    if isinstance(image, (str, Path)):
        path = image
        from mvlm_core.images import check_image_file

        check_image_file(path)
        try:
            image = Image.open(path)
            image.load()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise MvlmError(f"cannot read image {path}: {e}") from None
    return square_image(image, size)



def image_embedding(mmproj_path: Path, gguf_path: Path, image=None, runtime: str | Backend = "host") -> np.ndarray:
    """llama.cpp's [n_tokens, D] image embedding for ``image`` (None = the synthetic picture).

    Reusable for comparing e.g. a quantized mmproj with the f16 one on exactly the same pixels.
    """
    info = mmproj_info(mmproj_path)
    size = int(info["image_size"] or 336)
    return get_backend(runtime).image_embedding(Path(mmproj_path), Path(gguf_path), load_image(image, size))


# ------------------------------------------------------------------------------------------------------------------
# verify
# ------------------------------------------------------------------------------------------------------------------


def _verify_vision(rt, result: dict[str, Any], checkpoint_dir: Path, gguf_path: Path, mmproj_path: Path, image,
                   vision_tower: Path | None, image_threshold: float, question: str | None, kv_cache: str,
                   lm) -> list[str]:
    """The image half of :func:`verify`: the same bitmap through the PyTorch tower + projector and through llama.cpp
    (figures into ``result``), then (``question`` given) the end-to-end last-position logits. Returns the problems."""
    import torch

    from mvlm_convert import reference as ref

    problems: list[str] = []
    with _reference_loads(checkpoint_dir):
        vis = ref.load_vision(checkpoint_dir, vision_tower)
    info = mmproj_info(mmproj_path)
    size = vis.image_size
    if info["image_size"] is not None and int(info["image_size"]) != size:
        problems.append(f"mmproj image_size {info['image_size']} != checkpoint CLIP image size {size}")
    for key, mine in (("image_mean", vis.mean), ("image_std", vis.std)):
        theirs = info.get(key)
        ok = theirs is not None and np.allclose(np.asarray(theirs, np.float64), mine, rtol=0, atol=1e-6)
        result[f"{key}_match"] = bool(ok)
        if not ok:
            problems.append(f"mmproj {key} {theirs} != checkpoint preprocessor {list(mine)}")
    rgb = load_image(image, size)
    result["image"] = "synthetic" if image is None else str(image)
    ref_emb = vis.embed(rgb)
    got_emb = rt.image_embedding(mmproj_path, gguf_path, rgb)
    result["n_image_tokens_ref"] = int(ref_emb.shape[0])
    result["n_image_tokens_llama"] = int(got_emb.shape[0])
    result["image_embd_dim"] = int(ref_emb.shape[1])
    result["projector_type"] = vis.projector_type
    result["vision_tower"] = vis.origin
    result.update(compare_embeddings(got_emb, ref_emb))
    if result["image_rel_err"] is None:
        problems.append(f"image embedding shapes differ: llama.cpp {list(got_emb.shape)} vs reference "
                        f"{list(ref_emb.shape)}")
    elif result["image_rel_err"] > image_threshold:
        problems.append(f"image relative error {result['image_rel_err']:.3g} > {image_threshold:g}")

    # -- end to end (informational): text + llama.cpp's image embeddings + text, last-position logits ----------
    if question is not None and result["image_rel_err"] is not None:
        try:
            mm = rt.multimodal(mmproj_path, gguf_path, rgb, v1_prompt(question, IMAGE_PLACEHOLDER),
                               kv_cache=kv_cache)
            emb_layer = lm.get_input_embeddings()
            with torch.no_grad():
                seq = torch.cat([
                    emb_layer(torch.tensor(mm.before, dtype=torch.long)),
                    torch.from_numpy(ref_emb),
                    emb_layer(torch.tensor(mm.after, dtype=torch.long)),
                ])
            ref_last = ref.lm_logits(lm, [], inputs_embeds=seq)[-1]
            result["mm_n_tokens"] = len(mm.before) + mm.n_image_tokens + len(mm.after)
            result["mm_last_logits_rel_err"] = rel_err(mm.last_logits, ref_last)
            result["mm_last_top1_agree"] = bool(mm.last_logits.argmax() == ref_last.argmax())
        except MvlmError as e:
            result["mm_error"] = str(e)
    return problems


@contextlib.contextmanager
def _reference_loads(checkpoint_dir: Path):
    """The PyTorch reference built from config.json: weights of other shapes (a config that contradicts its weights)
    are one line, not torch's traceback."""
    try:
        yield
    except RuntimeError as e:
        if "size mismatch" not in str(e) and "Error(s) in loading state_dict" not in str(e):
            raise
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise MvlmError(f"{checkpoint_dir}: its config.json does not describe its weights ({first[:200]}): fix "
                        "config.json or use the weights it belongs to (`mvlm convert` names the field)") from None


def verify(
    checkpoint_dir: Path,
    gguf_path: Path,
    mmproj_path: Path | None,
    image=None,
    vision_tower: Path | None = None,
    runtime: str | Backend = "host",
    image_threshold: float = DEFAULT_IMAGE_THRESHOLD,
    logits_threshold: float = DEFAULT_LOGITS_THRESHOLD,
    question: str = DEFAULT_QUESTION,
    multimodal: bool = True,
    kv_cache: str = "f32",
) -> dict[str, Any]:
    """Compare llama.cpp with the PyTorch reference; returns the figures and ``passed``.

    ``mmproj_path`` None checks only the language model (MobileLLaMA has no vision part).
    """

    from mvlm_convert import reference as ref
    from mvlm_core.gguf_header import check_gguf

    checkpoint_dir = Path(checkpoint_dir)
    check_gguf(Path(gguf_path), "--gguf", "lm")  # the bounded reader, before llama.cpp or gguf-py reads them
    if mmproj_path is not None:
        check_gguf(Path(mmproj_path), "--mmproj", "mmproj")
    rt = get_backend(runtime)
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint_dir),
        "gguf": str(gguf_path),
        "mmproj": str(mmproj_path) if mmproj_path else None,
        "runtime": rt.name,
        "image_threshold": image_threshold,
        "logits_threshold": logits_threshold,
        "kv_cache": kv_cache,
    }
    problems: list[str] = []
    t0 = time.perf_counter()

    # -- language model: same token ids to both sides ------------------------------------------------------------
    prompt = v1_prompt(question)
    tokens = rt.tokenize(Path(gguf_path), prompt)
    result["prompt"] = prompt
    result["n_text_tokens"] = len(tokens)
    with _reference_loads(checkpoint_dir):
        lm = ref.load_lm(checkpoint_dir)
    ref_logits = ref.lm_logits(lm, tokens)
    got_logits = rt.logits(Path(gguf_path), tokens, kv_cache=kv_cache)
    result.update(compare_logits(got_logits, ref_logits))
    if result["logits_rel_err"] > logits_threshold:
        problems.append(f"logits relative error {result['logits_rel_err']:.3g} > {logits_threshold:g}")

    # -- vision: same bitmap to both sides ------------------------------------------------------------------------
    if mmproj_path is not None:
        problems += _verify_vision(rt, result, checkpoint_dir, Path(gguf_path), Path(mmproj_path), image, vision_tower,
                                   image_threshold, question if multimodal else None, kv_cache, lm)

    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["problems"] = problems
    result["passed"] = not problems
    return result
