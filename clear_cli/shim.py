"""Entry point of the `clear` command.

`clear` is also the shell's screen-clearing command. With no arguments, or only the system clear's own
flags (-x, -T TYPE, -V), we hand over to the next `clear` on PATH (or print the ANSI escape when there is
none) before importing anything heavy. Everything else goes to the toolkit (`clear-dit` is its unambiguous name).
"""

from __future__ import annotations

import os
import sys

_CLEAR_FLAGS = {"-x", "-V"}


def is_screen_clear(args: list[str]) -> bool:
    """True when `args` are only what the system `clear` accepts (nothing, -x, -V, -T TYPE)."""
    i = 0
    while i < len(args):
        a = args[i]
        if a in _CLEAR_FLAGS:
            i += 1
        elif a == "-T" and i + 1 < len(args):
            i += 2
        elif a.startswith("-T") and len(a) > 2:
            i += 1
        else:
            return False
    return True


def _next_clear_on_path() -> str | None:
    """The first executable named `clear` on PATH that is not this program."""
    me = os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    for d in os.environ.get("PATH", "").split(os.pathsep):
        cand = os.path.join(d or ".", "clear")
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            real = os.path.realpath(cand)
            if real == me or _is_ours(real):
                continue
            return cand
    return None


def _is_ours(path: str) -> bool:
    """A console-script wrapper of this package (pip writes a small Python file that imports clear_cli)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2048)
    except OSError:
        return False
    return b"clear_cli" in head


def hand_over(args: list[str]) -> int:
    """Run the system clear with `args`; the ANSI clear-screen escape when there is none."""
    other = _next_clear_on_path()
    if other is not None:
        try:
            os.execv(other, [other, *args])
        except OSError:
            pass
    if "-V" in args:
        print("clear (clear-dit shim: no system clear found)")
        return 0
    sys.stdout.write("\033[H\033[2J" + ("" if "-x" in args else "\033[3J"))
    sys.stdout.flush()
    return 0


def main() -> None:
    args = sys.argv[1:]
    if is_screen_clear(args):
        sys.exit(hand_over(args))
    from clear_cli.cli.app import main as app_main

    app_main()


if __name__ == "__main__":
    main()
