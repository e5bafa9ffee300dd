"""The front door of ``mvlm serve``: an HTTP proxy on the address the user asked for, in front of llama-server.

llama-server decodes every image a request carries (stb_image) before checking anything: an 875 KB PNG that claims
30000 x 30000 pixels costs it 1.8 GB, three at once 5.6 GB. It fetches any http(s) image URL from its own host (a door
into the device's network), and takes request bodies of any size, as many at once as connect. The front, for each
request:

- reads the request line, headers and body within ``read_timeout`` seconds in all (408 and closed beyond: a client
  that trickles or stops sending cannot hold a connection), at most ``max_body`` bytes (413 beyond; a body without a
  length: 411); at most ``max_connections`` connections are open (more are closed at once);
- lets at most ``max_concurrent`` requests go on at once (503 with ``Retry-After`` beyond), counting a request only
  once its whole body has arrived: connections still sending take no slot;
- checks the API key when one is set (401; ``Authorization: Bearer KEY`` or ``X-Api-Key``, as llama-server does);
- parses a POST body as JSON (refused when it is not, has a key twice, nests beyond ``MAX_DEPTH``, or holds what
  llama-server's parser fails on with a 500: ``NaN``/``Infinity``, a number beyond a double, a lone surrogate escape;
  a parser that read it differently from llama-server's must not decide what passes) and finds every image in it
  where llama-server looks (OpenAI ``image_url``, Responses ``input_image``, Anthropic ``image`` sources,
  ``input_video``/``video_url``, ``multimodal_data`` of /completion);
- reads each image's header only (PIL): more than ``max_pixels`` pixels, a payload that is not valid base64, or bytes
  that are not an image format are a 400; an http(s) URL is a 400 unless ``allow_remote_media``;
- forwards the rest unchanged to llama-server on this machine's loopback (or the tunnel to the device) and streams the
  response back as it comes (server-sent events included).

Refusals are OpenAI-shaped JSON (``{"error": {"message", "type", "code"}}``), as llama-server's own.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import http.client
import io
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_BASE64 = re.compile(r"[A-Za-z0-9+/]*=*")  # what llama-server's decoder reads, to its first '=' (no whitespace)
MAX_DEPTH = 64  # a chat request nests ~6 deep; JSON Schema tools a few more
MEDIA_TYPES = {"image_url", "input_image", "image", "input_video", "video_url"}
PUBLIC_PATHS = {"/health", "/v1/health"}  # as llama-server: no key needed
SEND_TIMEOUT = 60.0  # seconds a client may leave its response unread (a send that cannot go on) before it is dropped
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # where a lone surrogate may hide (llama-server refuses one)
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may carry and how many may run; ``mvlm serve``'s options set them."""

    max_body: int = 32 << 20  # bytes of one request body (a 4096 x 4096 PNG in base64 is ~25 MB at worst)
    max_pixels: int = 4096 * 4096  # per image; MobileVLM and LLaVA resize to 336 x 336 anyway
    max_concurrent: int = 8  # requests in flight (llama-server queues them on its slots)
    max_connections: int = 64  # open connections (each is a thread here), requests being sent included
    allow_remote_media: bool = False  # http(s) image URLs, fetched by llama-server from its own host
    api_keys: tuple[str, ...] = ()
    read_timeout: float = 10.0  # seconds a client may take to send its whole request (line, headers and body)

    def describe(self) -> str:
        return (f"images up to {self.max_pixels:,} pixels, bodies up to {self.max_body >> 20} MiB, "
                f"{self.max_concurrent} requests at once, remote image URLs "
                f"{'allowed' if self.allow_remote_media else 'refused'}")

    def __post_init__(self) -> None:
        if not 0 < self.read_timeout <= 3600:  # NaN too
            raise ValueError(f"read_timeout {self.read_timeout!r}: give seconds from 0 to 3600")


class Refused(Exception):
    """A request the front answers itself: HTTP ``status`` and a message."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.retry_after = status, message, kind, retry_after


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise Refused(400, f"the request body has the key {k!r} twice")
        out[k] = v
    return out


def _constant(name: str) -> float:
    raise Refused(400, f"the request body is not valid JSON: it holds {name}, which JSON does not have (send a number "
                       "or null)")


def _float(text: str) -> float:
    f = float(text)
    if f in (float("inf"), float("-inf")):
        raise Refused(400, f"the request body is not valid JSON for this server: the number {text[:24]} is beyond "
                           "any double")
    return f


def _text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise Refused(400, "the request body is not valid JSON for this server: a string holds a lone surrogate "
                           "escape (\\ud800-\\udfff without its pair)") from None


def parse_body(body: bytes) -> object:
    """A request body as JSON, or Refused: not JSON (NaN, Infinity and numbers beyond a double included), a key twice,
    nested beyond MAX_DEPTH, a lone surrogate escape (each a 500 from llama-server's parser)."""
    try:
        obj = json.loads(body, object_pairs_hook=_no_duplicates, parse_constant=_constant, parse_float=_float)
    except RecursionError:
        raise Refused(400, f"the request body nests deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Refused(400, f"the request body is not JSON ({e})") from None
    check_text = bool(_SURROGATE_ESCAPE.search(body))
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _text(node)
            continue
        if depth > MAX_DEPTH:
            raise Refused(400, f"the request body nests deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict) and check_text:
            for k in node:
                _text(k)
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)) or (check_text and isinstance(c, str)))
    return obj


