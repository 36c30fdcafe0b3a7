"""The ComfyUI node without ComfyUI: key mapping, weight patches, the attention override's contract, the wrapper.

The same node runs against real ComfyUI in tests/integration/test_comfyui_real.py (opt-in: CLEAR_COMFYUI=path).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

from clear_cli.comfy.keys import block_of, lora_name, to_comfy
from clear_cli.comfy.node import apply_clear
from clear_cli.comfy.override import CALL_KEY, OVERRIDE_KEY, CallInfo, ClearPatch, settings
from clear_cli.errors import ClearError
from tests.unit.comfy_fakes import (
    PREFIX, FakeFlux, Holder, StandInPatcher, bfl_state, comfy_attention, plain_attention,
)

WINDOW = 2


# ----------------------------------------------------------------------------------------------- key mapping

def _bfl_checkpoint(n_double: int, n_single: int, hidden: int = 3072, cols: int = 2) -> dict[str, torch.Tensor]:
    """A FLUX.1 checkpoint in BFL layout, FLUX's widths in the rows diffusers' converter splits, few columns."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g)

    sd = {}
    for name in ("time_in", "vector_in", "guidance_in"):
        for layer in ("in_layer", "out_layer"):
            sd[f"{name}.{layer}.weight"], sd[f"{name}.{layer}.bias"] = t(4, cols), t(4)
    for name in ("txt_in", "img_in", "final_layer.linear"):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = t(4, cols), t(4)
    sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"] = t(4, cols), t(4)
    for i in range(n_double):
        b = f"double_blocks.{i}."
        for br in ("img", "txt"):
            sd[f"{b}{br}_mod.lin.weight"], sd[f"{b}{br}_mod.lin.bias"] = t(6, cols), t(6)
            sd[f"{b}{br}_attn.qkv.weight"], sd[f"{b}{br}_attn.qkv.bias"] = t(3 * hidden, cols), t(3 * hidden)
            sd[f"{b}{br}_attn.proj.weight"], sd[f"{b}{br}_attn.proj.bias"] = t(hidden, cols), t(hidden)
            sd[f"{b}{br}_attn.norm.query_norm.scale"], sd[f"{b}{br}_attn.norm.key_norm.scale"] = t(cols), t(cols)
            for j in (0, 2):
                sd[f"{b}{br}_mlp.{j}.weight"], sd[f"{b}{br}_mlp.{j}.bias"] = t(4, cols), t(4)
    for i in range(n_single):
        b = f"single_blocks.{i}."
        sd[f"{b}modulation.lin.weight"], sd[f"{b}modulation.lin.bias"] = t(3, cols), t(3)
        sd[f"{b}linear1.weight"], sd[f"{b}linear1.bias"] = t(7 * hidden, cols), t(7 * hidden)  # q k v + 4x mlp
        sd[f"{b}linear2.weight"], sd[f"{b}linear2.bias"] = t(hidden, cols), t(hidden)
        sd[f"{b}norm.query_norm.scale"], sd[f"{b}norm.key_norm.scale"] = t(cols), t(cols)
    return sd


