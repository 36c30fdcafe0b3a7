"""`StageRunner` for Qwen-Image pipelines: the same cascade (base stage with the original model, SDEdit refinement
stages with CLEAR), with QwenImagePipeline's own conventions for prompts (embeddings + padding mask), latents
(2x2 packing of [B, C, 1, h, w] latents, per-channel mean/std), `img_shapes` and the transformer call. Guidance is
Qwen-Image's: no guidance embedding; `true_cfg_scale` needs a negative prompt, which `clear gen` does not take.
"""

from __future__ import annotations

from clear_cli.errors import ClearError
from clear_cli.sampling.plan import Stage
from clear_cli.sampling.runner import StageRunner


class QwenStageRunner(StageRunner):
    def encode_prompt(self, prompt: str):
        return self.pipe.encode_prompt(prompt=[prompt], device=self.device, num_images_per_prompt=1,
                                       max_sequence_length=self.text_len)

    def _stats(self, ref):
        cfg = self.pipe.vae.config
        mean = self.torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(ref.device, ref.dtype)
        std = self.torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(ref.device, ref.dtype)
        return mean, std

    def noise(self, w: int, h: int, dtype, generator):
        pipe = self.pipe
        c = pipe.transformer.config.in_channels // 4
        latents = pipe.prepare_latents(1, c, h, w, dtype, self.device, generator)
        f = pipe.vae_scale_factor * 2
        return latents, [[(1, h // f, w // f)]]

    def decode(self, latents, w: int, h: int):
        pipe = self.pipe
        lat = pipe._unpack_latents(latents, h, w, pipe.vae_scale_factor).to(pipe.vae.dtype)
        mean, std = self._stats(lat)
        with self.torch.no_grad():
            return pipe.vae.decode(lat * std + mean, return_dict=False)[0][:, :, 0]

    def encode_image(self, image, w: int, h: int, dtype):
        import torch.nn.functional as F

        pipe = self.pipe
        x = F.interpolate(image.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(-1, 1).to(device=self.device, dtype=pipe.vae.dtype)[:, :, None]
        with self.torch.no_grad():
            lat = pipe.vae.encode(x).latent_dist.mode()
        mean, std = self._stats(lat)
        lat = (lat - mean) / std
        b, c, _, lh, lw = lat.shape
        return pipe._pack_latents(lat[:, :, 0].to(dtype), b, c, lh, lw)

    def denoise(self, latents, ids, stage: Stage, embeds, generator_desc: str, progress: bool):
        from diffusers import FlowMatchEulerDiscreteScheduler
        from tqdm.auto import tqdm

        torch = self.torch
        prompt_embeds, mask = embeds
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
        bar = tqdm(total=len(sched.timesteps), desc=generator_desc, disable=not progress, leave=False,
                   unit="step", dynamic_ncols=True)
        with torch.no_grad(), bar:
            for t in sched.timesteps:
                timestep = t.expand(latents.shape[0]).to(latents.dtype)
                v = tr(hidden_states=latents, timestep=timestep / 1000, encoder_hidden_states=prompt_embeds,
                       encoder_hidden_states_mask=mask, img_shapes=ids, return_dict=False)[0]
                latents = sched.step(v, t, latents, return_dict=False)[0]
                bar.update()
        return latents


def runner_class(pipe) -> type[StageRunner]:
    """The StageRunner for a pipeline's family (Qwen-Image's conventions, else FLUX's)."""
    from clear_cli.attention.adapters import adapter_for

    adapter = adapter_for(pipe.transformer)
    return QwenStageRunner if adapter is not None and adapter.family == "qwen-image" else StageRunner
