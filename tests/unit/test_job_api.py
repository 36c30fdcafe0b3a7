"""One job signature: `job(config=None, *, log=None, progress=True, **options) -> Result` for every job."""

import dataclasses
import inspect
from pathlib import Path

import pytest

from clear_cli.config import merge_options
from clear_cli.errors import UsageError


def _jobs():
    from clear_cli.jobs.bench import bench_attention
    from clear_cli.jobs.demo import demo
    from clear_cli.jobs.distill import distill
    from clear_cli.jobs.evaluate import evaluate
    from clear_cli.jobs.export import export
    from clear_cli.jobs.generate import generate
    from clear_cli.jobs.synth import synth
    from clear_cli.tiny.checks import check
    from clear_cli.tiny.train import train

    return {"synth": synth, "distill": distill, "evaluate": evaluate, "export": export, "generate": generate,
            "demo": demo, "train": train, "check": check, "bench_attention": bench_attention}


@pytest.mark.parametrize("name", list(_jobs()))
def test_every_job_has_the_one_signature(name):
    sig = inspect.signature(_jobs()[name])
    params = list(sig.parameters.values())
    assert params[0].name == "config" and params[0].default is None
    assert params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params[1:]), "only config positional"
    kw = {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert kw["log"].default is None and kw["progress"].default is True
    assert params[-1].kind is inspect.Parameter.VAR_KEYWORD
    assert "Result" in str(sig.return_annotation)


@pytest.mark.parametrize("name,typo,meant", [
    ("synth", "batchsize", "batch_size"), ("distill", "overwrit", "overwrite"), ("evaluate", "metric", "metrics"),
    ("export", "rnak", "rank"), ("generate", "stpes", "steps"), ("demo", "distil_steps", "distill_steps"),
    ("train", "vae_step", "vae_steps"), ("check", "locallity", "locality"), ("bench_attention", "windw", "window"),
])
def test_unknown_option_names_the_close_one_before_any_work(name, typo, meant, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=f"{name}\\(\\) got an unknown option '{typo}' \\(did you mean '{meant}'\\?\\)"):
        _jobs()[name](**{typo: 1})
    assert list(tmp_path.iterdir()) == []  # nothing written


@dataclasses.dataclass
class _Cfg:
    prompts: list[str] = dataclasses.field(default_factory=list)
    out: str = "o"
    res: str | None = None
    n: int = 1


def test_merge_options_overrides_by_name_and_keeps_the_config():
    base = _Cfg(out="a", n=3)
    cfg = merge_options(_Cfg, base, {"n": 5}, job="j")
    assert (cfg.out, cfg.n) == ("a", 5) and base.n == 3  # a copy: the caller's config is not changed
    assert merge_options(_Cfg, {"out": "b"}, {}, job="j").out == "b"


def test_merge_options_python_conveniences():
    cfg = merge_options(_Cfg, "a cat", {"out": Path("x/y"), "res": 256}, job="j", primary="prompts")
    assert cfg.prompts == ["a cat"] and cfg.out == "x/y" and cfg.res == "256" and cfg.n == 1
    assert merge_options(_Cfg, ("a", "b"), {}, job="j", primary="prompts").prompts == ["a", "b"]
    with pytest.raises(UsageError, match="prompts given twice"):
        merge_options(_Cfg, "a", {"prompts": ["b"]}, job="j", primary="prompts")
    with pytest.raises(UsageError, match="config must be a _Cfg"):
        merge_options(_Cfg, "a", {}, job="j")


def test_main_process_rule(monkeypatch):
    from clear_cli.devices import is_main_process

    monkeypatch.delenv("RANK", raising=False)
    assert is_main_process()
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()
