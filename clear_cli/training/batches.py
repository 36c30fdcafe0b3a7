"""Training batches from a synth set, as a deterministic function of (seed, step): resume- and process-count-proof.

Step s draws its global batch (sample order, sigmas, noise, latent samples) from generators seeded by (seed, s)
alone, the same on every process and after every resume; process p takes its micro batches as fixed slices of
it. So a run resumed at step s, or spread over any number of processes, sees exactly the same data.

Inputs are built exactly as diffusers' FluxPipeline builds them: latents `(z - shift) * scale`, packed 2x2 with
`FluxPipeline._pack_latents`, image ids from `FluxPipeline._prepare_latent_image_ids`, text ids zeros, timestep
= sigma (the transformer multiplies by 1000), the guidance embedding a constant.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across machines and Python versions, unlike hash())."""
    digest = hashlib.sha256(":".join(str(p) for p in ("clear-distill", *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def sample_order(seed: int, step: int, batch_size: int, n: int) -> list[int]:
    """Dataset positions of step `step`'s global batch: epoch after epoch of seeded permutations of range(n)."""
    out: list[int] = []
    perms: dict[int, list[int]] = {}
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch = pos // n
        if epoch not in perms:
            g = torch.Generator().manual_seed(derived_seed(seed, "epoch", epoch))
            perms[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(perms[epoch][pos % n])
    return out


def training_sigmas(num_train_timesteps: int = 1000) -> torch.Tensor:
    """FLUX's unshifted training sigmas: t/N for t = 1..N (what FlowMatchEulerDiscreteScheduler holds before any
    shift; no static or dynamic shift is applied, as the authors)."""
    return torch.arange(1, num_train_timesteps + 1, dtype=torch.float64).div(num_train_timesteps).float()


def draw_sigmas(kind: str, n: int, generator: torch.Generator, *, num_train_timesteps: int = 1000,
                logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """`n` sigmas: uniform over the unshifted training sigmas, or logit-normal (sigmoid of a normal)."""
    if kind == "uniform":
        table = training_sigmas(num_train_timesteps)
        return table[torch.randint(0, len(table), (n,), generator=generator)]
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator) * logit_std + logit_mean)
    raise ValueError(f"unknown timestep sampling {kind!r} (uniform or logit_normal)")


def pack_latents(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C, H, W] latents -> (packed [B, H/2 * W/2, 4C], image ids [H/2 * W/2, 3]) exactly as FluxPipeline."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even for 2x2 packing, got {h}x{w}")
    packed = FluxPipeline._pack_latents(latents, b, c, h, w)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    return packed, ids


@dataclass
class Batch:
    """One micro batch, ready for the transformer (all on one device)."""

    x0: torch.Tensor  # packed clean latents [b, L, 4C] (fp32)
    noise: torch.Tensor  # packed noise, same shape
    sigmas: torch.Tensor  # [b]
    t5: torch.Tensor  # [b, T, D]
    pooled: torch.Tensor  # [b, D_clip]
    img_ids: torch.Tensor  # [L, 3]
    txt_ids: torch.Tensor  # [T, 3]
    indices: list[int]  # dataset positions (for logs and tests)
    text_mask: torch.Tensor | None = None  # [b, T] bool of real text tokens (Qwen-Image); None: FLUX, no mask
    grid: tuple[int, int] = (0, 0)  # (H, W) token grid of the packed latents

    @property
    def size(self) -> int:
        return int(self.x0.shape[0])

    def noisy(self) -> torch.Tensor:
        """x_t = (1 - s) x0 + s noise."""
        s = self.sigmas.view(-1, 1, 1).to(self.x0.dtype)
        return (1 - s) * self.x0 + s * self.noise

    def target(self) -> torch.Tensor:
        """The flow-matching velocity FLUX predicts: noise - x0."""
        return self.noise - self.x0


class BatchSource:
    """Builds step `s`'s micro batch `m` for process `p` of `P` from a SynthDataset."""

    def __init__(self, dataset, *, seed: int, batch_size: int, latents: str = "sample", timesteps: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0, num_train_timesteps: int = 1000):
        self.ds = dataset
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.sample_latents = latents == "sample"
        self.timesteps = timesteps
        self.logit = (float(logit_mean), float(logit_std))
        self.num_train_timesteps = int(num_train_timesteps)
        self._step_cache: tuple[int, dict] | None = None

    def _global(self, step: int) -> dict:
        """The random draws of a whole global batch (cached for the step's micro batches)."""
        if self._step_cache is not None and self._step_cache[0] == step:
            return self._step_cache[1]
        order = sample_order(self.seed, step, self.batch_size, len(self.ds))
        g = torch.Generator().manual_seed(derived_seed(self.seed, "step", step))
        sigmas = draw_sigmas(self.timesteps, self.batch_size, g, num_train_timesteps=self.num_train_timesteps,
                             logit_mean=self.logit[0], logit_std=self.logit[1])
        draws = {"order": order, "sigmas": sigmas, "noise_seeds": torch.randint(0, 2**62, (self.batch_size, 2),
                                                                                generator=g).tolist()}
        self._step_cache = (step, draws)
        return draws

    def micro(self, step: int, micro: int, process: int, num_processes: int, accumulation: int,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Batch:
        """Micro batch `micro` (of `accumulation`) of process `process`: a fixed slice of step's global batch.

        Latents and noise stay fp32 (the target noise - x0 is formed in fp32); conditioning is cast to `dtype`.
        """
        mb = self.batch_size // (num_processes * accumulation)
        start = (micro * num_processes + process) * mb
        draws = self._global(step)
        x0s, noises, t5s, pooleds, masks, idx = [], [], [], [], [], []
        for j in range(start, start + mb):
            item = self.ds[draws["order"][j]]
            # Per-sample generators: noise and latent samples do not depend on how the batch is sliced.
            g_noise = torch.Generator().manual_seed(draws["noise_seeds"][j][0])
            g_lat = torch.Generator().manual_seed(draws["noise_seeds"][j][1])
            z = self.ds.model_latents(item, sample=self.sample_latents, generator=g_lat).float()
            x0s.append(z)
            noises.append(torch.randn(z.shape, generator=g_noise, dtype=torch.float32))
            t5s.append(item["t5_embeds"])
            if "text_mask" in item:   # Qwen-Image data: no pooled embedding, a padding mask
                masks.append(item["text_mask"])
            else:
                pooleds.append(item["pooled_embeds"])
            idx.append(draws["order"][j])
        x0, img_ids = pack_latents(torch.stack(x0s))
        noise, _ = pack_latents(torch.stack(noises))
        t5 = torch.stack(t5s)
        pooled = torch.stack(pooleds).to(device, dtype) if pooleds else torch.zeros(len(idx), 0, device=device)
        return Batch(
            x0=x0.to(device), noise=noise.to(device),
            sigmas=draws["sigmas"][start:start + mb].to(device), t5=t5.to(device, dtype),
            pooled=pooled, img_ids=img_ids.to(device, dtype),
            txt_ids=torch.zeros(t5.shape[1], 3, device=device, dtype=dtype), indices=idx,
            text_mask=torch.stack(masks).to(device) if masks else None,
            grid=(x0s[0].shape[-2] // 2, x0s[0].shape[-1] // 2),
        )
