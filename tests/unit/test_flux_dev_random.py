"""flux-dev-random: FLUX.1-dev's architecture (counted on the meta device) and the seeded on-device builder."""

import pytest
import torch

from clear_cli.models import flux_dev


@pytest.fixture(scope="module")
def meta_pipe():
    from clear_cli.models import load_pipeline

    return load_pipeline("flux-dev-random", device="meta")


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def flux_transformer_count(c: dict) -> int:
    """FluxTransformer2DModel's parameters written out from its config (diffusers' FLUX layout)."""
    d = c["num_attention_heads"] * c["attention_head_dim"]
    hd = c["attention_head_dim"]

    def lin(i, o):
        return i * o + o

    embed = (2 * (lin(256, d) + lin(d, d))  # timestep + guidance embedders (256 sinusoidal channels)
             + lin(c["pooled_projection_dim"], d) + lin(d, d)  # pooled CLIP text projection
             + lin(c["joint_attention_dim"], d) + lin(c["in_channels"], d))  # context and x embedders
    double = (2 * lin(d, 6 * d)  # AdaLayerNormZero for image and text streams
              + 8 * lin(d, d)  # to_q/k/v/out and add_q/k/v + to_add_out
              + 4 * hd  # RMSNorm q/k and added q/k
              + 2 * (lin(d, 4 * d) + lin(4 * d, d)))  # feed-forward of both streams
    single = lin(d, 3 * d) + lin(d, 4 * d) + lin(5 * d, d) + 3 * lin(d, d) + 2 * hd
    out = lin(d, 2 * d) + lin(d, c["patch_size"] ** 2 * c["in_channels"])
    return embed + c["num_layers"] * double + c["num_single_layers"] * single + out


def t5_encoder_count(c: dict) -> int:
    inner = c["num_heads"] * c["d_kv"]
    layer = 4 * c["d_model"] * inner + 3 * c["d_model"] * c["d_ff"] + 2 * c["d_model"]  # attention, gated FF, norms
    return (c["vocab_size"] * c["d_model"] + c["num_layers"] * layer
            + c["relative_attention_num_buckets"] * c["num_heads"] + c["d_model"])


def clip_text_count(c: dict) -> int:
    h, f = c["hidden_size"], c["intermediate_size"]
    layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 4 * h
    return c["vocab_size"] * h + c["max_position_embeddings"] * h + c["num_hidden_layers"] * layer + 2 * h


def test_counts_match_flux_dev(meta_pipe):
    from clear_cli.models import FluxPipeline

    assert type(meta_pipe) is FluxPipeline  # the class load_pipeline gives hub models
    tr = meta_pipe.transformer
    assert all(p.device.type == "meta" for p in tr.parameters())
    assert n_params(tr) == flux_transformer_count(flux_dev.TRANSFORMER) == 11_901_408_320  # FLUX.1-dev: 11.9B
    t5 = meta_pipe.text_encoder_2
    assert n_params(t5) == t5_encoder_count(flux_dev.T5) == 4_762_310_656  # T5-XXL encoder: 4.76B (9.52 GB bf16)
    assert t5.encoder.embed_tokens.weight is t5.shared.weight
    assert n_params(meta_pipe.text_encoder) == clip_text_count(flux_dev.CLIP) == 123_060_480  # CLIP-L text: 123M
    assert 83.7e6 < n_params(meta_pipe.vae) < 84.0e6  # FLUX VAE: ~84M
    vc = meta_pipe.vae.config
    assert (vc.latent_channels, vc.scaling_factor, vc.shift_factor) == (16, 0.3611, 0.1159)
    assert meta_pipe.vae_scale_factor == 8 and vc.sample_size == 1024


def test_pipeline_settings_are_flux_dev(meta_pipe):
    from clear_cli.models import text_len

    assert text_len(meta_pipe) == 512
    assert dict(meta_pipe.scheduler.config)["shift"] == 3.0 and meta_pipe.scheduler.config.use_dynamic_shifting
    for tok, table in ((meta_pipe.tokenizer, meta_pipe.text_encoder), (meta_pipe.tokenizer_2, meta_pipe.text_encoder_2)):
        ids = tok("a photo of a red fox in a snowy forest, 8k", padding="max_length", truncation=True).input_ids
        assert max(ids) < table.get_input_embeddings().num_embeddings  # ids fit the real-size embedding tables
        assert tok.unk_token_id not in ids[:5]


SMALL = {  # FLUX.1-dev's structure at a size a CPU builds in a second
    "transformer": {**flux_dev.TRANSFORMER, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
                    "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16,
                    "axes_dims_rope": (4, 6, 6)},
    "text_encoder_2": {**flux_dev.T5, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4},
    "text_encoder": {**flux_dev.CLIP, "hidden_size": 16, "intermediate_size": 32, "projection_dim": 16,
                     "num_hidden_layers": 1, "num_attention_heads": 2},
    "vae": {**flux_dev.VAE, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4},
}


def test_builder_fills_in_place_seeded_and_sane():
    a = flux_dev.build_components("cpu", torch.bfloat16, seed=3, configs=SMALL)
    b = flux_dev.build_components("cpu", torch.bfloat16, seed=3, configs=SMALL)
    c = flux_dev.build_components("cpu", torch.bfloat16, seed=4, configs=SMALL)
    for name in flux_dev.COMPONENTS:
        pa, pb, pc = (dict(x[name].named_parameters()) for x in (a, b, c))
        for k, p in pa.items():
            assert p.device.type == "cpu" and p.dtype == torch.bfloat16, (name, k)
            assert torch.equal(p, pb[k]), (name, k)  # same seed, same weights
            kind, std = flux_dev._init_rule(k, p.shape)
            if kind == "normal":
                if p.numel() >= 256:
                    assert not torch.equal(p, pc[k]), (name, k)
                    assert abs(p.float().std().item() - std) < 0.25 * std, (name, k)
            else:
                assert torch.all(p == (0 if kind == "zeros" else 1)), (name, k)
        assert not a[name].training
    t5 = a["text_encoder_2"]
    assert t5.encoder.embed_tokens.weight is t5.shared.weight
    assert all(b.device.type == "cpu" for _, b in a["text_encoder"].named_buffers())


def test_fp16_keeps_t5_wo_in_fp32_like_from_pretrained():
    comps = flux_dev.build_components("cpu", torch.float16, configs=SMALL)
    t5 = dict(comps["text_encoder_2"].named_parameters())
    assert {p.dtype for k, p in t5.items() if ".wo." in k} == {torch.float32}
    assert {p.dtype for k, p in t5.items() if ".wo." not in k} == {torch.float16}


def test_small_build_runs_as_a_flux_pipeline():
    from clear_cli.models import FluxPipeline

    pipe = FluxPipeline(**flux_dev.build_components("cpu", torch.float32, configs=SMALL))
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
               output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_cpu_build_refused_when_ram_is_short(monkeypatch):
    from clear_cli.errors import UsageError
    from clear_cli.models import load_pipeline

    monkeypatch.setenv("CLEAR_DEVICE_MEMORY", "48")
    with pytest.raises(UsageError) as e:
        load_pipeline("flux-dev-random", device="cpu")  # fp32: 62.8 GiB of weights, refused before allocating
    msg = e.value.one_line()
    assert "needs ~62.8 GiB" in msg and "--dtype bf16 needs ~31.4 GiB" in msg


def test_meta_device_only_for_the_random_model():
    from clear_cli.errors import ClearError
    from clear_cli.models import load_pipeline

    with pytest.raises(ClearError, match="meta"):
        load_pipeline("tiny-random", device="meta")
