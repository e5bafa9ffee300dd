"""MobileVLM's conversation "v1", once: system prompt, roles, separators, image placement, the GGUF chat template.

MobileVLM (and LLaVA-1.5, Xmodel-VLM, Imp v1) are trained with LLaVA's ``conv_vicuna_v1`` (SeparatorStyle.TWO,
sep " ", sep2 "</s>")::

    "{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:"

and the first question is ``"<image>\\n{question}"``. ``mvlm verify`` builds its prompts with :func:`v1_prompt`, the
converter writes :data:`CHAT_TEMPLATE` as ``tokenizer.chat_template``, and the tiny checkpoints train their
tokenizers on text in this format. Imp v1 (Phi-2) is trained with the same conversation but Phi-2's EOS as sep2,
``"... ASSISTANT: {a}<|endoftext|>USER: ..."``: :func:`chat_template` builds both from one template.

In llama.cpp the image marker is ``<__media__>`` (:data:`MEDIA_MARKER`, mtmd_default_marker() at the pinned commit);
llama-server uses a random one, ``<__media_XXXX__>`` (unless ``LLAMA_MEDIA_MARKER`` is set). What each client hands
the template for "an image and a question":

- llama-mtmd-cli: the string ``"<__media__>" + question`` (marker first, no newline);
- llama-server (``/v1/chat/completions``, ``/apply-template``): OpenAI ``image_url`` parts become media-marker parts
  and, because the message holds media, the parts are joined into ONE string (text parts with "\\n" between them, none
  next to a marker): ``"<__media_XXXX__>" + question``; text-only part lists may reach the template as a list;
- llama-cpp-python's ``MTMDChatHandler``: the OpenAI list with each ``image_url`` part replaced by
  ``{"type": "text", "text": "<__media__>"}``;
- transformers' ``apply_chat_template``: whatever the caller passes, e.g. HF's ``{"type": "image"}`` parts.

The template accepts a string or a list of parts (``text``, ``media_marker``, ``image``, ``image_url``), joins parts the
way llama.cpp does, and moves every marker (any ``<__media…__>``; HF ``image``/``image_url`` parts become
:data:`MEDIA_MARKER`) to the start of its user message, each followed by exactly one "\\n" — where ``<image>\\n`` goes
in training — so every client gets the trained prompt. The text a marker stood between stays apart: one newline next
to each marker is dropped and the non-empty pieces are joined with one "\\n" (``"A<m>B"``, ``"A\\n<m>\\nB"`` and the
parts ``[A, image, B]`` all give ``"<m>\\nA\\nB"``). The strings "USER: " / "ASSISTANT: " and the system prompt
also make llama.cpp's non-Jinja fallback (llama-mtmd-cli's default; llm_chat_detect_template) pick the runtime's
built-in "vicuna-v1" format (patch 0005), which renders the same for ``<__media__>``.
"""

from __future__ import annotations

from collections.abc import Sequence

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = ("USER", "ASSISTANT")
SEP = " "  # after the system prompt and after each user turn
SEP2 = "</s>"  # after each assistant turn
IMAGE_PLACEHOLDER = "<image>"  # where MobileVLM puts the image in a prompt
MEDIA_MARKER = "<__media__>"  # llama.cpp's image marker (mtmd_default_marker())
DEFAULT_QUESTION = "What is in the picture?"


def v1_conversation(turns: Sequence[str], system: str = SYSTEM, image_marker: str | None = None,
                    sep2: str = SEP2) -> str:
    """LLaVA's ``Conversation.get_prompt()`` for SeparatorStyle.TWO (conv_vicuna_v1; Imp v1: ``sep2`` "<|endoftext|>").

    ``turns`` alternate user, assistant, user, ...; an odd count ends with the generation prompt "ASSISTANT:". With
    ``image_marker`` the image goes where MobileVLM puts ``<image>``: ``"{marker}\\n"`` before the first question.
    """
    msgs: list[str | None] = list(turns)
    if image_marker is not None and msgs:
        msgs[0] = f"{image_marker}\n{msgs[0]}"
    if len(msgs) % 2:
        msgs.append(None)
    seps = (SEP, sep2)
    ret = system + seps[0]
    for i, msg in enumerate(msgs):
        role = ROLES[i % 2]
        ret += f"{role}: {msg}{seps[i % 2]}" if msg else f"{role}:"
    return ret


def v1_prompt(question: str = DEFAULT_QUESTION, image_marker: str | None = None) -> str:
    """MobileVLM conversation "v1" prompt; with ``image_marker`` the image goes where MobileVLM puts ``<image>``."""
    return v1_conversation([question], image_marker=image_marker)


