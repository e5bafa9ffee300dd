"""`mvlm serve`: the real llama-server of the host runtime, driven by the real `openai` client over 127.0.0.1.

A tiny MobileVLM V2 (random weights, trained tokenizer) is made and converted with the real commands; the server is
started through `mvlm serve` as a subprocess and stopped with real signals; the ssh test goes through the real sshd
(tests/conftest.py) and a real `ssh -L` tunnel. Process checks read /proc (tests/peers.py: proc_table).
"""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peers import Served, _free_port, proc_table
from peers import cmdlines_with as _cmdlines_with

MVLM = [sys.executable, "-m", "mvlm"]
ENV = {**os.environ, "COLUMNS": "200"}


# --------------------------------------------------------------------------------------------------- helpers


def _descendants(pid: int) -> dict[int, str]:
    table = proc_table()
    out, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, name) in table.items():
            if ppid == parent and child not in out:
                out[child] = name
                todo.append(child)
    return out


def png_data_uri(seed: int = 0) -> str:
    import numpy as np
    from PIL import Image

    rgb = np.random.default_rng(seed).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_tokens(mmproj: Path) -> int:
    """Image tokens per image, from the mmproj's own header: (336/14)^2 patches, pooled 2x2 by the LDP(v2) projector."""
    import gguf

    r = gguf.GGUFReader(mmproj)
    size = int(r.get_field("clip.vision.image_size").contents())
    patch = int(r.get_field("clip.vision.patch_size").contents())
    assert r.get_field("clip.projector_type").contents() in ("ldp", "ldpv2")
    return (size // patch) ** 2 // 4


def ask(text: str, image: str | None = None) -> list[dict]:
    content: list[dict] = [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": image}})
    return [{"role": "user", "content": content}]


def mvlm(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*MVLM, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_v2(tmp_path_factory, host_runtime) -> tuple[Path, Path]:
    """A tiny MobileVLM V2 made and converted by the real commands (f32)."""
    d = tmp_path_factory.mktemp("serve")
    r = subprocess.run([sys.executable, "-m", "mvlm_convert.tiny", str(d / "ckpt"), "--variant", "v2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = mvlm("convert", d / "ckpt", "--outtype", "f32", "-o", d / "out", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lm = next(p for p in (d / "out").glob("*.gguf") if not p.name.startswith("mmproj-"))
    return lm, next((d / "out").glob("mmproj-*.gguf"))


@pytest.fixture(scope="module")
def vlm_server(tiny_v2):
    lm, mmproj = tiny_v2
    s = Served("--model", lm, "--mmproj", mmproj, "--port", _free_port(), "--threads", 2, "--ctx-size", 2048)
    yield s
    s.stop()


@pytest.fixture
def fake_gguf(tmp_path):
    """Minimal GGUFs written with gguf-py: an 'LM' (llama arch, token embedding, tokenizer) and an 'mmproj' (clip).
    Enough for the checks made before anything starts; no server ever loads them."""
    import gguf
    import numpy as np

    def make(name: str, arch: str, lm: bool) -> Path:
        p = tmp_path / name
        w = gguf.GGUFWriter(str(p), arch)
        if lm:
            w.add_string("tokenizer.ggml.model", "llama")
            w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
        else:
            w.add_tensor("v.patch_embd.weight", np.zeros((4, 8), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return p

    return make("M-F32.gguf", "llama", True), make("mmproj-M-F32.gguf", "clip", False), make("E.gguf", "llama", False)


# --------------------------------------------------------------------------------------------------- bad input (fast)


def _one_line_exit2(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


BAD_INPUT = {  # case -> (arguments; {lm} {mmproj} {not_lm} {tmp} are filled in, words the error line must hold)
    "mmproj-as-model": (["--model", "{mmproj}"], ["is an mmproj", "--mmproj"]),
    "lm-as-mmproj": (["--model", "{lm}", "--mmproj", "{lm}"], ["not an mmproj"]),
    "not-an-lm": (["--model", "{not_lm}"], ["not a language-model GGUF"]),
    "missing": (["--model", "{tmp}/absent.gguf"], ["does not exist"]),
    "not-gguf": (["--model", "{tmp}/text.gguf"], ["not a GGUF file"]),
    "port-too-big": (["--model", "{lm}", "--port", "70000"], ["out of range"]),
    "port-zero": (["--model", "{lm}", "--port", "0"], ["out of range"]),
    "no-model": ([], ["--model"]),
    "log-is-the-model": (["--model", "{lm}", "--log", "{lm}"], ["--log", "input"]),
    "log-is-a-gguf": (["--model", "{lm}", "--log", "{not_lm}"], ["--log", "existing GGUF"]),
    "log-is-a-directory": (["--model", "{lm}", "--log", "{tmp}"], ["--log", "directory"]),
    "host-shorthand": (["--model", "{lm}", "--host", "0"], ["--host 0", "0.0.0.0"]),
    "timeout-too-short": (["--model", "{lm}", "--timeout", "0.001"], ["--timeout 0.001", "at least 1"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2(fake_gguf, tmp_path, case):
    lm, mmproj, not_lm = fake_gguf
    (tmp_path / "text.gguf").write_text("not a gguf")
    args, words = BAD_INPUT[case]
    args = [a.format(lm=lm, mmproj=mmproj, not_lm=not_lm, tmp=tmp_path) for a in args]
    _one_line_exit2(mvlm("serve", *args), *words)


@pytest.mark.slow
@pytest.mark.parametrize("where,listen", [("127.0.0.1", True), ("0.0.0.0", True), ("127.0.0.1", False)],
                         ids=["listening", "listening-on-every-interface", "bound-not-listening"])
def test_port_in_use_is_refused_before_starting(fake_gguf, where, listen):
    """The message says what was found, true whether the other socket listens or is only bound, here or on 0.0.0.0."""
    lm, mmproj, _ = fake_gguf
    with socket.socket() as s:
        s.bind((where, 0))
        if listen:
            s.listen()
        port = s.getsockname()[1]
        _one_line_exit2(mvlm("serve", "--model", lm, "--mmproj", mmproj, "--port", port),
                        f"port {port} is in use on 127.0.0.1")


def _make_fifo(p: Path) -> None:
    os.mkfifo(p)


def _make_symlink(p: Path) -> None:
    p.symlink_to(p.parent / "victim.txt")


@pytest.mark.slow
@pytest.mark.parametrize("make,words", [(_make_symlink, "symbolic link"), (_make_fifo, "FIFO")], ids=["symlink", "fifo"])
def test_log_through_a_symlink_or_onto_a_fifo_is_refused(fake_gguf, tmp_path, make, words):
    """A symlink (to /etc/hostname, say) is never followed, a FIFO never opened: one line, exit 2, the target unchanged."""
    lm, _, _ = fake_gguf
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    log = tmp_path / "serve.log"
    make(log)
    _one_line_exit2(mvlm("serve", "--model", lm, "--log", log, "--port", _free_port(), timeout=60), "--log", words)
    assert victim.read_text() == "precious\n"


def test_open_log_appends_to_an_existing_file_and_never_follows_a_symlink(tmp_path):
    """An existing file (a PNG given by mistake) keeps its bytes; the log is appended after a header line; a symlink
    that appears after the checks is still not followed (O_NOFOLLOW)."""
    from mvlm_bench.session import serve
    from mvlm_core.errors import MvlmError

    png = tmp_path / "photo.png"
    original = b"\x89PNG\r\n\x1a\n" + os.urandom(64)
    png.write_bytes(original)
    spec = serve.ServeSpec(model=tmp_path / "M.gguf", log=png, port=18170)
    path, f = serve.open_log(spec)
    f.write(b"server line\n")
    f.close()
    data = png.read_bytes()
    assert path == png and data.startswith(original), data[:80]
    header = data[len(original):].split(b"\n")[0].decode()
    assert f"mvlm serve (pid {os.getpid()})" in header and "started" in header and "18170" in header
    assert data.endswith(b"server line\n")
    target = tmp_path / "target"
    target.write_text("keep")
    link = tmp_path / "link.log"
    link.symlink_to(target)
    with pytest.raises(MvlmError, match="symbolic link"):
        serve.open_log(serve.ServeSpec(model=tmp_path / "M.gguf", log=link))
    assert target.read_text() == "keep"


def test_wildcard_hosts_print_the_loopback_url():
    from mvlm_bench.session.server import loopback_for

    assert [loopback_for(h) for h in ("0.0.0.0", "::", "[::]", "::0", "0:0::0", "127.0.0.2", "::1", "localhost")] == [
        "127.0.0.1", "::1", "::1", "::1", "::1", "127.0.0.2", "::1", "localhost"]


# --------------------------------------------------------------------------------------------------- the real server


@pytest.mark.slow
def test_chat_completion_with_image_counts_the_image_tokens(vlm_server, tiny_v2):
    client = vlm_server.client()
    assert [m.id for m in client.models.list().data] == [vlm_server.alias]
    with_image = client.chat.completions.create(model=vlm_server.alias, messages=ask("What is in the picture?",
                                                                                     png_data_uri()),
                                                max_tokens=8, temperature=0)
    text_only = client.chat.completions.create(model=vlm_server.alias, messages=ask("What is in the picture?"),
                                               max_tokens=8, temperature=0)
    assert with_image.choices[0].message.content and with_image.usage.completion_tokens == 8
    n_img = image_tokens(tiny_v2[1])
    extra = with_image.usage.prompt_tokens - text_only.usage.prompt_tokens
    # the image's tokens, plus at most the few text tokens around its marker
    assert n_img <= extra <= n_img + 4, (with_image.usage, text_only.usage, n_img)


@pytest.mark.slow
def test_streaming_yields_the_same_text_in_chunks(vlm_server):
    client = vlm_server.client()
    msgs = ask("Describe it.", png_data_uri(1))
    whole = client.chat.completions.create(model=vlm_server.alias, messages=msgs, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=vlm_server.alias, messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) >= 2, chunks
    assert "".join(deltas) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


@pytest.mark.slow
def test_bad_image_is_http_400_and_the_server_stays_up(vlm_server):
    import openai

    client = vlm_server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=vlm_server.alias, messages=ask("hi", "data:image/png;base64,!!garbage@@"),
                                       max_tokens=4)
    assert e.value.status_code == 400 and "image" in str(e.value).lower()
    ok = client.chat.completions.create(model=vlm_server.alias, messages=ask("hi", png_data_uri(2)), max_tokens=4)
    assert ok.usage.completion_tokens == 4
    assert vlm_server.proc.poll() is None


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stop_leaves_no_server_process_and_exits_0(tiny_v2, sig):
    lm, mmproj = tiny_v2
    s = Served("--model", lm, "--mmproj", mmproj, "--port", _free_port(), "--threads", 2, "--ctx-size", 1024)
    servers = [pid for pid, name in _descendants(s.proc.pid).items() if name == "llama-server"]
    assert len(servers) == 1, _descendants(s.proc.pid)
    assert s.client().chat.completions.create(model=s.alias, messages=ask("hi"), max_tokens=2).choices
    rc, out = s.stop(sig)
    assert rc == 0, out
    assert "stopped" in out and "Traceback" not in out
    assert servers[0] not in proc_table()  # reaped, not a zombie and not an orphan
    assert "cleaning up before exit" in s.log.read_text()  # it got SIGTERM and shut down on its own, no SIGKILL


@pytest.mark.slow
def test_server_that_dies_at_start_up_is_one_line(tiny_v2, smollm2_gguf):
    _, mmproj = tiny_v2  # the tiny mmproj projects to 128 dims; SmolLM2 embeds in 576: llama-server refuses the pair
    r = mvlm("serve", "--model", smollm2_gguf, "--mmproj", mmproj, "--port", _free_port(), timeout=300)
    assert r.returncode == 4, (r.stdout, r.stderr)
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "mismatch between text model" in err[0] and "Traceback" not in r.stderr, r.stderr
    log = Path(re.search(r"whole log: (\S+)\)", err[0]).group(1))
    assert "mismatch between text model" in log.read_text()


@pytest.mark.slow
def test_text_only_model_without_mmproj(smollm2_gguf, host_runtime):
    import openai

    s = Served("--model", smollm2_gguf, "--port", _free_port(), "--threads", 2, "--ctx-size", 1024)
    try:
        client = s.client()
        r = client.chat.completions.create(model=s.alias, messages=[{"role": "user", "content": "Say hello."}],
                                           max_tokens=8, temperature=0)
        assert r.choices[0].message.content and r.usage.prompt_tokens > 0 and r.usage.completion_tokens <= 8
        # no mmproj: an image is refused (llama-server answers 500 here, not 400), and the server stays up
        with pytest.raises(openai.APIStatusError, match="image input is not supported"):
            client.chat.completions.create(model=s.alias, messages=ask("hi", png_data_uri()), max_tokens=2)
        assert client.chat.completions.create(model=s.alias, messages=ask("hi"), max_tokens=2).choices
    finally:
        rc, out = s.stop()
    assert rc == 0, out


# --------------------------------------------------------------------------------------------------- ssh device


@pytest.fixture(scope="module")
def ssh_box(sshd, tmp_path_factory) -> tuple[Path, Path]:
    """A device profile for the real sshd (host-key checking on, its own key) and the device's work dir."""
    d = tmp_path_factory.mktemp("box")
    remote = d / "remote"
    return sshd.profile_file(d / "box.toml", remote, threads=2), remote


def _gone(remote: Path, port: int, within: float = 15.0) -> tuple[list[int], list[int]]:
    """(device servers, ssh tunnels) still running after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        left = (_cmdlines_with(f"{remote}/bin/llama-server", "llama-server"),
                _cmdlines_with(f"127.0.0.1:{port}:127.0.0.1:", "ssh"))
        if not any(left) or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


@pytest.mark.slow
def test_serve_on_ssh_device_through_the_tunnel(ssh_box, tiny_v2):
    lm, mmproj = tiny_v2
    profile, remote = ssh_box
    port = _free_port()
    s = Served("--device", profile, "--model", lm, "--mmproj", mmproj, "--port", port, "--ctx-size", 2048)
    print(f"ssh device: ready {s.ready_s:.1f} s after start (push included)")
    try:
        assert s.base_url == f"http://127.0.0.1:{port}/v1"
        # the server runs from the device's work dir (pushed there, checked by sha256), bound to its 127.0.0.1
        server_pids = _cmdlines_with(f"{remote}/bin/llama-server", "llama-server")
        assert len(server_pids) == 1
        cmd = Path(f"/proc/{server_pids[0]}/cmdline").read_bytes().split(b"\0")
        assert cmd[cmd.index(b"--host") + 1] == b"127.0.0.1" and cmd[cmd.index(b"--port") + 1] == b"0"
        assert (remote / "models" / lm.name).read_bytes() == lm.read_bytes()
        t0 = time.monotonic()
        r = s.client().chat.completions.create(model=s.alias, messages=ask("What is in the picture?", png_data_uri()),
                                               max_tokens=6, temperature=0)
        print(f"ssh device: one completion through the tunnel {time.monotonic() - t0:.2f} s")
        assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > image_tokens(mmproj)
    finally:
        rc, out = s.stop()
    assert rc == 0, out
    servers, tunnels = _gone(remote, port)
    assert not servers, "the device's server outlived mvlm serve"
    assert not tunnels, "the ssh tunnel outlived mvlm serve"
    with socket.socket() as sock:  # the local port is free again (TIME_WAIT entries aside, as for any server)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))


@pytest.mark.slow
def test_ssh_session_lost_stops_the_device_server_and_exits_4(ssh_box, tiny_v2):
    """The server's ssh session ends under it (its ssh client killed): the script on the device kills the server,
    mvlm serve says so in one line (exit 4) and takes the tunnel down."""
    lm, mmproj = tiny_v2
    profile, remote = ssh_box
    port = _free_port()
    s = Served("--device", profile, "--model", lm, "--mmproj", mmproj, "--port", port, "--ctx-size", 1024)
    try:
        assert len(_cmdlines_with(f"{remote}/bin/llama-server", "llama-server")) == 1
        clients = [pid for pid, name in _descendants(s.proc.pid).items()
                   if name == "ssh" and b"sh -c" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(clients) == 1, _descendants(s.proc.pid)
        os.kill(clients[0], signal.SIGKILL)
        s.proc.wait(timeout=30)
    finally:
        rc, out = s.stop()
    assert rc == 4, out
    # unchanged files are not pushed again: 0 bytes when the tunnel test ran first in this module (run alone, this
    # test makes the first push itself)
    assert re.search(r"pushed .*\d+ files", out), out  # "pushed 0 bytes: all 26 files …" or "pushed 51.8 MiB (26 files)"
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "stopped while serving" in errors[0] and "Traceback" not in out, out
    servers, tunnels = _gone(remote, port)
    assert not servers and not tunnels, (servers, tunnels)


@pytest.mark.slow
def test_local_server_that_dies_while_serving_is_exit_4(tiny_v2):
    lm, _ = tiny_v2
    s = Served("--model", lm, "--port", _free_port(), "--ctx-size", 1024)
    server = next(pid for pid, name in _descendants(s.proc.pid).items() if name == "llama-server")
    os.kill(server, signal.SIGKILL)
    s.proc.wait(timeout=30)
    rc, out = s.stop()
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert rc == 4 and len(errors) == 1 and "stopped while serving (killed by SIGKILL)" in errors[0], out


@pytest.mark.slow
def test_mvlm_killed_outright_still_stops_the_server(tiny_v2):
    """SIGKILL leaves mvlm no chance to clean up: the server's parent-death signal (SIGTERM) stops it anyway. Its
    output reaches the log through mvlm (the stream the port and pid are read from), so the log holds every line up
    to the kill and none after it."""
    lm, _ = tiny_v2
    s = Served("--model", lm, "--port", _free_port(), "--ctx-size", 1024)
    server = next(pid for pid, name in _descendants(s.proc.pid).items() if name == "llama-server")
    s.proc.kill()
    s.proc.wait(timeout=10)
    deadline = time.monotonic() + 15
    while server in proc_table() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server not in proc_table(), "llama-server outlived a killed mvlm serve"
    assert re.search(r"listening on http://127\.0\.0\.1:\d+", s.log.read_text())
    s.stop()


@pytest.mark.slow
def test_two_serves_with_the_same_log_both_append(tiny_v2, tmp_path):
    """The second serve with the same --log does not wipe the first one's live log: both servers' lines are there."""
    lm, _ = tiny_v2
    log = tmp_path / "shared.log"
    log.write_text("an older run\n")
    ports = [_free_port(), _free_port()]
    first = Served("--model", lm, "--port", ports[0], "--ctx-size", 512, "--threads", 1, "--log", log)
    try:
        second = Served("--model", lm, "--port", ports[1], "--ctx-size", 512, "--threads", 1, "--log", log)
        rc2, out2 = second.stop()
    finally:
        rc1, out1 = first.stop()
    assert (rc1, rc2) == (0, 0), (out1, out2)
    text = log.read_text()
    assert text.startswith("an older run\n")
    for port in ports:  # each serve's own header, with the port it was asked for
        assert re.search(rf"==== mvlm serve \(pid \d+\) started .* on port {port} ====", text), text[-3000:]
    # each server's own line, on the private port it picked behind its serve's front
    assert len(set(re.findall(r"listening on http://127\.0\.0\.1:(\d+)", text))) == 2, text[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("signals", [(signal.SIGINT, signal.SIGINT), (signal.SIGINT, signal.SIGTERM), (signal.SIGHUP,),
                                     (signal.SIGQUIT,), (signal.SIGTERM, signal.SIGHUP)],
                         ids=["double-ctrl-c", "sigint-then-sigterm", "sighup", "sigquit", "sigterm-then-sighup"])
def test_any_stop_signals_exit_0_and_reap_the_server(tiny_v2, signals):
    """A second stop signal 50 ms after the first only hastens the stop; SIGHUP (terminal closed) and SIGQUIT stop it
    like SIGTERM. Each time: exit 0, "stopped", and the server reaped (not running, not a zombie)."""
    lm, _ = tiny_v2
    port = _free_port()
    s = Served("--model", lm, "--port", port, "--ctx-size", 512, "--threads", 1)
    servers = [pid for pid, name in _descendants(s.proc.pid).items() if name == "llama-server"]
    assert len(servers) == 1
    for i, sig in enumerate(signals):
        if i:
            time.sleep(0.05)
        s.proc.send_signal(sig)
    rc, out = s.stop()
    assert rc == 0, out
    assert "stopped" in out.splitlines() and "Traceback" not in out, out
    assert servers[0] not in proc_table(), proc_table().get(servers[0])  # a zombie would still be listed
    assert not _cmdlines_with(f"--port\0{port}\0", "llama-server")


@pytest.mark.slow
def test_a_second_stop_signal_kills_a_server_that_ignores_sigterm_at_once():
    """In-process, with a real child that ignores SIGTERM (its grace period would be 10 s): the first signal raises
    Stopped; a second one, arriving while mvlm waits for the child, SIGKILLs it at once and does not raise, so the
    child is reaped; afterwards the stop signals are ignored (Python's shutdown would otherwise restore death by them)."""
    import threading

    from mvlm_bench.session.server import stop_process
    from mvlm_core.stops import STOP_SIGNALS, Stopped, StopSignals

    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    proc = None
    try:
        stops = StopSignals().install()
        proc = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 30 & wait"], start_new_session=True)
        stops.procs.append(proc)
        time.sleep(0.2)  # the trap is set
        with pytest.raises(Stopped):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        stops.begin()
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
        t0 = time.monotonic()
        stop_process(proc, grace=10.0)
        took = time.monotonic() - t0
        assert proc.returncode == -signal.SIGKILL and 0.4 < took < 3, (proc.returncode, took)
        stops.done()
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in STOP_SIGNALS)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.slow
def test_parallel_slots_decode_four_streams_at_once_and_options_after_dashdash_reach_llama_server(smollm2_gguf,
                                                                                                  host_runtime):
    """`-np 4`: four streams from the real openai client are all under way before any of them ends (one slot would
    finish the first before starting the fourth), and llama-server itself reports 4 slots; `-- --no-slots` reaches
    llama-server unchanged (its /slots endpoint answers 501 then)."""
    import json
    import threading
    import urllib.error
    import urllib.request

    s = Served("--model", smollm2_gguf, "--port", _free_port(), "--ctx-size", 2048, "-np", 4, "--", "--no-slots")
    try:
        root = s.base_url.removesuffix("/v1")
        with urllib.request.urlopen(root + "/props", timeout=30) as r:
            assert json.load(r)["total_slots"] == 4
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(root + "/slots", timeout=30)
        assert e.value.code == 501
        client = s.client()
        firsts, ends, texts = [], [], []

        def stream(i: int) -> None:
            chunks = client.chat.completions.create(
                model=s.alias, stream=True, max_tokens=48, temperature=0, seed=i,
                messages=[{"role": "user", "content": f"Count from {i} to {i + 40}, one number per line."}])
            got = ""
            for chunk in chunks:
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta and not got:
                    firsts.append(time.monotonic())
                got += delta or ""
            ends.append(time.monotonic())
            texts.append(got)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert len(texts) == 4 and all(texts), texts
        assert max(firsts) < min(ends), "a stream started only after another had ended: the slots did not run at once"
    finally:
        rc, out = s.stop()
    assert rc == 0, out


@pytest.mark.slow
def test_llama_server_options_mvlm_owns_are_refused_after_dashdash(smollm2_gguf):
    for extra, instead in ((["--", "-m", "x.gguf"], "--model"), (["--", "--port=9"], "--port"),
                           (["--", "-c", "100"], "--ctx-size"), (["--", "--api-key", "k"], "--api-key-file"),
                           # llama.cpp reads --ctx_size as --ctx-size: the underscore spelling is the same option
                           (["--", "--ctx_size", "64"], "--ctx-size"), (["--", "--model_url", "file:///x"], "--model"),
                           (["--", "--log_file=/tmp/x"], "--log"), (["--", "--api_key_file", "k"], "--api-key-file"),
                           (["--", "--api-prefix", "/x"], "API at the root"), (["stray.gguf"], "go after --")):
        r = subprocess.run([sys.executable, "-m", "mvlm", "serve", "--model", str(smollm2_gguf), *extra],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and instead in r.stderr, (extra, r.stderr)
