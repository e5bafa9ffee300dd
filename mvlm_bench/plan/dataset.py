"""The ``dataset`` protocol (Xmodel-VLM Table 6): a whole evaluation set through ONE loaded model. This module: the
question file and the set's figures; mvlm_bench.session.dataset_run: the server and the requests.

The set is a question file in LLaVA's evaluation format (``llava/eval/model_vqa_science.py`` and its ScienceQA
``llava_test_CQM-A.json`` converted to JSONL): one JSON object per line with ``question_id``, ``image`` (a path
relative to the file, or absolute) and ``text`` (the prompt as the model sees it, choices included). Every line is
checked before anything goes to a device (one line naming the bad line, exit 2).

How it runs: the images are pushed with the content-addressed sync under ``images/ds/<sha256[:16]><ext>`` (a file
already on the device is not pushed again; two identical images are one file), next to the runtime's ``llama-server``
and the GGUFs. llama-server starts once (``--media-path`` pointing at those images, one slot: ``-np 1``), and is
ready when ``GET /health`` answers 200; its load time (start to ready) is ``load_s`` and is not part of anything else.
Then every sample is one ``POST /v1/chat/completions`` (the GGUF's chat template via ``--jinja``; the image as
``file://NAME``; greedy; ``max_tokens`` = ``-n``; ``cache_prompt: false``, so no sample reuses another's prompt),
sent one after the other. A local device is reached directly, an ssh device through ``ssh -L`` (adb: no port
forwarding, refused).

What is measured, per pass over the set (``--repeat`` passes; ``--warmup`` unmeasured requests of the first sample
before them): each sample's latency (the request's round trip on this machine's clock), the server's own ``timings``
(prompt_n / prompt_ms, predicted_n / predicted_ms), and the pass's wall time from the first request sent to the last
answer received: ``total_s`` (Table 6's "Total": loading, reading the question file and pushing are before the clock
starts; the image decode and resize llama.cpp does inside each request are in it). ``samples_tps`` (Table 6's
"Samples") = generated tokens / generation time summed over the set (predicted_n / predicted_ms). ``p50_s`` /
``p90_s`` / ``p99_s``: percentiles of the per-sample latencies (linear interpolation, numpy's default).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvlm_core import jsontext
from mvlm_core.atomic import file_kind
from mvlm_core.errors import MvlmError

DEVICE_DIR = "images/ds"  # where the set's images go under the device's workdir


@dataclass(frozen=True)
class Sample:
    line: int  # 1-based line of the question file
    question_id: str
    image: Path
    text: str
    device_name: str  # the image's content-addressed name on the device (under DEVICE_DIR)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


MAX_LINE_BYTES = 1 << 20  # one line of the question file (the JSON object)
MAX_TEXT_CHARS = 64 * 1024  # one question's text: far more than any model here has context for (4096 tokens)
_FORMAT = 'one {"question_id", "image", "text"} object per line'
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def load_samples(path: Path) -> list[Sample]:
    """The samples of a question file, each checked (one line naming the first bad line otherwise)."""
    path = Path(path)
    st = path.stat() if path.is_file() else None
    if st is None:
        what = f"is {file_kind(path)}, not a file" if path.exists() else "does not exist"
        raise MvlmError(f"--data {path} {what}: give a JSONL question file ({_FORMAT})")
    return list(_load(str(path.resolve()), st.st_size, st.st_mtime_ns))


def _lines(path: Path):
    """(line number, text) of each line; a UTF-8 BOM and CRLF line ends (Windows editors) are accepted. A line longer
    than MAX_LINE_BYTES is refused before the rest of it is read."""
    try:
        with open(path, "rb") as f:
            n = 0
            while raw := f.readline(MAX_LINE_BYTES + 1):
                n += 1
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    raise MvlmError(f"--data {path} line {n} is longer than {MAX_LINE_BYTES >> 20} MiB: a question "
                                    f"line is one small JSON object (a text of at most {MAX_TEXT_CHARS // 1024} KiB "
                                    "characters and an image path); fix or drop that line")
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    yield n, raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise MvlmError(f"--data {path} line {n} is not UTF-8 text: give a JSONL question file") from None
    except OSError as e:
        raise MvlmError(f"--data {path} cannot be read ({e.strerror or e})") from None


def _check_image(p: Path, where: str) -> None:
    """An image file PIL can open (header and checksums; a decompression bomb is named as too large)."""
    if not p.exists():
        raise MvlmError(f"{where}: image {p} does not exist (image paths are relative to the question file)")
    if not p.is_file():
        raise MvlmError(f"{where}: image {p} is {file_kind(p)}, not a file: give PNG or JPEG files")
    from PIL import Image

    try:
        with Image.open(p) as im:
            im.verify()
    except Image.DecompressionBombError:
        raise MvlmError(f"{where}: image {p} is too large ({_pixels(p)}, over PIL's limit of "
                        f"{Image.MAX_IMAGE_PIXELS * 2:,} pixels): resize it (the models see 336×336 or less)") from None
    except Exception as e:  # PIL raises many types for a non-image
        raise MvlmError(f"{where}: image {p} is not an image PIL can read ({type(e).__name__}): give PNG or JPEG "
                        "files") from None


def _pixels(p: Path) -> str:
    """An image's size from its header alone (no pixels decoded), e.g. "30000×30000 pixels"."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # only to read the header's size; restored at once
    try:
        with Image.open(p) as im:
            return f"{im.size[0]}×{im.size[1]} pixels"
    except Exception:  # noqa: BLE001 - the message goes on without the size
        return "size unknown"
    finally:
        Image.MAX_IMAGE_PIXELS = limit


