"""The ``imp`` protocol's text prompt (Imp Table 4: "the same text prompt of 41 tokens" plus the image, 64 tokens out).

The paper does not print its prompt. mvlm fixes one English request (``IMP_SOURCE``) and cuts it to exactly
``IMP_TEXT_TOKENS`` tokens of the benchmarked model's own tokenizer: the GGUF's vocabulary, read here by the pinned
llama.cpp (llama-cpp-python on the host runtime, ``vocab_only``: no weights are loaded), tokenized without BOS and
without special tokens, as llama-mtmd-cli tokenizes the user's text. The first 41 tokens are turned back into text,
and that text is kept only if it tokenizes to 41 tokens again (otherwise the next shorter or longer cut that does).
So every model gets the same request, 41 of its own tokens long; the chat template (``--jinja``) then adds its own
tokens around it, and the image its embeddings: llama.cpp's prompt eval count, ``n_prompt``, holds all three.
"""

from __future__ import annotations

import functools
from pathlib import Path

from mvlm_core.errors import MvlmError

IMP_TEXT_TOKENS = 41
IMP_SOURCE = (
    "Please look at this image carefully and describe everything you can see in it: the main objects, their colors "
    "and shapes, where they are placed relative to each other, what the background looks like and what might be "
    "happening in the scene. Then say in one sentence what the picture is most likely used for, and why you think so."
)


def model_vocab(model: Path):
    """The model's tokenizer (llama.cpp's, vocab only) on this machine's host runtime."""
    from mvlm_core.runtime import use_runtime

    try:
        use_runtime("host")
        import llama_cpp
    except (MvlmError, OSError) as e:
        raise MvlmError(f"the imp protocol counts its 41 prompt tokens with the model's tokenizer on this machine and "
                        f"needs the host runtime for it ({e}): run `mvlm runtime build --target host`, or give "
                        "--prompt TEXT") from None
    try:
        return llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise MvlmError(f"llama.cpp cannot read the tokenizer of {model} ({e}): convert the model again with "
                        "`mvlm convert`") from None


def count_tokens(model: Path, text: str) -> int:
    """Tokens of ``text`` under the model's tokenizer (no BOS, no special tokens)."""
    return len(model_vocab(Path(model)).tokenize(text.encode("utf-8"), add_bos=False, special=False))


@functools.lru_cache(maxsize=16)
def _prompt(model_text: str, _size: int, _mtime: int, n: int) -> str:
    vocab = model_vocab(Path(model_text))

    def tok(s: str) -> list[int]:
        return vocab.tokenize(s.encode("utf-8"), add_bos=False, special=False)

    ids = tok(IMP_SOURCE)
    if len(ids) < n:
        raise MvlmError(f"the imp protocol's request is only {len(ids)} tokens long under {Path(model_text).name}'s "
                        f"tokenizer, fewer than {n}: give --prompt TEXT")
    for k in sorted(range(max(1, n - 8), min(len(ids), n + 8) + 1), key=lambda k: (abs(k - n), k)):
        text = vocab.detokenize(ids[:k]).decode("utf-8", errors="ignore").strip()
        if len(tok(text)) == n:
            return text
    raise MvlmError(f"cannot cut the imp protocol's request to exactly {n} tokens of {Path(model_text).name}'s "
                    "tokenizer: give --prompt TEXT")


def imp_prompt(model: Path, n: int = IMP_TEXT_TOKENS) -> str:
    """The protocol's request cut to exactly ``n`` tokens of ``model``'s tokenizer (see the module docstring)."""
    p = Path(model).resolve()
    st = p.stat()
    return _prompt(str(p), st.st_size, st.st_mtime_ns, n)
