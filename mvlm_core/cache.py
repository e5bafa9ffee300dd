"""Where mvlm keeps what it builds and fetches: ``$MVLM_CACHE``, else ``$XDG_CACHE_HOME/mvlm``, else
``~/.cache/mvlm`` (runtimes, the llama.cpp source, the device-side tools, fetched models)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("MVLM_CACHE"):
        return Path(os.environ["MVLM_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mvlm"
