"""The device's temperature, read over its transport: the hottest of Linux's thermal zones.

Linux (and Android) expose each sensor as ``/sys/class/thermal/thermal_zone*/temp`` in millidegrees Celsius (some
old drivers: whole degrees). :func:`read_celsius` returns the **maximum** over all zones: the number that throttling
follows (a phone's SoC zones run hotter than its battery or skin zones, and the hottest one is what the governor
reacts to). A zone that cannot be read (some drivers answer EINVAL or EAGAIN while a sensor is off) is skipped.
A device with no readable zone (a container, macOS, most VMs, this machine under qemu: the zones read are the
host's) gives None; the benchmark then records null and says so once.

The reading is one small shell script on ssh/adb devices (one round trip) and a direct file read on ``local``.
"""

from __future__ import annotations

from mvlm_bench.device.transports.base import THERMAL_ROOT

# Any reading beyond this is a driver's placeholder (e.g. -274000 or 0x7fffffff), not a temperature.
_PLAUSIBLE_C = (-60.0, 200.0)
ZONES_SCRIPT = 'for f in {root}/thermal_zone*/temp; do [ -r "$f" ] && v=$(cat "$f" 2>/dev/null) && echo "T:$v"; done; true'


def parse_zone_values(values: list[str]) -> float | None:
    """The hottest plausible zone in degrees Celsius from the zones' raw ``temp`` texts; None when none is usable.

    Values above 1000 are millidegrees (the kernel's unit); smaller ones are taken as whole degrees (old drivers)."""
    best: float | None = None
    for raw in values:
        try:
            v = float(raw.strip())
        except ValueError:
            continue
        c = v / 1000.0 if abs(v) >= 1000 else v
        if not (_PLAUSIBLE_C[0] <= c <= _PLAUSIBLE_C[1]):
            continue
        best = c if best is None else max(best, c)
    return best


def read_celsius(transport, root: str = THERMAL_ROOT) -> float | None:
    """The device's temperature now (max over its thermal zones, degrees Celsius), or None when it has none (or its
    transport cannot read one: ``capabilities.thermal``). Never raises for a missing sensor; a lost link raises the
    transport's own error."""
    if not transport.capabilities.thermal:
        return None
    return transport.read_celsius(root)
