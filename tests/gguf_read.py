"""Test helpers shared by the family tests: read a written GGUF back with gguf-py, and the f32 parity checks."""

from __future__ import annotations

import gguf
import numpy as np


def field(reader: gguf.GGUFReader, key: str):
    """A key's value as gguf-py decodes it, or None when the file lacks the key."""
    f = reader.get_field(key)
    return None if f is None else f.contents()


def tensor(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    """A tensor as float32 in PyTorch's dimension order (gguf-py lists dimensions innermost first)."""
    t = next(t for t in reader.tensors if t.name == name)
    return np.asarray(t.data, np.float32).reshape([int(x) for x in reversed(t.shape)])


def assert_f32_parity(r: dict, image_bar: float, logits_bar: float, n_image_tokens: int) -> None:
    """``mvlm verify``'s result for f32 files: passed, the same image token count on both sides, errors under bars."""
    assert r["passed"], r["problems"]
    assert r["n_image_tokens_ref"] == r["n_image_tokens_llama"] == n_image_tokens
    assert r["image_rel_err"] <= image_bar and r["image_min_cos"] > 0.9999
    assert r["logits_rel_err"] <= logits_bar and r["top1_agree"] == 1.0
    assert r["mm_last_logits_rel_err"] <= 1e-2


def verify_f32_parity(label: str, ckpt, res, image_bar: float, logits_bar: float, n_image_tokens: int) -> dict:
    """``mvlm verify`` of a convert result's f32 files against the checkpoint: print the errors, assert parity."""
    from mvlm_convert.verify import verify

    r = verify(ckpt, res.lm.path, res.mmproj.path)
    print(f"\n[{label}] image_rel_err={r['image_rel_err']:.3g} logits_rel_err={r['logits_rel_err']:.3g} "
          f"mm_last={r.get('mm_last_logits_rel_err')}")
    assert_f32_parity(r, image_bar, logits_bar, n_image_tokens)
    return r


def assert_reference_lm_matches(theirs, ckpt, ids=(5, 17, 42, 99, 3, 250, 7)) -> None:
    """mvlm's PyTorch reference LM (``reference.load_lm``) gives transformers' ``theirs`` logits for ``ids``."""
    import numpy as np
    import torch

    from mvlm_convert import reference as ref

    with torch.no_grad():
        want = theirs(input_ids=torch.tensor([list(ids)])).logits[0].numpy()
    got = ref.lm_logits(ref.load_lm(ckpt), list(ids))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
