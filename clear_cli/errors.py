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


# The fix for each file-system cause a user meets: one table, so every command says the same thing.
_OS_FIXES = {
    "EROFS": "the file system is read-only: pick a directory you can write to",
    "EACCES": "pick a directory you can write to, or fix its permissions",
    "EPERM": "pick a directory you can write to, or fix its permissions",
    "ENOSPC": "free some space (or pick another disk), then rerun the same command: finished outputs are kept",
    "EDQUOT": "free some space within your quota, then rerun the same command: finished outputs are kept",
    "ENOTDIR": "a file is in the way where a directory is needed: pick another path or move the file",
    "EEXIST": "a file is in the way where a directory is needed: pick another path or move the file",
    "EISDIR": "a directory is in the way where a file is needed: pick another path",
    "ENAMETOOLONG": "pick a shorter path",
    "ENOENT": "check the path",
    "EMFILE": "raise the open-file limit (ulimit -n) and rerun",
}


def os_error(e: OSError, action: str = "cannot write") -> ClearError:
    """A file-system error as one ClearError naming the path, the cause and the fix (exit code 1).

    `action` says what was being done ("cannot write", "cannot read"). Used by the CLI's safety net for any
    OSError a job lets through, and by jobs that want a better verb.
    """
    import errno as _errno

    name = _errno.errorcode.get(e.errno or 0, "")
    path = e.filename if e.filename is not None else ""
    where = f" {path}" if path else ""
    cause = e.strerror or type(e).__name__
    hint = _OS_FIXES.get(name)
    if name == "ENOENT" and action == "cannot write":
        hint = "a folder on the way is missing or was removed: check the path"
    return ClearError(f"{action}{where}: {cause}", hint)


def embedded_os_error(e: BaseException, path: str | None = None) -> OSError | None:
    """The OSError inside another library's error: safetensors reports a full disk as a SafetensorError
    "I/O error: No space left on device (os error 28)"; None when there is none."""
    import os
    import re

    if isinstance(e, OSError):
        return e
    m = re.search(r"\(os error (\d+)\)", str(e))
    if m is None:
        return None
    n = int(m.group(1))
    return OSError(n, os.strerror(n), path)
