"""llama.cpp's file-name convention for file types (``Name-Q4_K_S.gguf``), without gguf-py: ``mvlm bench`` reads a
model's precision from its name at start-up, before anything needs gguf-py (and numpy with it)."""

from __future__ import annotations

import re

# A file type label as it ends a llama.cpp file name: ``Name-Q4_K_S.gguf``, ``name.f16.gguf`` (any case).
LABEL_PATTERN = r"F32|F16|BF16|Q\d\w*|IQ\d\w*"
_FILENAME_RE = re.compile(rf"[-.]({LABEL_PATTERN})\.gguf$", re.I)
_STEM_RE = re.compile(rf"^(.*?)[-.]({LABEL_PATTERN})$", re.I)


def precision_from_filename(filename: str) -> str:
    """The file type a GGUF's name says it holds, lower case (``q4_k_s``), or ``unknown``."""
    m = _FILENAME_RE.search(filename)
    return m.group(1).lower() if m else "unknown"


def split_label(stem: str) -> tuple[str, str | None]:
    """``Name-F16`` -> (``Name``, ``F16``); a stem without a file-type label -> (stem, None)."""
    m = _STEM_RE.match(stem)
    return (m.group(1), m.group(2)) if m else (stem, None)


# The longest file name mvlm writes, in bytes: its private temporary name (".NAME.PID.RANDOM.tmp") must stay within
# the 255 bytes every common file system allows for one name.
MAX_NAME_BYTES = 220


def check_name_length(name: str, what: str) -> None:
    """One line when ``name`` is too long to be written here (with its temporary name), before anything is made."""
    from mvlm_core.errors import MvlmError

    n = len(name.encode("utf-8", "surrogateescape"))
    if n > MAX_NAME_BYTES:
        raise MvlmError(f"{what} {name[:40]}… is {n} bytes long; mvlm writes names of at most {MAX_NAME_BYTES} bytes "
                        "(255, less room for its temporary name): give a shorter name")