def _q(s: str) -> str:
    """A Python string as a single-quoted Jinja string literal."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


_MARK_OPEN, _MARK_CLOSE = "<__media", "__>"  # every llama.cpp media marker: <__media__>, <__media_XXXX__>
_IS_MARKER = f"part['text'].startswith({_q(_MARK_OPEN)}) and part['text'].endswith({_q(_MARK_CLOSE)})"

def chat_template(sep2: str = SEP2) -> str:
    """The GGUF chat template (Jinja; jinja2 and llama.cpp's own engine) of conversation "v1" with ``sep2`` after each
    assistant turn: "</s>" for the LLaMA-based families (:data:`CHAT_TEMPLATE`), Phi-2's "<|endoftext|>" for Imp v1.

    An explicit system message replaces SYSTEM; add_generation_prompt ends with "ASSISTANT:". Every tag trims
    whitespace, so trim_blocks/lstrip_blocks (llama-cpp-python, transformers) change nothing.
    """
    return "".join(
        line.strip()
        for line in f"""
{{%- set ns = namespace(system={_q(SYSTEM)}, body='') -%}}
{{%- for message in messages -%}}
  {{%- if message['content'] is string -%}}
    {{%- set acc = namespace(text=message['content']) -%}}
  {{%- elif message['content'] is none -%}}
    {{%- set acc = namespace(text='') -%}}
  {{%- else -%}}
    {{%- set acc = namespace(text='', marker=false) -%}}
    {{%- for part in message['content'] -%}}
      {{%- if part['type'] == 'text' and not ({_IS_MARKER}) -%}}
        {{%- if acc.text != '' and not acc.marker -%}}{{%- set acc.text = acc.text + {_q(chr(10))} -%}}{{%- endif -%}}
        {{%- set acc.text = acc.text + part['text'] -%}}
        {{%- set acc.marker = false -%}}
      {{%- elif part['type'] == 'text' or part['type'] == 'media_marker' -%}}
        {{%- set acc.text = acc.text + part['text'] -%}}
        {{%- set acc.marker = true -%}}
      {{%- elif part['type'] == 'image' or part['type'] == 'image_url' -%}}
        {{%- set acc.text = acc.text + {_q(MEDIA_MARKER)} -%}}
        {{%- set acc.marker = true -%}}
      {{%- endif -%}}
    {{%- endfor -%}}
  {{%- endif -%}}
  {{%- if message['role'] == 'system' -%}}
    {{%- set ns.system = acc.text -%}}
  {{%- elif message['role'] == 'user' -%}}
    {{%- set pieces = acc.text.split({_q(_MARK_OPEN)}) -%}}
    {{%- set out = namespace(markers='', text='', prev=pieces[0]) -%}}
    {{%- for piece in pieces[1:] -%}}
      {{%- set tail = piece.split({_q(_MARK_CLOSE)}, 1) -%}}
      {{%- if tail | length == 1 -%}}
        {{%- set out.prev = out.prev + {_q(_MARK_OPEN)} + piece -%}}
      {{%- else -%}}
        {{%- set out.markers = out.markers + {_q(_MARK_OPEN)} + tail[0] + {_q(_MARK_CLOSE + chr(10))} -%}}
        {{%- if out.prev.endswith({_q(chr(10))}) -%}}{{%- set out.prev = out.prev[:-1] -%}}{{%- endif -%}}
        {{%- if out.text != '' and out.prev != '' -%}}{{%- set out.text = out.text + {_q(chr(10))} -%}}{{%- endif -%}}
        {{%- set out.text = out.text + out.prev -%}}
        {{%- set out.prev = tail[1][1:] if tail[1].startswith({_q(chr(10))}) else tail[1] -%}}
      {{%- endif -%}}
    {{%- endfor -%}}
    {{%- if out.text != '' and out.prev != '' -%}}{{%- set out.text = out.text + {_q(chr(10))} -%}}{{%- endif -%}}
    {{%- set ns.body = ns.body + 'USER: ' + out.markers + out.text + out.prev + ' ' -%}}
  {{%- elif message['role'] == 'assistant' -%}}
    {{%- set ns.body = ns.body + 'ASSISTANT: ' + acc.text + {_q(sep2)} -%}}
  {{%- endif -%}}
{{%- endfor -%}}
{{{{- ns.system + ' ' + ns.body -}}}}
{{%- if add_generation_prompt -%}}{{{{- 'ASSISTANT:' -}}}}{{%- endif -%}}
""".splitlines()
    )


CHAT_TEMPLATE = chat_template()  # conv_vicuna_v1: sep2 "</s>"
