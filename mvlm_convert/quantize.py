"""Quantize GGUFs with llama.cpp's own quantizer, and measure what each type costs in quality.

Language models (any llama.cpp text architecture) go through the pinned runtime's ``llama-quantize`` — the same C++
as upstream, so K-quants are never re-implemented here. mmproj files (arch ``clip``) are not handled by
``llama-quantize``; the legacy block types (q8_0, q5_0, q5_1, q4_0, q4_1) are written with gguf-py's reference
quantizers (``gguf.quants``, bit-exact with ggml's reference code), quantizing only 2-D matmul weights and keeping the
tensors clip.cpp needs in f16/f32 (patch/position/class embeddings, norms, biases, depthwise convs).

Quality is measured against the input file on a fixed text: mean KL divergence of the next-token distributions and
top-1 agreement (LM), cosine of the image embeddings (mmproj).

An LM input is first loaded once by the runtime's own loader (``mvlm-dump -m``): a GGUF llama.cpp cannot load is
refused in one line instead of being quantized into another broken file. Every ``--type`` output is written under a
temporary name (``mvlm_core.atomic``) and all are renamed together at the end, after the quality figures; a
failure or interruption (disk full, Ctrl-C, SIGTERM: the llama-quantize child is terminated and waited for first)
removes the temporaries and leaves earlier files of the same names exactly as they were.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mvlm_core.atomic import AtomicOutputs, is_disk_full
from mvlm_core.errors import MvlmError
from mvlm_core.filetypes import BY_LABEL, LM_TYPES, MMPROJ_TYPES, UNQUANTIZED_FILE_TYPES, split_label

# Fixed text for the quality figures (plain English; tokenised by each model's own tokenizer).
QUALITY_TEXT = (
    "Building a website can be done in 10 simple steps:\nStep 1: Choose a domain name that is short and easy to "
    "remember. Step 2: Pick a hosting provider. Step 3: Plan the pages you need, such as a home page, an about page "
    "and a contact page. A photograph of a cat sitting on a wooden table next to a cup of coffee and a laptop."
)


@dataclasses.dataclass
class QuantResult:
    type: str
    path: Path
    size_bytes: int
    bits_per_weight: float
    seconds: float
    kind: str  # "lm" | "mmproj"
    kl_div: float | None = None  # mean KL(ref || quant) per token, nats
    top1_agree: float | None = None
    image_cos: float | None = None  # mean per-token cosine of image embeddings (mmproj)
    image_min_cos: float | None = None

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        return d


def parse_types(spec: str, kind: str) -> list[str]:
    valid = LM_TYPES if kind == "lm" else MMPROJ_TYPES
    out = []
    for t in (s.strip() for s in spec.split(",")):
        if not t:
            continue
        u = t.upper()
        if u not in valid:
            raise MvlmError(f"unknown {kind} quantization type {t!r}: valid types are {', '.join(s.lower() for s in valid)}")
        if u not in out:
            out.append(u)
    if not out:
        raise MvlmError("no quantization type given: pass --type q4_k_s[,q8_0,...]")
    return out


def read_header(path: Path) -> tuple[str, int | None, int, bool]:
    """(architecture, general.file_type, number of weights, has quantized tensors) of a GGUF, from the bounded header
    reader (:mod:`mvlm_core.gguf_header`); MvlmError (one line) when it is not a GGUF this can quantize."""
    from mvlm_core.gguf_header import FLOAT_TYPES, check_gguf

    header = check_gguf(Path(path), "the input")
    ftype = header.kv.get("general.file_type")
    ftype = ftype if isinstance(ftype, int) and not isinstance(ftype, bool) else None
    n = 0
    for _, dims, _, _ in header.tensors:
        count = 1
        for d in dims:
            count *= d
        n += count
    quantized = any(ttype not in FLOAT_TYPES for _, _, ttype, _ in header.tensors)
    return header.architecture or "unknown", ftype, n, quantized


def output_name(inp: Path, qtype: str) -> str:
    """llama.cpp naming: ``Name-F16.gguf`` -> ``Name-Q4_K_S.gguf``; ``mmproj-Name-F16.gguf`` -> ``mmproj-Name-Q8_0.gguf``."""
    stem = inp.name[:-5] if inp.name.endswith(".gguf") else inp.name
    base, _ = split_label(stem)
    return f"{base}-{qtype}.gguf"


MAX_THREADS = 1024
EXIT_DISK_FULL = 28  # docs/reliability.md: every command exits 28 on a full disk


def human_bytes(n: float) -> str:
    """A size precise enough that two different sizes read differently: 1.7 MiB vs 2.0 MiB, 640.0 KiB, 512 bytes
    (a whole-MB rounding printed "about 2 MB needed, 2 MB free")."""
    if n < 1024:
        return f"{int(n)} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024.0
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if n < 10 else f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def _free_bytes(d: Path) -> int:
    st = os.statvfs(d)
    return st.f_bavail * st.f_frsize


ProgressFn = Callable[[int, int], None]


def _run_tool(cmd: list[str], on_line: Callable[[str], None] | None = None) -> tuple[int, list[str]]:
    """Run a llama.cpp tool, streaming its merged output; (exit status, last lines).

    However this function is left (an error, Ctrl-C, or SIGTERM turned into SystemExit by the CLI) the child is
    terminated and waited for first, so that it writes nothing after the caller removes its temporary files.
    """
    from mvlm_core.stops import starting

    tail: list[str] = []
    proc: subprocess.Popen | None = None
    try:
        with starting():  # a stop signal during the start is raised once `proc` is ours to terminate
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    text=True, errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-15:]
            if on_line is not None:
                on_line(line)
        return proc.wait(), tail
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()


_LOAD_ERROR = re.compile(r"error loading model: (.*)")


def check_loadable(model: Path, loader: Path) -> None:
    """Refuse (one line) a language-model GGUF that the pinned llama.cpp cannot load: quantizing it would only give
    another broken file. ``loader`` is the runtime's ``mvlm-dump``, which with only ``-m`` loads the model through
    llama.cpp's own loader (every tensor's shape checked against the hyper-parameters) and exits; nothing is run."""
    reason: list[str] = []

    def watch(line: str) -> None:
        m = _LOAD_ERROR.search(line)
        if m and not reason:
            reason.append(" ".join(m.group(1).split()))

    rc, tail = _run_tool([str(loader), "-m", str(model)], watch)
    if rc != 0:
        why = reason[0] if reason else (tail[-1].strip() if tail else f"exit {rc}")
        raise MvlmError(f"{model} cannot be loaded by llama.cpp ({why}); it is not a working model, so it is not "
                        "quantized: convert the checkpoint again with `mvlm convert`")


def quantize_lm(inp: Path, out: Path, qtype: str, llama_quantize: Path, threads: int | None = None,
                allow_requantize: bool = False, progress: ProgressFn | None = None, tmp: Path | None = None) -> None:
    """Run llama-quantize into ``tmp`` (left for the caller's commit) or, without it, atomically into ``out``."""
    if tmp is None:
        with AtomicOutputs() as outs:
            quantize_lm(inp, out, qtype, llama_quantize, threads, allow_requantize, progress, tmp=outs.path(out))
            outs.commit()
        return
    import shutil
    import tempfile

    # llama-quantize opens its output path itself: it writes into a fresh private directory (0700, next to the output,
    # same file system), never to a name anyone else could have planted a link at; its file then replaces ``tmp``
    private = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=tmp.parent))
    cmd = [str(llama_quantize)]
    if allow_requantize:
        cmd.append("--allow-requantize")
    cmd += [str(inp), str(private / out.name), qtype, str(threads or os.cpu_count() or 1)]
    pat = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")

    def on_line(line: str) -> None:
        m = pat.match(line)
        if m and progress:
            progress(int(m.group(1)), int(m.group(2)))

    try:
        rc, tail = _run_tool(cmd, on_line)
        if rc != 0:
            if any("No space left" in t for t in tail) or _free_bytes(out.parent) < (1 << 20):
                raise MvlmError(f"disk full while writing {out}: free space and retry (no partial file left; earlier "
                                "files of the same names are untouched)", exit_code=EXIT_DISK_FULL)
            raise MvlmError(f"llama-quantize failed for {qtype} (exit {rc}): {tail[-1] if tail else 'no output'}",
                            detail="\n".join(tail))
        os.replace(private / out.name, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _keep_float(name: str, shape: tuple[int, ...]) -> bool:
    """Tensors clip.cpp needs unquantized (or that are too small/odd-shaped for 32-wide blocks)."""
    if len(shape) != 2 or not name.endswith(".weight"):
        return True
    keep = ("patch_embd", "position_embd", "class_embd", "ln", "norm", "peg", "mb_block")
    return any(k in name for k in keep) or shape[-1] % 32 != 0


def quantize_mmproj(inp: Path, out: Path, qtype: str, progress: ProgressFn | None = None,
                    tmp: Path | None = None) -> None:
    """Rewrite an mmproj GGUF with its 2-D matmul weights in ``qtype`` (gguf-py reference quantizers), into ``tmp``
    (left for the caller's commit) or, without it, atomically into ``out``."""
    if tmp is None:
        with AtomicOutputs() as outs:
            quantize_mmproj(inp, out, qtype, progress, tmp=outs.path(out))
            outs.commit()
        return
    import gguf
    from gguf import quants

    r = gguf.GGUFReader(inp)
    arch = r.get_field("general.architecture").contents()
    target = gguf.GGMLQuantizationType[qtype]
    w = None
    try:
        w = gguf.GGUFWriter(tmp, arch)
        for field in r.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            if field.name == "general.file_type":  # what the file now is (reports read the precision from it)
                w.add_key_value(field.name, int(BY_LABEL[qtype].file_type), vtype)
                continue
            w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        plan = []
        for t in r.tensors:
            shape = tuple(int(x) for x in reversed(t.shape))  # numpy order
            data = np.asarray(t.data)
            if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                arr = data.astype(np.float32).reshape(shape)
            else:
                raise MvlmError(f"{inp} tensor {t.name} is already quantized ({t.tensor_type.name}): "
                                "quantize from the f16/f32 mmproj")
            plan.append((t.name, arr, t.tensor_type))
        for i, (name, arr, orig) in enumerate(plan):
            if _keep_float(name, arr.shape) or qtype == "F16":
                as_f16 = orig == gguf.GGMLQuantizationType.F16 or (qtype == "F16" and not _keep_float(name, arr.shape))
                w.add_tensor(name, arr.astype(np.float16) if as_f16 else arr)
            else:
                q = quants.quantize(arr, target)
                w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=target)
            if progress:
                progress(i + 1, len(plan))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    except BaseException as e:
        try:
            if w is not None:
                w.close()
        except Exception:  # noqa: BLE001 - flushing into a full disk fails again; the file goes anyway
            pass
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            # numpy's tofile reports a short write without errno ("N requested and M written"): ask the filesystem
            if is_disk_full(e) or _free_bytes(out.parent) < (1 << 20):
                raise MvlmError(f"disk full while writing {out}: free space and retry (no partial file left; earlier "
                                "files of the same names are untouched)", exit_code=EXIT_DISK_FULL) from e
            raise MvlmError(f"cannot write {out}: {e.strerror or e}") from e
        raise


