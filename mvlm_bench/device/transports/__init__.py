"""Device transports, one module per kind (local, ssh, adb): each defines one :class:`Transport` subclass with its
``kind``; this package finds them, so a new kind is a new module here (docs/architecture.md, 'Adding a transport').
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from mvlm_bench.device.transports.base import Transport
from mvlm_core.errors import MvlmError

_NOT_KINDS = {"base", "shell"}  # the interface and the shared sh-script part, no kinds of their own


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


@cache
def transport_kinds() -> dict[str, type[Transport]]:
    """kind name -> Transport class, for every module of this package (in name order: local, ssh, adb, ...)."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name not in _NOT_KINDS:
            importlib.import_module(f"{__name__}.{info.name}")
    kinds = {sub.kind: sub for sub in _subclasses(Transport) if getattr(sub, "kind", "")}
    order = ["local", "ssh", "adb"]
    return dict(sorted(kinds.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))


def make_transport(profile) -> Transport:
    """The transport a profile names."""
    kind = transport_kinds().get(profile.transport)
    if kind is None:
        raise MvlmError(f"device {profile.name}: unknown transport {profile.transport!r}")
    return kind(profile)
