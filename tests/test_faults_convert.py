"""Faults of `mvlm convert` / `mvlm quantize` found by an independent probe (issue 13), each reproduced for real.

- a failed re-convert / re-quantize (a real full tmpfs) keeps the earlier files byte-identical, no temporaries;
- config values that contradict the weights (or have the wrong type) are refused in one line naming the field, its
  value and what the weights say, for every LM writer (llama, phi2, qwen2, phi3) and the vision side; quantize
  refuses a GGUF llama.cpp cannot load;
- shard index entries outside the checkpoint (``..``, absolute, symlink) are refused;
- a real SIGTERM sent to a real `mvlm convert` / `mvlm quantize` mid-write leaves no temporary, no orphan
  llama-quantize, and the earlier files untouched;
- every family's summary (table and --json) names its llama.cpp architecture (Imp v1 used to crash: n_head_kv);
- a pickle holding code is refused as such (a marker file proves the code never ran); truncated files say so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from mvlm_convert.convert import convert
from mvlm_convert.families.imp import make_tiny_imp, make_tiny_imp15
from mvlm_convert.families.llava import make_tiny_llava
from mvlm_convert.families.mobilevlm import make_tiny_checkpoint
from mvlm_convert.families.tiny_parts import train_tokenizer
from mvlm_convert.families.xmodel import make_tiny_xmodel
from mvlm_core.errors import MvlmError

MVLM = [sys.executable, "-m", "mvlm"]
PAGE = 4096


def mvlm(*args: object, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*MVLM, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def digests(d: Path) -> dict[str, str]:
    """name -> sha256 of every entry of ``d`` (hidden temporaries included)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def pages(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


def edit_config(ckpt: Path, **changes: object) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


# ---------------------------------------------------------------------------------------------------------------
# 1. a failed re-convert / re-quantize keeps the earlier files exactly as they were
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_failed_reconvert_keeps_earlier_files_byte_identical(tmp_path, small_fs):
    """Earlier good LM + mmproj in place; the new LM fits on the (real, tmpfs) disk, the new mmproj does not."""
    earlier_ckpt = make_tiny_checkpoint(tmp_path / "earlier", variant="v2", seed=1)
    new_ckpt = make_tiny_checkpoint(tmp_path / "new", variant="v2", seed=0)
    scratch = tmp_path / "scratch"
    earlier = convert(earlier_ckpt, scratch / "earlier", outtype="f32", name="T", progress=False)
    sized = convert(new_ckpt, scratch / "sized", outtype="f32", name="T", progress=False)  # what the new run writes
    assert digests(scratch / "earlier")["T-F32.gguf"] != digests(scratch / "sized")["T-F32.gguf"]
    # Room for the earlier pair + the new LM + part of the new mmproj. Also too small for the old write order (new LM
    # renamed over the earlier one, freeing it, then the mmproj): that needs earlier mmproj + new LM + new mmproj,
    # more than this as long as the LM is the smaller file (f32: 2.0 vs 2.4 MB), so it fails on the mmproj as well.
    assert earlier.lm.nbytes < sized.mmproj.nbytes
    base = pages(earlier.lm.nbytes) + pages(earlier.mmproj.nbytes) + pages(sized.lm.nbytes)
    size = base + pages((pages(sized.mmproj.nbytes) - pages(earlier.lm.nbytes)) // 2)
    out = small_fs(size)
    for f in earlier.files:
        shutil.copy(f, out / f.name)
    before = digests(out)

    r = mvlm("convert", new_ckpt, "-o", out, "--outtype", "f32", "--name", "T")
    assert r.returncode == 28, r.stderr  # a full disk
    errs = error_lines(r.stderr)
    assert len(errs) == 1 and "disk full" in errs[0] and "mmproj-T-F32.gguf" in errs[0], r.stderr  # the 2nd file
    assert "Traceback" not in r.stderr
    assert digests(out) == before  # both earlier files byte-identical; no temporary, no new file

    # with room, the same command replaces both files together
    bigger = small_fs(size * 2)
    for f in earlier.files:
        shutil.copy(f, bigger / f.name)
    r = mvlm("convert", new_ckpt, "-o", bigger, "--outtype", "f32", "--name", "T", "--json")
    assert r.returncode == 0, r.stderr
    assert digests(bigger) == digests(scratch / "sized")


@pytest.mark.slow
def test_failed_requantize_keeps_earlier_outputs(tmp_path, small_fs, host_runtime):
    """Three --type outputs; the first two fit, the third hits a real full disk: all three earlier files stay."""
    from mvlm_convert import quantize as q

    lm_new = convert(make_tiny_checkpoint(tmp_path / "c0", variant="mobilellama", seed=0), tmp_path / "in",
                     outtype="f32", name="T", progress=False).lm.path
    lm_old = convert(make_tiny_checkpoint(tmp_path / "c1", variant="mobilellama", seed=1), tmp_path / "old",
                     outtype="f32", name="T", progress=False).lm.path
    types = "q8_0,q4_0,f16"
    old = q.run(lm_old, types, outdir=tmp_path / "old_q", quality=False)
    _, _, n_weights, _ = q.read_header(lm_new)
    estimate = sum(int(n_weights * q.LM_TYPES[t] / 8) for t in ("Q8_0", "Q4_0", "F16"))  # quantize's own check
    size = sum(pages(r.size_bytes) for r in old) + pages(estimate + 6 * PAGE)
    out = small_fs(size)
    for r in old:
        shutil.copy(r.path, out / r.path.name)
    before = digests(out)

    r = mvlm("quantize", lm_new, "--type", types, "-o", out, "--no-quality")
    assert r.returncode == 28, r.stdout + r.stderr  # a full disk
    errs = error_lines(r.stderr)
    assert len(errs) == 1 and "disk full" in errs[0] and "T-F16.gguf" in errs[0], r.stderr  # past the free-space check
    assert "Traceback" not in r.stderr
    assert digests(out) == before


# ---------------------------------------------------------------------------------------------------------------
# 6. config values that contradict the weights, or have the wrong type
# ---------------------------------------------------------------------------------------------------------------
MAKERS = {
    "v1": lambda d: make_tiny_checkpoint(d, variant="v1"),
    "v2": lambda d: make_tiny_checkpoint(d, variant="v2"),
    "mobilellama": lambda d: make_tiny_checkpoint(d, variant="mobilellama"),
    "llava": lambda d: make_tiny_llava(d, layout="liuhaotian"),
    "llava-hf4": lambda d: make_tiny_llava(d, layout="hf4", weights="bin"),
    "llava-hf5": lambda d: make_tiny_llava(d, layout="hf5"),
    "xmodel": lambda d: make_tiny_xmodel(d),
    "imp": lambda d: make_tiny_imp(d),
    "imp15-qwen2": lambda d: make_tiny_imp15(d, lm="qwen2"),
    "imp15-phi3": lambda d: make_tiny_imp15(d, lm="phi3"),
}

# (family, field, bad value, words the one-line message must hold)
CONFIG_FAULTS = [
    # llama writer (MobileVLM / MobileLLaMA / LLaVA / Xmodel)
    ("v2", "intermediate_size", 400, ["intermediate_size = 400", "weights say 352", "gate_proj"]),
    ("v2", "hidden_size", None, ["hidden_size = null", "weights say 128"]),
    ("mobilellama", "hidden_size", None, ["hidden_size = null", "weights say 128"]),
    ("v2", "num_attention_heads", 0, ["num_attention_heads = 0", "integer >= 1"]),
    ("v2", "num_attention_heads", 3, ["hidden_size = 128", "not a multiple of num_attention_heads = 3"]),
    ("v2", "rms_norm_eps", "abc", ["rms_norm_eps = \"abc\"", "positive number"]),
    ("v2", "vocab_size", 999, ["vocab_size = 999", "weights say 384"]),
    ("mobilellama", "num_hidden_layers", 3, ["num_hidden_layers = 3", "weights say 2"]),
    ("v2", "num_key_value_heads", 2, ["num_key_value_heads = 2", "weights say 4", "k_proj"]),
    ("xmodel", "num_key_value_heads", 4, ["num_key_value_heads = 4", "weights say 2"]),
    ("llava", "tie_word_embeddings", "yes", ["tie_word_embeddings = \"yes\"", "true or false"]),
    ("mobilellama", "max_position_embeddings", -1, ["max_position_embeddings = -1"]),
    # phi2 writer (Imp v1)
    ("imp", "intermediate_size", 400, ["intermediate_size = 400", "weights say 512", "fc1"]),
    ("imp", "layer_norm_eps", "abc", ["layer_norm_eps = \"abc\""]),
    ("imp", "num_hidden_layers", 3, ["num_hidden_layers = 3", "weights say 2"]),
    ("imp", "partial_rotary_factor", 2.0, ["partial_rotary_factor = 2.0", "<= 1"]),
    # qwen2 / phi3 writers (Imp v1.5)
    ("imp15-qwen2", "intermediate_size", 400, ["intermediate_size = 400", "weights say 512"]),
    ("imp15-qwen2", "num_key_value_heads", 2, ["num_key_value_heads = 2", "weights say 4"]),
    ("imp15-qwen2", "rms_norm_eps", -1, ["rms_norm_eps = -1"]),
    ("imp15-phi3", "intermediate_size", 400, ["intermediate_size = 400", "weights say 512", "gate_up_proj"]),
    ("imp15-phi3", "num_key_value_heads", 4, ["num_key_value_heads = 4", "weights say 2", "qkv_proj"]),
    ("imp15-phi3", "hidden_size", None, ["hidden_size = null", "weights say 128"]),
    # vision side
    ("v2", "mm_hidden_size", 64, ["mm_hidden_size = 64", "128 wide"]),
    ("imp", "mm_hidden_size", 64, ["mm_hidden_size = 64", "144 wide"]),
    ("v2", "mm_vision_select_layer", "x", ["mm_vision_select_layer = \"x\""]),
    ("llava", "hidden_size", 256, ["hidden_size = 256"]),
    # family
    ("v2", "model_type", "gpt2", ["model_type 'gpt2'", "MobileVLM V1/V2", "LLaVA-1.5", "Xmodel-VLM", "Imp"]),
    ("imp", "model_type", "gpt2", ["model_type 'gpt2'", "supports"]),
]


@pytest.mark.parametrize(("family", "field", "value", "words"), CONFIG_FAULTS,
                         ids=[f"{f}-{k}-{v}" for f, k, v, _ in CONFIG_FAULTS])
def test_config_value_contradicting_weights_is_refused(tmp_path, family, field, value, words):
    ckpt = MAKERS[family](tmp_path / "ckpt")
    edit_config(ckpt, **{field: value})
    with pytest.raises(MvlmError) as e:
        convert(ckpt, tmp_path / "out", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and e.value.exit_code == 2
    for w in words:
        assert w in msg, msg
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_llava_hf_text_config_contradicting_weights_is_refused(tmp_path):
    ckpt = make_tiny_llava(tmp_path / "ckpt", layout="hf5")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 400
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MvlmError, match=r"intermediate_size = 400 but the weights say 352"):
        convert(ckpt, tmp_path / "out", progress=False)


@pytest.mark.parametrize(("where", "field", "value", "words"), [
    ("clip", "hidden_size", 256, ["hidden_size = 256", "weights say 128"]),
    ("clip", "num_hidden_layers", 4, ["num_hidden_layers = 4", "weights say 3"]),
    ("clip", "num_attention_heads", 3, ["num_attention_heads = 3", "does not divide"]),
    ("clip", "hidden_act", "relu", ["hidden_act = \"relu\"", "quick_gelu"]),
    ("siglip", "intermediate_size", 100, ["intermediate_size = 100", "weights say 240"]),
    ("siglip", "num_attention_heads", "x", ["num_attention_heads = \"x\""]),
])
def test_vision_tower_config_contradicting_weights_is_refused(tmp_path, where, field, value, words):
    if where == "clip":  # LLaVA-1.5 loads CLIP from its own directory (mm_vision_tower)
        ckpt = make_tiny_llava(tmp_path / "ckpt", layout="liuhaotian")
        edit_config(ckpt / "clip-vit-tiny-patch14-336", **{field: value})
    else:  # Imp's SigLIP hyper-parameters sit in config.json vision_tower_config
        ckpt = make_tiny_imp(tmp_path / "ckpt")
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["vision_tower_config"][field] = value
        (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MvlmError) as e:
        convert(ckpt, tmp_path / "out", progress=False)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize(("field", "value", "words"), [("intermediate_size", 400, "weights say 352"),
                                                       ("model_type", "gpt2", "model_type 'gpt2'")])
def test_cli_config_fault_is_one_line_exit_2_nothing_written(tmp_path, field, value, words):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="v2")
    edit_config(ckpt, **{field: value})
    r = mvlm("convert", ckpt, "-o", tmp_path / "out")
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], r.stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def _gguf_with_field(src: Path, dst: Path, key: str, value: object) -> None:
    """A copy of ``src`` with one key/value changed (what a converter ignoring the weights' shapes produced)."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.get_field("general.architecture").contents())
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vtype = f.types[0]
        w.add_key_value(f.name, value if f.name == key else f.contents(), vtype,
                        sub_type=f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data).reshape([int(x) for x in reversed(t.shape)]), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.slow
def test_quantize_refuses_gguf_llama_cpp_cannot_load(tmp_path, host_runtime):
    good = convert(make_tiny_checkpoint(tmp_path / "ckpt", variant="mobilellama"), tmp_path / "good", outtype="f32",
                   name="T", progress=False).lm.path
    d = tmp_path / "in"
    d.mkdir()
    broken = d / "Broken-F32.gguf"
    _gguf_with_field(good, broken, "llama.feed_forward_length", 400)  # the weights say 352
    r = mvlm("quantize", broken, "--type", "q8_0")  # with the quality step that used to give a traceback
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot be loaded by llama.cpp" in lines[0], r.stderr
    assert "blk.0.ffn_gate.weight" in lines[0] and "wrong shape" in lines[0], r.stderr  # llama.cpp's own reason
    assert sorted(p.name for p in d.iterdir()) == ["Broken-F32.gguf"]
    # the good file still quantizes
    r = mvlm("quantize", good, "--type", "q8_0", "--no-quality", "-o", tmp_path / "q")
    assert r.returncode == 0, r.stderr
    assert [p.name for p in (tmp_path / "q").iterdir()] == ["T-Q8_0.gguf"]


# ---------------------------------------------------------------------------------------------------------------
# 7. shard index entries outside the checkpoint directory
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["../../../../etc/passwd", "/etc/passwd", "symlink-out"])
def test_shard_outside_checkpoint_is_refused(tmp_path, entry):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="v2", layout="sharded-safetensors")
    index = ckpt / "model.safetensors.index.json"
    idx = json.loads(index.read_text())
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    if entry == "symlink-out":  # the shard's name is inside, but it is a link to a file elsewhere
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        shutil.move(shard, outside / shard.name)
        shard.symlink_to(outside / shard.name)
    else:
        victim = next(k for k, v in idx["weight_map"].items() if v == shard.name)
        idx["weight_map"][victim] = entry
        index.write_text(json.dumps(idx))
    with pytest.raises(MvlmError) as e:
        convert(ckpt, tmp_path / "out", progress=False)
    assert "outside the checkpoint directory" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_single_weights_file_symlinked_outside_is_refused(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="mobilellama", layout="safetensors")
    (tmp_path / "elsewhere").mkdir()
    shutil.move(ckpt / "model.safetensors", tmp_path / "elsewhere" / "model.safetensors")
    (ckpt / "model.safetensors").symlink_to(tmp_path / "elsewhere" / "model.safetensors")
    with pytest.raises(MvlmError, match="outside the checkpoint directory"):
        convert(ckpt, tmp_path / "out", progress=False)


def test_hf_cache_snapshot_symlinks_into_blobs_are_accepted(tmp_path):
    """huggingface_hub's cache: snapshots/<rev>/<file> -> ../../blobs/<hash>. That layout must keep working."""
    src = make_tiny_checkpoint(tmp_path / "src", variant="v2", layout="sharded-safetensors")
    repo = tmp_path / "hub" / "models--mvlm--tiny"
    snap = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    res = convert(snap, tmp_path / "out", progress=False)
    assert [p.name for p in res.files] == ["MobileVLM_V2-Tiny-F16.gguf", "mmproj-MobileVLM_V2-Tiny-F16.gguf"]


