"""Running a plan's stages on one FluxPipeline: the model switched between the original (full attention) and CLEAR.

`StageRunner` holds the pipeline and the student weights; `run_stages` draws one image through every stage of a
plan (`clear_cli.sampling.plan`): the base stage with the original model, refinement stages decoded, resized,
encoded and re-noised to their start sigma, then denoised with CLEAR attention, RoPE NTK and proportional
attention. `clear_cli.parallel.generation.PatchRunner` subclasses it to split each CLEAR stage over processes.
"""

from __future__ import annotations

import time

from clear_cli.errors import ClearError, UsageError
from clear_cli.logs import Log
from clear_cli.sampling.plan import Stage


class StageRunner:
    """Holds the pipeline and switches it between the original model and the CLEAR model.

    `generate` uses it per image: encode_prompt once, run_stages (per stage: use() the attention it needs, with
    RoPE NTK [--ntk-factor] and proportional attention above the base; noise or encode_image + SDEdit noise
    [--strength]; denoise [--steps, --refine-steps, --guidance, --refine-guidance]), then to_pil; restore() puts
    the original processors back. flops() gives each stage's attention work for the log.
    """

    def __init__(self, pipe, window: int, down_factor: int, backend: str, weights, train_seq_len: int):
        import torch

        self.pipe = pipe
        self.torch = torch
        self.window, self.down_factor, self.backend = window, down_factor, backend
        self.weights = weights
        self.train_seq_len = train_seq_len
        self.student: dict[str, torch.Tensor] | None = None
        self.original: dict[str, torch.Tensor] | None = None
        self.mode: tuple | None = None
        self.vae_tiling = bool(getattr(pipe.vae, "use_tiling", False))
        self.device = pipe._execution_device
        from clear_cli.models import text_len

        self.text_len = text_len(pipe)
        tr = pipe.transformer
        self.d_model = int(tr.config.num_attention_heads * tr.config.attention_head_dim)
        from clear_cli.attention.linearize import attention_modules

        self.n_layers = len(attention_modules(tr))

    # -- model state ---------------------------------------------------------------------------------------
    def use(self, attention: str, ntk: float | None, proportional: bool) -> None:
        """Full attention with the original weights (+ optional NTK RoPE), or CLEAR with the student weights."""
        from clear_cli.attention.adapters import adapter_for
        from clear_cli.attention.linearize import linearize, unlinearize
        from clear_cli.models.weights import POOL_SUFFIX, load_tensors, materialize

        key = (attention, ntk, proportional)
        if self.mode == key:
            return
        tr = self.pipe.transformer
        rope = adapter_for(tr)   # the family's RoPE rule (FLUX: attention/rope.py)
        if attention == "full":
            unlinearize(tr)
            if self.original is not None:
                load_tensors(tr, self.original)
            if ntk is not None:
                rope.scale_rope(tr, ntk)
            else:
                rope.restore_rope(tr)
        else:
            rope.restore_rope(tr)
            try:
                linearize(tr, self.window, self.down_factor, self.backend, proportional_attention=proportional,
                          train_seq_len=self.train_seq_len, ntk_factor=ntk)
            except ValueError as e:
                raise UsageError(str(e)) from e
            if self.weights is not None:
                if self.student is None:  # first time: the transformer holds the base weights now
                    self.student = materialize(tr, self.weights)
                    previous = load_tensors(tr, self.student)
                    # pooling weights live in the CLEAR processors: the original model has none to restore
                    self.original = {k: v for k, v in previous.items() if not k.endswith(POOL_SUFFIX)}
                else:
                    load_tensors(tr, self.student)
        self.mode = key

    def restore(self) -> None:
        """Leave the pipeline as it came: stock attention and RoPE, the base weights."""
        from clear_cli.attention.adapters import adapter_for
        from clear_cli.attention.linearize import unlinearize
        from clear_cli.models.weights import load_tensors

        tr = self.pipe.transformer
        unlinearize(tr)
        adapter_for(tr).restore_rope(tr)
        if self.original is not None:
            load_tensors(tr, self.original)
        if not self.vae_tiling and getattr(self.pipe.vae, "use_tiling", False):
            self.pipe.vae.disable_tiling()
        self.mode = None

    # -- pieces --------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str):
        return self.pipe.encode_prompt(prompt=[prompt], prompt_2=None, device=self.device, num_images_per_prompt=1,
                                       max_sequence_length=self.text_len)

    def noise(self, w: int, h: int, dtype, generator):
        c = self.pipe.transformer.config.in_channels // 4
        return self.pipe.prepare_latents(1, c, h, w, dtype, self.device, generator)

    def decode(self, latents, w: int, h: int):
        pipe = self.pipe
        lat = pipe._unpack_latents(latents, h, w, pipe.vae_scale_factor)
        lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        with self.torch.no_grad():
            return pipe.vae.decode(lat.to(pipe.vae.dtype), return_dict=False)[0]

    def encode_image(self, image, w: int, h: int, dtype):
        import torch.nn.functional as F

        pipe = self.pipe
        x = F.interpolate(image.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(-1, 1).to(device=self.device, dtype=pipe.vae.dtype)
        with self.torch.no_grad():
            lat = pipe.vae.encode(x).latent_dist.mode()
        lat = (lat - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        b, c, lh, lw = lat.shape
        return pipe._pack_latents(lat.to(dtype), b, c, lh, lw)

    def denoise(self, latents, ids, stage: Stage, embeds, generator_desc: str, progress: bool):
        from clear_cli.logs import progress_bar as tqdm

        torch = self.torch
        from diffusers import FlowMatchEulerDiscreteScheduler

        prompt_embeds, pooled, text_ids = embeds
        # A scheduler that applies no shift of its own: the planned sigmas are already shifted.
        sched = FlowMatchEulerDiscreteScheduler.from_config(
            self.pipe.scheduler.config, use_dynamic_shifting=False, shift=1.0, shift_terminal=None,
            use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, invert_sigmas=False,
            stochastic_sampling=False)
        sched.set_timesteps(sigmas=stage.sigmas, device=self.device)
        if abs(float(sched.sigmas[0]) - stage.start_sigma) > 1e-4:
            raise ClearError(f"stage {stage.index}: the scheduler starts at sigma {float(sched.sigmas[0]):.4f}, "
                             f"planned {stage.start_sigma:.4f}")
        sched.set_begin_index(0)
        tr = self.pipe.transformer
        guidance = None
        if tr.config.guidance_embeds:
            guidance = torch.full([latents.shape[0]], stage.guidance, device=self.device, dtype=torch.float32)
        bar = tqdm(total=len(sched.timesteps), desc=generator_desc, disable=not progress, leave=False,
                   unit="step", dynamic_ncols=True)
        with torch.no_grad(), bar:
            for t in sched.timesteps:
                timestep = t.expand(latents.shape[0]).to(latents.dtype)
                v = tr(hidden_states=latents, timestep=timestep / 1000, guidance=guidance, pooled_projections=pooled,
                       encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
                latents = sched.step(v, t, latents, return_dict=False)[0]
                bar.update()
        return latents

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def flops(self, stage: Stage, attention: str) -> tuple[float, float]:
        """(attention FLOPs of the stage as run, the same with full attention): all layers and steps, one image."""
        from clear_cli.attention import attention_flops, count_pairs
        from clear_cli.attention.counting import full_pairs

        grid = stage.grid
        full = attention_flops(full_pairs(grid, self.text_len), self.d_model)
        if attention == "clear":
            run = attention_flops(count_pairs(grid, self.text_len, self.window, self.down_factor), self.d_model)
        else:
            run = full
        k = self.n_layers * stage.steps
        return run * k, full * k

    # -- one image -------------------------------------------------------------------------------------------
    def run_stages(self, stages: list[Stage], prompt: str, seed: int, embeds, *, attention_override: str | None,
                   start_latents=None, progress: bool, log: Log, tag: str = ""):
        """Run `stages` (from the first, or from `start_latents` = output of stages[0]).

        Returns (final latents, per-stage records, the first stage's output latents).
        """
        torch = self.torch
        dtype = self.pipe.transformer.dtype
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = first = None
        records = []
        prev: Stage | None = None
        for st in stages:
            attention = st.attention if attention_override is None or st.kind == "base" else attention_override
            if st.index == 0 and start_latents is not None:
                # same seed: consume the base stage's noise draw so later draws match the first run's
                self.noise(st.width, st.height, dtype, generator)
                latents, prev, first = start_latents, st, start_latents
                continue
            self.use(attention, st.ntk_factor, st.proportional if attention == "clear" else False)
            self.sync()
            t0 = time.perf_counter()
            noise, ids = self.noise(st.width, st.height, dtype, generator)
            if st.kind == "refine":
                assert prev is not None and latents is not None
                if st.width * st.height > 1024 * 1024:
                    self.pipe.vae.enable_tiling()
                image = self.decode(latents, prev.width, prev.height)
                x0 = self.encode_image(image, st.width, st.height, dtype)
                s = st.start_sigma
                latents = (1.0 - s) * x0 + s * noise  # flow matching: x_t = (1 - s) x0 + s noise
            else:
                latents = noise
            n = len(stages)
            desc = f"{tag}stage {st.index + 1}/{n} {st.width}x{st.height}"
            latents = self.denoise(latents, ids, st, embeds, desc, progress)
            if first is None:
                first = latents
            self.sync()
            dt = time.perf_counter() - t0
            run_f, full_f = self.flops(st, attention)
            saved = 0.0 if full_f == 0 else 100.0 * (1 - run_f / full_f)
            h, w = st.grid
            what = "full attention" if attention == "full" else (
                f"CLEAR r={self.window}" + (f" f={self.down_factor}" if self.down_factor > 1 else ""))
            extra = ""
            if st.kind == "refine":
                extra = (f", strength {st.strength:g} (stock dynamic shift would start at "
                         f"{st.stock_start_sigma:.3f})")
            ntk = f", NTK x{st.ntk_factor:g}" if st.ntk_factor else ""
            prop = ", proportional attention" if attention == "clear" and st.proportional else ""
            log(f"  {tag}stage {st.index + 1}/{n} {st.kind:<6} {st.width}x{st.height} ({w}x{h} tokens) {what}{ntk}"
                f"{prop}: start sigma {st.start_sigma:.3f}{extra}, {st.steps} steps, {dt:.1f} s, attention "
                f"{_tflop(run_f)} vs {_tflop(full_f)} full ({saved:.1f}% saved)")
            records.append({**st.to_dict(), "attention": attention, "seconds": round(dt, 3),
                            "attention_tflop": run_f / 1e12, "full_attention_tflop": full_f / 1e12})
            prev = st
        return latents, records, first

    def to_pil(self, latents, w: int, h: int):
        if w * h > 1024 * 1024:
            self.pipe.vae.enable_tiling()
        image = self.decode(latents, w, h)
        return self.pipe.image_processor.postprocess(image, output_type="pil")[0]


def _tflop(x: float) -> str:
    return f"{x / 1e12:.3g} TFLOP" if x >= 1e12 else f"{x / 1e9:.3g} GFLOP"
