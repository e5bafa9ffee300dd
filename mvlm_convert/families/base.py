"""What every family module shares: ``FamilyInfo``, the answer to "what is this config?".

Family modules import it from here, not from the registry (``mvlm_convert.families``), so that the registry, the
family modules and the writers the registry falls back to import one way.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class FamilyInfo:
    """What a config is: family, variant (e.g. ``v2``), GGUF projector type (``ldpv2``) or None for a text-only LM."""

    family: str
    variant: str
    projector: str | None
    module: ModuleType
