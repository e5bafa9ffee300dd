"""Pacing of any bench: ``--delay`` (sleep before every run but the first) and ``--max-temp`` (wait until the device's
hottest thermal zone reads below it, for at most ``--max-temp-wait`` seconds; then exit 3). The values are checked
with the plan (:func:`mvlm_bench.plan.sweep.check_pacing`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from mvlm_bench.device import thermal
from mvlm_core.errors import MvlmError

POLL_S = 5.0  # between two readings while waiting for the device to cool
DEFAULT_TEMP_WAIT_S = 1800.0


class CoolingTimeout(MvlmError):
    """The device did not cool below --max-temp within --max-temp-wait."""


@dataclasses.dataclass
class Pacer:
    """Called before every run (warm-ups, repetitions, configurations alike): the ``--delay`` sleep, then the
    ``--max-temp`` wait.

    ``on_status(text)`` hears what it waits for (the progress line: "cooling: 52.0 °C > 45 °C, 20 s"); ``log`` gets
    the one-time note about a device without thermal zones. ``root``: where the zones are (tests: a directory)."""

    delay: float = 0.0
    max_temp: float | None = None
    max_temp_wait: float = DEFAULT_TEMP_WAIT_S
    on_status: Callable[[str], None] = lambda s: None
    log: Callable[[str], None] = lambda s: None
    root: str = thermal.THERMAL_ROOT
    poll_s: float = POLL_S
    runs: int = 0
    no_zones: set[str] = dataclasses.field(default_factory=set)

    def __call__(self, transport, i: int = 0, total: int = 0) -> None:
        if self.runs and self.delay > 0:
            self.on_status(f"delay: {self.delay:g} s before the next run")
            time.sleep(self.delay)
        self.runs += 1
        if self.max_temp is not None:
            self.wait_cool(transport)

    def wait_cool(self, transport) -> float | None:
        """Block until the device reads below ``max_temp`` (returns the reading), None when it has no thermal zone.
        Raises :class:`CoolingTimeout` (exit 3) after ``max_temp_wait`` seconds."""
        assert self.max_temp is not None
        name = transport.name
        if name in self.no_zones:
            return None
        t0 = time.monotonic()
        while True:
            c = thermal.read_celsius(transport, self.root)
            if c is None:
                self.no_zones.add(name)
                self.log(f"device {name} has no readable thermal zone ({self.root}/thermal_zone*/temp): --max-temp "
                         "cannot wait for it to cool; running without waiting")
                return None
            waited = time.monotonic() - t0
            if c < self.max_temp:
                if waited >= 1:
                    self.log(f"device {name} cooled to {c:.1f} °C (below --max-temp {self.max_temp:g}) in {waited:.0f} s")
                return c
            if waited >= self.max_temp_wait:
                raise CoolingTimeout(f"device {name} stayed at {c:.1f} °C, not below --max-temp {self.max_temp:g}, for "
                                     f"{waited:.0f} s: let it cool, or raise --max-temp or --max-temp-wait", exit_code=3)
            self.on_status(f"cooling: {c:.1f} °C ≥ {self.max_temp:g} °C, waited {waited:.0f}/{self.max_temp_wait:.0f} s")
            time.sleep(min(self.poll_s, max(0.05, self.max_temp_wait - waited)))


