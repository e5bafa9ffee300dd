"""Model-family registry: a family is one class (``families.base.Family``) in one module, registered with
``@register``.

``FAMILY_MODULES`` lists the family modules in detection order (the first family that claims a config wins; MobileVLM
before the others because its LLaMA LMs claim plain ``LlamaForCausalLM`` configs). Adding a family = adding a module
with a registered ``Family`` subclass and listing it here. A config whose ``model_type`` is not one of the matching
family's is refused (``model_type: gpt2`` with a MobileVLM projector is not a MobileVLM).
"""

from __future__ import annotations

import importlib
from typing import Any

from mvlm_convert.families.base import REGISTERED, SUPPORTED, Family, ProjTensor, Variant, register
from mvlm_core.errors import MvlmError

__all__ = ["FAMILY_MODULES", "SUPPORTED", "Family", "ProjTensor", "Variant", "detect_family", "families",
           "family_for_projector", "known_projector_types", "register"]

FAMILY_MODULES = [
    "mvlm_convert.families.mobilevlm",
    "mvlm_convert.families.imp",
    "mvlm_convert.families.xmodel",
    "mvlm_convert.families.llava",
]


def families() -> list[Family]:
    """Every registered family, in detection order."""
    out = []
    for name in FAMILY_MODULES:
        importlib.import_module(name)
        if name not in REGISTERED:
            raise MvlmError(f"{name} registers no Family class (@register)")
        out.append(REGISTERED[name])
    return out


def known_projector_types() -> list[str]:
    return [p + "*" for fam in families() for p in fam.projector_prefixes]


def family_for_projector(projector_type: str) -> tuple[Family, str]:
    """The family whose ``mm_projector_type`` prefixes claim ``projector_type``, and the GGUF projector it writes."""
    for fam in families():
        for prefix, gguf_projector in fam.projectors.items():
            if projector_type.startswith(prefix):
                return fam, gguf_projector
    raise MvlmError(f"unknown mm_projector_type {projector_type!r}; supported: {', '.join(known_projector_types())}")


def detect_family(config: dict[str, Any]) -> Variant:
    """The variant of the family that claims this config (each family asked once); MvlmError naming what is
    supported otherwise."""
    if not isinstance(config, dict):
        raise MvlmError("config.json is not a JSON object; point at a checkpoint directory as released on the HF hub")
    proj = config.get("mm_projector_type")
    if proj is not None and not isinstance(proj, str):
        raise MvlmError(f"config.json: mm_projector_type = {proj!r} is not a string; supported: {SUPPORTED}")
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise MvlmError(f"config.json: architectures = {archs!r} is not a list of names; supported: {SUPPORTED}")
    mtype = config.get("model_type")
    if mtype is not None and not isinstance(mtype, str):
        raise MvlmError(f"config.json: model_type = {mtype!r} is not a string; supported: {SUPPORTED}")
    for fam in families():
        found = fam.detect(config)
        if found is not None:
            return found
    if proj is not None:
        raise MvlmError(f"unknown mm_projector_type {proj!r}; supported: {', '.join(known_projector_types())}")
    raise MvlmError(f"unsupported model: architectures={archs} model_type={mtype!r}; supported: {SUPPORTED}")
