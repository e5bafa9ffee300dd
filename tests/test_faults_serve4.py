"""`mvlm serve` against what an outside tester did to it (round 4): each case fails on the code before it.

- an ``--api-key-file`` that is /dev/zero (read whole: OOM-killed at 23.8 GB), a FIFO (waited forever) or a file of
  gigabytes (MemoryError traceback);
- a JSON body with ``NaN``/``Infinity`` (or a number beyond a double, a lone surrogate escape) forwarded to
  llama-server, whose parser answers 500;
- slowloris: nine connections that send headers and one byte of body and then nothing held the eight request slots
  (every real request 503 for a minute, again after each reconnect);
- ``--timeout inf`` accepted (``nan`` refused as "too short").

Everything is real: the `mvlm` console script as a subprocess, the real host llama-server with SmolLM2, raw sockets
and the `openai` client over 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from peers import error_line, small_gguf

READ_TIMEOUT = 10.0  # the front's default (front.Limits.read_timeout)


def _mvlm(*args: object) -> subprocess.CompletedProcess:
    """`mvlm ARGS` with 30 s and 4 GiB of address space: a command that reads /dev/zero fails here, not the machine."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    env = dict(os.environ) | {"COLUMNS": "200"}
    env.pop("MVLM_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "mvlm", *map(str, args)], capture_output=True, text=True,
                          errors="replace", env=env, timeout=30, preexec_fn=cap)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ============================================================================= 1. --api-key-file: a file, and small
@pytest.mark.parametrize("kind,words", [("dev-zero", "is a character device, not a regular file"),
                                        ("fifo", "is a FIFO (named pipe), not a regular file"),
                                        ("sparse-2mib", "is 2097152 bytes, more than the 1048576")])
def test_an_api_key_file_that_is_not_a_small_regular_file_is_one_line_at_once(tmp_path, kind, words):
    if kind == "dev-zero":
        keys = Path("/dev/zero")
    elif kind == "fifo":
        keys = tmp_path / "keys.fifo"
        os.mkfifo(keys)  # nobody writes to it: opening it to read blocked forever
    else:
        keys = tmp_path / "keys.txt"
        with open(keys, "wb") as f:
            f.truncate(2 << 20)  # 2 MiB of (sparse) zeros
    t0 = time.monotonic()
    line = error_line(_mvlm("serve", "--model", small_gguf(tmp_path / "m.gguf"), "--api-key-file", keys))
    assert f"--api-key-file {keys}: {words}" in line and "one per line" in line, line
    assert time.monotonic() - t0 < 20


# ======================================================================================== 4. --timeout is finite
@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "86401", "0.5"])
def test_a_timeout_that_is_not_finite_or_beyond_a_day_is_one_line(tmp_path, value):
    line = error_line(_mvlm("serve", "--model", small_gguf(tmp_path / "m.gguf"), "--timeout", value))
    assert f"--timeout {float(value):g} is out of range" in line and "at least 1 and at most 86400" in line, line


# ========================================================================= the real server, behind its front door
@pytest.fixture(scope="module")
def served(smollm2_gguf, host_runtime):
    """`mvlm serve` of SmolLM2 with the default limits (8 requests at once, 10 s to send a request)."""
    from peers import Served

    s = Served("--model", smollm2_gguf, "--port", _free_port(), "--ctx-size", 512, "--threads", 1)
    yield s
    rc, out = s.stop()
    assert rc == 0, out


def _address(s) -> tuple[str, int]:
    return "127.0.0.1", int(s.base_url.rsplit(":", 1)[1].split("/")[0])


def _post(s, body: bytes, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(s.base_url + "/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


# =========================================================== 2. NaN, Infinity: not JSON, a 400 from the front door
@pytest.mark.slow  # starts llama-server
@pytest.mark.parametrize("value,words", [
    ("NaN", "it holds NaN, which JSON does not have"),
    ("Infinity", "it holds Infinity, which JSON does not have"),
    ("-Infinity", "it holds -Infinity, which JSON does not have"),
    ("1e999", "the number 1e999 is beyond any double"),
    ('"\\ud800"', "a lone surrogate escape"),
], ids=["nan", "infinity", "minus-infinity", "1e999", "lone-surrogate"])
def test_nan_and_infinity_are_a_400_from_the_front_not_a_500_from_llama_server(served, value, words):
    body = ('{"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": '
            + value + "}").encode()
    status, answer = _post(served, body)
    assert status == 400, (status, answer)
    err = answer["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == 400, answer
    assert "the request body is not valid JSON" in err["message"] and words in err["message"], answer
    status, answer = _post(served, body.replace(value.encode(), b"0"))  # the same request with a number goes through
    assert status == 200 and answer["usage"]["completion_tokens"] == 1, answer


# ==================================================== 3. slowloris: sending a request takes no slot, and 10 s at most
def _slow_client(s, first: bytes) -> socket.socket:
    c = socket.create_connection(_address(s), timeout=30)
    c.sendall(first)
    return c


@pytest.mark.slow  # starts llama-server; waits out the read deadline
def test_connections_that_stop_sending_take_no_slot_and_are_closed_after_the_read_timeout(served):
    import openai

    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"
    silent = [_slow_client(served, head) for _ in range(9)]  # one more than the 8 request slots
    trickler = _slow_client(served, b"P")  # sends a byte a second, never a whole request line
    t0 = time.monotonic()
    try:
        time.sleep(0.5)  # the front has read what they sent
        client = openai.OpenAI(base_url=served.base_url, api_key="none", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert r.usage.completion_tokens == 2
        assert time.monotonic() - t0 < READ_TIMEOUT / 2, "the real request waited for the slow clients"
        status, answer = _post(served, b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}')
        assert status == 200, answer  # and again: nothing is queued behind them

        closed: dict[socket.socket, tuple[float, bytes]] = {}
        answers = {c: b"" for c in [*silent, trickler]}
        while len(closed) < len(answers) and time.monotonic() - t0 < READ_TIMEOUT + 10:
            ready, _, _ = select.select([c for c in answers if c not in closed], [], [], 1.0)
            for c in ready:
                try:
                    chunk = c.recv(65536)
                except OSError:
                    chunk = b""
                answers[c] += chunk
                if not chunk:
                    closed[c] = (time.monotonic() - t0, answers[c])
            if trickler not in closed and time.monotonic() - t0 < READ_TIMEOUT + 10:
                try:
                    trickler.sendall(b"O")
                except OSError:
                    pass
        assert len(closed) == len(answers), f"{len(answers) - len(closed)} slow connections still open after " \
                                            f"{time.monotonic() - t0:.0f} s"
        for when, answer in closed.values():
            assert READ_TIMEOUT - 1 < when < READ_TIMEOUT + 5, when
            assert answer.startswith(b"HTTP/1.0 408"), answer[:200]
            assert b"did not arrive whole within 10 s" in answer, answer
    finally:
        for c in [*silent, trickler]:
            c.close()
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert r.usage.completion_tokens == 2
