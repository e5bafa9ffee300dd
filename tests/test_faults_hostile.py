"""Hostile inputs and situations, one section per root cause of hardening round 3 (issue 24).

Each case fails on the code before that round: a link planted at a temporary name (S1), GGUF headers crafted to make
a reader allocate or spin (R1), a serve log reused by an earlier session (W1), imports that dropped rows (D1) or
stored a file twice when run at once (W2), a password on the command line (S2), serve's defaults against image bombs
(R2), inputs that raised tracebacks (T1-T7), terminal escapes in names (S3) and misleading lines (M1-M6).

Everything is real: the `mvlm` console script as a subprocess (exit codes and one-line errors as a user sees them),
real GGUFs written byte by byte, the real host runtime, a real sshd, real SQLite and PostgreSQL. The one double is the
source of randomness behind temporary names (S1): it plants a link at the very name mvlm is about to try, which is
what an attacker guessing pids does, without guessing.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from peers import error_line, small_gguf

MVLM = [sys.executable, "-m", "mvlm"]


def mvlm(*args: object, cwd: Path | None = None, env: dict | None = None, timeout: float = 120):
    e = dict(os.environ) | {"COLUMNS": "200"} | (env or {})
    e.pop("MVLM_HISTORY", None)
    return subprocess.run([*MVLM, *map(str, args)], cwd=cwd, capture_output=True, text=True, errors="replace", env=e,
                          timeout=timeout)


def local_profile(tmp_path: Path, name: str = "hostile") -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(f'name = "{name}"\ntransport = "local"\nworkdir = "{tmp_path / ("dev-" + name)}"\ntarget = "host"\n'
                 "threads = 2\n")
    return p


# ============================================================================ S1. a link planted at a temporary name
class PlantingRandomness:
    """Stands in for ``secrets.token_hex`` (the randomness of temporary names): on the first draw for each output it
    plants a symbolic link to a victim file at exactly the name that draw produces, as an attacker who guessed the pid
    would. A writer that follows the link, or that does not draw its temporary this way, fails the checks."""

    def __init__(self, victim: Path, real):
        self.victim, self.real = victim, real
        self.planted: list[Path] = []

    def __call__(self, nbytes: int | None = None) -> str:
        final = sys._getframe(1).f_locals.get("final")
        if isinstance(final, Path):
            link = final.with_name(f".{final.name}.{os.getpid()}.0bad.tmp")
            if not os.path.lexists(link):
                link.symlink_to(self.victim)
                self.planted.append(link)
                return "0bad"
        return self.real(nbytes)

    def check(self, finals: list[Path]) -> None:
        assert self.victim.read_text() == "victim\n"  # never written through a link
        for link in self.planted:
            assert link.is_symlink() and os.readlink(link) == str(self.victim)
        names = {p.name for p in self.planted}
        for f in finals:
            assert f.is_file() and not f.is_symlink(), f
            assert f".{f.name}.{os.getpid()}.0bad.tmp" in names, f"{f} was not written through a drawn temporary name"


@pytest.fixture
def planting(tmp_path, monkeypatch) -> PlantingRandomness:
    import secrets

    victim = tmp_path / "victim"
    victim.write_text("victim\n")
    fake = PlantingRandomness(victim, secrets.token_hex)
    monkeypatch.setattr(secrets, "token_hex", fake)
    return fake


def _cli(*args) -> tuple[int, str, str]:
    """``mvlm ARGS`` in this process (typer's CliRunner), so the planted randomness is the one mvlm draws from."""
    from typer.testing import CliRunner

    from mvlm.cli import app
    from mvlm_core.errors import MvlmError

    res = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})
    if isinstance(res.exception, MvlmError):
        return res.exception.exit_code, res.stdout, res.stderr + f"error: {res.exception}\n"
    return res.exit_code, res.stdout, res.stderr


def test_convert_never_writes_through_a_planted_link(tmp_path, planting):
    from mvlm_convert.convert import convert
    from mvlm_convert.families.mobilevlm import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="v2")
    res = convert(ckpt, tmp_path / "shared", outtype="f16", name="Tiny", progress=False)
    planting.check([res.lm.path, res.mmproj.path])


