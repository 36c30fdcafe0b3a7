"""The `clear` / `clear-dit` Typer app: registers one command per module, turns known errors into one line."""

from __future__ import annotations

import os
import sys
import traceback

import typer

from clear_cli import __version__
from clear_cli.errors import ClearError, embedded_os_error, os_error

app = typer.Typer(
    name="clear",
    help="CLEAR: make pre-trained diffusion transformers (FLUX) fast at high resolution with local attention.\n\n"
    "`clear-dit` is the same program under a name that never clashes with the shell's `clear`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        print(f"clear-dit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks (or set CLEAR_DEBUG=1)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _state["debug"] = debug


def _register() -> None:
    """Each command lives in its own module under clear_cli/cli/ and exposes `register(app)`."""
    from clear_cli.cli import bench as bench_cmd
    from clear_cli.cli import comfy as comfy_cmd
    from clear_cli.cli import demo as demo_cmd
    from clear_cli.cli import distill as distill_cmd
    from clear_cli.cli import env as env_cmd
    from clear_cli.cli import eval as eval_cmd
    from clear_cli.cli import export as export_cmd
    from clear_cli.cli import gen as gen_cmd
    from clear_cli.cli import model as model_cmd
    from clear_cli.cli import synth as synth_cmd
    from clear_cli.cli import tiny as tiny_cmd

    for mod in (env_cmd, model_cmd, gen_cmd, tiny_cmd, export_cmd, synth_cmd, eval_cmd, distill_cmd, bench_cmd, demo_cmd,
                comfy_cmd):
        mod.register(app)


_register()


def debug_enabled() -> bool:
    return _state["debug"] or os.environ.get("CLEAR_DEBUG", "") not in ("", "0")


def run(argv: list[str] | None = None, prog_name: str = "clear") -> int:
    """Run the app on `argv` and return the exit code (used by `main` and by in-process tests)."""
    _state["debug"] = False
    try:
        app(args=argv, prog_name=prog_name)
    except SystemExit as e:
        code = e.code
        if code == 130:  # Typer turns Ctrl-C into a silent exit 130
            _interrupted()
        return code if isinstance(code, int) else (0 if code is None else 1)
    except ClearError as e:
        return _fail(e)
    except OSError as e:  # the safety net: a file-system fault any job let through is one line too
        return _fail(os_error(e, "cannot read" if _reading(e) else "cannot write"))
    except KeyboardInterrupt:
        _interrupted()
        return 130
    except Exception as e:  # a library's wrapper around an I/O fault (safetensors inside accelerate's save_state)
        inner = embedded_os_error(e)
        if inner is None:
            raise
        return _fail(os_error(inner))
    return 0


def _fail(e: ClearError) -> int:
    if debug_enabled():
        traceback.print_exc()
    print(e.one_line(), file=sys.stderr)
    return e.exit_code


def _reading(e: OSError) -> bool:
    import errno

    return e.errno in (errno.ENOENT, errno.EISDIR) and not str(e.filename or "").endswith(".tmp")


def _interrupted() -> None:
    print("error: interrupted (outputs written so far are kept; rerun the same command to resume)", file=sys.stderr)


def main() -> None:
    prog = os.path.basename(sys.argv[0]) if sys.argv else "clear"
    sys.exit(run(sys.argv[1:], prog_name="clear-dit" if prog.startswith("clear-dit") else "clear"))
