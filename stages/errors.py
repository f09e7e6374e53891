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

    def __reduce__(self):  # picklable (e.g. across processes); subclasses keep the default
        if type(self) is QcbedInputError:
            return (QcbedInputError, (self.field, self.problem, self.fix))
        return super().__reduce__()


class QcbedInputErrors(QcbedInputError):
    """Several input problems found together (e.g. by :func:`stages.config.validate_config`).

    ``errors`` lists the single :class:`QcbedInputError` of each problem, ``path`` the config file.
    ``str()`` is the single problem's one line when there is one, else ``"<path>: N problems"``
    followed by one indented ``"field: problem (fix)"`` line per problem.
    """

    def __init__(self, errors, path=None):
        self.errors = list(errors)
        self.path = path
        if not self.errors:
            raise ValueError("QcbedInputErrors needs at least one error")
        if len(self.errors) == 1:
            e = self.errors[0]
            super().__init__(e.field, e.problem, e.fix)
            return
        where = str(path) if path is not None else "input"
        super().__init__(where, f"{len(self.errors)} problems")
        lines = [f"{where}: {len(self.errors)} problems"] + [f"  {e}" for e in self.errors]
        self.args = ("\n".join(lines),)

    @property
    def fields(self) -> list[str]:
        return [e.field for e in self.errors]

    def __reduce__(self):
        return (type(self), ([QcbedInputError(e.field, e.problem, e.fix) for e in self.errors], self.path))