@pytest.mark.slow  # runs llama-quantize and the quality phase
def test_quantize_never_writes_through_a_planted_link(tmp_path, planting, host_runtime):
    from mvlm_convert.convert import convert
    from mvlm_convert.families.mobilevlm import make_tiny_checkpoint
    from mvlm_convert.quantize import run

    res = convert(make_tiny_checkpoint(tmp_path / "ckpt", variant="v2"), tmp_path / "in", name="Tiny", progress=False)
    outs = run(res.lm.path, "q8_0", outdir=tmp_path / "shared", quality=False)
    outs += run(res.mmproj.path, "q8_0", outdir=tmp_path / "shared", quality=False)
    planting.check([Path(o.path) for o in outs])
    assert not [p for p in (tmp_path / "shared").iterdir() if p.is_dir()]  # llama-quantize's private directory went


@pytest.mark.slow  # measures SmolLM2 once on this machine
def test_bench_reports_and_history_outputs_never_follow_a_planted_link(tmp_path, planting, smollm2_gguf, host_runtime):
    out = tmp_path / "shared"
    out.mkdir()
    reports = [out / "r.json", out / "r.md", out / "r.csv", out / "r.jsonl"]
    code, _, err = _cli("bench", "--device", local_profile(tmp_path), "--model", smollm2_gguf, "-n", 4, "--repeat", 1,
                        "--warmup", 0, "--json-file", reports[0], "--markdown", reports[1], "--csv", reports[2],
                        "--jsonl", reports[3], "--save", "--db", tmp_path / "h.sqlite")
    assert code == 0, err
    code, _, err = _cli("history", "plot", "--db", tmp_path / "h.sqlite", "--out", out / "plots")
    assert code == 0, err
    code, _, err = _cli("compare", reports[0], "id:1", "--db", tmp_path / "h.sqlite", "--markdown", out / "cmp.md")
    assert code == 0, err
    planting.check([*reports, out / "cmp.md", *sorted((out / "plots").glob("*.png"))])


def test_spill_and_cache_writers_never_follow_a_planted_link(tmp_path, planting, monkeypatch):
    from mvlm_bench.history.entries import Entry
    from mvlm_bench.history.spill import spill_entries
    from mvlm_bench.plan.protocols import default_image
    from mvlm_bench.records.record import RunContext
    from mvlm_core import runtime as rtmod

    monkeypatch.setenv("MVLM_CACHE", str(tmp_path / "cache"))
    image = default_image()
    rtmod.write_latest("host", rtmod.Runtime(tmp_path / "rt", {"key": "k"}))
    entry = Entry(RunContext(device="d", model="m", protocol="lm"), {"Eval": [40.0]})
    (tmp_path / "shared").mkdir()
    spilled, _ = spill_entries([entry], tmp_path / "shared" / "h.sqlite")
    assert Path(spilled).parent == tmp_path / "shared"
    planting.check([image, tmp_path / "cache" / "runtime" / "latest-host.json", Path(spilled)])


def test_runtime_cache_lock_and_log_refuse_a_planted_link(tmp_path):
    from mvlm_core.atomic import open_fresh
    from mvlm_core.errors import MvlmError
    from mvlm_core.runtime import locked

    victim = tmp_path / "victim"
    victim.write_text("victim\n")
    (tmp_path / ".lock").symlink_to(victim)
    with pytest.raises(MvlmError, match="a link or another file is in the way"), locked(tmp_path / ".lock"):
        pass
    (tmp_path / "build.log").symlink_to(victim)
    with open_fresh(tmp_path / "build.log") as f:  # a log is written from the start: the link is replaced, not followed
        f.write("log\n")
    assert victim.read_text() == "victim\n" and not (tmp_path / "build.log").is_symlink()


# ================================================================================= R1. GGUF headers that lie
def _gguf(*parts: bytes, version: int = 3, tensors: int = 0, keys: int = 1) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensors, keys) + b"".join(parts)


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


