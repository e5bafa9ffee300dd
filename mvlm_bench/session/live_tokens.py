"""The generated-token count of a run while it streams, for a live progress line (never for the report)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from mvlm_bench.plan.protocols import IMAGE_PROTOCOLS, LM_PROMPT, VLM_PROMPT
from mvlm_bench.plan.spec import BenchSpec


class LiveTokens:
    """The generated-token count of a run while it streams (a progress line's "123/400 tokens"), for ``on_tokens``.

    The text a run has generated so far is what follows its last llama.cpp log line (``generate: ...`` for
    llama-completion, the image's decode line for llama-mtmd-cli); it is counted with the model's own tokenizer
    (llama.cpp's, vocab only, on this machine), less the echoed prompt. A count, not a guess: re-tokenizing the text
    can differ from the sampled ids by a token or two where a piece splits differently, and it is capped at -n. The
    figures in the report come from llama.cpp's own perf lines, never from here. Any trouble (no host runtime, an
    unreadable tokenizer) turns the count off, never the run."""

    _vocabs: dict[str, object] = {}

    def __init__(self, spec: BenchSpec, on_tokens: Callable[[int, int], None], prompt: str | None = None,
                 every_s: float = 0.2):
        self.spec, self.on_tokens, self.every_s = spec, on_tokens, every_s
        self.expected = spec.tokens()
        self.prompt = prompt or spec.prompt or (VLM_PROMPT if spec.protocol in IMAGE_PROTOCOLS else LM_PROMPT)
        self.out: list[str] = []
        self.last_t = 0.0
        self.last_n = -1
        self.off = spec.protocol in ("llama-bench", "dataset")

    def _count(self, text: str) -> int:
        key = str(self.spec.model)
        vocab = LiveTokens._vocabs.get(key)
        if vocab is None:
            import os
            import sys

            from mvlm_bench.plan.imp_prompt import model_vocab

            # llama.cpp's C code warns on stderr while it loads (n_ctx_train ...): not into the progress line
            sys.stderr.flush()
            saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, 2)
                vocab = LiveTokens._vocabs[key] = model_vocab(Path(self.spec.model))
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                os.close(null)

        def n(t: str) -> int:
            return len(vocab.tokenize(t.encode("utf-8"), add_bos=False, special=False)) if t else 0  # type: ignore[attr-defined]

        total = n(text)
        if text.startswith(self.prompt):  # llama-completion echoes the prompt before the generated text
            total -= n(self.prompt)
        return max(0, min(total, self.expected))

    def feed(self, piece: str) -> None:
        if self.off:
            return
        self.out.append(piece)
        now = time.monotonic()
        if now - self.last_t < self.every_s:
            return
        self.last_t = now
        text = "".join(self.out)
        cut = 0
        for m in _LOG_LINE.finditer(text):
            cut = m.end()
        generated = "\n".join(ln for ln in text[cut:].split("\n") if not ln.startswith("\t")).lstrip("\n")
        try:
            count = self._count(generated)
        except Exception:  # noqa: BLE001 - the progress line loses its count, the run goes on
            self.off = True
            return
        if count != self.last_n:
            self.last_n = count
            self.on_tokens(count, self.expected)


# a whole llama.cpp log line ("0.00.218.341 I generate: ..."), as -lv 4 prints them (timestamp, level)
_LOG_LINE = re.compile(r"(?m)^\d+\.\d+\.\d+\.\d+ [A-Z] .*(?:\n|$)")


