"""One conversation everywhere: the GGUF's chat template gives MobileVLM's trained prompt in every client.

The expected prompt is built independently of the template: LLaVA's conv_vicuna_v1 algorithm
(``conversation.v1_conversation``, pinned below against a hand-written string) with the image where ``<image>`` goes in
training; its text chunks are tokenized apart by llama.cpp's tokenizer (BOS on the first) and the projector's image
token count is added, computed from the checkpoint's geometry (336/14 -> 576 patches; LDP and XDP merge 4, LLaVA's MLP
none). Each client must reach exactly that count: llama-mtmd-cli (with and without --jinja), llama-server
(``/apply-template`` and ``usage.prompt_tokens`` of ``/v1/chat/completions`` through the openai client),
llama-cpp-python's MTMDChatHandler, and transformers' ``apply_chat_template`` given the GGUF's template string.
The pure-template tests (jinja2, every content form) are fast.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jinja2
import pytest
from peers import _free_port

from mvlm_convert.families.llava import make_tiny_llava
from mvlm_convert.families.mobilevlm import make_tiny_checkpoint
from mvlm_convert.families.tiny_parts import CLIP
from mvlm_convert.families.xmodel import make_tiny_xmodel
from mvlm_core.conversation import CHAT_TEMPLATE, IMAGE_PLACEHOLDER, MEDIA_MARKER, SYSTEM, v1_conversation

Q = "What is in the picture?"
SERVER_MARKER = re.compile(r"<__media_[A-Za-z0-9]+__>")


# ---------------------------------------------------------------------------------------------------------------
# the reference conversation and the template itself (fast)
# ---------------------------------------------------------------------------------------------------------------
def test_reference_conversation_is_llava_conv_vicuna_v1():
    """The oracle, pinned by hand from LLaVA's conv_vicuna_v1 (sep " ", sep2 "</s>", SeparatorStyle.TWO)."""
    sys_ = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the user's questions.")
    assert SYSTEM == sys_
    assert v1_conversation([Q, "A cat.", "Colour?"], image_marker="<image>") == (
        sys_ + " USER: <image>\nWhat is in the picture? ASSISTANT: A cat.</s>USER: Colour? ASSISTANT:")
    assert v1_conversation(["Hi", "Hello."], system="Be brief.") == "Be brief. USER: Hi ASSISTANT: Hello.</s>"


def _image_url(url: str = "data:image/png;base64,AAAA") -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _text(t: str) -> dict:
    return {"type": "text", "text": t}


# (content of the first user message as a client hands it to the template, the marker the prompt must carry)
CONTENT_FORMS = {
    "string, llama-mtmd-cli (marker first, no newline)": (MEDIA_MARKER + Q, MEDIA_MARKER),
    "string, marker already followed by a newline": (MEDIA_MARKER + "\n" + Q, MEDIA_MARKER),
    "string, llama-server (random marker)": ("<__media_q8ZrT0__>" + Q, "<__media_q8ZrT0__>"),
    "string, llama-server, image after the text": (Q + "<__media_q8ZrT0__>", "<__media_q8ZrT0__>"),
    "OpenAI parts, image first": ([_image_url(), _text(Q)], MEDIA_MARKER),
    "OpenAI parts, text first": ([_text(Q), _image_url()], MEDIA_MARKER),
    "MTMDChatHandler (image_url -> text part with the marker)": ([_text(MEDIA_MARKER), _text(Q)], MEDIA_MARKER),
    "MTMDChatHandler, text first": ([_text(Q), _text(MEDIA_MARKER)], MEDIA_MARKER),
    "llama-server media_marker part": ([{"type": "media_marker", "text": "<__media_ab__>"}, _text(Q)], "<__media_ab__>"),
    "HF parts": ([{"type": "image"}, _text(Q)], MEDIA_MARKER),
    "plain text parts, no image": ([_text(Q)], None),
    "string, no image": (Q, None),
}


def _render(template: str, messages: list, trim: bool = False, **kw) -> str:
    # trim_blocks/lstrip_blocks as llama-cpp-python and transformers render
    env = jinja2.Environment(trim_blocks=trim, lstrip_blocks=trim)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("trim", [False, True], ids=["plain", "trim_blocks"])