def _string_array(n: int) -> bytes:
    return _key("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, n) + b"\0" * 8 * n


CRAFTED = {  # name -> (bytes, words of the refusal)
    "u8-array-of-2^64-1-items": (_gguf(_key("a"), struct.pack("<IIQ", 9, 0, 2**64 - 1)), "more than the"),
    "string-of-2^63-bytes": (_gguf(_key("a"), struct.pack("<IQ", 8, 2**63)), "beyond any real model"),
    "2^62-tensors": (_gguf(version=3, tensors=2**62, keys=0), "the number of tensors"),
    "2^40-keys": (_gguf(keys=2**40), "the number of keys"),
    "array-of-arrays": (_gguf(_key("a"), struct.pack("<II", 9, 9), struct.pack("<Q", 1) * 200), "array of arrays"),
    "key-not-utf8": (_gguf(struct.pack("<Q", 2) + b"\xff\xfe", struct.pack("<IB", 0, 1)), "not UTF-8"),
    "version-4": (_gguf(version=4, keys=0), "version 4"),
    "byte-swapped": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "version 50331648"),
    "unknown-value-type": (_gguf(_key("a"), struct.pack("<I", 77)), "unknown value type 77"),
    "alignment-zero": (_gguf(_key("general.alignment"), struct.pack("<II", 4, 0)), "general.alignment is 0"),
    "tensor-with-9-dims": (_gguf(_key("general.architecture"), struct.pack("<I", 8), _key("llama"), _key("t"),
                                 struct.pack("<I", 9), tensors=1), "9 dimensions"),
    "tensor-past-the-end": (_gguf(_key("general.architecture"), struct.pack("<I", 8), _key("llama"), _key("t"),
                                  struct.pack("<IQIQ", 1, 1 << 30, 0, 0), tensors=1), "truncated"),
    # what llama.cpp's own loader refuses (ggml/src/gguf.cpp), refused before anything is pushed (hostile round 4)
    "duplicate-key": (_gguf(_key("general.architecture"), struct.pack("<I", 8), _key("llama"),
                            _key("general.architecture"), struct.pack("<I", 8), _key("clip"), keys=2), "appears twice"),
    "duplicate-tensor": (_gguf(_key("t"), struct.pack("<IQIQ", 1, 8, 0, 0), _key("t"), struct.pack("<IQIQ", 1, 8, 0, 32),
                               tensors=2, keys=0) + b"\0" * 64, "the tensor 't' appears twice"),
    "unknown-tensor-type": (_gguf(_key("t"), struct.pack("<IQIQ", 1, 8, 999, 0), tensors=1, keys=0) + b"\0" * 64,
                            "ggml type 999"),
    "tensor-data-not-where-the-loader-expects": (_gguf(_key("t"), struct.pack("<IQIQ", 1, 8, 0, 3), tensors=1, keys=0)
                                                 + b"\0" * 64, "at offset 3, where llama.cpp expects 0"),
    "rows-not-whole-blocks": (_gguf(_key("t"), struct.pack("<IQIQ", 1, 8, 2, 0), tensors=1, keys=0) + b"\0" * 64,
                              "not a whole number of its type's blocks of 32"),
    "version-1": (_gguf(version=1, keys=0), "an early 2023 file"),
    "architecture-as-a-number": (_gguf(_key("general.architecture"), struct.pack("<II", 4, 7)),
                                 "general.architecture that is not text"),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_header_costs_little_and_is_refused_with_its_reason(tmp_path, name):
    from mvlm_core.errors import MvlmError
    from mvlm_core.gguf_header import check_gguf

    data, words = CRAFTED[name]
    p = tmp_path / "m.gguf"
    p.write_bytes(data)
    import gguf  # noqa: F401 - the reader's type table: importing a module is not what the file costs

    tracemalloc.start()
    try:
        with pytest.raises(MvlmError) as e:
            check_gguf(p, "--model")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert words in str(e.value) and str(e.value).startswith(f"--model {p}"), str(e.value)
    assert peak < 1 << 20, peak  # what the file holds, not what it claims


@pytest.mark.slow  # over ~1.3 s: the fast lane stays under 2 minutes
def test_ten_megabytes_of_empty_strings_read_in_bounded_memory(tmp_path):
    """1.3 M empty strings: a header this reader walks without keeping them (gguf-py built 2 GB of objects)."""
    from mvlm_core.gguf_header import read_header

    p = tmp_path / "m.gguf"
    p.write_bytes(_gguf(_string_array(1_300_000)))
    tracemalloc.start()
    try:
        header = read_header(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert header.kv["tokenizer.ggml.tokens"].count == 1_300_000
    assert peak < 8 << 20, peak


COMMANDS = {  # command -> argv with {f} for the crafted file
    "bench --model": ["bench", "--device", "{profile}", "--model", "{f}"],
    "bench --mmproj": ["bench", "--device", "{profile}", "--protocol", "vlm", "--model", "{lm}", "--mmproj", "{f}"],
    "serve --model": ["serve", "--model", "{f}"],
    "verify --gguf": ["verify", "{tmp}", "--gguf", "{f}"],
    "verify --mmproj": ["verify", "{tmp}", "--gguf", "{lm}", "--mmproj", "{f}"],
    "quantize": ["quantize", "{f}", "--type", "q8_0", "--outdir", "{tmp}/q"],
}


@pytest.mark.slow  # 6 commands x 4 files, each a python start
@pytest.mark.parametrize("name", ["u8-array-of-2^64-1-items", "array-of-arrays", "version-4", "key-not-utf8"])
def test_every_command_refuses_a_crafted_header_in_one_line_before_anything_else(tmp_path, name):
    data, words = CRAFTED[name]
    f = tmp_path / "m.gguf"
    f.write_bytes(data)
    lm = small_gguf(tmp_path / "lm.gguf")
    fields = {"f": f, "lm": lm, "tmp": tmp_path, "profile": local_profile(tmp_path)}
    for command, argv in COMMANDS.items():
        t0 = time.monotonic()
        r = mvlm(*[a.format(**fields) for a in argv], timeout=60)
        line = error_line(r)
        assert words in line and str(f) in line, (command, line)
        assert time.monotonic() - t0 < 60
    assert not (tmp_path / "dev-hostile").exists() and not (tmp_path / "q").exists()  # nothing pushed or written


@pytest.mark.slow
def test_swapped_lm_and_mmproj_are_refused_by_every_command_before_pushing(tmp_path):
    lm, mm = small_gguf(tmp_path / "lm.gguf"), small_gguf(tmp_path / "mmproj-x.gguf", "clip")
    prof = local_profile(tmp_path)
    for argv, words in ((["bench", "--device", prof, "--protocol", "vlm", "--model", mm, "--mmproj", lm], "is an mmproj"),
                        (["serve", "--model", lm, "--mmproj", lm], "not an mmproj GGUF"),
                        (["verify", tmp_path, "--gguf", mm], "is an mmproj")):
        assert words in error_line(mvlm(*argv)), argv
    assert not (tmp_path / "dev-hostile").exists()


def test_an_mmproj_with_a_vocabulary_sized_array_is_refused_before_gguf_py(tmp_path):
    """gguf-py reads mmproj files (verify, quantize) after the check: an 'mmproj' carrying 100k strings is crafted."""
    from mvlm_core.errors import MvlmError
    from mvlm_core.gguf_header import check_gguf

    p = tmp_path / "mmproj.gguf"
    arch = _key("general.architecture") + struct.pack("<I", 8) + _key("clip")
    p.write_bytes(_gguf(arch, _string_array(100_000), keys=2))
    with pytest.raises(MvlmError, match="array of 100000 strings"):
        check_gguf(p, "--mmproj", "mmproj")


# ============================================================== W1. serve identifies its own server, nobody else's
class Impostor(ThreadingHTTPServer):
    """Another HTTP server on this machine that answers like a llama-server with another model, and counts hits."""

    def __init__(self, model: str = "impostor"):
        self.hits: list[str] = []
        model_id = model

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                self.server.hits.append(self.path)
                body = b"{}" if self.path == "/health" else json.dumps({"data": [{"id": model_id}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.mark.slow
def test_the_identity_check_refuses_an_impostor_on_the_port():
    from mvlm_bench.session.server import check_identity
    from mvlm_core.errors import MvlmError

    imp = Impostor()
    try:
        with pytest.raises(MvlmError, match=r"not the one started on box .*lists 'impostor', not 'Mine'") as e:
            check_identity("127.0.0.1", imp.port, "Mine", "box")
        assert e.value.exit_code == 4
        check_identity("127.0.0.1", imp.port, "impostor", "box")  # its own model: no complaint
    finally:
        imp.close()


def _stale_log(path: Path, port: int, pid: int) -> None:
    """A log an earlier session wrote: its server's port and pid lines, as llama-server and the device script print."""
    from mvlm_bench.device.transports.base import SERVER_PID_MARKER

    path.write_text(f"==== mvlm serve (pid 1) started earlier ====\n{SERVER_PID_MARKER}{pid}\n"
                    f"main: server is listening on http://127.0.0.1:{port} - starting the main loop\n"
                    f"srv  llama_server: listening on http://127.0.0.1:{port}\n")


@pytest.mark.slow  # pushes the runtime to a real sshd's device dir and starts llama-server there
def test_serve_over_ssh_with_a_reused_log_serves_its_own_server_and_kills_only_its_pid(sshd, tmp_path, smollm2_gguf,
                                                                                     host_runtime):
    from peers import Served

    imp = Impostor()
    bystander = subprocess.Popen(["sleep", "300"])  # the pid the stale log names: never to be killed
    log = tmp_path / "serve.log"
    _stale_log(log, imp.port, bystander.pid)
    prof = sshd.profile_file(tmp_path / "box.toml", tmp_path / "remote", threads=2)
    s = Served("--device", prof, "--model", smollm2_gguf, "--port", _free_port(), "--ctx-size", 512, "--log", log)
    try:
        models = [m.id for m in s.client().models.list().data]
        assert models == [smollm2_gguf.stem] and imp.hits == [], (models, imp.hits)
    finally:
        rc, out = s.stop()
        imp.close()
    assert rc == 0, out
    assert bystander.poll() is None, "serve killed a pid it did not start"
    bystander.kill()
    assert log.read_text().startswith("==== mvlm serve (pid 1) started earlier")  # appended to, not replaced


# ============================================================================== R2. serve's front door and its limits
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory, host_runtime) -> tuple[Path, Path]:
    """A tiny MobileVLM V2 converted by the real converter (f32): llama-server reads images with it."""
    from mvlm_convert.convert import convert
    from mvlm_convert.families.mobilevlm import make_tiny_checkpoint

    d = tmp_path_factory.mktemp("vlm")
    res = convert(make_tiny_checkpoint(d / "ckpt", variant="v2"), d / "out", outtype="f32", progress=False)
    return res.lm.path, res.mmproj.path


KEY = "k-7f3c9a"


@pytest.fixture(scope="module")
def guarded(tiny_vlm, tmp_path_factory):
    """`mvlm serve` with an API key, one request at a time and bodies up to 2 MiB; the default pixel limit."""
    from peers import Served

    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# the team's key\n{KEY}\n")
    lm, mm = tiny_vlm
    s = Served("--model", lm, "--mmproj", mm, "--port", _free_port(), "--ctx-size", 1024, "--threads", 2,
               "--api-key-file", keys, "--max-concurrent", 1, "--max-body-mb", 2)
    yield s
    rc, out = s.stop()
    assert rc == 0, out


def _post(s, path: str, body: bytes | dict, key: str | None = KEY, timeout: float = 120) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(s.base_url.removesuffix("/v1") + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _chat(image_url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                      {"type": "image_url", "image_url": {"url": image_url}}]}],
            "max_tokens": 2, "temperature": 0}


def _png(width: int, height: int) -> bytes:
    """A real, whole grayscale PNG of zeros: tiny on the wire, ``width * height`` pixels once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = bytes(width + 1)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _server_rss_kb(s) -> int:
    from peers import _descendants, proc_table

    table = proc_table()
    (pid,) = [p for p in _descendants(s.proc.pid) if table.get(p, (0, ""))[1] == "llama-server"]
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))


@pytest.mark.slow
def test_an_image_bomb_is_refused_before_llama_server_decodes_it(guarded):
    bomb = _png(12000, 12000)  # 144 M pixels, ~140 KB
    assert len(bomb) < 1 << 20
    before = _server_rss_kb(guarded)
    status, body = _post(guarded, "/v1/chat/completions", _chat(_data_uri(bomb)))
    assert status == 400 and "12000 x 12000 pixels is over this server's limit" in body["error"]["message"], body
    assert _server_rss_kb(guarded) - before < 50_000  # llama-server never saw it (decoding costs 432 MB)
    status, body = _post(guarded, "/v1/chat/completions", _chat(_data_uri(_png(64, 48))))
    assert status == 200 and body["usage"]["completion_tokens"] == 2, body  # a sane image still goes through


@pytest.mark.slow
@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/cat.png", "HTTP://127.0.0.1:{port}/cat.png",
                                 "httpx://127.0.0.1:{port}/cat.png"])
def test_remote_image_urls_are_never_fetched_by_default(guarded, url):
    imp = Impostor()
    try:
        status, body = _post(guarded, "/v1/chat/completions", _chat(url.format(port=imp.port)))
    finally:
        imp.close()
    assert status == 400 and "image URLs are not fetched" in body["error"]["message"], body
    assert imp.hits == []  # nothing reached into this machine's network


@pytest.mark.slow
@pytest.mark.parametrize("payload,words", [
    (b'{"messages": [], "messages": [{"role": "user", "content": "hi"}]}', "has the key 'messages' twice"),
    (b'{"a": ' * 100 + b"1" + b"}" * 100, "nests deeper than 64"),
    (b'{"a": ' * 5000 + b"1" + b"}" * 5000, "nests deeper than"),
    (b"\xff\xfe not json", "not JSON"),
    (json.dumps(_chat("data:image/png;base64,iVBORw0KG go=")).encode(), "not valid base64"),
    (json.dumps(_chat("data:image/hdr;base64," + base64.b64encode(b"#?RADIANCE\n\n-Y 30000 +X 30000\n").decode()))
     .encode(), "not an image format this server reads"),
    (json.dumps({"prompt": {"prompt_string": "<__media__>", "multimodal_data": [base64.b64encode(
        _png(5000, 5000)).decode()]}}).encode(), "5000 x 5000 pixels"),
], ids=["duplicate-key", "depth-100", "depth-5000", "not-json", "bad-base64", "radiance-hdr", "completion-bomb"])
def test_bodies_the_front_cannot_vouch_for_are_400(guarded, payload, words):
    status, body = _post(guarded, "/completion" if b"multimodal_data" in payload else "/v1/chat/completions", payload)
    assert status == 400 and words in body["error"]["message"], body


@pytest.mark.slow
def test_body_size_concurrency_and_key_are_enforced(guarded):
    host, port = "127.0.0.1", int(guarded.base_url.rsplit(":", 1)[1].split("/")[0])

    def raw(head: str, body: bytes = b"") -> socket.socket:
        c = socket.create_connection((host, port), timeout=30)
        c.sendall(head.encode() + b"\r\n" + body)
        return c

    big = raw(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
              f"Content-Length: {3 << 20}\r\n")
    assert big.recv(200).startswith(b"HTTP/1.0 413"), "a 3 MiB body passed a 2 MiB limit"
    big.close()
    # holds the one request slot: a whole request whose generation is slow (1000 tokens, EOS ignored: ~4 s here) and
    # whose answer it does not read; a client still sending its body takes no slot (test_faults_serve4.py)
    slow = json.dumps({"prompt": "Hi", "n_predict": 1000, "ignore_eos": True, "stream": True}).encode()
    stalled = raw(f"POST /completion HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(slow)}\r\n", slow)
    assert stalled.recv(12).startswith(b"HTTP/1.0 200")  # in a slot, generating
    try:
        for _ in range(50):
            status, body = _post(guarded, "/v1/chat/completions", _chat(_data_uri(_png(8, 8))))
            if status == 503:
                break
            time.sleep(0.1)
        assert status == 503 and "1 requests at once" in body["error"]["message"], body
    finally:
        stalled.close()
    for _ in range(50):  # the slot comes back once the stalled client is gone
        status, body = _post(guarded, "/v1/chat/completions", _chat(_data_uri(_png(8, 8))))
        if status != 503:
            break
        time.sleep(0.1)
    assert status == 200, body
    assert _post(guarded, "/v1/chat/completions", _chat(_data_uri(_png(8, 8))), key=None)[0] == 401
    assert _post(guarded, "/v1/chat/completions", _chat(_data_uri(_png(8, 8))), key="wrong")[0] == 401
    import openai

    client = openai.OpenAI(base_url=guarded.base_url, api_key=KEY, max_retries=0, timeout=120)
    r = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert r.usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.base_url, api_key="wrong", max_retries=0).models.list()


@pytest.mark.slow
def test_serving_beyond_loopback_without_a_key_is_warned_and_a_key_on_argv_too(smollm2_gguf, host_runtime, tmp_path):
    from peers import Served

    s = Served("--model", smollm2_gguf, "--host", "0.0.0.0", "--port", _free_port(), "--ctx-size", 512)
    rc, out = s.stop()
    assert rc == 0 and "--host 0.0.0.0 without an API key: anyone who reaches this machine" in out, out
    s = Served("--model", smollm2_gguf, "--port", _free_port(), "--ctx-size", 512, "--api-key", "k")
    rc, out = s.stop()
    assert rc == 0 and "--api-key on the command line is readable by every local user" in out, out


@pytest.mark.slow
@pytest.mark.parametrize("args,words", [
    (["--max-image-pixels", "0"], "--max-image-pixels 0 is out of range"),
    (["--max-body-mb", "99999"], "--max-body-mb 99999 is out of range"),
    (["--max-concurrent", "0"], "--max-concurrent 0 is out of range"),
    (["--api-key-file", "/nonexistent/keys"], "cannot be read"),
    (["--api-key", ""], "--api-key is empty"),
])
def test_serve_limits_and_keys_are_checked_in_one_line(tmp_path, args, words):
    assert words in error_line(mvlm("serve", "--model", small_gguf(tmp_path / "m.gguf"), *args))


def test_an_empty_key_file_is_refused(tmp_path):
    (tmp_path / "keys").write_text("# no key yet\n\n")
    line = error_line(mvlm("serve", "--model", small_gguf(tmp_path / "m.gguf"), "--api-key-file", tmp_path / "keys"))
    assert "has no key" in line


# =========================================================================== S3. names that carry escape sequences
@pytest.mark.slow
def test_escape_sequences_in_names_are_shown_not_sent_to_the_terminal(tmp_path):
    evil = tmp_path / "M\x1b]0;pwned\x07\x1b[2J.gguf"
    for argv in (["bench", "--device", local_profile(tmp_path), "--model", evil], ["serve", "--model", evil],
                 ["quantize", evil]):
        r = mvlm(*argv)
        line = error_line(r)
        assert "\x1b" not in r.stderr + r.stdout and "\x07" not in r.stderr, argv
        assert "M\\x1b]0;pwned\\x07\\x1b[2J.gguf" in line, line


# ============================================================================ D1. import stores every row or none
BENCH_DATA = Path(__file__).parent / "data" / "llama-bench"


def _jsonl_rows() -> list[dict]:
    return [json.loads(ln) for ln in (BENCH_DATA / "smollm2-q4_1-p8-n4-r2.jsonl").read_text().splitlines() if ln.strip()]


def _many(n: int, fmt: str, path: Path) -> Path:
    """``n`` llama-bench rows (the real run's two tests, again and again, each with its own time) in ``fmt``."""
    base = _jsonl_rows()
    rows = []
    for i in range(n):
        r = dict(base[i % len(base)])
        r["test_time"] = f"2026-01-01T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}Z"
        r["samples_ts"], r["samples_ns"] = [r["avg_ts"]], [r["avg_ns"]]
        rows.append(r)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=2))
    elif fmt == "csv":
        import csv

        fields = [k for k in rows[0] if not k.startswith("samples_")]  # llama-bench's CSV has no sample lists
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    elif fmt == "sql":
        sql = (BENCH_DATA / "smollm2-q4_1-p8-n4-r2.sql").read_text().splitlines()
        head = [ln for ln in sql if not ln.startswith("INSERT INTO")]
        inserts = [ln for ln in sql if ln.startswith("INSERT INTO")]
        path.write_text("\n".join(head + [inserts[i % len(inserts)] for i in range(n)]) + "\n")
    return path


def _stored_values(db: Path) -> dict[str, int]:
    import sqlite3

    with sqlite3.connect(db) as con:
        return dict(con.execute("SELECT metric, COUNT(*) FROM sample GROUP BY metric"))


@pytest.mark.slow  # 4 formats x 5000 rows
@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "sql"])
def test_import_stores_every_row_past_what_a_table_shows(tmp_path, fmt):
    n = 5000  # more than the 4096 rows a parsed table keeps for display
    src = _many(n, fmt, tmp_path / f"runs.{fmt}")
    r = mvlm("history", "import", src, "--db", tmp_path / "h.sqlite", "--device", "box", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    counts = _stored_values(tmp_path / "h.sqlite")
    assert counts["pp8_tps"] == n // 2 and counts["tg4_tps"] == n // 2, counts  # every row, none dropped


def test_import_refuses_a_file_beyond_its_limit_in_one_line_and_stores_nothing(tmp_path, monkeypatch):
    from mvlm_bench.history.imports import bench_file
    from mvlm_bench.records import llama_bench_output
    from mvlm_core.errors import MvlmError

    monkeypatch.setattr(llama_bench_output, "IMPORT_MAX_ROWS", 100)
    src = _many(101, "jsonl", tmp_path / "runs.jsonl")
    with pytest.raises(MvlmError, match=r"has 101 llama-bench rows .* at most 100, every one or none: split the file"):
        bench_file(src)
    assert len(bench_file(_many(100, "jsonl", tmp_path / "ok.jsonl"))) == 1


# ======================================================================= W2. concurrent imports store a file once
def _import_at_once(db: str, src: Path, cwd: Path, n: int = 6) -> list[subprocess.CompletedProcess]:
    env = dict(os.environ) | {"COLUMNS": "200"}
    env.pop("MVLM_HISTORY", None)
    procs = [subprocess.Popen([*MVLM, "history", "import", str(src), "--db", db, "--device", "box"], cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(n)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


@pytest.mark.slow  # 6 python processes, 3 rounds
def test_six_imports_of_one_file_at_once_store_it_once_in_sqlite(tmp_path):
    src = BENCH_DATA / "smollm2-q4_1-p8-n4-r2.jsonl"
    for round_ in range(3):
        db = tmp_path / f"h{round_}.sqlite"
        results = _import_at_once(str(db), src, tmp_path)
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
        assert sum("imported 1 measurement" in r.stdout + r.stderr for r in results) == 1, [r.stdout for r in results]
        import sqlite3

        with sqlite3.connect(db) as con:
            assert con.execute("SELECT COUNT(*) FROM entry").fetchone() == (1,)


@pytest.mark.slow
def test_six_imports_of_one_file_at_once_store_it_once_in_postgresql(tmp_path, postgresql):
    import psycopg

    src = BENCH_DATA / "smollm2-q4_1-p8-n4-r2.jsonl"
    for round_ in range(3):
        with psycopg.connect(postgresql, autocommit=True) as con:
            con.execute(f"CREATE DATABASE w2_{round_}")
        url = postgresql.rsplit("/", 1)[0] + f"/w2_{round_}"
        results = _import_at_once(url, src, tmp_path)
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
        with psycopg.connect(url) as con:
            assert con.execute("SELECT COUNT(*) FROM entry").fetchone() == (1,)


# ===================================================================================== S2. secrets on the command line
@pytest.mark.slow
def test_a_history_password_on_the_command_line_is_warned_about_and_never_shown(postgresql, tmp_path):
    url = postgresql.replace("mvlm@", "mvlm:s3cret-pw@")
    r = mvlm("history", "--db", url)  # an empty database: refused (exit 2), after the warning
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "the --db URL carries a password" in r.stderr and "$MVLM_HISTORY" in r.stderr
    assert "s3cret-pw" not in r.stdout + r.stderr
    env = {"MVLM_HISTORY": url}
    r = subprocess.run([*MVLM, "history"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ) | {"COLUMNS": "200"} | env)
    assert r.returncode == 2 and "carries a password" not in r.stderr and "s3cret-pw" not in r.stdout + r.stderr


# ============================================================================================ M. misleading answers
@pytest.mark.slow  # starts llama-server
@pytest.mark.parametrize("host", ["[::1]", "::1"])
def test_serve_takes_ipv6_loopback_hosts(smollm2_gguf, host_runtime, host):
    from peers import Served

    s = Served("--model", smollm2_gguf, "--host", host, "--port", _free_port(), "--ctx-size", 512)
    try:
        assert s.base_url.startswith("http://[::1]:")
        assert [m.id for m in s.client().models.list().data] == [smollm2_gguf.stem]
    finally:
        rc, out = s.stop()
    assert rc == 0, out
