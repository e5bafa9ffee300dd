"""The rich consoles every command prints through: on a terminal, the terminal's width; anywhere else (a CI log, a
pipe into ``cat``, ``tee`` or a file) no width limit, so that a table never folds a number onto a second line.

rich, left alone, takes 80 columns (or ``$COLUMNS``) when its stream is not a terminal, and a table wider than that
folds its cells: ``0.437`` printed as ``0.43`` over ``7``, a range ``2824–1627`` over ``7``, and whoever reads the
CI log cannot tell. Off a terminal the consoles here are as wide as what they print (``$COLUMNS`` is ignored there: a
CI runner sets it to whatever its own terminal was). On a terminal too narrow for a table, its cells are cut with an
ellipsis (``363…``), never folded into two numbers, and a note under it says so.
"""

from __future__ import annotations

from rich.console import Console, ConsoleDimensions
from rich.measure import Measurement
from rich.table import Table

# wider than any table mvlm prints; rich pads a line to the width only for an expanding table, and no view expands
UNBOUNDED = 100_000


class _Console(Console):
    """Its width is decided at each print by the stream it writes to then (``sys.stdout`` may be replaced after the
    console is made: the command line's broken-pipe guard, a test runner's capture)."""

    def __init__(self, **kwargs) -> None:
        self._fixed_width = kwargs.get("width") is not None
        super().__init__(**kwargs)

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self._fixed_width or self.is_terminal:
            return size
        return ConsoleDimensions(UNBOUNDED, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._fixed_width = True
        Console.size.fset(self, new_size)

    def print(self, *objects, **kwargs) -> None:
        cut = [t for t in objects if isinstance(t, Table) and self._too_narrow_for(t)]
        for table in cut:
            for col in table.columns:
                col.no_wrap, col.overflow = True, "ellipsis"
        super().print(*objects, **kwargs)
        if cut:
            super().print(f"[dim]({self.width} columns are too few for this table: cells ending in … are cut; widen "
                          "the terminal, or pipe the output (| cat) for whole numbers)[/]", highlight=False)

    def _too_narrow_for(self, table: Table) -> bool:
        """A table whose words cannot all fit on a line at this terminal's width (rich would fold a number in two)."""
        if not self.is_terminal or self._fixed_width:
            return False
        return Measurement.get(self, self.options.update_width(UNBOUNDED), table).minimum > self.width


def console(*, stderr: bool = False, **kwargs) -> Console:
    """A console on stdout (``stderr=True``: on stderr) that never folds off a terminal (see the module's text)."""
    return _Console(stderr=stderr, **kwargs)