@pytest.mark.parametrize("form", list(CONTENT_FORMS))
def test_template_renders_v1_for_every_content_form(form, trim):
    content, marker = CONTENT_FORMS[form]
    msgs = [{"role": "user", "content": content}]
    assert _render(CHAT_TEMPLATE, msgs, trim) == v1_conversation([Q], image_marker=marker)
    # an explicit system message (string or text parts) replaces the default
    for sys_content in ("Be brief.", [_text("Be brief.")]):
        got = _render(CHAT_TEMPLATE, [{"role": "system", "content": sys_content}, *msgs], trim)
        assert got == v1_conversation([Q], system="Be brief.", image_marker=marker)
    # multi-turn: assistant turns end with </s>, the image stays in the first user message
    turns = [{"role": "assistant", "content": "A cat."}, {"role": "user", "content": [_text("What colour?")]},
             {"role": "assistant", "content": [_text("Grey.")]}, {"role": "user", "content": "Sure?"}]
    got = _render(CHAT_TEMPLATE, [*msgs, *turns], trim)
    assert got == v1_conversation([Q, "A cat.", "What colour?", "Grey.", "Sure?"], image_marker=marker)
    assert "[{" not in got and "'type'" not in got  # never a Python repr of the parts


def test_template_joins_text_parts_like_llama_cpp():
    # llama.cpp (common/chat.cpp concat_content_parts): text parts joined with "\n", none next to a marker
    msgs = [{"role": "user", "content": [_image_url(), _text("Describe it."), _text("Be brief.")]}]
    assert _render(CHAT_TEMPLATE, msgs) == v1_conversation(["Describe it.\nBe brief."], image_marker=MEDIA_MARKER)
    no_gen = jinja2.Environment().from_string(CHAT_TEMPLATE).render(messages=msgs, add_generation_prompt=False)
    assert no_gen + "ASSISTANT:" == v1_conversation(["Describe it.\nBe brief."], image_marker=MEDIA_MARKER)


# text on both sides of an image: the image goes first, the text it stood between stays apart (one "\n")
BETWEEN_FORMS = {
    "llama-server string [A, image, B]": ("Compare<__media_x1__>with this.", "<__media_x1__>"),
    "user's own newlines around the marker": ("Compare\n" + MEDIA_MARKER + "\nwith this.", MEDIA_MARKER),
    "OpenAI parts [A, image, B]": ([_text("Compare"), _image_url(), _text("with this.")], MEDIA_MARKER),
    "MTMDChatHandler parts [A, marker, B]": ([_text("Compare"), _text(MEDIA_MARKER), _text("with this.")], MEDIA_MARKER),
}


@pytest.mark.parametrize("form", list(BETWEEN_FORMS))
def test_template_keeps_the_text_around_an_image_apart(form):
    content, marker = BETWEEN_FORMS[form]
    got = _render(CHAT_TEMPLATE, [{"role": "user", "content": content}])
    assert got == v1_conversation(["Compare\nwith this."], image_marker=marker)
    two = _render(CHAT_TEMPLATE, [{"role": "user", "content": [_text("A"), _image_url(), _text("B"), _image_url()]}])
    assert two == v1_conversation(["A\nB"], image_marker=MEDIA_MARKER + "\n" + MEDIA_MARKER)


def test_template_keeps_llama_cpp_fallback_detection():
    # llama.cpp's non-Jinja path (llama-mtmd-cli's default) picks patch 0005's "vicuna-v1" from these strings
    assert "USER: " in CHAT_TEMPLATE and "ASSISTANT: " in CHAT_TEMPLATE and "SYSTEM: " not in CHAT_TEMPLATE
    assert "A chat between a curious user and an artificial intelligence assistant" in CHAT_TEMPLATE


IMP_CARD_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                   "detailed, and polite answers to the user's questions. USER: <image>\nWhat are the colors of the bus "
                   "in the image? ASSISTANT:")


def test_imp_v1_template_is_v1_with_phi2_eos():
    """Imp v1 (Phi-2): LLaVA's v1 conversation with "<|endoftext|>" as sep2; the card's prompt, pinned by hand."""
    from mvlm_convert.families.imp import V1_CHAT_TEMPLATE
    from mvlm_core.conversation import chat_template

    bus = "What are the colors of the bus in the image?"
    got = _render(V1_CHAT_TEMPLATE, [{"role": "user", "content": MEDIA_MARKER + bus}])  # as llama-mtmd-cli hands it
    assert got == IMP_CARD_PROMPT.replace("<image>", MEDIA_MARKER)
    for form, (content, marker) in CONTENT_FORMS.items():
        got = _render(V1_CHAT_TEMPLATE, [{"role": "user", "content": content}])
        assert got == v1_conversation([Q], image_marker=marker), form
    turns = [{"role": "user", "content": [_image_url(), _text(bus)]}, {"role": "assistant", "content": "Red and white."},
             {"role": "user", "content": "Sure?"}]
    assert _render(V1_CHAT_TEMPLATE, turns) == (IMP_CARD_PROMPT.replace("<image>", MEDIA_MARKER)
                                                + " Red and white.<|endoftext|>USER: Sure? ASSISTANT:")
    assert "</s>" not in V1_CHAT_TEMPLATE
    assert chat_template() == CHAT_TEMPLATE  # the "</s>" template is the default of the one builder


