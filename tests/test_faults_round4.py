"""A fourth outside probe (issue 24's "repeat the exercise"): ~400 hostile inputs of the tester's own choosing against
the redesigned bench, 69 defective runs from 30 causes. Each cause fixed here is a case, run through the `mvlm`
command as a user runs it (one `error:` line, exit 2, nothing written, nothing followed). The history-import and
serve-front cases of the same probe are in test_faults_import4.py and test_faults_serve4.py.

- reports through a symbolic link: ``--json-file /dev/stdout`` replaced /dev's link with a file (as root), a link to
  a file was silently replaced, ``--jsonl`` through a link measured first and failed after;
- unbounded reads of small inputs: a device profile of 3 GB (MemoryError), a FIFO profile (blocked);
- names too long for a file system with room for a temporary name (convert --name, quantize, bench): tracebacks;
- a profile's work dir that is a file (FileExistsError); a PNG that declares 60000x60000 pixels (verify, quantize);
- NaN / negative verify thresholds; quantize -t 0 and -o /proc; click's four-line usage errors; --order and --prompt
  typos; ssh:// with no host.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest
from peers import error_line, mvlm_cli, small_gguf


def mvlm(*args: object, cwd: Path | None = None, timeout: float = 120, env: dict | None = None):
    return mvlm_cli(*args, cwd=cwd, timeout=timeout, env=env)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds one row: what an image bomb looks like on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.slow
@pytest.mark.parametrize("option", ["--json-file", "--jsonl", "--markdown", "--csv"])
def test_a_report_path_that_is_a_symbolic_link_is_refused_before_measuring(tmp_path, option):
    """The report is renamed over its path: the link itself would be replaced (as root, /dev/stdout became a file),
    silently. Refused up front, naming the link's target; the link and its target stay as they were."""
    model = small_gguf(tmp_path / "m.gguf")
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    link = tmp_path / "report.out"
    link.symlink_to(precious)
    line = error_line(mvlm("bench", "-m", model, option, link, cwd=tmp_path))
    assert "is a symbolic link" in line and str(precious) in line, line
    assert link.is_symlink() and precious.read_text() == "keep me\n"
    stdout_like = tmp_path / "stdout"
    stdout_like.symlink_to("/proc/self/fd/1")  # what /dev/stdout is
    assert "is a symbolic link (to /proc/self/fd/1)" in error_line(mvlm("bench", "-m", model, option, stdout_like,
                                                                        cwd=tmp_path))
    assert stdout_like.is_symlink()


@pytest.mark.slow
def test_a_device_profile_is_read_bounded_and_never_from_a_fifo(tmp_path):
    big = tmp_path / "big.toml"
    big.write_text('name = "big"\ntransport = "local"\ntarget = "host"\n')
    os.truncate(big, 3 << 30)  # sparse: 3 GB claimed, nothing stored
    assert "more than the 1048576 of a device profile (.toml)" in error_line(mvlm("devices", big, timeout=30))
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    line = error_line(mvlm("bench", "--device", fifo, "-m", small_gguf(tmp_path / "m.gguf"), timeout=30))
    assert "FIFO" in line, line


@pytest.mark.slow
def test_names_too_long_with_room_for_a_temporary_name_are_refused_before_anything_is_made(tmp_path):
    from mvlm_convert.families.mobilevlm import make_tiny_checkpoint

    ck = make_tiny_checkpoint(tmp_path / "ck", variant="v2", seed=1)
    out = tmp_path / "out"
    line = error_line(mvlm("convert", ck, "-o", out, "--outtype", "f32", "--name", "n" * 300, timeout=300))
    assert "bytes long" in line and not out.exists(), line
    long_model = small_gguf(tmp_path / ("m" * 240 + "-F32.gguf"))
    assert "bytes long" in error_line(mvlm("bench", "-m", long_model))
    assert "bytes long" in error_line(mvlm("quantize", long_model, "-q", "q8_0", "--no-quality"))


@pytest.mark.slow
def test_quantize_refuses_threads_out_of_range_and_an_outdir_where_nothing_can_be_written(tmp_path, smollm2_gguf):
    for t in ("0", "-5"):
        assert "--threads" in error_line(mvlm("quantize", smollm2_gguf, "-q", "q8_0", "--allow-requantize", "-t", t,
                                              "-o", tmp_path / "q"))
    assert not (tmp_path / "q").exists()
    line = error_line(mvlm("quantize", smollm2_gguf, "-q", "q8_0", "--allow-requantize", "-o", "/proc"))
    assert "cannot create it in /proc" in line, line


@pytest.mark.slow
def test_a_work_dir_that_is_a_file_is_one_line_and_the_file_stays(tmp_path, smollm2_gguf, host_runtime):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    prof = tmp_path / "pw.toml"
    prof.write_text(f'name = "pw"\ntransport = "local"\ntarget = "host"\nworkdir = "{precious}"\n')
    line = error_line(mvlm("bench", "--device", prof, "-m", smollm2_gguf, "-n", "4", "-r", "1", timeout=300))
    assert "is a file" in line and precious.read_text() == "keep me\n", line