def test_key_mapping_agrees_with_diffusers_single_file_converter():
    """Every attention tensor diffusers' converter makes is the slice of the ComfyUI tensor our mapping names."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    bfl = _bfl_checkpoint(n_double=2, n_single=3)
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    attn = {k: v for k, v in converted.items() if ".attn." in k}
    assert len(attn) == 2 * 20 + 3 * 8  # double: 8 projections x (w, b) + 4 norms; single: 3 x 2 + 2 norms
    for key, want in attn.items():
        ckey, offset = to_comfy(key, hidden=3072, prefix="")
        got = bfl[ckey] if offset is None else bfl[ckey].narrow(*offset)
        assert torch.equal(got, want), key
        kind = "double" if key.startswith("transformer_blocks") else "single"
        assert block_of(key) == (kind, int(key.split(".")[1]))
    # The mlp rows of linear1 are proj_mlp in diffusers: not attention, never touched by the node.
    rows = converted["single_transformer_blocks.0.proj_mlp.weight"]
    assert torch.equal(bfl["single_blocks.0.linear1.weight"][3 * 3072:], rows)


def test_key_mapping_refuses_what_comfyui_has_no_place_for():
    for key in ("transformer_blocks.0.attn.processor.spatial_weight", "transformer_blocks.0.ff.net.0.proj.weight",
                "single_transformer_blocks.1.attn.to_out.0.weight"):
        with pytest.raises(KeyError):
            to_comfy(key, 3072)
    assert lora_name("diffusion_model.double_blocks.3.img_attn.qkv.weight") == "lora_unet_double_blocks_3_img_attn_qkv"


# ----------------------------------------------------------------------------------------------- weight patches

def _student(path: Path, f: int, seed: int = 0, metadata: bool = True) -> Path:
    """tiny-random with perturbed trainable attention weights (and trained-looking pooling weights for f > 1)."""
    from clear_cli.attention.linearize import linearize, trainable_attention_parameters
    from clear_cli.models import load_pipeline
    from clear_cli.models.weights import save_attention_weights

    pipe = load_pipeline("tiny-random")
    linearize(pipe, window=WINDOW, down_factor=f)
    g = torch.Generator().manual_seed(seed)
    params = trainable_attention_parameters(pipe)
    with torch.no_grad():
        for name, p in params.items():
            scale = 0.3 if name.endswith("spatial_weight") else 0.05 * float(p.abs().mean())
            p.add_(torch.randn(p.shape, generator=g) * scale)
    meta = {"window": WINDOW, "down_factor": f, "base_model": "tiny-random"} if metadata else {}
    return save_attention_weights(path, dict(params), meta)


@pytest.fixture(scope="module")
def tiny():
    from clear_cli.models import load_pipeline

    tr = load_pipeline("tiny-random").transformer
    return tr, {k: v.detach().clone() for k, v in tr.state_dict().items()}


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    d = tmp_path_factory.mktemp("comfy_students")
    return {f: _student(d / f"student_f{f}.safetensors", f, seed=f) for f in (1, 2)}


def _patcher(base_state: dict, cfg, report_blocks: bool = False) -> StandInPatcher:
    dm = FakeFlux(n_double=cfg.num_layers, n_single=cfg.num_single_layers, heads=cfg.num_attention_heads,
                  head_dim=cfg.attention_head_dim, report_blocks=report_blocks)
    return StandInPatcher(Holder(dm, bfl_state(base_state, cfg.num_layers, cfg.num_single_layers)))


def _student_state(base_state: dict, path: Path) -> dict:
    from clear_cli.models.weights import POOL_SUFFIX, load_attention_weights

    state = dict(base_state)
    state.update({k: v for k, v in load_attention_weights(path).tensors.items() if not k.endswith(POOL_SUFFIX)})
    return state


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_attention_file_becomes_diff_patches_that_give_the_student(tiny, students, strength):
    tr, base = tiny
    cfg = tr.config
    patcher = _patcher(base, cfg)
    m = apply_clear(patcher, str(students[2]), strength=strength)
    assert not patcher.patches and patcher.model_options["transformer_options"] == {}  # the input is untouched
    got = m.patched_state()
    fused_base = bfl_state(base, cfg.num_layers, cfg.num_single_layers)
    fused_student = bfl_state(_student_state(base, students[2]), cfg.num_layers, cfg.num_single_layers)
    assert all(isinstance(v[1], tuple) and v[1][0] == "diff" for ps in m.patches.values() for v in ps)
    for key in fused_base:
        want = fused_base[key] + strength * (fused_student[key] - fused_base[key])
        assert torch.allclose(got[key], want, atol=1e-6, rtol=0), key
    # linear1's mlp rows are never patched
    for i in range(cfg.num_single_layers):
        w = got[f"{PREFIX}single_blocks.{i}.linear1.weight"][3 * tr.inner_dim:]
        assert torch.equal(w, fused_base[f"{PREFIX}single_blocks.{i}.linear1.weight"][3 * tr.inner_dim:])


def test_other_loras_stack_with_the_node(tiny, students):
    tr, base = tiny
    cfg = tr.config
    patcher = _patcher(base, cfg)
    key = f"{PREFIX}double_blocks.0.img_attn.qkv.weight"
    other = torch.full_like(patcher.model.state_dict()[key], 0.01)
    patcher.add_patches({key: ("diff", (other,))}, 1.0)  # someone's LoRA, loaded before the node
    got = apply_clear(patcher, str(students[1])).patched_state()
    student = bfl_state(_student_state(base, students[1]), cfg.num_layers, cfg.num_single_layers)
    assert torch.allclose(got[key], student[key] + other, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fmt", ["lora", "comfy"])
def test_our_loras_become_the_same_patches(tiny, students, tmp_path, fmt):
    from clear_cli.jobs.export import export

    tr, base = tiny
    cfg = tr.config
    res = export(students[2], format=fmt, energy=1.0, model="tiny-random", out=tmp_path / f"{fmt}.safetensors",
                 progress=False)
    m = apply_clear(_patcher(base, cfg), str(res.path))
    got = m.patched_state()
    want = bfl_state(_student_state(base, students[2]), cfg.num_layers, cfg.num_single_layers)
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst < 1e-5
    patch = m.model_options["transformer_options"][OVERRIDE_KEY].clear_patch
    assert (patch.settings.window, patch.settings.down_factor) == (WINDOW, 2)
    assert sorted(patch.pools) == [("double", 0), ("double", 1), ("single", 0), ("single", 1)]


def test_apply_weights_off_reads_geometry_and_pools_only(tiny, students, tmp_path):
    from clear_cli.jobs.export import export

    tr, base = tiny
    res = export(students[2], format="comfy", rank=4, model="tiny-random", out=tmp_path / "c.safetensors", progress=False)
    m = apply_clear(_patcher(base, tr.config), str(res.path), apply_weights=False)
    assert not m.patches
    patch = m.model_options["transformer_options"][OVERRIDE_KEY].clear_patch
    from clear_cli.comfy.patches import load_weights, pool_weights

    want = pool_weights(load_weights(students[2]))
    assert all(torch.equal(patch.pools[b], want[b]) for b in want) and len(patch.pools) == 4


def test_node_refuses_what_it_cannot_do(tiny, students, tmp_path, caplog):
    tr, base = tiny
    cfg = tr.config
    small = _patcher(base, cfg)
    del small.model._fused[f"{PREFIX}single_blocks.1.linear1.weight"]  # a model with fewer blocks than the file
    with pytest.raises(ClearError, match="single_blocks.1.linear1"):
        apply_clear(small, str(students[1]))
    m = apply_clear(_patcher(base, cfg), str(students[1]))
    with pytest.raises(ClearError, match="already applied"):
        apply_clear(m, str(students[1]))
    with pytest.raises(ClearError, match="pooling weights"):
        apply_clear(_patcher(base, cfg), str(students[2]), down_factor=4)
    with caplog.at_level(logging.WARNING, "clear_cli.comfy"):  # another window: allowed, said once
        m = apply_clear(_patcher(base, cfg), str(students[1]), window=5)
    assert m.model_options["transformer_options"][OVERRIDE_KEY].clear_patch.settings.window == 5
    assert sum("window 5" in r.getMessage() for r in caplog.records) == 1
    renamed = tmp_path / "mine.safetensors"
    renamed.write_bytes(_student(tmp_path / "x.safetensors", 1, metadata=False).read_bytes())
    with pytest.raises(ClearError, match="window"):  # no metadata, no name to read r from: never guessed
        apply_clear(_patcher(base, cfg), str(renamed))


def test_ntk_factor_scales_rope_theta_by_an_object_patch(tiny):
    tr, base = tiny
    patcher = _patcher(base, tr.config)
    m = apply_clear(patcher, None, window=3, ntk_factor=10.0)
    assert m.get_model_object("diffusion_model.pe_embedder").theta == 100000
    assert patcher.get_model_object("diffusion_model.pe_embedder").theta == 10000


# ----------------------------------------------------------------------------------------------- the override

def _qkv(b=2, heads=2, text=5, grid=(4, 6), d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = text + grid[0] * grid[1]
    return [torch.randn(b, heads, n, d, generator=g) for _ in range(3)]


def _call(patch, text=5, grid=(4, 6), **extra) -> dict:
    return {CALL_KEY: CallInfo(patch=patch, text_len=text, grid=grid), **extra}


@pytest.mark.parametrize("f", [1, 2])
def test_override_computes_clear_in_comfyui_layouts(f):
    from clear_cli.attention.reference import reference_attention

    pools = {("single", 3): torch.tensor([[0.1, 0.2], [0.3, 0.4]])} if f > 1 else {}
    patch = ClearPatch(settings(WINDOW, f, "tiled"), pools)
    q, k, v = _qkv()
    want = reference_attention(q, k, v, text_len=5, grid=(4, 6), window=WINDOW, down_factor=f,
                               down_weight=pools.get(("single", 3)))
    opts = _call(patch, block_type="single", block_index=3)
    patch.install(opts)
    out = comfy_attention(q, k, v, 2, transformer_options=opts)  # FLUX's call: skip_reshape, [B, L, H*D] out
    assert out.shape == (2, 29, 16)
    assert torch.allclose(out, want.transpose(1, 2).reshape(2, 29, 16), atol=1e-5)
    ov = opts[OVERRIDE_KEY]
    flat = [t.transpose(1, 2).reshape(2, 29, 16) for t in (q, k, v)]
    out = ov(plain_attention, *flat, 2, skip_reshape=False, skip_output_reshape=True, transformer_options=opts)
    assert out.shape == (2, 2, 29, 8) and torch.allclose(out, want, atol=1e-5)


def test_override_steps_aside_with_one_warning_per_kind(caplog):
    patch = ClearPatch(settings(WINDOW, 1, "tiled"))
    previous_calls = []

    def previous(func, *args, **kwargs):
        previous_calls.append(kwargs.get("mask"))
        return func(*args, **kwargs)

    q, k, v = _qkv()
    cases = [
        ("mask", _call(patch), torch.zeros(29, 29)),                                   # an attention mask
        ("do not add up", _call(patch, text=7), None),                                 # lengths (e.g. extra tokens)
        ("without the CLEAR wrapper", {}, None),                                       # no geometry at all
        ("Kontext", {CALL_KEY: CallInfo(patch=patch, reason="reference-image tokens (Kontext)")}, None),
    ]
    for words, opts, mask in cases:
        previous_calls.clear()
        opts[OVERRIDE_KEY] = patch.override_over(previous)
        with caplog.at_level(logging.WARNING, "clear_cli.comfy"):
            caplog.clear()
            for _ in range(3):
                out = comfy_attention(q, k, v, 2, transformer_options=opts, mask=mask)
        want = plain_attention(q, k, v, 2, mask=mask, skip_reshape=True)
        assert torch.allclose(out, want, atol=1e-6), words
        assert len(previous_calls) == 3, words
        assert len(caplog.records) == 1 and words in caplog.records[0].getMessage(), words
    patch.reset()  # ON_CLEANUP: the next run warns again
    with caplog.at_level(logging.WARNING, "clear_cli.comfy"):
        caplog.clear()
        comfy_attention(q, k, v, 2, transformer_options=cases[0][1], mask=cases[0][2])
    assert len(caplog.records) == 1
    # without a previous override the backend itself runs
    opts = {OVERRIDE_KEY: patch.override_over(None)}
    assert torch.allclose(comfy_attention(q, k, v, 2, transformer_options=opts),
                          plain_attention(q, k, v, 2, skip_reshape=True), atol=1e-6)


def test_override_chains_and_stays_on_top():
    patch = ClearPatch(settings(WINDOW, 1, "tiled"))
    seen = []

    def foreign(func, *args, **kwargs):
        seen.append("foreign")
        return func(*args, **kwargs)

    opts = {OVERRIDE_KEY: foreign}
    patch.install(opts)
    ours = opts[OVERRIDE_KEY]
    assert ours is not foreign and ours in patch.installed
    patch.install(opts)
    assert opts[OVERRIDE_KEY] is ours  # idempotent
    # ModelPatcher.clone deep-copies model_options: the override (and the wrapper's patch) must survive it as itself
    assert copy.deepcopy({"t": opts})["t"][OVERRIDE_KEY] is ours
    assert copy.deepcopy({"w": [patch.wrapper]})["w"][0].__self__ is patch
    # a node applied later that does not chain: ON_PREPARE_STATE puts ours back on top, chained to it
    later = {"transformer_options": {OVERRIDE_KEY: foreign}}
    patch.prepare_state(None, 0.5, later)
    top = later["transformer_options"][OVERRIDE_KEY]
    assert top in patch.installed
    q, k, v = _qkv()
    comfy_attention(q, k, v, 2, transformer_options={**later["transformer_options"]}, mask=torch.zeros(29, 29))
    assert seen == ["foreign"]  # stepped aside to the one below
    seen.clear()
    comfy_attention(q, k, v, 2, transformer_options={**later["transformer_options"], **_call(patch)})
    assert seen == []  # CLEAR ran itself


# ----------------------------------------------------------------------------------------------- the wrapper

def _pools(n=2):
    return {(kind, i): torch.tensor([[0.1 + i, 0.2], [0.3, 0.4 - i / 10]]) + (kind == "single")
            for kind in ("double", "single") for i in range(n)}


@pytest.mark.parametrize("report_blocks", [False, True])
def test_wrapper_gives_each_call_its_grid_and_block(report_blocks):
    """Latent 12 x 16 (6 x 8 tokens), 5 text tokens; pooling weights per block from hooks or ComfyUI's own keys."""
    from clear_cli.attention.reference import reference_attention

    pools = _pools()
    dm = FakeFlux(heads=2, head_dim=8, report_blocks=report_blocks)
    patcher = StandInPatcher(Holder(dm, {}))
    m = apply_clear(patcher, None, window=WINDOW, down_factor=2, backend="tiled")
    patch = m.model_options["transformer_options"][OVERRIDE_KEY].clear_patch
    patch.pools = pools  # as a file would give them
    caller = dict(m.model_options["transformer_options"])
    for _ in range(2):  # the second call: hooks only where ComfyUI does not report the block
        dm.log.clear()
        m.run(torch.zeros(1, 16, 12, 16), torch.zeros(1, 5, 4), transformer_options=caller)
        assert [(kind, i) for kind, i, _ in dm.log] == [("double", 0), ("double", 1), ("single", 0), ("single", 1)]
        for kind, i, out in dm.log:
            g = torch.Generator().manual_seed(100 + i + (50 if kind == "single" else 0))
            q, k, v = torch.randn(3, 1, 2, 5 + 48, 8, generator=g)
            want = reference_attention(q, k, v, text_len=5, grid=(6, 8), window=WINDOW, down_factor=2,
                                       down_weight=pools[(kind, i)])
            assert torch.allclose(out, want.transpose(1, 2).reshape(1, 53, 16), atol=1e-5), (kind, i)
    assert CALL_KEY not in caller  # the caller's options are never written to
    assert patch.native_blocks is report_blocks
    assert not any(b._forward_pre_hooks for b in list(dm.double_blocks) + list(dm.single_blocks))


