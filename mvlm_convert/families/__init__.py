"""Model-family registry: a family is one module that recognises its configs and maps its tensors.

Each family module exposes ``NAME``, ``PROJECTOR_TYPES`` (config ``mm_projector_type`` prefixes it handles, ordered
most specific first), ``MODEL_TYPES`` (the config ``model_type`` values its releases carry), ``matches(config) ->
bool`` and ``describe(config) -> FamilyInfo`` (``families.base``). Adding a family = adding a module and listing it
in ``FAMILY_MODULES``.
A config whose ``model_type`` is not one of the matching family's is refused (``model_type: gpt2`` with a MobileVLM
projector is not a MobileVLM).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from mvlm_convert.families.base import FamilyInfo
from mvlm_core.errors import MvlmError

FAMILY_MODULES = [
    "mvlm_convert.families.mobilevlm",
    "mvlm_convert.families.imp",
    "mvlm_convert.families.xmodel",
    "mvlm_convert.families.llava",
]


def _modules() -> list[ModuleType]:
    return [importlib.import_module(m) for m in FAMILY_MODULES]


def known_projector_types() -> list[str]:
    out: list[str] = []
    for mod in _modules():
        out.extend(p + "*" for p in mod.PROJECTOR_TYPES)
    return out


def projector_tensors(projector: str) -> list[Any]:
    """The tensor mapping (``ProjTensor`` list) for a GGUF projector type, from the family that writes it."""
    for mod in _modules():
        if projector in getattr(mod, "GGUF_PROJECTORS", ()):
            return mod.projector_tensors(projector)
    raise MvlmError(f"no family writes projector type {projector!r}")


def normalize(info: FamilyInfo, ckpt: Any) -> Any:
    """The checkpoint as the writers expect it (family-specific renames / config defaults); unchanged if none."""
    fn = getattr(info.module, "normalize", None)
    return fn(ckpt) if fn is not None else ckpt


def prepare_lm(info: FamilyInfo, ckpt: Any, outtype: str, name: str) -> Any:
    """The family's LM writer (``prepare_lm``, e.g. Imp's Phi-2) or the LLaMA one (mvlm_convert.lm_gguf)."""
    fn = getattr(info.module, "prepare_lm", None)
    if fn is None:
        from mvlm_convert.lm_gguf import prepare_lm_gguf

        fn = prepare_lm_gguf
    return fn(ckpt, outtype, name)


SUPPORTED = (
    "MobileVLM V1/V2 (ldpnet/ldpnetv2), MobileLLaMA (LLaMA LMs), LLaVA-1.5 (mlp2x_gelu, liuhaotian and llava-hf "
    "layouts), Xmodel-VLM (xdpnet), Imp v1 / v1.5 (Phi-2, Qwen1.5, Phi-3 + SigLIP)"
)


def detect_family(config: dict[str, Any]) -> FamilyInfo:
    """The family that claims this config; MvlmError naming what is supported otherwise."""
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
    for mod in _modules():
        if mod.matches(config):
            known = getattr(mod, "MODEL_TYPES", None)
            if mtype is not None and known is not None and mtype not in known:
                raise MvlmError(
                    f"config.json: model_type {mtype!r} is not one of the {mod.NAME} family ({', '.join(sorted(known))}) "
                    f"although the rest of the config looks like it; refusing to guess. mvlm convert supports: {SUPPORTED}"
                )
            return mod.describe(config)
    if proj is not None:
        raise MvlmError(f"unknown mm_projector_type {proj!r}; supported: {', '.join(known_projector_types())}")
    raise MvlmError(f"unsupported model: architectures={archs} model_type={mtype!r}; supported: {SUPPORTED}")
