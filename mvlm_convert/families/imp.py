"""Imp (MILVLG): imp-v1-3b = Phi-2 + SigLIP-so400m-patch14-384 (729 tokens) + ``mlp2x_gelu``; Imp-v1.5 uses
Qwen1.5 (2B) / Phi-3 (4B). Recognised so that it is not mistaken for LLaVA (same projector type), but not converted
yet: it needs a Phi-2/Qwen2/Phi-3 LM writer and a SigLIP mmproj (no CLS, GELU, no pre-LN, 27x27 grid).
"""

from __future__ import annotations

from typing import Any

from mvlm_convert.errors import MvlmError
from mvlm_convert.families import FamilyInfo

NAME = "imp"
PROJECTOR_TYPES: list[str] = []
GGUF_PROJECTORS: set[str] = set()
ARCHS = {"ImpForCausalLM", "ImpQwen2ForCausalLM", "ImpPhi3ForCausalLM"}
MODEL_TYPES = {"imp", "imp_qwen2", "imp_phi3"}


def matches(config: dict[str, Any]) -> bool:
    return bool(set(config.get("architectures") or []) & ARCHS) or config.get("model_type") in MODEL_TYPES


def describe(config: dict[str, Any]) -> FamilyInfo:
    archs = ",".join(config.get("architectures") or []) or config.get("model_type")
    raise MvlmError(
        f"Imp ({archs}) is recognised but not supported yet: its Phi-2/Qwen1.5/Phi-3 LM writer and SigLIP mmproj "
        "are missing in mvlm convert"
    )
