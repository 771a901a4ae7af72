"""The one error type gpual raises for bad input or a bad environment.

The CLI turns a :class:`GpualError` into a single line on stderr and a non-zero exit
code; library code raises it with a message that says what is wrong *and what to do*.
"""
from __future__ import annotations


class GpualError(Exception):
    """A user-facing failure: one line that says what is wrong and what to do.

    ``exit_code`` is 1 for bad input (files, sizes, round order, budgets) and 2 for a
    bad environment or invocation (CUDA asked for but absent, unknown option values).
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):  # keep exit_code across process boundaries (worker pools)
        return (type(self), (self.args[0], self.exit_code))

    def __str__(self) -> str:  # one line, always
        return " ".join(str(self.args[0]).split())
