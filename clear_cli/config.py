"""Recipe YAML <-> dataclasses.

Configs are plain dataclasses whose fields carry a one-line doc in `metadata["doc"]` (see `doc()`).
Loading checks the whole file at once and reports every problem with its key path; unknown keys get a
"did you mean"; `--set a.b=value` overrides are applied before checking; the resolved config is written
next to the outputs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from clear_cli.errors import UsageError
from clear_cli.files import atomic_write_text

T = TypeVar("T")


def doc(default: Any, text: str, **kw: Any) -> Any:
    """A dataclass field with a one-line doc: `steps: int = doc(10000, "optimizer steps")`."""
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        factory = (lambda d=default: type(d)(d)) if not dataclasses.is_dataclass(default) else (
            lambda d=default: dataclasses.replace(d)
        )
        return dataclasses.field(default_factory=factory, metadata={"doc": text, **kw})
    return dataclasses.field(default=default, metadata={"doc": text, **kw})


def field_docs(cls: type) -> dict[str, str]:
    """{field name: one-line doc} for a config dataclass."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}


def merge_options(cls: type[T], config: Any = None, options: dict[str, Any] | None = None, *, job: str,
                  primary: str | None = None) -> T:
    """The settings of one job call: `config` (a `cls`, a mapping of its fields, or None) with keyword `options`
    overriding fields by name. Unknown names are a UsageError with a "did you mean". `primary`: the field a bare
    positional value stands for (`generate("a cat")` -> prompts), the call form jobs had before configs.
    Paths and numbers given for text fields become text, one text for a list field becomes a list of one."""
    opts = dict(options or {})
    if config is None:
        cfg = cls()
    elif isinstance(config, cls):
        cfg = dataclasses.replace(config)
    elif isinstance(config, dict):
        cfg = from_dict(cls, config, source=f"{job}()")
    elif primary is not None:
        if primary in opts:
            raise UsageError(f"{job}(): {primary} given twice (positionally and as {primary}=)")
        cfg, opts[primary] = cls(), config
    else:
        raise UsageError(f"{job}(): config must be a {cls.__name__}, a mapping or None, got {type(config).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in opts.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"{job}() got an unknown option {key!r}{hint}", f"its options: {', '.join(names)}")
        setattr(cfg, key, _plain(value, hints[key]))
    return check_finite(cfg)  # NaN/inf in any float field, from the CLI or a Python call: one rule, here


def _plain(value: Any, tp: Any) -> Any:
    """Python-call conveniences: Path/int for a str field -> str; a str or path for a list field -> [str]."""
    args = set(typing.get_args(tp)) if typing.get_origin(tp) in (typing.Union, types.UnionType) else {tp}
    lists = [a for a in args if typing.get_origin(a) is list]
    if lists and isinstance(value, (str, os.PathLike)):
        return [str(value)] if typing.get_args(lists[0])[:1] == (str,) else [value]
    if lists and isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list) and lists and typing.get_args(lists[0])[:1] == (str,):
        return [str(v) if isinstance(v, os.PathLike) else v for v in value]
    if str in args and Path not in args:
        if isinstance(value, os.PathLike):
            return str(value)
        if isinstance(value, int) and not isinstance(value, bool) and int not in args:
            return str(value)
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert_union(value: Any, args: tuple, path: str, errors: list[str]) -> Any:
    """The first member type the value converts to; else the first member's complaint."""
    if value is None and type(None) in args:
        return None
    sub: list[str] = []
    for a in args:
        if a is type(None):
            continue
        trial: list[str] = []
        out = _convert(value, a, path, trial)
        if not trial:
            return out
        sub.extend(trial)
    errors.append(sub[0] if sub else f"{path}: invalid value {value!r}")
    return value


