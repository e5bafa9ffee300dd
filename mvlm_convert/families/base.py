"""What every family shares: the ``Family`` base class and its hooks, ``Variant`` (the answer to "what is this
config?"), ``ProjTensor`` and the ``register`` decorator that the registry (``mvlm_convert.families``) reads.

A family is one class in one module: how it recognises its configs, renames its releases, which LM writer and
vision tower it uses, its projector's tensors, GGUF keys, image-token count and PyTorch reference forward, and the
tiny checkpoint its tests convert. The writers (``mmproj_gguf``, ``convert``) and the reference call these hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mvlm_core.errors import MvlmError

SUPPORTED = (
    "MobileVLM V1/V2 (ldpnet/ldpnetv2), MobileLLaMA (LLaMA LMs), LLaVA-1.5 (mlp2x_gelu, liuhaotian and llava-hf "
    "layouts), Xmodel-VLM (xdpnet), Imp v1 / v1.5 (Phi-2, Qwen1.5, Phi-3 + SigLIP)"
)

# module name -> the registered family object of that module (the registry orders them)
REGISTERED: dict[str, Family] = {}


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: make ``cls`` the family of its module (listed in ``mvlm_convert.families.FAMILY_MODULES``)."""
    REGISTERED[cls.__module__] = cls()
    return cls


@dataclass(frozen=True)
class Variant:
    """What a config is: family, variant (e.g. ``v2``), GGUF projector type (``ldpv2``) or None for a text-only LM,
    and the family object whose hooks handle it."""

    family: str
    variant: str
    projector: str | None
    impl: Family


@dataclass(frozen=True)
class ProjTensor:
    """One projector tensor: HF name, GGUF name, and how clip.cpp consumes it (decides dtype and shape)."""

    hf: str
    gguf: str
    kind: str  # "matrix" (Linear or 1x1 conv, 2-D), "vector" (bias / norm, f32), "dwconv" (depthwise 3x3, f16)


class Family:
    """One model family. Subclasses set the class attributes and override ``matches`` / ``describe`` and the
    projector hooks; the defaults are what LLaMA + CLIP releases need."""

    name: ClassVar[str] = ""
    architectures: ClassVar[set[str]] = set()  # HF config "architectures" it claims
    model_types: ClassVar[set[str]] = set()  # config "model_type" values of its releases (others are refused)
    # config "mm_projector_type" prefix -> the clip.projector_type it writes, most specific first
    projectors: ClassVar[dict[str, str]] = {}

    @property
    def projector_prefixes(self) -> tuple[str, ...]:
        return tuple(self.projectors)

    @property
    def gguf_projectors(self) -> set[str]:
        return set(self.projectors.values())

    def variant(self, variant: str, projector: str | None) -> Variant:
        return Variant(family=self.name, variant=variant, projector=projector, impl=self)

    # -- detection ---------------------------------------------------------------------------------------------

    def matches(self, config: dict[str, Any]) -> bool:
        """Whether the config looks like this family's (architectures, model_type or projector type)."""
        raise NotImplementedError

    def describe(self, config: dict[str, Any]) -> Variant:
        """The variant of a config this family ``matches``; MvlmError when it is one this family cannot convert."""
        raise NotImplementedError

    def detect(self, config: dict[str, Any]) -> Variant | None:
        """None: not mine. A config that looks like this family but names another family's model_type is refused."""
        if not self.matches(config):
            return None
        mtype = config.get("model_type")
        if mtype is not None and self.model_types and mtype not in self.model_types:
            raise MvlmError(
                f"config.json: model_type {mtype!r} is not one of the {self.name} family "
                f"({', '.join(sorted(self.model_types))}) although the rest of the config looks like it; refusing to "
                f"guess. mvlm convert supports: {SUPPORTED}"
            )
        return self.describe(config)

    # -- the language model ------------------------------------------------------------------------------------

    def normalize(self, ckpt: Any) -> Any:
        """The checkpoint as the writers expect it (renames / config defaults of this family's releases)."""
        return ckpt

    def lm_writer(self, ckpt: Any, outtype: str, name: str) -> Any:
        """The planned LM GGUF (``PreparedGGUF``); LLaMA unless the family brings its own LM."""
        from mvlm_convert.lm.llama import prepare_lm_gguf

        return prepare_lm_gguf(ckpt, outtype, name)

    # -- the vision tower and the projector --------------------------------------------------------------------

    def uses_tower_copy(self, projector: str) -> bool:
        """Whether inference runs the tower copy inside the checkpoint (True) or reloads ``mm_vision_tower``."""
        return True

    def vision_source(self, ckpt: Any, override: Path | None, variant: Variant) -> Any:
        """The vision tower (``mmproj_gguf.ClipSource``): ``--vision-tower``, the checkpoint copy or mm_vision_tower."""
        from mvlm_convert.mmproj_gguf import resolve_clip

        return resolve_clip(ckpt, override, prefer_copy=self.uses_tower_copy(variant.projector or ""))

    def check_vision(self, projector: str, vision: Any) -> None:
        """Refuse a tower the projector (as llama.cpp runs it) cannot take; nothing to check by default."""

    def projector_tensors(self, projector: str) -> list[ProjTensor]:
        """The exact tensor list clip.cpp loads for this projector (all required there)."""
        raise MvlmError(f"no projector mapping for {projector!r} in the {self.name} family")

    def projector_output(self, projector: str) -> str:
        """The tensor whose rows are the projector's output width (the LM's hidden size): its last matrix."""
        return [t.hf for t in self.projector_tensors(projector) if t.kind == "matrix"][-1]

    def mmproj_keys(self, projector: str, vision: Any) -> dict[str, Any]:
        """The projector's own mmproj keys (the tower's keys are common to every family)."""
        return {"projector_type": projector}

    def n_image_tokens(self, projector: str, vision: Any, proj_in: int) -> int:
        """Tokens per image, from the projector's input width ``proj_in`` (read from the weights)."""
        if proj_in != vision.hidden:
            raise MvlmError(f"projector input width {proj_in} does not match the vision tower width {vision.hidden}")
        grid = vision.image_size // vision.patch_size
        return grid * grid

    def project(self, projector: str, feats: Any, get: Callable[[str], Any]) -> Any:
        """The projector's PyTorch reference forward: [N, Dv] vision features -> [n_tokens, hidden]."""
        raise MvlmError(f"the {self.name} family has no reference forward for projector {projector!r}")

    # -- tests -------------------------------------------------------------------------------------------------

    def tiny_checkpoint(self, outdir: Path, **kw: Any) -> Path:
        """A tiny random checkpoint in this family's release layout (real key names, a trained tiny tokenizer)."""
        raise NotImplementedError
