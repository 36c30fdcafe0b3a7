"""CLI options derived from the job configs: one dataclass field, one option (name, type, default, help).

    @app.command("gen")
    @config_command(GenConfig, arguments={"prompts": "PROMPT"}, names={"prompts_file": "--prompts"},
                    aliases={"n": ["--num-images"]})
    def gen(cfg: GenConfig, progress: bool) -> None: ...

The command Typer sees takes one parameter per field (its signature is built with inspect.Signature and
typer.Option / typer.Argument, Typer's public API) plus the declared CLI-only options; the function written here
receives the config built from them. So an option cannot disagree with its field: the parity test
(tests/cli/test_options.py) checks every command. Old spellings are hidden options that fill the same field.

Vocabulary (docs/cli.md): an option is `--` + the field name with `-` for `_`; a bool field that defaults to True
gets `--x/--no-x`, one that defaults to False the flag `--x`; a list field is repeatable, or one comma-separated
value when the field says `cli_split=","` in its `doc(...)`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

import typer

from clear_cli.errors import UsageError

PROGRESS_HELP = "Progress bars and progress lines (--no-progress: only warnings and the result)."


@dataclass
class Extra:
    """A CLI-only option (not a config field), passed to the command function by its name."""

    name: str
    annotation: Any
    default: Any
    decls: tuple[str, ...]
    help: str
    hidden: bool = False
    metavar: str | None = None


def progress_option() -> list[Extra]:
    """`--progress/--no-progress` the same on every command; `--quiet` is its old spelling (hidden)."""
    return [Extra("progress", bool, True, ("--progress/--no-progress",), PROGRESS_HELP),
            Extra("quiet", bool, False, ("--quiet",), "Same as --no-progress.", hidden=True)]


def help_of(f: dataclasses.Field) -> str:
    """A field's one-line doc as help text, with a full stop."""
    text = str(f.metadata.get("doc", "")).strip()
    return text if not text or text.endswith(".") else text + "."


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return ...


def _optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) of `X | None` / Optional[X]."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], type(None) in typing.get_args(tp)
    return tp, False


def cli_type(tp: Any, split: str | None) -> Any:
    """The annotation Typer gets for a field type (`X | None` as Optional[X]; a split list as one str)."""
    inner, optional = _optional(tp)
    if split is not None:
        return Optional[str]
    if typing.get_origin(inner) is list:
        return list[typing.get_args(inner)[0]] if typing.get_args(inner) else list[str]
    if typing.get_origin(inner) is tuple:
        return tuple[typing.get_args(inner)]
    return Optional[inner] if optional else inner


def field_decls(f: dataclasses.Field, names: dict[str, str]) -> tuple[str, ...]:
    name = names.get(f.name, option_name(f.name))
    if f.type in (bool, "bool") or _is_bool(f):
        if default_of(f) is True:
            return (f"{name}/--no-{name[2:]}",)
    return (name,)


def _is_bool(f: dataclasses.Field) -> bool:
    return isinstance(default_of(f), bool)


def cli_default(f: dataclasses.Field) -> Any:
    """The default Typer shows and fills in: the field's, a split list joined back."""
    value = default_of(f)
    split = f.metadata.get("cli_split")
    if split is not None and isinstance(value, list):
        return split.join(map(str, value))
    return value


def _alias_param(name: str) -> str:
    return "alias__" + name.replace("-", "_").strip("_")


def config_command(cls: type, *, arguments: dict[str, str] | None = None, names: dict[str, str] | None = None,
                   aliases: dict[str, list[str]] | None = None, hidden_arguments: dict[str, str] | None = None,
                   extras: list[Extra] | None = None, metavars: dict[str, str] | None = None,
                   required: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate `fn(cfg, **extras)` into a Typer command with one option per field of `cls`.

    arguments: fields given positionally ({field: METAVAR}); names: fields whose option is spelled otherwise
    ({field: "--set"}); aliases: old spellings, hidden ({field: ["--num-images"]}); hidden_arguments: a field
    that also takes a hidden positional argument (the old form); extras: CLI-only options; required: arguments
    that must be given (their field's None default is then the Python API's only).
    """
    arguments, names, aliases = arguments or {}, names or {}, aliases or {}
    hidden_arguments, extras, metavars = hidden_arguments or {}, list(extras or []), metavars or {}
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        params: list[inspect.Parameter] = []
        alias_of: dict[str, tuple[str, str]] = {}  # parameter -> (field, spelling)
        for f in fields:
            split = f.metadata.get("cli_split")
            tp = cli_type(hints[f.name], split)
            help_text = help_of(f)
            if f.name in arguments:
                info = typer.Argument(... if f.name in required else cli_default(f), help=help_text,
                                      metavar=arguments[f.name], show_default=False)
            else:
                info = typer.Option(cli_default(f), *field_decls(f, names), help=help_text,
                                    metavar=metavars.get(f.name))
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=tp))
            for spelling in aliases.get(f.name, []):
                p = _alias_param(spelling)
                alias_of[p] = (f.name, spelling)
                atp = tp if typing.get_origin(tp) is list or tp is bool else Optional[_optional(tp)[0]]
                adefault = [] if typing.get_origin(tp) is list else (False if tp is bool else None)
                params.append(inspect.Parameter(p, inspect.Parameter.KEYWORD_ONLY, annotation=atp,
                                                default=typer.Option(adefault, spelling, hidden=True)))
            if f.name in hidden_arguments:
                p = _alias_param(f"arg_{f.name}")
                alias_of[p] = (f.name, hidden_arguments[f.name])
                params.append(inspect.Parameter(p, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                                default=typer.Argument(None, hidden=True,
                                                                       metavar=hidden_arguments[f.name])))
        for e in extras:
            params.append(inspect.Parameter(e.name, inspect.Parameter.KEYWORD_ONLY, annotation=e.annotation,
                                            default=typer.Option(e.default, *e.decls, help=e.help, hidden=e.hidden,
                                                                 metavar=e.metavar)))

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            values = {f.name: kwargs.pop(f.name) for f in fields}
            for p, (name, spelling) in alias_of.items():
                given = kwargs.pop(p)
                if given in (None, False, []):
                    continue
                if values[name] not in (default_of_name(cls, name), None, []) and values[name] != given:
                    raise UsageError(f"{spelling} and {option_name(name)} both given", f"pass {option_name(name)} only")
                values[name] = given
            for f in fields:
                split = f.metadata.get("cli_split")
                if split is not None and isinstance(values[f.name], str):
                    values[f.name] = [s.strip() for s in values[f.name].split(split) if s.strip()]
                elif isinstance(values[f.name], tuple) and typing.get_origin(_optional(hints[f.name])[0]) is list:
                    values[f.name] = list(values[f.name])
            extra = {e.name: kwargs.pop(e.name) for e in extras}
            if extra.pop("quiet", False):
                extra["progress"] = False
            return fn(cls(**values), **extra)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {}  # Typer reads the types from the signature above
        command.__wrapped_config__ = cls  # type: ignore[attr-defined]  (the parity test reads it)
        del command.__wrapped__  # inspect.signature must not look through to fn
        return command

    return decorate


def default_of_name(cls: type, name: str) -> Any:
    return default_of(next(f for f in dataclasses.fields(cls) if f.name == name))
