import dataclasses
from typing import Literal

import numpy as np
import pytest
import torch

from clear_cli.config import apply_overrides, doc, from_dict, load_config, save_config
from clear_cli.devices import resolve_device, resolve_dtype
from clear_cli.errors import ClearError, UsageError
from clear_cli.models import load_pipeline, save_pipeline, text_len


def _image(pipe, prompt="a small red circle", size=128, steps=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return np.asarray(pipe(prompt, height=size, width=size, num_inference_steps=steps, generator=g).images[0])


def test_tiny_pipeline_draws_finite_image_of_right_size(tiny_random_pipe):
    img = _image(tiny_random_pipe, size=128)
    assert img.shape == (128, 128, 3)
    img2 = np.asarray(tiny_random_pipe("x", height=64, width=96, num_inference_steps=2,
                                       generator=torch.Generator().manual_seed(1)).images[0])
    assert img2.shape == (64, 96, 3)


def test_tiny_is_deterministic_per_seed_and_differs_across_seeds():
    a = load_pipeline("tiny-random", seed=0).transformer.state_dict()
    b = load_pipeline("tiny-random", seed=0).transformer.state_dict()
    c = load_pipeline("tiny-random", seed=1).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_tiny_has_every_flux_component_and_short_text_len(tiny_random_pipe):
    p = tiny_random_pipe
    assert text_len(p) == 32
    assert p.vae.config.latent_channels == 16 and p.vae.config.sample_size >= 1024
    assert p.transformer.config.guidance_embeds
    assert p.text_encoder is not None and p.text_encoder_2 is not None
    assert not p.transformer.training and not p.text_encoder_2.training
    # the pipeline defaults to the model's own text length, not FLUX's 512
    ids = p.tokenizer_2("a red circle", padding="max_length", max_length=text_len(p), return_tensors="pt").input_ids
    assert ids.shape[1] == 32


def test_save_load_round_trip_gives_same_output(tmp_path, tiny_random_pipe):
    from diffusers import FluxPipeline as StockFluxPipeline

    save_pipeline(tiny_random_pipe, tmp_path / "tiny")
    assert (tmp_path / "tiny" / "model_index.json").is_file()
    loaded = load_pipeline(str(tmp_path / "tiny"))
    assert text_len(loaded) == 32
    np.testing.assert_array_equal(_image(tiny_random_pipe), _image(loaded))
    stock = StockFluxPipeline.from_pretrained(str(tmp_path / "tiny"))  # stock diffusers reads it too
    assert type(stock).__name__ == "FluxPipeline"


def test_missing_and_unreachable_models_are_clear_errors(tmp_path):
    with pytest.raises(ClearError, match="does not exist"):
        load_pipeline("./no/such/dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClearError, match="model_index.json"):
        load_pipeline(str(tmp_path / "empty"))
    with pytest.raises(ClearError, match="someone/no-such-model") as e:
        load_pipeline("someone/no-such-model")  # HF_HUB_OFFLINE=1 in tests
    assert "--model tiny" in e.value.one_line()


def test_device_and_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.warns(UserWarning, match="overflow"):
        assert resolve_dtype("fp16", cpu) == torch.float16
    with pytest.raises(UsageError, match="fp64"):
        resolve_dtype("fp64", cpu)
    with pytest.raises(UsageError, match="not a device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_device("cuda:0")


@dataclasses.dataclass
class _Optim:
    lr: float = doc(1.0, "learning rate")
    name: Literal["adamw", "prodigy"] = doc("adamw", "optimizer")


@dataclasses.dataclass
class _Recipe:
    steps: int = doc(10, "optimizer steps")
    window: int = doc(16, "window radius in tokens")
    layers: list[int] = doc([1, 5], "attention-loss layers")
    optim: _Optim = doc(_Optim(), "optimizer settings")

    def validate(self):
        return ["window: must be >= 1"] if self.window < 1 else []


def test_config_reports_every_problem_at_once_with_paths_and_suggestions():
    with pytest.raises(UsageError) as e:
        from_dict(_Recipe, {"stepz": 3, "window": "big", "optim": {"lr": "fast", "name": "adam"}}, "r.yaml")
    msg = e.value.message
    assert "4 problems" in msg
    assert "stepz: unknown key (did you mean 'steps'?)" in msg
    assert "window: expected an integer" in msg
    assert "optim.lr: expected a number" in msg
    assert "optim.name" in msg and "did you mean 'adamw'" in msg
    with pytest.raises(UsageError, match="window: must be >= 1"):
        from_dict(_Recipe, {"window": 0})


def test_config_overrides_and_round_trip(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steps: 5\noptim:\n  lr: 0.5\n")
    cfg = load_config(_Recipe, path, ["optim.name=prodigy", "layers=[2, 3]", "steps=7"])
    assert cfg.steps == 7 and cfg.optim.lr == 0.5 and cfg.optim.name == "prodigy" and cfg.layers == [2, 3]
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(_Recipe, tmp_path / "resolved.yaml") == cfg
    assert apply_overrides({"a": 1}, ["b.c=x"]) == {"a": 1, "b": {"c": "x"}}
    with pytest.raises(UsageError, match="key=value"):
        load_config(_Recipe, path, ["steps"])
    (tmp_path / "bad.yaml").write_text("steps: [1\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_config(_Recipe, tmp_path / "bad.yaml")
    with pytest.raises(UsageError, match="not found"):
        load_config(_Recipe, tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", ["synth", "distill", "evaluate", "export", "generate", "demo"])
def test_job_api_is_a_plain_function_after_its_module_is_imported(name):
    import importlib
    import inspect

    import clear_cli

    module = importlib.import_module(f"clear_cli.jobs.{name}")  # must not shadow the package's function
    job = getattr(clear_cli, name)
    assert inspect.isfunction(job) and job is getattr(module, name)
    assert job.__doc__  # the function's docs travel with it


def test_package_exports_the_documented_api():
    import clear_cli

    for name in ("linearize", "unlinearize", "load_pipeline", "clear_attention", "count_pairs"):
        assert callable(getattr(clear_cli, name)), name


def test_config_undoes_yaml_1_1_traps(tmp_path):
    @dataclasses.dataclass
    class _Train:
        lr: float = doc(1.0, "learning rate")
        mixed_precision: Literal["no", "bf16", "fp16"] = doc("bf16", "autocast dtype")

    path = tmp_path / "t.yaml"
    path.write_text("lr: 1e-4\nmixed_precision: no\n")  # YAML 1.1: a string and a boolean
    cfg = load_config(_Train, path)
    assert cfg.lr == 1e-4 and cfg.mixed_precision == "no"
    with pytest.raises(UsageError, match="lr: expected a number"):
        from_dict(_Train, {"lr": "fast"})