def test_wrapper_steps_aside_for_reference_images_and_ragged_pooling(caplog):
    dm = FakeFlux(heads=2, head_dim=8)
    m = apply_clear(StandInPatcher(Holder(dm, {})), None, window=WINDOW, down_factor=2, backend="tiled")
    caplog.clear()
    with caplog.at_level(logging.WARNING, "clear_cli.comfy"):
        m.run(torch.zeros(1, 16, 8, 8), torch.zeros(1, 3, 4), ref_latents=[torch.zeros(1, 16, 8, 8)])
        m.run(torch.zeros(1, 16, 14, 8), torch.zeros(1, 3, 4))  # 7 x 4 tokens: f = 2 does not divide 7
    text = [r.getMessage() for r in caplog.records]
    assert len(text) == 2 and "reference-image" in text[0] and "7x4 token grid" in text[1]
    for _, _, out in dm.log:  # every call ran the previous (here: the backend's) attention
        assert out.shape[-1] == 16


def test_non_flux_models_get_the_previous_attention(caplog):
    class Other(FakeFlux):
        pass

    dm = Other(heads=2, head_dim=8)
    with caplog.at_level(logging.WARNING, "clear_cli.comfy"):
        m = apply_clear(StandInPatcher(Holder(dm, {})), None, window=WINDOW)
        m.run(torch.zeros(1, 16, 8, 8), torch.zeros(1, 3, 4))
    assert any("not ComfyUI's FLUX.1" in r.getMessage() for r in caplog.records)
    assert len(dm.log) == 4


