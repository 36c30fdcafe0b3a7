"""CLI <-> config parity: every job command's options come from its config dataclass, with one vocabulary."""

import dataclasses
from dataclasses import dataclass

import pytest
import typer

from clear_cli.cli.app import app
from clear_cli.cli.options import Extra, cli_default, config_command, help_of, progress_option
from clear_cli.config import doc
from clear_cli.flux import DEFAULT_MODEL

# The job commands: each must be built by config_command from its config (a hand-typed option would drift).
JOB_COMMANDS = {("gen",), ("synth",), ("eval",), ("export",), ("distill",), ("demo",), ("tiny", "train"),
                ("tiny", "check"), ("tiny", "video-train"), ("tiny", "video-check"), ("bench", "attention"),
                ("bench", "video")}
OLD_SPELLINGS = {"--num-images", "--samples", "--student", "--batch", "--quiet"}


def _commands():
    root = typer.main.get_command(app)
    out = {}

    def walk(group, prefix):
        for name, sub in getattr(group, "commands", {}).items():
            path = (*prefix, name)
            out[path] = sub
            walk(sub, path)

    walk(root, ())
    return out


def _config_of(cmd):
    return getattr(cmd.callback, "__wrapped_config__", None)


def test_every_job_command_is_built_from_its_config():
    cmds = _commands()
    built = {p for p, c in cmds.items() if _config_of(c) is not None}
    assert built == JOB_COMMANDS


@pytest.mark.parametrize("path", sorted(JOB_COMMANDS))
def test_each_field_has_its_option_with_the_same_default_and_help(path):
    cmd = _commands()[path]
    cls = _config_of(cmd)
    params = {p.name: p for p in cmd.params}
    for f in dataclasses.fields(cls):
        assert f.name in params, f"{' '.join(path)}: field {f.name} has no option"
        p = params[f.name]
        assert not getattr(p, "hidden", False), f.name
        assert p.help == help_of(f) and p.help, f"{' '.join(path)} {f.name}: help {p.help!r}"
        want = cli_default(f)
        got = p.default
        if isinstance(want, (list, tuple)):
            want, got = list(want), list(got or [])
        if p.required:
            continue  # a required argument (distill's RECIPE.yaml): the field's None is the Python default only
        assert got == want, f"{' '.join(path)} {f.name}: default {got!r} != field {want!r}"
    fields = {f.name for f in dataclasses.fields(cls)}
    for name, p in params.items():
        if name in fields:
            continue
        # not a field: a hidden old spelling, or a CLI-only option the command declares
        if getattr(p, "hidden", False):
            assert name.startswith("alias__") or name == "quiet", name
        else:
            assert name in {"progress", "as_json", "json_out", "verify_dir", "repair", "help"}, \
                f"{' '.join(path)}: option {name} maps to no field and is not a declared CLI-only option"


def test_one_vocabulary():
    cmds = _commands()
    for path in JOB_COMMANDS:
        params = {p.name: p for p in cmds[path].params}
        where = " ".join(path)
        assert "--progress" in params["progress"].opts and "--no-progress" in params["progress"].secondary_opts, where
        for p in cmds[path].params:
            for spelling in p.opts:
                if spelling in OLD_SPELLINGS:
                    assert p.hidden, f"{where}: {spelling} is an old spelling and must stay hidden"
        if "model" in params and params["model"].default is not None:
            tiny_cmd = path[0] in ("tiny", "demo")
            tiny_model = "tiny-wan" if path[-1].startswith("video-") else "tiny"  # the tiny video teacher
            assert params["model"].default == (tiny_model if tiny_cmd else DEFAULT_MODEL), where
        if "device" in params:
            assert params["device"].default == ("cpu" if path[0] == "tiny" else "auto"), where
        for name in ("n", "batch_size", "weights", "res"):
            if name in params:
                assert f"--{name.replace('_', '-')}" in params[name].opts, where


# --- the builder itself, on a small config ---------------------------------------------------------------

@dataclass
class _Cfg:
    items: list[str] = doc([], "things")
    n: int = doc(2, "how many")
    sizes: list[str] = doc(["1k", "2k"], "sizes", cli_split=",")
    fast: bool = doc(True, "go fast")
    label: str | None = doc(None, "a label")


def _app(seen):
    small = typer.Typer()

    @small.command()
    @config_command(_Cfg, arguments={"items": "ITEM"}, aliases={"n": ["--count"]},
                    extras=[Extra("loud", bool, False, ("--loud",), "Shout."), *progress_option()])
    def run(cfg: _Cfg, loud: bool, progress: bool) -> None:
        seen.append((cfg, loud, progress))

    @small.command()
    def other() -> None:
        pass

    return small


def _invoke(args):
    from typer.testing import CliRunner

    seen = []
    res = CliRunner().invoke(_app(seen), ["run", *args])
    return res, seen


def test_builder_fills_the_config():
    res, seen = _invoke(["a", "b", "--n", "5", "--sizes", "4k, 8k", "--no-fast", "--label", "x", "--loud"])
    assert res.exit_code == 0, res.output
    cfg, loud, progress = seen[0]
    assert cfg == _Cfg(items=["a", "b"], n=5, sizes=["4k", "8k"], fast=False, label="x") and loud and progress


def test_builder_defaults_are_the_fields():
    res, seen = _invoke([])
    assert res.exit_code == 0, res.output
    assert seen[0][0] == _Cfg() and seen[0][2] is True


def test_old_spelling_fills_the_field_and_is_hidden():
    res, seen = _invoke(["--count", "7", "--quiet"])
    assert res.exit_code == 0, res.output
    assert seen[0][0].n == 7 and seen[0][2] is False  # --quiet is --no-progress
    res, _ = _invoke(["--help"])
    assert "--count" not in res.output and "--quiet" not in res.output and "--n" in res.output


def test_old_and_new_spelling_that_disagree_are_refused():
    res, seen = _invoke(["--count", "7", "--n", "5"])
    assert res.exit_code != 0 and not seen
