"""MobileVLM's conversation "v1", once: system prompt, roles, separators, image placement, the GGUF chat template.

MobileVLM (and LLaVA-1.5, Xmodel-VLM, Imp v1) are trained with LLaVA's ``conv_vicuna_v1`` (SeparatorStyle.TWO,
sep " ", sep2 "</s>")::

    "{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:"

and the first question is ``"<image>\\n{question}"``. ``mvlm verify`` builds its prompts with :func:`v1_prompt`, the
converter writes :data:`CHAT_TEMPLATE` as ``tokenizer.chat_template``, and the tiny checkpoints train their
tokenizers on text in this format.

In llama.cpp the image marker is ``<__media__>`` (:data:`MEDIA_MARKER`, mtmd_default_marker() at the pinned commit)
and llama-mtmd-cli puts it in front of the prompt WITHOUT a newline, so the template normalises every marker to be
followed by exactly one "\\n" (the trained layout). The strings "USER: " / "ASSISTANT: " also make llama.cpp's
non-Jinja fallback (llama-mtmd-cli's default; llm_chat_detect_template) pick its built-in "vicuna" format rather
than failing (the runtime's patch 0005 makes that fallback reproduce v1 exactly).
"""

from __future__ import annotations

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


def v1_prompt(question: str = DEFAULT_QUESTION, image_marker: str | None = None) -> str:
    """MobileVLM conversation "v1" prompt; with ``image_marker`` the image goes where MobileVLM puts ``<image>``."""
    user = question if image_marker is None else f"{image_marker}\n{question}"
    return f"{SYSTEM}{SEP}{ROLES[0]}: {user}{SEP}{ROLES[1]}:"


# The GGUF chat template (Jinja): an explicit system message replaces SYSTEM; add_generation_prompt ends with
# "ASSISTANT:".
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='" + SYSTEM.replace("'", "\\'") + "') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- ns.system + ' ' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' + (message['content'] | replace('" + MEDIA_MARKER + "\\n', '" + MEDIA_MARKER + "')"
    " | replace('" + MEDIA_MARKER + "', '" + MEDIA_MARKER + "\\n')) + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT: ' + message['content'] + '</s>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
