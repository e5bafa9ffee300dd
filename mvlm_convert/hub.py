"""Checkpoints named by their Hugging Face Hub id (``mtgv/MobileVLM_V2-1.7B``, ``OWNER/NAME@REVISION``).

``mvlm convert OWNER/NAME`` downloads the checkpoint with huggingface_hub, exactly as ``hf download`` would: its
cache (``$HF_HOME`` / ``$HF_HUB_CACHE``), its token (``hf auth login`` / ``$HF_TOKEN``), its offline switch
(``$HF_HUB_OFFLINE=1``: the cache only, no network call) and its progress bars. Only what a conversion reads is
fetched: configs, tokenizers and weights (no code: mvlm never runs a repository's Python, and reads ``.bin`` weights
with ``weights_only``). A path that exists is always a path; an id is recognised only when no such path exists.
"""

from __future__ import annotations

import re
from pathlib import Path

from mvlm_core.errors import MvlmError

# OWNER/NAME as the Hub spells repository ids, then an optional @revision (branch, tag or commit)
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})"
                     r"(?:@(?P<rev>[A-Za-z0-9][A-Za-z0-9_./-]{0,199}))?")
# what a conversion reads: configs, tokenizers (SentencePiece, BPE, tiktoken) and weights (single or sharded)
WANTED = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.tiktoken", "vision_tower/*", "*/config.json",
          "*/*.safetensors", "*/*.bin"]


def hub_reference(arg: str | Path) -> tuple[str, str | None] | None:
    """``(repo, revision)`` when ``arg`` is a Hub id and no file or directory of that name exists here; else None."""
    text = str(arg)
    if Path(text).exists() or text.startswith((".", "/", "~")):
        return None
    m = _HUB_ID.fullmatch(text)
    if m is None or ".." in text:
        return None
    return m["repo"], m["rev"]


def _download_line(repo: str, rev: str | None) -> str:
    return f"hf download {repo}" + (f" --revision {rev}" if rev else "")


def download(repo: str, rev: str | None) -> Path:
    """The checkpoint's directory in huggingface_hub's cache, downloaded first when it is not there (its progress
    bars on stderr). Every failure is one line saying what to do."""
    try:
        from huggingface_hub import errors as hub_errors
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MvlmError(f"{repo}: converting by Hub id needs the huggingface_hub package (pip install huggingface_hub), "
                        f"or download it with `{_download_line(repo, rev)}` and pass the directory") from None
    where = f"{repo}" + (f"@{rev}" if rev else "")
    try:
        return Path(snapshot_download(repo_id=repo, revision=rev, allow_patterns=WANTED))
    except hub_errors.GatedRepoError:
        raise MvlmError(f"{where}: the repository is gated: accept its terms on huggingface.co, then log in with `hf "
                        "auth login` (or set $HF_TOKEN)") from None
    except hub_errors.RepositoryNotFoundError:
        raise MvlmError(f"{where}: no such model on the Hugging Face Hub (or it is private: log in with `hf auth login` "
                        "or set $HF_TOKEN); a local checkpoint is given as a directory path") from None
    except hub_errors.RevisionNotFoundError:
        raise MvlmError(f"{where}: the repository has no revision {rev!r}: give a branch, tag or commit it has") from None
    except Exception as e:  # noqa: BLE001 - only the network's and the cache's failures are answered here
        network = type(e).__module__.split(".")[0] in ("httpx", "httpcore", "requests", "urllib3")
        if not (network or isinstance(e, OSError)):
            raise
        why = "$HF_HUB_OFFLINE is set" if _offline() else f"the Hub cannot be reached ({type(e).__name__})"
        raise MvlmError(f"{where} is not in the Hugging Face cache and {why}: on a machine with network run "
                        f"`{_download_line(repo, rev)}` (the same $HF_HOME), or pass the checkpoint's directory") from None


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")
