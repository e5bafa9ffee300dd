"""`mvlm quantize`: llama.cpp's quantizer on real GGUFs (a tiny converted MobileVLM and the real SmolLM2-135M)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from mvlm_convert import quantize as q
from mvlm_core.errors import MvlmError

MVLM = [sys.executable, "-m", "mvlm"]


def _mvlm(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    r = subprocess.run([*MVLM, *args], capture_output=True, text=True, timeout=900)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory, host_runtime) -> tuple[Path, Path]:
    """A tiny MobileVLM V2 converted to F32: (lm, mmproj)."""
    from mvlm_convert.convert import convert
    from mvlm_convert.families.mobilevlm import make_tiny_checkpoint

    d = tmp_path_factory.mktemp("q")
    ckpt = make_tiny_checkpoint(d / "ckpt", variant="v2")
    res = convert(ckpt, d / "out", outtype="f32", name="Tiny", progress=False)
    return res.lm.path, res.mmproj.path


def test_output_names_follow_llama_cpp():
    assert q.output_name(Path("MobileVLM_V2-1.7B-F16.gguf"), "Q4_K_S") == "MobileVLM_V2-1.7B-Q4_K_S.gguf"
    assert q.output_name(Path("mmproj-MobileVLM_V2-1.7B-F16.gguf"), "Q8_0") == "mmproj-MobileVLM_V2-1.7B-Q8_0.gguf"
    assert q.output_name(Path("model.gguf"), "Q8_0") == "model-Q8_0.gguf"


def test_unknown_type_lists_valid_ones():
    with pytest.raises(MvlmError) as e:
        q.parse_types("q4_k_s,q3_z", "lm")
    assert "q3_z" in str(e.value) and "q4_k_m" in str(e.value) and "q8_0" in str(e.value)
    with pytest.raises(MvlmError, match="valid types are"):
        q.parse_types("q4_k_s", "mmproj")  # K-quants are not offered for clip files


def test_kl_is_zero_for_identical_and_positive_otherwise():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 50))
    kl, top1 = q.kl_and_top1(a, a)
    assert kl == pytest.approx(0, abs=1e-12) and top1 == 1.0
    b = a + rng.normal(scale=0.5, size=a.shape)
    # independent computation of KL(p||q) per row
    p = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
    qq = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
    expect = float(np.mean(np.sum(p * np.log(p / qq), -1)))
    assert q.kl_and_top1(a, b)[0] == pytest.approx(expect, rel=1e-9)


def test_not_a_gguf(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"PK\x03\x04 not a gguf")
    r = _mvlm("quantize", str(f), "--type", "q8_0")
    assert r.returncode != 0 and "not a GGUF file" in r.stderr
    assert r.stderr.splitlines()[0].startswith("error:"), r.stderr  # one line: no empty line before it
    assert list(tmp_path.iterdir()) == [f]


def test_truncated_gguf(tmp_path, smollm2_gguf):
    f = tmp_path / "cut-F16.gguf"
    with open(smollm2_gguf, "rb") as src:
        f.write_bytes(src.read(100_000))
    r = _mvlm("quantize", str(f), "--type", "q8_0", "--no-quality")
    assert r.returncode != 0 and r.stderr.splitlines()[0].startswith("error:"), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut-F16.gguf"]


@pytest.mark.slow
def test_already_quantized_needs_allow_requantize(tmp_path, smollm2_gguf, host_runtime):
    r = _mvlm("quantize", str(smollm2_gguf), "--type", "q8_0", "--outdir", str(tmp_path))
    assert r.returncode == 2 and "already quantized" in r.stderr and "--allow-requantize" in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_requantize_real_smollm2_orders_quality(tmp_path, smollm2_gguf, host_runtime):
    r = _mvlm("quantize", str(smollm2_gguf), "--type", "q8_0,q4_0", "--allow-requantize", "--outdir", str(tmp_path),
              "--json", check=True)
    res = {d["type"]: d for d in json.loads(r.stdout)}
    for t in ("Q8_0", "Q4_0"):
        assert Path(res[t]["path"]).is_file()
        assert 0 <= res[t]["kl_div"] < 5 and 0 <= res[t]["top1_agree"] <= 1
    # q8_0 keeps the Q4_1 model almost exactly; q4_0 re-rounds it: strictly worse
    assert res["Q8_0"]["kl_div"] < res["Q4_0"]["kl_div"]
    assert res["Q8_0"]["top1_agree"] >= res["Q4_0"]["top1_agree"]
    assert res["Q8_0"]["top1_agree"] > 0.9


@pytest.mark.slow
def test_tiny_lm_sizes_and_quality(tmp_path, tiny_f32, host_runtime):
    lm, _ = tiny_f32
    results = q.run(lm, "q8_0,q4_0,q4_k_s,f16", outdir=tmp_path)
    by = {r.type: r for r in results}
    f32_size = lm.stat().st_size
    # sizes shrink as the type says (token embeddings and norms keep some floats in tiny models)
    assert by["F16"].size_bytes < 0.6 * f32_size
    assert by["Q8_0"].size_bytes < by["F16"].size_bytes
    assert by["Q4_0"].size_bytes < by["Q8_0"].size_bytes
    for r in results:
        assert r.path.name == f"Tiny-{r.type}.gguf"
        assert np.isfinite(r.kl_div) and 0 <= r.top1_agree <= 1
        # llama.cpp loads it and it says so in the header
        rd = gguf.GGUFReader(r.path)
        assert rd.get_field("general.architecture").contents() == "llama"
    assert by["F16"].kl_div < by["Q8_0"].kl_div < by["Q4_0"].kl_div
    # each output runs in llama.cpp
    out = subprocess.run([host_runtime / "bin" / "llama-completion", "-m", by["Q4_0"].path, "-p", "hello", "-n", "4",
                          "-no-cnv", "--temp", "0", "-t", "2"], capture_output=True, text=True, errors="replace", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.slow
def test_mmproj_quantize_keeps_clip_required_tensors_float(tmp_path, tiny_f32):
    lm, mmproj = tiny_f32
    results = q.run(mmproj, "q8_0,q4_0", outdir=tmp_path, lm_for_mmproj=lm)
    by = {r.type: r for r in results}
    assert by["Q4_0"].size_bytes < by["Q8_0"].size_bytes < mmproj.stat().st_size
    rd = gguf.GGUFReader(by["Q4_0"].path)
    types = {t.name: t.tensor_type for t in rd.tensors}
    assert types["v.patch_embd.weight"] in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32)
    assert types["v.position_embd.weight"] in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32)
    assert any(t == gguf.GGMLQuantizationType.Q4_0 for t in types.values())
    # damage to image embeddings is measured with the real clip.cpp, and q8_0 hurts less than q4_0
    assert 0.9 < by["Q8_0"].image_cos <= 1.0
    assert by["Q8_0"].image_cos > by["Q4_0"].image_cos


@pytest.mark.slow
def test_unwritable_outdir(tmp_path, tiny_f32_plain):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores mode bits: use a path under a file instead
            ro = tmp_path / "file" / "sub"
            (tmp_path / "file").write_text("")
        r = _mvlm("quantize", str(tiny_f32_plain), "--type", "q8_0", "--outdir", str(ro), "--no-quality")
        assert r.returncode != 0 and "error:" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        os.chmod(tmp_path / "ro", 0o700)


@pytest.fixture(scope="module")
def tiny_f32_plain(tmp_path_factory) -> Path:
    from mvlm_convert.convert import convert
    from mvlm_convert.families.mobilevlm import make_tiny_checkpoint

    d = tmp_path_factory.mktemp("qp")
    ckpt = make_tiny_checkpoint(d / "ckpt", variant="mobilellama")
    return convert(ckpt, d / "out", outtype="f32", name="TinyLM", progress=False).lm.path


@pytest.mark.slow
def test_disk_full_leaves_nothing(small_fs, tiny_f32_plain, host_runtime):
    out = small_fs(64 * 1024)  # a real filesystem with 64 KiB: the q8_0 file does not fit
    r = _mvlm("quantize", str(tiny_f32_plain), "--type", "q8_0", "--outdir", str(out), "--no-quality")
    assert r.returncode == 28, r.stderr  # a full disk (docs/reliability.md)
    assert "space" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_disk_full_mid_write_lm_and_mmproj(small_fs, tiny_f32, host_runtime):
    """Past the free-space check: the quantizer itself hits ENOSPC; one clear error, no partial file."""
    lm, mmproj = tiny_f32
    out = small_fs(64 * 1024)
    with pytest.raises(MvlmError, match="disk full") as e:
        q.quantize_lm(lm, out / "Tiny-Q8_0.gguf", "Q8_0", host_runtime / "bin" / "llama-quantize")
    assert list(out.iterdir()) == [] and e.value.exit_code == 28
    with pytest.raises(MvlmError, match="disk full") as e:
        q.quantize_mmproj(mmproj, out / "mmproj-Tiny-Q8_0.gguf", "Q8_0")
    assert list(out.iterdir()) == [] and e.value.exit_code == 28


def test_sizes_in_messages_differ_when_the_sizes_do():
    assert q.human_bytes(1_700_000) == "1.62 MiB" and q.human_bytes(2_000_000) == "1.91 MiB"
    assert q.human_bytes(655_360) == "640.0 KiB" and q.human_bytes(512) == "512 bytes"
    assert q.human_bytes(3 * 2**30) == "3.00 GiB"


def test_not_enough_space_says_sizes_that_differ(small_fs, tiny_f32_plain):
    """~1.7 MB free for ~1.9 MB of outputs used to read "about 2 MB needed, 2 MB free"; the check fires before
    anything is written, exit 28 (a full disk), nothing left."""
    import re

    _, _, n_weights, _ = q.read_header(tiny_f32_plain)
    types = [t for t in ("F32", "F16", "Q8_0", "Q4_0") if n_weights * q.LM_TYPES[t] / 8 <= 2.4e6]
    need = 0
    chosen = []
    for t in types:  # outputs adding up to 1.6-2.4 MB, the range where whole MB round alike
        if need + int(n_weights * q.LM_TYPES[t] / 8) <= 2.4e6:
            need += int(n_weights * q.LM_TYPES[t] / 8)
            chosen.append(t)
    assert 1.6e6 <= need <= 2.4e6, (n_weights, need)
    out = small_fs(need - 160 * 1024)
    free = os.statvfs(out).f_bavail * os.statvfs(out).f_frsize
    assert free < need and round(need / 1e6) == round(free / 1e6) == 2  # the case that printed "2 MB ... 2 MB"
    r = _mvlm("quantize", str(tiny_f32_plain), "--type", ",".join(t.lower() for t in chosen), "--outdir", str(out),
              "--no-quality")
    assert r.returncode == 28 and "Traceback" not in r.stderr, r.stderr
    m = re.search(r"about ([0-9.]+ \w+) needed, ([0-9.]+ \w+) free", r.stderr)
    assert m and m.group(1) != m.group(2), r.stderr
    assert list(out.iterdir()) == []
