"""Derivatives of the tiny teacher (`clear_cli.tiny.derive`), test-sized: what they write loads and what moved moved."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clear_cli.errors import UsageError


def test_styles():
    from clear_cli.tiny.derive import apply_style

    img = np.array([[[0.8, 0.1, 0.3]]], dtype=np.float32)
    assert np.allclose(apply_style(img, "roll"), [[[0.3, 0.8, 0.1]]])  # (R, G, B) <- (B, R, G)
    assert np.allclose(apply_style(img, "invert"), 1 - img)
    with pytest.raises(UsageError):
        apply_style(img, "sepia")


def test_full_fine_tune_moves_only_the_transformer(tmp_path):
    from clear_cli.models import load_pipeline
    from clear_cli.tiny.derive import INFO_FILE, derive

    res = derive(tmp_path / "d", style="roll", steps=2, scenes=8, batch=2)
    assert (res.path / "model_index.json").is_file() and (res.path / INFO_FILE).is_file() and len(res.losses) == 2
    ours, teacher = load_pipeline(str(res.path)), load_pipeline("tiny")
    moved = [k for k, v in teacher.transformer.state_dict().items()
             if not torch.equal(v, ours.transformer.state_dict()[k])]
    assert any(".attn.to_q." in k for k in moved)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(ours, name).state_dict(), getattr(teacher, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), name


def test_style_lora_loads_in_stock_diffusers(tmp_path):
    from clear_cli.models import load_pipeline
    from clear_cli.tiny.derive import derive

    res = derive(tmp_path / "style.safetensors", style="invert", steps=2, scenes=8, batch=2, lora_rank=2, lr=3e-3)
    assert res.path.is_file() and res.path.with_suffix(".json").is_file()
    pipe = load_pipeline("tiny")
    pipe.load_lora_weights(str(res.path), adapter_name="style")
    assert "style" in pipe.get_list_adapters()["transformer"]
    with pytest.raises(UsageError):
        derive(tmp_path / "x", style="sepia", steps=1)