def _convert_literal(value: Any, args: tuple, path: str, errors: list[str]) -> Any:
    if isinstance(value, bool) and value not in args:
        # YAML 1.1 reads `no`/`yes`/`off`/`on` as booleans; map back when the choice list has the word
        for word in (("no", "off", "false") if value is False else ("yes", "on", "true")):
            if word in args:
                return word
    if value not in args:
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        errors.append(f"{path}: {value!r} is not one of {', '.join(map(repr, args))}{hint}")
    return value


def _convert(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    """Check/convert one value against a type hint; append problems to `errors`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, args, path, errors)
    if origin is typing.Literal:
        return _convert_literal(value, args, path, errors)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return value
        return _from_dict(tp, value, path, errors)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            if origin is list and args and not isinstance(value, dict):
                value = [value]
            else:
                errors.append(f"{path}: expected a list, got {type(value).__name__}")
                return value
        inner = args[0] if args else Any
        items = [_convert(v, inner, f"{path}[{i}]", errors) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {type(value).__name__}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            errors.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads `1e-4` (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected a number, got {value!r}")
            return value
        if not math.isfinite(value):
            errors.append(f"{path}: {value!r} is not a finite number")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            errors.append(f"{path}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            errors.append(f"{path}: expected a path, got {value!r}")
            return value
        return Path(value)
    return value


def _from_dict(cls: type, data: dict, prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{path}: unknown key{hint}")
            continue
        kwargs[key] = _convert(value, hints[key], path, errors)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        errors.append(f"{prefix or '<root>'}: {e}")
        return None
    check = getattr(obj, "validate", None)
    if callable(check) and not errors:
        for problem in check() or []:
            errors.append(f"{prefix + '.' if prefix else ''}{problem}")
    return obj


def from_dict(cls: type[T], data: dict, source: str = "config") -> T:
    """Build `cls` from a mapping; every problem is reported at once in one UsageError."""
    if not isinstance(data, dict):
        raise UsageError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    errors: list[str] = []
    obj = _from_dict(cls, data, "", errors)
    if errors:
        n = len(errors)
        raise UsageError(f"{source}: {n} problem{'s' if n > 1 else ''}: " + "; ".join(errors))
    return obj


def non_finite(obj: Any, prefix: str = "--") -> list[str]:
    """Every float field of a config dataclass (nested ones too) that holds NaN or inf, as problems naming the
    option (`--guidance nan is not a finite number`). The one finiteness rule for configs built from CLI options
    or Python calls (YAML and --set values are checked on conversion)."""
    problems: list[str] = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        name = f"{prefix}{f.name.replace('_', '-')}" if prefix == "--" else f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            problems += non_finite(v, f"{name}." if prefix != "--" else f"{f.name}.")
        elif isinstance(v, float) and not math.isfinite(v):
            problems.append(f"{name} {v!r} is not a finite number")
        elif isinstance(v, (list, tuple)) and any(isinstance(x, float) and not math.isfinite(x) for x in v):
            problems.append(f"{name} {list(v)!r} holds a value that is not a finite number")
    return problems


def check_finite(obj: Any) -> Any:
    """`non_finite` as one UsageError (exit 2); returns `obj` so a job can write `cfg = check_finite(cfg)`."""
    problems = non_finite(obj)
    if problems:
        raise UsageError("; ".join(problems), "pass a real number (NaN and inf are never meaningful settings)")
    return obj


def to_dict(obj: Any) -> dict:
    """A dataclass as plain YAML-able data (paths as strings)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise UsageError(f"--set {text!r}: expected key=value", "e.g. --set train.steps=100")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UsageError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--set a.b=value` overrides to a nested mapping (a copy)."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file not found: {p}", "check the path, e.g. recipes/tiny.yaml")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise UsageError(f"{p} is not a text file (not UTF-8)", "pass a YAML recipe such as recipes/tiny.yaml") \
            from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"{p}:{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{p}: expected a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read a YAML recipe (optional), apply overrides, and check it against `cls`."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data, source=str(path) if path is not None else "config")


def save_config(obj: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))