@pytest.mark.slow
def test_cli_path_traversal_is_one_line(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="mobilellama", layout="sharded-bin")
    index = ckpt / "pytorch_model.bin.index.json"
    idx = json.loads(index.read_text())
    idx["weight_map"][next(iter(idx["weight_map"]))] = "../../../../etc/passwd"
    index.write_text(json.dumps(idx))
    r = mvlm("convert", ckpt, "-o", tmp_path / "out")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "../../../../etc/passwd" in lines[0] and "outside" in lines[0], r.stderr


# ---------------------------------------------------------------------------------------------------------------
# 8. a real SIGTERM mid-write
# ---------------------------------------------------------------------------------------------------------------
def make_big_llama(out: Path, hidden: int = 512, ffn: int = 1408, layers: int = 8, heads: int = 8) -> Path:
    """A MobileLLaMA-layout checkpoint big enough (26M weights) that writing it takes a visible fraction of a second."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    train_tokenizer(out / "tokenizer.model", 384, 0)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).vocab_size()
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    one = torch.ones(hidden, dtype=torch.bfloat16)
    sd = {"model.embed_tokens.weight": r(vocab, hidden), "model.norm.weight": one, "lm_head.weight": r(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in "qkvo":
            sd[f"{p}self_attn.{n}_proj.weight"] = r(hidden, hidden)
        sd[p + "mlp.gate_proj.weight"] = r(ffn, hidden)
        sd[p + "mlp.up_proj.weight"] = r(ffn, hidden)
        sd[p + "mlp.down_proj.weight"] = r(hidden, ffn)
        sd[p + "input_layernorm.weight"] = one.clone()
        sd[p + "post_attention_layernorm.weight"] = one.clone()
    save_file(sd, str(out / "model.safetensors"))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": ffn,
           "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": heads, "vocab_size": vocab,
           "rms_norm_eps": 1e-6, "max_position_embeddings": 2048}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory) -> Path:
    return make_big_llama(tmp_path_factory.mktemp("big") / "Big")


def _children(pid: int) -> dict[int, str]:
    """pid -> command name of the direct children of ``pid`` (from /proc)."""
    from peers import proc_table

    return {child: comm for child, (ppid, comm) in proc_table().items() if ppid == pid}


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the command ended (rc {proc.returncode}) before the moment to signal it came")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("timed out waiting for the moment to signal")
        time.sleep(0.001)


@pytest.mark.slow
def test_sigterm_mid_convert_leaves_no_temporary_and_earlier_file_intact(tmp_path, big_ckpt):
    out = tmp_path / "out"
    earlier = convert(make_tiny_checkpoint(tmp_path / "small", variant="mobilellama"), out, outtype="f32", name="Big",
                      progress=False)
    assert [p.name for p in earlier.files] == ["Big-F32.gguf"]
    before = digests(out)
    proc = subprocess.Popen([*MVLM, "convert", str(big_ckpt), "-o", str(out), "--outtype", "f32", "--name", "Big"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: set(os.listdir(out)) - set(before), proc)  # mid-write: a new (temporary) file exists
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert digests(out) == before  # no temporary left, the earlier file byte-identical


@pytest.mark.slow
def test_sigterm_mid_quantize_stops_llama_quantize_and_cleans_up(tmp_path, big_ckpt, host_runtime):
    src = convert(big_ckpt, tmp_path / "in", outtype="f32", name="Big", progress=False).lm.path
    out = tmp_path / "q"
    out.mkdir()
    # an earlier output of the same name (a real GGUF with other contents)
    small = convert(make_tiny_checkpoint(tmp_path / "small", variant="mobilellama"), tmp_path / "small_out",
                    outtype="f16", name="Big", progress=False).lm.path
    shutil.copy(small, out / "Big-Q4_K_S.gguf")
    before = digests(out)
    proc = subprocess.Popen([*MVLM, "quantize", str(src), "--type", "q8_0,q4_k_s", "--no-quality", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    running: list[int] = []

    def second_type_running() -> bool:  # Q8_0 complete (under its temporary name), llama-quantize busy on Q4_K_S
        running[:] = [p for p, c in _children(proc.pid).items() if c == "llama-quantize"]
        writing = [n for n in os.listdir(out) if "Q4_K_S" in n and n not in before  # its temporary, any naming,
                   and os.path.getsize(out / n) > 0]  # written to (the temporaries are reserved before the tool runs)
        return bool(writing) and len(running) == 1

    _wait_for(second_type_running, proc)
    quantizer = running[0]
    proc.send_signal(signal.SIGTERM)  # to mvlm only, as a service manager or `timeout` would send it
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert not Path(f"/proc/{quantizer}").exists(), "llama-quantize outlived mvlm"
    assert digests(out) == before  # neither temporary left (Q8_0 complete, Q4_K_S half-written); earlier file intact


# ---------------------------------------------------------------------------------------------------------------
# 9. every family's summary names its architecture (table and --json)
# ---------------------------------------------------------------------------------------------------------------
FAMILY_SUMMARIES = {
    # maker: (family label in the title, llama.cpp LM arch); every maker but the text-only mobilellama has an mmproj
    "v1": ("MobileVLM v1", "llama"),
    "v2": ("MobileVLM v2", "llama"),
    "mobilellama": ("MobileVLM mobilellama", "llama"),
    "llava": ("LLaVA-1.5 liuhaotian", "llama"),
    "llava-hf5": ("LLaVA-1.5 llava-hf", "llama"),
    "xmodel": ("Xmodel-VLM xdpnet", "llama"),
    "imp": ("Imp v1", "phi2"),
    "imp15-qwen2": ("Imp v1.5-qwen2", "qwen2"),
    "imp15-phi3": ("Imp v1.5-phi3", "phi3"),
}


def _convert_app():
    import typer

    from mvlm_convert.convert_cli import convert_cmd

    app = typer.Typer()
    app.command("convert")(convert_cmd)
    app.command("noop")(lambda: None)  # keep "convert" a sub-command
    return app


@pytest.mark.parametrize(("maker", "title", "arch"), [(m, *v) for m, v in FAMILY_SUMMARIES.items()], ids=list(FAMILY_SUMMARIES))
def test_summary_table_and_json_name_the_architecture(tmp_path, monkeypatch, maker, title, arch):
    from rich.console import Console
    from typer.testing import CliRunner

    from mvlm_convert import convert_cli

    monkeypatch.setattr(convert_cli, "console", Console(width=300))  # wide enough that no cell is cut
    has_mmproj = maker != "mobilellama"
    ckpt = MAKERS[maker](tmp_path / "ckpt")
    runner = CliRunner()
    r = runner.invoke(_convert_app(), ["convert", str(ckpt), "-o", str(tmp_path / "table")])
    assert r.exit_code == 0, (r.output, r.exception)
    assert f"{title} ({arch} LM)" in r.stdout, r.stdout
    assert f"{arch} 2 layers" in r.stdout, r.stdout
    assert ("mmproj" in r.stdout) == has_mmproj

    r = runner.invoke(_convert_app(), ["convert", str(ckpt), "-o", str(tmp_path / "json"), "--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    out = json.loads(r.stdout)
    assert out["lm"]["metadata"]["arch"] == arch and out["lm"]["metadata"]["n_layer"] == 2
    assert (out["mmproj"] is not None) == has_mmproj and len(out["files"]) == 1 + has_mmproj
    lm = gguf.GGUFReader(out["lm"]["path"])
    assert lm.get_field("general.architecture").contents() == arch  # the label is what the file says


@pytest.mark.slow
def test_imp_v1_cli_table_no_longer_crashes(tmp_path):
    ckpt = make_tiny_imp(tmp_path / "ckpt")
    r = mvlm("convert", ckpt, "-o", tmp_path / "out", env={"COLUMNS": "250"})
    assert r.returncode == 0, r.stderr
    assert "phi2 2 layers, 4/4 heads" in r.stdout and "KeyError" not in r.stderr, r.stdout + r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["imp-v1-tiny-F16.gguf", "mmproj-imp-v1-tiny-F16.gguf"]


def test_convert_help_lists_every_family():
    r = mvlm("convert", "--help", env={"COLUMNS": "250"})
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for family in ("MobileVLM V1/V2", "MobileLLaMA", "LLaVA-1.5", "Xmodel-VLM", "Imp v1", "Imp v1.5"):
        assert family in text, text


# ---------------------------------------------------------------------------------------------------------------
# 12a. a pickle holding code is refused as such; damaged files say so
# ---------------------------------------------------------------------------------------------------------------
class RunsCode:
    """Unpickling this would run ``touch MARKER`` (os.system): what a malicious pytorch_model.bin carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _with_code(tmp_path: Path, variant: str, key: str) -> tuple[Path, Path, dict]:
    """A tiny checkpoint, the marker its planted code would create, and its state dict with ``key`` = that code."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant=variant)
    marker = tmp_path / "MARKER"
    sd = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    sd[key] = RunsCode(marker)
    return ckpt, marker, sd


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_pickle_with_code_is_refused_and_never_run(tmp_path, fmt):
    ckpt, marker, sd = _with_code(tmp_path, "v2", "model.norm.weight")
    torch.save(sd, ckpt / "pytorch_model.bin", _use_new_zipfile_serialization=fmt == "zip")
    with pytest.raises(MvlmError) as e:
        convert(ckpt, tmp_path / "out", progress=False)
    msg = str(e.value)
    assert not marker.exists(), "the pickled code ran"
    assert "\n" not in msg and "refused" in msg and "contains code" in msg and "posix.system" in msg, msg
    assert "safetensors" in msg and "trusted environment" in msg and "corrupt" not in msg, msg
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torch.save", "pickle-protocol-4"])
def test_cli_pickle_with_code_is_one_line(tmp_path, fmt):
    import pickle

    ckpt, marker, sd = _with_code(tmp_path, "mobilellama", "payload")
    if fmt == "torch.save":
        torch.save(sd, ckpt / "pytorch_model.bin")
    else:  # a bare pickle: torch warns about its protocol on the way (must not reach the terminal)
        with open(ckpt / "pytorch_model.bin", "wb") as f:
            pickle.dump(sd, f, protocol=4)
    r = mvlm("convert", ckpt, "-o", tmp_path / "out")
    assert r.returncode == 2 and not marker.exists()
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: refused to load") and "safetensors" in lines[0], r.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "fname", "words"), [("bin", "pytorch_model.bin", "truncated or corrupt"),
                                                       ("safetensors", "model.safetensors", "truncated")])
def test_cli_truncated_weights_say_so_in_one_line(tmp_path, layout, fname, words):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="mobilellama", layout=layout)
    f = ckpt / fname
    f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 3])
    r = mvlm("convert", ckpt, "-o", tmp_path / "out")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and fname in lines[0] and words in lines[0] and "refused" not in lines[0], r.stderr
    assert lines[0].endswith(("download it again", "(truncated?))")), lines[0]  # whole: torch's advice was cut mid-word


@pytest.mark.slow
def test_cli_checkpoint_path_that_is_missing_or_a_file_says_which(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    for path, says in ((tmp_path / "nope", "does not exist"), (f, "not a directory")):
        r = mvlm("convert", path)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and f"{path}: {says};" in lines[0], r.stderr
