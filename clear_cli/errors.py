"""One error type for everything a user can get wrong: a message, a hint, an exit code."""

from __future__ import annotations


class ClearError(Exception):
    """A known failure, shown to the user as one line on stderr (traceback only with --debug / CLEAR_DEBUG=1).

    exit_code: 1 for a failure, 2 for bad usage (wrong option values, bad files named on the command line).
    """

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 1):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def one_line(self) -> str:
        text = f"error: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text.replace("\n", " ")


class UsageError(ClearError):
    """Bad option values or arguments: exit code 2."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message, hint, exit_code=2)