@pytest.mark.slow
def test_an_image_that_declares_billions_of_pixels_is_refused_by_verify_and_quantize(tmp_path):
    from mvlm_convert.families.mobilevlm import make_tiny_checkpoint

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(60000, 60000))
    ck = make_tiny_checkpoint(tmp_path / "ck", variant="v2", seed=1)
    lm, mm = small_gguf(tmp_path / "lm.gguf"), small_gguf(tmp_path / "mmproj.gguf", arch="clip")
    line = error_line(mvlm("verify", ck, "--gguf", lm, "--mmproj", mm, "--image", bomb, timeout=300))
    assert "decompression bomb" in line, line
    line = error_line(mvlm("quantize", mm, "-q", "q8_0", "--lm", lm, "--image", bomb, "-o", tmp_path / "q"))
    assert "decompression bomb" in line and not (tmp_path / "q").exists(), line


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf"])
def test_verify_thresholds_that_judge_nothing_are_refused(tmp_path, value):
    (tmp_path / "ck").mkdir()
    line = error_line(mvlm("verify", tmp_path / "ck", "--gguf", tmp_path / "x.gguf", "--image-threshold", value))
    assert "is not a threshold" in line, line


@pytest.mark.parametrize("argv,says", [
    (["history", "--limit", "-1"], "--limit"),
    (["history", "prune", "--keep", "0"], "--keep"),
    (["convertt"], "Did you mean 'convert'"),
])
def test_usage_errors_are_one_line(argv, says):
    r = mvlm(*argv)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, r.stderr


def test_runtime_build_of_an_unknown_target_is_one_line_without_a_blank_line_first():
    r = mvlm("runtime", "build", "--target", "bogus")
    assert r.returncode == 2 and r.stderr.startswith("error: unknown target 'bogus'"), repr(r.stderr)


@pytest.mark.parametrize("args,says", [
    (["--order", "bogus"], "--order 'bogus'"),
    (["--prompt", ""], "--prompt is empty"),
    (["--device", "ssh://"], "names no host"),
])
def test_bench_typos_are_refused_not_ignored(tmp_path, args, says):
    line = error_line(mvlm("bench", "-m", small_gguf(tmp_path / "m.gguf"), *args))
    assert says in line, line


@pytest.mark.slow
def test_a_report_too_large_to_parse_is_refused_from_its_size(tmp_path):
    """A 300 MB report (a gigabyte of whitespace cost compare 2 GB of memory): refused from its size, at once."""
    big = tmp_path / "ws.json"
    big.write_bytes(b"[")
    os.truncate(big, 300 << 20)
    for argv in (["compare", big, big], ["history", "import", big, "--db", tmp_path / "h.sqlite"]):
        assert "more than a report can be (256 MiB)" in error_line(mvlm(*argv, timeout=60))
    assert not (tmp_path / "h.sqlite").exists()


# --- the re-probe after the fixes (~190 new inputs: 5 defects, and cause 29's traceback) ---------------------------
DATA = Path(__file__).resolve().parent / "data" / "llama-bench"


@pytest.mark.slow
def test_an_array_among_json_lines_is_refused_not_skipped(tmp_path):
    row = next(ln for ln in (DATA / "smollm2-q4_1-p8-n4-r2.jsonl").read_text().splitlines() if ln.strip())
    for second in ("[1, 2, 3]", f"[{row}]"):
        f = tmp_path / "m.jsonl"
        f.write_text(row + "\n" + second + "\n")
        line = error_line(mvlm("history", "import", f, "--device", "d", "--db", tmp_path / "h.sqlite"))
        assert "line 2 is a JSON line that is not one of llama-bench's rows (an array)" in line, line
        assert not (tmp_path / "h.sqlite").exists()


@pytest.mark.parametrize("extra,says", [
    (["--prompt", "hello"], "--prompt is not used by the llama-bench protocol"),
    (["-c", "4096"], "--ctx-size is not used by the llama-bench protocol"),
    (["-pg", "4,2", "-pg", "4,2"], "given twice"),
    (["-p", "1-1024", "-d", "0-1023"], "more than 1024"),
])
def test_the_llama_bench_protocol_refuses_what_it_would_not_use(tmp_path, extra, says):
    line = error_line(mvlm("bench", "-P", "llama-bench", "-m", small_gguf(tmp_path / "m.gguf"), *extra))
    assert says in line, line


def test_a_model_name_with_a_comma_is_refused_before_llama_bench_splits_it(tmp_path):
    line = error_line(mvlm("bench", "-P", "llama-bench", "-m", small_gguf(tmp_path / "a,b.gguf")))
    assert "splits -m on commas" in line, line


def test_serve_parallel_out_of_range_names_parallel(tmp_path):
    assert "--parallel 100000 is out of range" in error_line(mvlm("serve", "-m", small_gguf(tmp_path / "m.gguf"),
                                                                 "-np", "100000"))


@pytest.mark.slow
def test_a_relative_path_is_a_path_never_a_hub_id(tmp_path):
    for cmd in (["convert", "./a/b"], ["verify", "./a/b", "--gguf", "x.gguf"]):
        line = error_line(mvlm(*cmd, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"}))
        assert "a/b" in line and "hf download" not in line, line


@pytest.mark.slow
def test_verify_of_a_config_that_contradicts_its_weights_is_one_line(tmp_path):
    import json

    from mvlm_convert.families.mobilevlm import make_tiny_checkpoint

    ck = make_tiny_checkpoint(tmp_path / "ck", variant="v2", seed=1)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["num_key_value_heads"] = max(1, cfg["num_attention_heads"] // 2)  # the weights hold every head's K and V
    (ck / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    good = make_tiny_checkpoint(tmp_path / "good", variant="v2", seed=1)
    assert mvlm("convert", good, "-o", out, "--outtype", "f32", "--name", "t").returncode == 0
    r = mvlm("verify", ck, "--gguf", out / "t-F32.gguf", "--mmproj", out / "mmproj-t-F32.gguf")
    assert "its config.json does not describe its weights" in error_line(r)