def _urls_of(item: dict) -> Iterator[object]:
    for key in dict.fromkeys(("image_url", item.get("type"), "source")):
        value = item.get(key) if isinstance(key, str) else None
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for field in ("url", "data"):
                if field in value:
                    yield value[field]


def media_of(obj: object) -> Iterator[object]:
    """Every media payload (a URL, a data URI, raw base64) in a request, where llama-server looks for them."""
    stack = [obj]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") in MEDIA_TYPES:
                yield from _urls_of(node)
            data = node.get("multimodal_data")
            if isinstance(data, list):
                yield from data
            elif data is not None:
                yield data
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def image_size(raw: bytes) -> tuple[int, int] | None:
    """(width, height) from an image's header alone; None when the bytes are no image format PIL reads."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as im:
            return im.size
    except Image.DecompressionBombError:
        return (1 << 31, 1)  # PIL's own bomb guard fired: more pixels than any limit here
    except Exception:  # UnidentifiedImageError, a broken header (SyntaxError, ValueError, OSError, struct.error)
        return None


def check_media(value: object, limits: Limits) -> None:
    """Refused unless ``value`` is an image within the limits (or a URL kind llama-server refuses itself)."""
    if not isinstance(value, str):
        raise Refused(400, "an image must be given as a string (a data URI or base64)")
    if value[:4].lower() == "http":  # llama-server fetches whatever starts with "http"
        if limits.allow_remote_media:
            return
        raise Refused(400, "image URLs are not fetched by this server (mvlm serve --allow-remote-images turns that on): "
                           "send the image as a data URI (data:image/png;base64,...)")
    if value.startswith("file://"):
        return  # llama-server refuses these itself (no --media-path)
    payload = value
    if value.startswith("data:"):
        meta, sep, payload = value.partition(",")
        if not sep or not meta.lower().endswith(";base64"):
            raise Refused(400, "a data URI must be base64: data:image/png;base64,...")
    core = payload.rstrip("=")
    try:
        if not _BASE64.fullmatch(payload):
            raise ValueError(payload)
        raw = base64.b64decode(core + "=" * (-len(core) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise Refused(400, "an image payload is not valid base64 (letters, digits, '+' and '/', no spaces)") from None
    size = image_size(raw)
    if size is None:
        raise Refused(400, "an image payload is not an image format this server reads (PNG, JPEG, GIF, BMP, ...)")
    if size[0] * size[1] > limits.max_pixels:
        raise Refused(400, f"an image of {size[0]} x {size[1]} pixels is over this server's limit of "
                           f"{limits.max_pixels:,} pixels (mvlm serve --max-image-pixels): send it smaller")


def key_ok(headers, keys: tuple[str, ...]) -> bool:
    given = headers.get("Authorization") or headers.get("X-Api-Key") or ""
    given = given[len("Bearer "):] if given.startswith("Bearer ") else given
    return any(hmac.compare_digest(given.encode(), k.encode()) for k in keys)


class _Expired(Exception):
    """The client did not send its whole request (line, headers, body) within ``read_timeout``."""


class _DeadlineReader(io.RawIOBase):
    """The client's socket, readable until one deadline for the whole request: each read may wait only for the time
    left, so a client that trickles a byte every few seconds is cut off as surely as one that sends nothing."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _Expired
        self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buf)
        except TimeoutError:
            raise _Expired from None


