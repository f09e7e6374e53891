"""Errors that reach the user as one clear line."""

from __future__ import annotations


class QcbedInputError(ValueError):
    """Bad user input: names the field (or file) at fault and how to fix it.

    The command line prints ``str(error)`` as a single line and exits with status 2,
    without a traceback.
    """

    def __init__(self, field: str, problem: str, fix: str | None = None):
        self.field = field
        self.problem = problem
        self.fix = fix
        msg = f"{field}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)