@functools.lru_cache(maxsize=4)
def _load(path_text: str, _size: int, _mtime: int) -> tuple[Sample, ...]:
    path = Path(path_text)
    out: list[Sample] = []
    digests: dict[Path, str] = {}
    seen: dict[str, int] = {}  # question_id (as a string) -> its line
    for n, raw in _lines(path):
        if not raw.strip():
            continue
        where = f"--data {path} line {n}"
        try:
            obj = jsontext.loads(raw)
        except jsontext.NotJson as e:
            raise MvlmError(f"{where} is not JSON ({str(e).removeprefix('it is not JSON (').rstrip(')')}): write "
                            f"{_FORMAT}") from None
        except jsontext.JsonError as e:
            raise MvlmError(f"{where} is refused: {e}; write {_FORMAT}") from None
        if not isinstance(obj, dict):
            raise MvlmError(f"{where} is a JSON {_json_type(obj)}, not an object: write {_FORMAT}")
        qid = obj.get("question_id")
        if not isinstance(qid, str | int) or isinstance(qid, bool) or str(qid) == "":
            raise MvlmError(f"{where} has no \"question_id\" (a string or number)")
        qid = str(qid)
        if qid in seen:
            raise MvlmError(f"{where}: question_id {qid} is also line {seen[qid]}'s (ids are compared as text, so 1 "
                            "and \"1\" are the same): give each question its own id")
        seen[qid] = n
        where = f"{where} (question {qid})"
        prompt = obj.get("text")
        if prompt is None:
            raise MvlmError(f"{where} has no \"text\" (the question as a string)")
        if not isinstance(prompt, str):
            raise MvlmError(f"{where}: \"text\" must be a string (the question), not a JSON {_json_type(prompt)}")
        if not prompt.strip():
            raise MvlmError(f"{where}: \"text\" is empty: give the question as the model should see it")
        if len(prompt) > MAX_TEXT_CHARS:
            raise MvlmError(f"{where}: \"text\" is {len(prompt):,} characters, over the limit of {MAX_TEXT_CHARS:,} "
                            "(no model here has context for it): shorten it or drop the line")
        img = obj.get("image")
        if not isinstance(img, str) or not img.strip():
            raise MvlmError(f"{where} has no \"image\": the dataset protocol measures image + text samples "
                            "(ScienceQA-IMG keeps only the questions with an image); drop text-only lines")
        p = Path(img)
        p = p if p.is_absolute() else path.parent / p
        if p not in digests:
            _check_image(p, where)
            digests[p] = _digest(p)
        name = digests[p][:16] + (p.suffix.lower() if p.suffix.lower() in _IMAGE_SUFFIXES else "")
        out.append(Sample(n, qid, p, prompt, name))
    if not out:
        raise MvlmError(f"--data {path} holds no samples: give a JSONL question file ({_FORMAT})")
    return tuple(out)


def _json_type(value: Any) -> str:
    return {list: "array", dict: "object", bool: "boolean", int: "number", float: "number", str: "string"}.get(
        type(value), "null")


def files(samples: list[Sample]) -> dict[str, Path]:
    """The images to push: device-relative path -> local file (identical images once)."""
    return {f"{DEVICE_DIR}/{s.device_name}": s.image for s in samples}


def check_device(profile) -> None:
    """The set runs through a llama-server on the device: its transport must reach a port there."""
    from mvlm_bench.device.transports import transport_kinds

    kind = transport_kinds().get(profile.transport)
    if kind is not None and not kind.capabilities.port_forward:
        raise MvlmError(f"device {profile.name}: the dataset protocol keeps one llama-server running and talks to it "
                        "over a port, which this device's transport cannot forward here: use a local or ssh device (nothing was "
                        "pushed)")


def percentile(values: list[float], q: float) -> float | None:
    """numpy's default (linear) percentile; None for no values."""
    if not values:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def pass_metrics(per_sample: list[dict[str, Any]], total_s: float) -> dict[str, float | int | None]:
    """A pass's dataset metrics from its per-sample records (see the module docstring)."""
    lat = [float(s["latency_s"]) for s in per_sample]
    gen_n = sum(int(s["predicted_n"] or 0) for s in per_sample)
    gen_ms = sum(float(s["predicted_ms"] or 0.0) for s in per_sample)
    return {"n_samples": len(per_sample), "samples_tps": gen_n / (gen_ms / 1000.0) if gen_ms > 0 else None,
            "total_s": total_s, "p50_s": percentile(lat, 50), "p90_s": percentile(lat, 90),
            "p99_s": percentile(lat, 99)}