# --- quality ------------------------------------------------------------------------------------------------------
def lm_logits(model: Path, text: str = QUALITY_TEXT, n_ctx: int = 512) -> tuple[list[int], np.ndarray]:
    """Token ids and [n_tokens, n_vocab] logits of ``text`` under ``model`` (patched host runtime via llama_cpp)."""
    from mvlm_core.runtime import use_runtime

    use_runtime("host")
    import llama_cpp

    try:
        llm = llama_cpp.Llama(str(model), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=os.cpu_count() or 1)
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
        raise MvlmError(f"llama.cpp cannot load {model} ({e}); convert the model again with `mvlm convert`") from e
    try:
        ids = llm.tokenize(text.encode(), add_bos=True)[:n_ctx]
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()
    return ids, logits


def kl_and_top1(ref: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Mean KL(ref || other) over positions (nats) and the fraction of positions with the same argmax."""

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(other)
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
    top1 = float(np.mean(ref.argmax(-1) == other.argmax(-1)))
    return max(kl, 0.0), top1


def run(inp: Path, types: str, outdir: Path | None = None, threads: int | None = None, allow_requantize: bool = False,
        quality: bool = True, lm_for_mmproj: Path | None = None, image: Path | None = None,
        on_start: Callable[[str], ProgressFn] | None = None,
        on_quality: Callable[[int, int, str], None] | None = None) -> list[QuantResult]:
    """Quantize ``inp`` to each type in ``types`` (comma list); returns one result per type, with quality figures.

    Progress: ``on_start(type)`` -> the quantizer's progress callback for that type; ``on_quality(done, total, what)``
    before each of the quality phase's model evaluations (the input first, then each output: ``total`` = 1 + types),
    and once more with ``done == total`` at its end."""
    inp = Path(inp)
    arch, ftype, n_weights, quantized = read_header(inp)
    kind = "mmproj" if arch == "clip" else "lm"
    qtypes = parse_types(types, kind)
    if (quantized or (ftype is not None and ftype not in UNQUANTIZED_FILE_TYPES)) and not allow_requantize:
        raise MvlmError(f"{inp.name} is already quantized: quantize from the f16/f32 file, or pass --allow-requantize")
    if image is not None:
        from mvlm_core.images import check_image_file

        check_image_file(image)
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise MvlmError(f"--threads {threads} is out of range: give a whole number from 1 to {MAX_THREADS}")
    from mvlm_core.filenames import check_name_length

    for t in qtypes:
        check_name_length(output_name(inp, t), "the output file name")
    outdir = Path(outdir) if outdir else inp.parent
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MvlmError(f"cannot create output dir {outdir}: {e.strerror}") from e
    if not os.access(outdir, os.W_OK):
        raise MvlmError(f"output dir {outdir} is not writable: pass --outdir DIR")
    from mvlm_core.atomic import check_writable

    check_writable(outdir / output_name(inp, qtypes[0]), "--outdir")  # /proc and the like: no file can be made there
    valid = LM_TYPES if kind == "lm" else MMPROJ_TYPES
    need = sum(int(n_weights * valid[t] / 8) for t in qtypes)
    free = _free_bytes(outdir)
    if free < need:
        need_s, free_s = human_bytes(need), human_bytes(free)
        if need_s == free_s:  # so close that the rounding hides it: say it in bytes
            need_s, free_s = f"{need:,} bytes", f"{free:,} bytes"
        raise MvlmError(f"not enough free space in {outdir}: about {need_s} needed, {free_s} free; "
                        "free space or pass --outdir on another disk", exit_code=EXIT_DISK_FULL)
    finals = []
    for t in qtypes:
        out = outdir / output_name(inp, t)
        if out.resolve() == inp.resolve() or (out.exists() and os.path.samefile(out, inp)):
            raise MvlmError(f"output {out} would overwrite the input: pass --outdir DIR")
        if out.is_dir():
            raise MvlmError(f"{out} is a directory; it is in the way of the output file: move it or pass --outdir DIR")
        finals.append(out)
    quantizer = None
    if kind == "lm":
        from mvlm_core.runtime import find

        rt = find("host")
        quantizer = rt.exe("llama-quantize")
        check_loadable(inp, rt.exe("mvlm-dump"))
    results = []
    # Every output goes to a temporary name and all are renamed together at the end (after the quality figures):
    # a failure or interruption half-way leaves earlier files of the same names exactly as they were.
    with AtomicOutputs() as outs:
        for t, out in zip(qtypes, finals, strict=True):
            tmp = outs.path(out)
            prog = on_start(t) if on_start else None
            t0 = time.perf_counter()
            if kind == "lm":
                quantize_lm(inp, out, t, quantizer, threads, allow_requantize, prog, tmp=tmp)
            else:
                quantize_mmproj(inp, out, t, prog, tmp=tmp)
            dt = time.perf_counter() - t0
            size = tmp.stat().st_size
            results.append(QuantResult(t, tmp, size, round(size * 8 / max(n_weights, 1), 3), round(dt, 3), kind))
        if quality:
            _measure_quality(inp, kind, results, lm_for_mmproj, image, on_quality)
        outs.commit()
    for r, out in zip(results, finals, strict=True):
        r.path = out
    return results


def _measure_quality(inp: Path, kind: str, results: list[QuantResult], lm_for_mmproj: Path | None,
                     image: Path | None, on_quality: Callable[[int, int, str], None] | None = None) -> None:
    total = 1 + len(results)

    def step(done: int, what: str) -> None:
        if on_quality:
            on_quality(done, total, what)

    if kind == "lm":
        step(0, f"logits of the input ({inp.name})")
        _, ref = lm_logits(inp)
        for i, r in enumerate(results):
            step(i + 1, f"logits of {r.type.lower()}")
            _, q = lm_logits(r.path)
            r.kl_div, r.top1_agree = kl_and_top1(ref, q)
        step(total, "done")
    elif lm_for_mmproj is not None:
        from mvlm_convert.verify import image_embedding

        step(0, f"image embedding of the input ({inp.name})")
        ref = image_embedding(inp, lm_for_mmproj, image)
        for i, r in enumerate(results):
            step(i + 1, f"image embedding of {r.type.lower()}")
            e = image_embedding(r.path, lm_for_mmproj, image)
            cos = np.sum(ref * e, -1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(e, axis=-1) + 1e-12)
            r.image_cos, r.image_min_cos = float(cos.mean()), float(cos.min())
        step(total, "done")