# ----------------------------------------------------------------------------------------------- end to end

class ComfyContractProcessor:
    """A diffusers FluxAttention processor that hands attention to ComfyUI's dispatch (override contract):
    q, k, v after norms and RoPE as [B, heads, T + H*W, D], text first; block_type / block_index reported."""

    def __init__(self, kind: str, index: int, options: dict):
        self.kind, self.index, self.options = kind, index, options

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)))
        k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1)))
        v = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if encoder_hidden_states is not None:
            eq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1)))
            ek = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1)))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1))
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        self.options.update(block_type=self.kind, block_index=self.index)
        out = comfy_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn.heads,
                              transformer_options=self.options)
        if encoder_hidden_states is None:
            return out
        t = encoder_hidden_states.shape[1]
        return attn.to_out[1](attn.to_out[0](out[:, t:])), attn.to_add_out(out[:, :t])


@pytest.mark.parametrize("f", [1, 2])
def test_node_override_equals_linearize_on_the_tiny_model(students, f):
    """The node's override inside a FLUX forward gives what `clear_cli.linearize` gives on the same weights."""
    from clear_cli.attention.linearize import attention_modules, linearize
    from clear_cli.comfy.patches import load_weights, pool_weights
    from clear_cli.models.weights import POOL_SUFFIX, apply_attention_weights, load_attention_weights, load_tensors
    from tests.unit.tiny_flux_inputs import build_transformer, inputs

    w = load_attention_weights(students[f])
    ref = build_transformer()
    linearize(ref, window=WINDOW, down_factor=f, backend="tiled")
    apply_attention_weights(ref, w)
    x = inputs(batch=2, grid=(6, 8), text_len=5)
    with torch.no_grad():
        want = ref(**x, return_dict=False)[0]

    model = build_transformer()
    load_tensors(model, {k: v for k, v in w.tensors.items() if not k.endswith(POOL_SUFFIX)})
    patch = ClearPatch(settings(WINDOW, f, "tiled"), pool_weights(load_weights(students[f])))
    options = _call(patch, text=5, grid=(6, 8))
    patch.install(options)
    n_double = model.config.num_layers
    for i, attn in enumerate(attention_modules(model)):
        kind, idx = ("double", i) if i < n_double else ("single", i - n_double)
        attn.set_processor(ComfyContractProcessor(kind, idx, options))
    with torch.no_grad():
        got = model(**x, return_dict=False)[0]
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_node_class_reruns_when_the_file_changes(students, tmp_path):
    from clear_cli.comfy.node import NODE_CLASS_MAPPINGS, ClearAttention

    assert NODE_CLASS_MAPPINGS["ClearAttention"] is ClearAttention
    path = tmp_path / "w.safetensors"
    path.write_bytes(students[1].read_bytes())
    before = ClearAttention.IS_CHANGED(weights="none", weights_path=str(path), strength=1.0)
    path.write_bytes(students[2].read_bytes())
    assert ClearAttention.IS_CHANGED(weights="none", weights_path=str(path)) != before
    assert ClearAttention.IS_CHANGED(weights_path="Huage001/CLEAR:clear_local_16.safetensors") == \
        "Huage001/CLEAR:clear_local_16.safetensors"


def test_node_apply_reports_errors_in_the_nodes_words(tiny, tmp_path):
    from clear_cli.comfy.node import ClearAttention

    tr, base = tiny
    renamed = tmp_path / "mine.safetensors"
    renamed.write_bytes(_student(tmp_path / "x.safetensors", 1, metadata=False).read_bytes())
    with pytest.raises(ValueError, match=r"^CLEAR Attention: .*pass window with") as e:
        ClearAttention().apply(_patcher(base, tr.config), "none", 1.0, 0, 0, "tiled", weights_path=str(renamed))
    assert "--" not in str(e.value)
    (m,) = ClearAttention().apply(_patcher(base, tr.config), "none", 1.0, 3, 0, "tiled", weights_path=str(renamed))
    assert m.model_options["transformer_options"][OVERRIDE_KEY].clear_patch.settings.window == 3
