"""User-facing errors shared by every mvlm command.

An ``MvlmError`` is bad input or a bad environment that the user can fix. The CLI prints its message as one
line (``error: ...``) and exits with ``exit_code``; no traceback. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class MvlmError(Exception):
    """Something the user can fix. ``str(err)`` is one line: what is wrong and what to do."""

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None, detail: str | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
        # Extra text printed after the one line (e.g. the tail of a build log); optional.
        self.detail = detail
