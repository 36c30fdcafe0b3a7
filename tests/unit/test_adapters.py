"""The model-adapter registry: which family a transformer belongs to, and what FLUX's adapter says."""

from __future__ import annotations

import pytest
import torch

from clear_cli.attention.adapters import ADAPTERS, FLUX, adapter_by_family, adapter_for, families


def test_registry_order_and_lookup():
    assert families() == ["qwen-image", "chroma", "flux"]   # specific families before FLUX (Chroma is FluxAttention)
    assert adapter_by_family("flux") is FLUX and ADAPTERS[-1] is FLUX
    with pytest.raises(ValueError, match="no model adapter for family 'sd3'; families: qwen-image, chroma, flux"):
        adapter_by_family("sd3")
    assert adapter_for(torch.nn.Linear(2, 2)) is None


def test_flux_adapter_reads_what_linearize_always_read(tiny_random_pipe):
    from diffusers import FluxPipeline

    tr = tiny_random_pipe.transformer
    assert adapter_for(tr) is FLUX
    mods = FLUX.attention_modules(tr)
    assert len(mods) == 4 and [FLUX.is_double(m) for m in mods] == [True, True, False, False]
    assert FLUX.image_projections(mods[0]) == ("to_q", "to_k", "to_v", "to_out.0")
    assert FLUX.image_projections(mods[3]) == ("to_q", "to_k", "to_v")
    assert FLUX.attention_loss_layers(mods) == []   # index % 4 == 0 among single blocks: none of 2 + 2
    ids = FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32)
    t, grid, mask, layout = FLUX.read_call({"img_ids": ids, "hidden_states": torch.zeros(1, 15, 64),
                                            "encoder_hidden_states": torch.zeros(1, 7, 64)})
    assert (t, grid, mask) == (7, (3, 5), None)
    assert layout.target.shape == (3, 5) and not layout.references   # the call's token layout (layout.py)
    assert FLUX.facts.train_seq_len == 64 * 64 + 512


def test_a_family_missing_a_required_method_cannot_be_built():
    import pytest

    from clear_cli.attention.adapters.base import ModelAdapter

    class Half(ModelAdapter):  # implements nothing of the interface
        family = "half"

    with pytest.raises(TypeError, match="read_call"):
        Half()
