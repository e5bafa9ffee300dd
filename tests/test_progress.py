"""Progress that tells the truth: ``mvlm bench`` and ``mvlm quantize`` run under a real pseudo-terminal (so rich draws
its live progress line) and what the terminal received is read back: the warm-up shown as warm-up, the measured runs
counted apart in runs (not bytes), a live generated-token count from the streamed output, an ETA; the quantizer's
quality phase with its models evaluated so far. Also the transports' streaming seam (``on_output``) on real processes."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mvlm_bench.device.profiles import load_profile
from mvlm_bench.device.transports.local import LocalTransport
from mvlm_bench.plan.protocols import LM_PROMPT
from mvlm_bench.plan.spec import BenchSpec
from mvlm_bench.session.live_tokens import LiveTokens

MVLM = [sys.executable, "-m", "mvlm"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def in_terminal(*args, timeout: float = 300) -> tuple[int, str]:
    """Run mvlm with stdout and stderr on a real pty; (exit status, everything the terminal got, escapes removed)."""
    master, slave = os.openpty()
    env = {**os.environ, "COLUMNS": "250", "LINES": "50", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([*MVLM, *map(str, args)], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env,
                            close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    rc = proc.wait(timeout=30)
    return rc, ANSI.sub("\n", b"".join(chunks).decode("utf-8", errors="replace"))


def profile_file(tmp_path: Path) -> Path:
    p = tmp_path / "proglocal.toml"
    p.write_text(f'name = "proglocal"\ntransport = "local"\nworkdir = "{tmp_path / "dev"}"\ntarget = "host"\nthreads = 2\n')
    return p


@pytest.mark.slow
def test_bench_progress_shows_warm_up_runs_tokens_and_eta(tmp_path, smollm2_gguf, host_runtime):
    n, repeat = 160, 3
    rc, screen = in_terminal("bench", "--device", profile_file(tmp_path), "--model", smollm2_gguf, "-n", n,
                             "--repeat", repeat, "--threads", 2)
    assert rc == 0, screen[-3000:]
    assert "lm on proglocal: warm-up 1/1" in screen, screen[-3000:]
    for i in range(1, repeat + 1):
        assert f"lm on proglocal: run {i}/{repeat}" in screen
    assert f"run {repeat + 1}/{repeat}" not in screen and "run 4/4" not in screen  # the warm-up is not a "run"
    # the bar counts runs, in runs, never in bytes
    assert re.search(rf"\b\d/{repeat + 1} runs\b", screen), screen[-3000:]
    assert not re.search(rf"\d/{repeat + 1} bytes", screen)
    # a live token count from the streamed output, below -n while the run goes on, never above it
    counts = [(int(a), int(b)) for a, b in re.findall(r"(\d+)/(\d+) tokens", screen)]
    assert counts and all(b == n and 0 <= a <= n for a, b in counts), counts
    assert any(0 < a < n for a, _ in counts), counts
    assert re.search(r"ETA \d+:\d\d", screen)
    # the log lines say the same
    assert "warm-up 1/1 done in" in screen and f"run {repeat}/{repeat} done in" in screen


@pytest.mark.slow
def test_quantize_quality_phase_shows_progress(tmp_path, smollm2_gguf, host_runtime):
    rc, screen = in_terminal("quantize", smollm2_gguf, "--type", "q8_0,q4_0", "--allow-requantize", "--outdir", tmp_path)
    assert rc == 0, screen[-3000:]
    assert f"quality: logits of the input ({Path(smollm2_gguf).name})" in screen, screen[-3000:]
    assert "quality: logits of q8_0" in screen and "quality: logits of q4_0" in screen
    # its bar: models evaluated / (the input + each output), on the same progress line as the description
    assert re.search(r"quality: logits of q8_0[^A-Za-z]*?\b1/3\b", screen), screen[-3000:]
    assert re.search(r"quality: logits of q4_0[^A-Za-z]*?\b2/3\b", screen), screen[-3000:]


@pytest.mark.slow
def test_transport_streams_output_while_the_process_runs(tmp_path):
    """``on_output`` hears each piece as it comes (before the process ends); the captured output is unchanged."""
    t = LocalTransport(load_profile(str(profile_file(tmp_path))))
    heard: list[tuple[float, str]] = []
    t0 = time.monotonic()
    r = t.run(["sh", "-c", "printf 'first\\n'; sleep 1; printf 'second é\\n'"], timeout=30,
              on_output=lambda s: heard.append((time.monotonic() - t0, s)))
    assert r.returncode == 0 and r.output == "first\nsecond é\n"
    assert "".join(s for _, s in heard) == r.output
    first_at = next(at for at, s in heard if "first" in s)
    assert first_at < 0.9 < r.duration_s  # heard while the process still ran


@pytest.mark.slow
def test_ssh_transport_streams_output_too(sshd, tmp_path):
    """Over a real sshd the same: pieces arrive while the remote command runs; the result is what it was before."""
    from mvlm_bench.device.transports import make_transport

    t = make_transport(sshd.profile(str(tmp_path / "remote")))
    try:
        t.check()
        heard: list[tuple[float, str]] = []
        t0 = time.monotonic()
        r = t.run(["sh", "-c", "echo first; sleep 1.5; echo second"], timeout=60,
                  on_output=lambda s: heard.append((time.monotonic() - t0, s)))
        plain = t.run(["sh", "-c", "echo first; echo second"], timeout=60)
    finally:
        t.close()
    assert r.returncode == 0 and r.output == plain.output == "first\nsecond\n"
    first_at = next(at for at, s in heard if "first" in s)
    assert first_at + 1.0 < r.duration_s, (first_at, r.duration_s)
    assert "second" in "".join(s for _, s in heard)


def test_live_tokens_counts_generated_text_after_the_last_log_line(smollm2_gguf):
    spec = BenchSpec("lm", Path(smollm2_gguf), n_predict=50)
    seen: list[tuple[int, int]] = []
    live = LiveTokens(spec, lambda a, b: seen.append((a, b)), every_s=0)
    live.feed("0.00.218.341 I generate: n_ctx = 2048, n_batch = 2048, n_predict = 50, n_keep = 0\n")
    live.feed("0.00.218.342 I \n")
    live.feed(LM_PROMPT)
    live.feed(" Choose a domain name")
    from mvlm_bench.plan.imp_prompt import count_tokens

    want = count_tokens(Path(smollm2_gguf), LM_PROMPT + " Choose a domain name") - count_tokens(
        Path(smollm2_gguf), LM_PROMPT)
    assert seen[0] == (0, 50) and seen[-1] == (want, 50) and want > 0