class _Handler(BaseHTTPRequestHandler):
    server: Front
    protocol_version = "HTTP/1.0"  # one request per connection: a streamed response ends when the connection does
    server_version = "mvlm-serve"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass

    def setup(self) -> None:
        super().setup()
        self.command, self.request_version, self.requestline = "", "HTTP/1.0", ""  # until the request line is read
        self.rfile.close()  # the socket's own file: every read goes through the deadline instead
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, time.monotonic() + self.server.limits.read_timeout))

    def handle(self) -> None:
        try:
            super().handle()
        except _Expired:
            self._refuse(Refused(408, f"the request did not arrive whole within {self.server.limits.read_timeout:g} "
                                      "s: send the headers and the body at once", "timeout_error"))
        except (OSError, http.client.HTTPException):
            pass  # the client went away while sending its request

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self._handle()

    do_POST = do_PUT = do_DELETE = do_OPTIONS = do_PATCH = do_HEAD = do_GET

    def _handle(self) -> None:
        front = self.server
        taken, held = False, [0]
        try:
            path = urlsplit(self.path).path
            if front.limits.api_keys and path not in PUBLIC_PATHS and not key_ok(self.headers, front.limits.api_keys):
                raise Refused(401, "Invalid API Key", "authentication_error")
            data = self._read_body(self._body_length(), held)
            if data is None:
                return  # the client went away mid-body
            self.connection.settimeout(SEND_TIMEOUT)  # the request is in: from here on only sends wait on the client
            if not front.inflight.acquire(blocking=False):  # a slot for a whole request only: sending one is no load
                raise Refused(503, f"this server takes {front.limits.max_concurrent} requests at once (mvlm serve "
                                   "--max-concurrent): retry shortly", "server_busy", retry_after=1)
            taken = True
            if data and self.command in ("POST", "PUT", "PATCH"):
                for value in media_of(parse_body(data)):
                    check_media(value, front.limits)
            self._forward(data)
        except Refused as e:
            self._refuse(e)
        except (OSError, http.client.HTTPException):
            pass  # the client or llama-server went away: nothing left to answer
        finally:
            if taken:
                front.inflight.release()
            front.hold_body_bytes(-held[0])

    def _read_body(self, n: int, held: list[int]) -> bytes | None:
        """``n`` bytes of body within the request's deadline (_DeadlineReader), or None when the client went away. The
        bytes count against the front's budget for bodies held at once (``held[0]``: this request's share, returned
        by the caller) as they arrive: a client that sends nothing costs nothing, a flood of whole bodies is a 503."""
        front, parts, got = self.server, [], 0
        while got < n:
            want = min(1 << 16, n - got)
            if not front.hold_body_bytes(want):
                raise Refused(503, f"this server is receiving {front.body_budget >> 20} MiB of request bodies at once "
                                   "(--max-concurrent x --max-body-mb): retry shortly", "server_busy", retry_after=1)
            held[0] += want
            chunk = self.rfile.read(want)
            if len(chunk) != want:
                return None
            parts.append(chunk)
            got += want
        return b"".join(parts)

    def _body_length(self) -> int:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise Refused(411, "send the request body with a Content-Length")
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise Refused(400, "Content-Length is not a number") from None
        if n < 0:
            raise Refused(400, "Content-Length is negative")
        if n > self.server.limits.max_body:
            raise Refused(413, f"a request body of {n:,} bytes is over this server's limit of "
                               f"{self.server.limits.max_body:,} (mvlm serve --max-body-mb)")
        return n

    def _forward(self, data: bytes) -> None:
        front = self.server
        up = http.client.HTTPConnection(front.upstream[0], front.upstream[1], timeout=front.upstream_timeout)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Content-Length"] = str(len(data))
            up.request(self.command, self.path, body=data if data or self.command != "GET" else None, headers=headers)
            resp = up.getresponse()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP or (k.lower() == "content-length" and self.command != "HEAD"):
                    self.send_header(k, v)
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command == "HEAD":
                return
            while True:
                chunk = resp.read1(1 << 16)
                if not chunk:
                    break
                self.wfile.write(chunk)
                self.wfile.flush()
        finally:
            up.close()

    def _refuse(self, e: Refused) -> None:
        body = json.dumps({"error": {"message": e.message, "type": e.kind, "code": e.status}}).encode()
        try:
            self.connection.settimeout(SEND_TIMEOUT)
            self.send_response(e.status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            if e.retry_after is not None:
                self.send_header("Retry-After", str(e.retry_after))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            pass


_TOO_MANY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
             b"Connection: close\r\n\r\n" + json.dumps({"error": {
                 "message": "this server has as many connections open as it takes: retry shortly", "type": "server_busy",
                 "code": 503}}).encode())


class Front(ThreadingHTTPServer):
    """The proxy, listening on ``(host, port)`` and forwarding to ``upstream`` (host, port); ``start()`` serves from
    a thread, ``close()`` stops it. ``port`` is the port it bound (0 asks for a free one)."""

    daemon_threads = True
    allow_reuse_address = True  # as llama-server (a restart right after a stop finds its port in TIME_WAIT)
    request_queue_size = 64

    def __init__(self, host: str, port: int, upstream: tuple[str, int], limits: Limits = Limits(),
                 upstream_timeout: float = 3600.0):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.limits, self.upstream, self.upstream_timeout = limits, upstream, upstream_timeout
        self.inflight = threading.BoundedSemaphore(limits.max_concurrent)
        self.connections = threading.BoundedSemaphore(limits.max_connections)
        self.body_budget = limits.max_concurrent * limits.max_body  # bytes of bodies held at once (read or being read)
        self._body_bytes, self._body_lock = 0, threading.Lock()
        super().__init__((host, port), _Handler)
        self.port = int(self.server_address[1])
        self._thread: threading.Thread | None = None

    def hold_body_bytes(self, n: int) -> bool:
        """Take ``n`` bytes of the body budget (give them back with a negative ``n``); False when they do not fit."""
        with self._body_lock:
            if n > 0 and self._body_bytes + n > self.body_budget:
                return False
            self._body_bytes += n
            return True

    def process_request(self, request, client_address) -> None:
        if not self.connections.acquire(blocking=False):  # too many open: a 503 if it fits, closed at once, no thread
            try:
                request.settimeout(0)
                request.send(_TOO_MANY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def start(self) -> Front:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
                                        name="mvlm-serve-front")
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=5.0)
            self._thread = None
        self.server_close()