# ---------------------------------------------------------------------------------------------------------------
# real clients on tiny converted checkpoints (slow)
# ---------------------------------------------------------------------------------------------------------------
N_PATCHES = (336 // CLIP["patch"]) ** 2
# family -> (checkpoint maker, tokens the projector merges into one)
FAMILIES = {
    "mobilevlm-v1": (lambda d: make_tiny_checkpoint(d, variant="v1"), 4),  # LDP: 2x2 depthwise stride 2
    "mobilevlm-v2": (lambda d: make_tiny_checkpoint(d, variant="v2"), 4),  # LDPv2: 2x2 average pooling
    "llava-1.5": (make_tiny_llava, 1),  # MLP: one token per patch
    "xmodel": (lambda d: make_tiny_xmodel(d, factor=4), 4),  # XDP: 4 consecutive tokens concatenated
}


class Model:
    def __init__(self, ckpt: Path, lm: Path, mmproj: Path, n_image: int):
        self.ckpt, self.lm, self.mmproj, self.n_image = ckpt, lm, mmproj, n_image
        self._tok = None

    def tokenize(self, text: str, bos: bool) -> list[int]:
        if self._tok is None:
            from llama_cpp import Llama

            self._tok = Llama(str(self.lm), vocab_only=True, verbose=False)
        return self._tok.tokenize(text.encode("utf-8"), add_bos=bos, special=True)

    def count(self, prompt: str, marker: str | None, bos: bool = True) -> int:
        """Tokens of a rendered prompt as mtmd makes them: text chunks apart (BOS first), each marker = one image."""
        chunks = prompt.split(marker) if marker else [prompt]
        return sum(len(self.tokenize(c, bos and i == 0)) for i, c in enumerate(chunks)) + self.n_image * (len(chunks) - 1)

    def expected(self, turns: list[str], system: str = SYSTEM) -> int:
        """The trained conversation: LLaVA's v1 with <image> where MobileVLM puts it, chunks tokenized apart."""
        return self.count(v1_conversation(turns, system=system, image_marker=IMAGE_PLACEHOLDER), IMAGE_PLACEHOLDER)


def convert_tiny(family: str, d: Path) -> Model:
    make, merge = FAMILIES[family]
    ckpt = make(d / "ckpt")
    r = subprocess.run([sys.executable, "-m", "mvlm", "convert", str(ckpt), "-o", str(d / "out"), "--outtype", "f32",
                        "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    return Model(ckpt, Path(res["lm"]["path"]), Path(res["mmproj"]["path"]), N_PATCHES // merge)


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request, tmp_path_factory, host_runtime) -> Model:
    return convert_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    import numpy as np
    from PIL import Image

    p = tmp_path_factory.mktemp("img") / "img.png"
    Image.fromarray((np.arange(336 * 336 * 3) % 251).astype(np.uint8).reshape(336, 336, 3)).save(p)
    return p


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def gguf_template(lm: Path) -> str:
    import gguf
    from gguf_read import field

    return field(gguf.GGUFReader(lm), "tokenizer.chat_template")


@pytest.mark.slow
@pytest.mark.parametrize("jinja", [False, True], ids=["builtin", "jinja"])
def test_llama_mtmd_cli_prompt_tokens(model, image, host_runtime, jinja):
    def prompt_tokens(*extra: str) -> int:
        cmd = [str(host_runtime / "bin" / "llama-mtmd-cli"), "-m", str(model.lm), "--mmproj", str(model.mmproj),
               "--image", str(image), "-p", Q, "-n", "1", "--temp", "0", "-t", "2", "--perf", "-lv", "4",
               *(["--jinja"] if jinja else []), *extra]
        p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        m = re.search(r"prompt eval time =.*/\s*(\d+) tokens", p.stderr)
        assert m, p.stderr[-2000:]
        return int(m.group(1))

    assert prompt_tokens() == model.expected([Q])
    # -sys: llama-mtmd-cli evaluates the system message on its own ("Be brief. "), then the rest: the same text, but
    # the SentencePiece space prefix of the second chunk adds a token at the boundary (llama-mtmd-cli's design)
    full = v1_conversation([Q], system="Be brief.", image_marker=IMAGE_PLACEHOLDER)
    head, rest = full[: len("Be brief. ")], full[len("Be brief. ") :]
    assert head == "Be brief. "
    want = len(model.tokenize(head, True)) + model.count(rest, IMAGE_PLACEHOLDER, bos=False)
    assert prompt_tokens("-sys", "Be brief.") == want


@pytest.fixture(scope="module", params=[[], ["--no-jinja"]], ids=["jinja", "builtin"])
def server(model, host_runtime, tmp_path_factory, request):
    """A real llama-server on 127.0.0.1 (a free port), killed at the end whatever happens; with the GGUF's template run
    by its Jinja engine (the default) and with --no-jinja (patch 0005's built-in vicuna-v1 format)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("srv") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(host_runtime / "bin" / "llama-server"), "-m", str(model.lm), "--mmproj",
                                 str(model.mmproj), "--host", "127.0.0.1", "--port", str(port), "-t", "2", "-c", "2048",
                                 "-np", "1", *request.param], stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


# (messages with the image as `uri`, the turns and system of the trained conversation they mean)
def _conversations(uri: str) -> dict[str, tuple[list, list[str], str]]:
    return {
        "image first": ([{"role": "user", "content": [_image_url(uri), _text(Q)]}], [Q], SYSTEM),
        "text first": ([{"role": "user", "content": [_text(Q), _image_url(uri)]}], [Q], SYSTEM),
        "image between text": ([{"role": "user", "content": [_text("Compare"), _image_url(uri), _text(Q)]}],
                               ["Compare\n" + Q], SYSTEM),
        "system + multi-turn": ([{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": [_image_url(uri), _text(Q)]},
                                 {"role": "assistant", "content": "A cat."},
                                 {"role": "user", "content": "What colour?"}], [Q, "A cat.", "What colour?"], "Be brief."),
    }


@pytest.mark.slow
def test_llama_server_apply_template_and_usage(model, image, server):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    for name, (msgs, turns, system) in _conversations(data_uri(image)).items():
        prompt = _post(server + "/apply-template", {"messages": msgs})["prompt"]
        markers = SERVER_MARKER.findall(prompt)
        assert len(markers) == 1, (name, prompt)  # llama-server's own random marker, once
        assert prompt == v1_conversation(turns, system=system, image_marker=markers[0]), name
        assert model.count(prompt, markers[0]) == model.expected(turns, system), name
        r = client.chat.completions.create(model="m", messages=msgs, max_tokens=1, temperature=0)
        assert r.usage.prompt_tokens == model.expected(turns, system), name


@pytest.mark.slow
def test_llama_cpp_python_mtmd_chat_handler(model, image):
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    llm = Llama(str(model.lm), chat_handler=MTMDChatHandler(clip_model_path=str(model.mmproj), verbose=False),
                n_ctx=2048, n_threads=2, verbose=False)
    try:
        for uri in (data_uri(image), image.resolve().as_uri()):
            for name, (msgs, turns, system) in _conversations(uri).items():
                r = llm.create_chat_completion(messages=msgs, max_tokens=1, temperature=0)
                assert r["usage"]["prompt_tokens"] == model.expected(turns, system), (name, uri[:20])
    finally:
        llm.close()


@pytest.mark.slow
def test_transformers_apply_chat_template(model):
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer(vocab_file=str(model.ckpt / "tokenizer.model"))  # the checkpoint's SentencePiece model
    template = gguf_template(model.lm)
    hf = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]}]
    for msgs, turns, system in (
        (hf, [Q], SYSTEM),
        ([{"role": "system", "content": [_text("Be brief.")]}, *hf, {"role": "assistant", "content": "A cat."},
          {"role": "user", "content": [_text("What colour?")]}], [Q, "A cat.", "What colour?"], "Be brief."),
    ):
        prompt = tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=True)
        assert prompt == v1_conversation(turns, system=system, image_marker=MEDIA_MARKER)
        assert model.count(prompt, MEDIA_MARKER) == model.expected(turns, system)
