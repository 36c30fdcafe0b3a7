"""`clear synth`: the teacher draws its own training set (or imports one), resumable, over many processes.

Sample i gets prompt i and a seed derived from (seed, i); samples are cut into fixed chunks of `batch_size`
indices and chunks are dealt to processes, so the set never depends on how many processes drew it. Each chunk
is committed atomically (clear_cli/data/store.py); rerunning the same command skips finished chunks.
The on-disk format is described in docs/dataset.md.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from clear_cli.config import doc, merge_options
from clear_cli.data import layout, store
from clear_cli.errors import ClearError, UsageError
from clear_cli.files import OutLock, atomic_write_text, foreign_entries, temp_path
from clear_cli.flux import DEFAULT_MODEL
from clear_cli.logs import Log, sayer

IMAGE_FORMATS = ("png", "webp")
MAX_N = 10**8  # indices, seeds and batch lists are built for every sample; beyond this they outgrow memory
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass
class SynthConfig:
    """Everything `clear synth` needs; the fields that shape the data are recorded in the dataset card."""

    n: int | None = doc(None, "samples; built-in prompts need it, a prompt file or image folder defaults to all")
    model: str = doc(DEFAULT_MODEL, "the teacher: hub id, local diffusers dir, tiny or tiny-random")
    prompts: str = doc("builtin", "builtin, or a .txt (a prompt a line), .jsonl or .csv file")
    prompt_column: str = doc("prompt", "field of a .jsonl file / column of a .csv file holding the prompt")
    res: str = doc("1k", "resolution: 1k, 2k, a size like 768 (multiple of 16) or WxH")
    steps: int = doc(28, "denoising steps per image")
    guidance: float = doc(3.5, "guidance (FLUX.1-dev's guidance embedding)")
    seed: int = doc(0, "base seed; sample i uses a seed derived from (seed, i)")
    out: str = doc("out/synth", "dataset directory")
    batch_size: int = doc(4, "images per batch (a batch is the unit of resume; fixed for a dataset)")
    cache_embeddings: bool = doc(True, "store the T5 and pooled CLIP embeddings")
    cache_latents: bool = doc(True, "store the VAE latent mean/std of each image")
    image_format: str = doc("png", "png or webp (lossless)")
    device: str = doc("auto", "auto, cpu, cuda or cuda:N (under accelerate: each process's own GPU)")
    dtype: str = doc("auto", "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16")
    overwrite: bool = doc(False, "delete an existing dataset in --out and start over")
    from_images: str | None = doc(None, "import this folder of captioned images instead of drawing")
    compile: str = doc("auto", "torch.compile of the FLUX blocks: auto (CUDA, from 2K up), on or off")

    def validate(self) -> list[str]:
        problems = []
        if self.n is not None and self.n < 1:
            problems.append(f"--n {self.n}: must be at least 1 (e.g. --n 10000)")
        if self.n is not None and self.n > MAX_N:
            problems.append(f"--n {self.n}: more than {MAX_N:,} samples is no dataset this tool can index "
                            "(draw it in several --out folders)")
        if self.steps < 1:
            problems.append(f"--steps {self.steps}: must be at least 1")
        if self.batch_size < 1:
            problems.append(f"--batch-size {self.batch_size}: must be at least 1")
        if self.image_format not in IMAGE_FORMATS:
            problems.append(f"--image-format {self.image_format!r}: use png or webp")
        if self.from_images is not None and not (self.cache_embeddings or self.cache_latents):
            problems.append("--from-images with --no-cache-embeddings and --no-cache-latents has nothing to compute")
        from clear_cli.models.compile import COMPILE_MODES

        if self.compile not in COMPILE_MODES:
            problems.append(f"--compile {self.compile!r} is not one of {', '.join(COMPILE_MODES)}")
        return problems


@dataclass
class SynthResult:
    """What a run did. `new` counts samples drawn by this run over all processes."""

    out: Path
    n: int
    done: int
    new: int
    seconds: float
    images_per_s: float
    peak_memory_bytes: int
    memory_kind: str
    complete: bool
    is_main: bool = True
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        state = "complete" if self.complete else f"{self.done} of {self.n} done"
        return (f"{self.out}: {self.done} samples ({state}; {self.new} new this run, {self.done - self.new} "
                f"already there) in {self.seconds:.1f} s: {self.images_per_s:.2f} images/s, "
                f"peak memory {self.peak_memory_bytes / 2**30:.2f} GiB ({self.memory_kind})")


@dataclass
class VerifyReport:
    """`clear synth --verify`: per broken sample, why; `redrawn` lists what --repair drew again."""

    out: Path
    n: int
    ok: int
    missing: dict[int, str]
    corrupt: dict[int, str]
    manifest_stale: bool = False
    redrawn: list[int] = field(default_factory=list)
    after: "VerifyReport | None" = None
    is_main: bool = True

    @property
    def clean(self) -> bool:
        final = self.after or self
        return not final.missing and not final.corrupt and not final.manifest_stale

    def summary(self) -> str:
        lines = [f"{self.out}: checked {self.n} samples: {self.ok} ok, {len(self.missing)} missing, "
                 f"{len(self.corrupt)} corrupt"]
        if self.missing:
            lines.append(f"  missing: {_ranges(self.missing)} ({_first_reason(self.missing)})")
        if self.corrupt:
            lines.append(f"  corrupt: {_ranges(self.corrupt)} ({_first_reason(self.corrupt)})")
        if self.manifest_stale:
            lines.append(f"  {layout.MANIFEST} does not match the finished batches")
        if self.after is not None:
            lines.append(f"repaired: redrew {len(self.redrawn)} samples (whole batches: {_ranges(self.redrawn)})"
                         if self.redrawn else "repaired: rewrote the manifest")
            lines.append(self.after.summary())
        elif not self.clean:
            lines.append(f"  run `clear synth --verify {self.out} --repair` to redraw them")
        return "\n".join(lines)


def _ranges(indices) -> str:
    """[1, 2, 3, 7] -> '1-3, 7' (at most 12 runs shown)."""
    idx = sorted(indices)
    runs: list[str] = []
    start = prev = None
    for i in idx + [None]:
        if start is not None and (i is None or i != prev + 1):
            runs.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ", ".join(runs[:12]) + (f", ... ({len(runs) - 12} more runs)" if len(runs) > 12 else "")


def _first_reason(reasons: dict[int, str]) -> str:
    i = min(reasons)
    return f"e.g. {i}: {reasons[i]}"


# ---------------------------------------------------------------------------------------------------------
# Planning: everything that can be checked without a model, so bad input fails before anything is touched.


@dataclass
class _Plan:
    config: SynthConfig
    root: Path
    mode: str  # "draw" or "import"
    n: int
    width: int
    height: int
    identity: dict
    prompts: list[str] = field(default_factory=list)
    sources: list = field(default_factory=list)  # SourceImage, import mode
    notes: list[str] = field(default_factory=list)

    def prompt(self, i: int) -> str:
        return self.sources[i].caption if self.mode == "import" else self.prompts[i % len(self.prompts)]


def _plan(cfg: SynthConfig, dtype_name: str) -> _Plan:
    from clear_cli.data import images, prompts

    problems = cfg.validate()
    if problems:
        raise UsageError("; ".join(problems))
    width, height = layout.parse_res(cfg.res)
    root = Path(cfg.out).expanduser()
    identity = {"format_version": layout.FORMAT_VERSION, "model": cfg.model, "width": width, "height": height,
                "batch_size": cfg.batch_size, "cache_embeddings": cfg.cache_embeddings,
                "cache_latents": cfg.cache_latents, "image_format": cfg.image_format, "dtype": dtype_name}
    notes: list[str] = []
    if cfg.from_images is not None:
        if cfg.prompts != prompts.BUILTIN:
            raise UsageError("--from-images takes its captions from the image folder; drop --prompts")
        found = images.find_images(cfg.from_images)
        n = cfg.n if cfg.n is not None else len(found)
        if n > len(found):
            raise UsageError(f"--n {n}: {cfg.from_images} holds only {len(found)} captioned images",
                             f"use --n {len(found)} or leave --n out")
        identity.update(mode="import", from_images=str(Path(cfg.from_images).expanduser().resolve()),
                        source_fingerprint=images.images_fingerprint(cfg.from_images, found[:n]))
        return _Plan(cfg, root, "import", n, width, height, identity, sources=found[:n], notes=notes)
    plist = prompts.load_prompts(cfg.prompts, column=cfg.prompt_column, n=cfg.n)
    n = cfg.n if cfg.n is not None else len(plist)
    if n > len(plist):
        notes.append(f"{len(plist)} prompts for {n} samples: each prompt is used again with new seeds")
    is_file = cfg.prompts != prompts.BUILTIN
    tabular = is_file and Path(cfg.prompts).suffix.lower() in (".jsonl", ".csv")
    identity.update(mode="draw", prompts=str(Path(cfg.prompts).expanduser().resolve()) if is_file else cfg.prompts,
                    prompt_column=cfg.prompt_column if tabular else None,
                    prompts_fingerprint=prompts.prompts_fingerprint(cfg.prompts, cfg.prompt_column),
                    steps=cfg.steps, guidance=float(cfg.guidance), seed=cfg.seed)
    return _Plan(cfg, root, "draw", n, width, height, identity, prompts=plist[:n], notes=notes)


# Paths are kept in the card (for --repair) but never compared: the same file named another way is fine.
_NOT_COMPARED = ("prompts", "from_images")


def _check_out(plan: _Plan) -> dict | None:
    """Refuse a directory we must not write into; return the existing card when resuming."""
    root = plan.root
    if root.exists() and not root.is_dir():
        raise UsageError(f"--out {root} exists and is not a directory", "pick a new directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = temp_path(root / ".write-probe")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {root}: cannot write there ({e.strerror or e})",
                         "pick a directory you can write to") from None
    if not (root / layout.CARD).is_file():
        stray = foreign_entries(root, ())
        if stray:
            raise UsageError(f"--out {root} is not empty and holds no synth dataset (found {stray[0]})",
                             "pick a new or empty directory; --overwrite never deletes other files")
        return None
    card = layout.read_card(root)
    if plan.config.overwrite:
        return card
    old = card.get("config", {})
    diffs = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in plan.identity.items()
             if k not in _NOT_COMPARED and old.get(k) != v]
    if diffs:
        raise UsageError(f"--out {root} holds a dataset made with other settings ({'; '.join(diffs)})",
                         "rerun with the same options to resume, choose another --out, or pass --overwrite "
                         "to start over")
    if int(card["n"]) > plan.n:
        raise UsageError(f"--n {plan.n}: {root} was started with --n {card['n']}; a dataset can grow, not shrink",
                         f"rerun with --n {card['n']} or more, or pass --overwrite")
    return card


# ---------------------------------------------------------------------------------------------------------
# Drawing and encoding one chunk.


def _dtype_name(dtype) -> str:
    return _DTYPE_NAMES.get(str(dtype).removeprefix("torch."), str(dtype).removeprefix("torch."))


def _family(pipe) -> str:
    from clear_cli.attention.adapters import adapter_for

    adapter = adapter_for(pipe.transformer)
    return adapter.family if adapter is not None else ""


def _model_facts(pipe, name: str) -> dict:
    from clear_cli.models import text_len

    vae = pipe.vae.config
    if _family(pipe) == "qwen-image":   # one text encoder, no pooled embedding, per-channel latent statistics
        return {"name": name, "family": "qwen-image", "text_len": text_len(pipe),
                "t5_dim": int(pipe.transformer.config.joint_attention_dim), "pooled_dim": 0,
                "latent_channels": int(vae.z_dim), "vae_scale_factor": int(pipe.vae_scale_factor),
                "vae_scaling_factor": 1.0, "vae_shift_factor": 0.0,
                "latents_mean": [float(x) for x in vae.latents_mean],
                "latents_std": [float(x) for x in vae.latents_std]}
    return {"name": name, "text_len": text_len(pipe), "t5_dim": int(pipe.text_encoder_2.config.d_model),
            "pooled_dim": int(pipe.text_encoder.config.hidden_size), "latent_channels": int(vae.latent_channels),
            "vae_scale_factor": int(pipe.vae_scale_factor), "vae_scaling_factor": float(vae.scaling_factor),
            "vae_shift_factor": float(vae.shift_factor or 0.0)}


def _tensor_spec(plan: _Plan, pipe, facts: dict) -> dict:
    spec = {}
    if plan.config.cache_embeddings and facts.get("family") == "qwen-image":
        spec[layout.T5] = {"shape": [facts["text_len"], facts["t5_dim"]],
                           "dtype": str(pipe.text_encoder.dtype).removeprefix("torch.")}
        spec[layout.TEXT_MASK] = {"shape": [facts["text_len"]], "dtype": "bool"}
    elif plan.config.cache_embeddings:
        spec[layout.T5] = {"shape": [facts["text_len"], facts["t5_dim"]],
                           "dtype": str(pipe.text_encoder_2.dtype).removeprefix("torch.")}
        spec[layout.POOLED] = {"shape": [facts["pooled_dim"]],
                               "dtype": str(pipe.text_encoder.dtype).removeprefix("torch.")}
    if plan.config.cache_latents:
        f = facts["vae_scale_factor"]
        lat = {"shape": [facts["latent_channels"], plan.height // f, plan.width // f],
               "dtype": str(pipe.vae.dtype).removeprefix("torch.")}
        spec[layout.LATENT_MEAN] = lat
        spec[layout.LATENT_STD] = dict(lat)
    return spec


def _compute_chunk(pipe, plan: _Plan, chunk: int, device, text_len: int) -> list:
    import torch

    cfg = plan.config
    idx = layout.chunk_indices(chunk, plan.n, cfg.batch_size)
    prompts = [plan.prompt(i) for i in idx]
    if _family(pipe) == "qwen-image":
        return _compute_chunk_qwen(pipe, plan, idx, prompts, device, text_len)
    with torch.inference_mode():
        embeds = pooled = None
        if plan.mode == "draw" or cfg.cache_embeddings:
            embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                   max_sequence_length=text_len)
        if plan.mode == "draw":
            seeds = [layout.sample_seed(cfg.seed, i) for i in idx]
            # One CPU generator per sample: its noise depends on its seed only, on any device and in any batch.
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, width=plan.width, height=plan.height,
                       num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, generator=gens,
                       output_type="pt", max_sequence_length=text_len).images
            pixels = (out.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        else:
            seeds, pixels = [None] * len(idx), _imported_pixels(plan, idx)
        mean = std = None
        if cfg.cache_latents:
            # Encode the stored 8-bit pixels, so the latents are exactly those of the image file on disk.
            x = pixels.to(device=device, dtype=pipe.vae.dtype) / 127.5 - 1.0
            dist = pipe.vae.encode(x).latent_dist
            mean, std = dist.mean, dist.std
    text = {layout.T5: embeds, layout.POOLED: pooled} if cfg.cache_embeddings else {}
    return _samples(plan, idx, prompts, seeds, pixels, text, mean, std)


def _compute_chunk_qwen(pipe, plan: _Plan, idx: list[int], prompts: list[str], device, text_len: int) -> list:
    """`_compute_chunk` in QwenImagePipeline's conventions: prompt embeddings padded to `text_len` with their mask,
    latents of the [B, C, 1, h, w] VAE without the frame axis."""
    import torch

    cfg = plan.config
    with torch.inference_mode():
        embeds, mask = pipe.encode_prompt(prompts, device=device, max_sequence_length=text_len)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        if plan.mode == "draw":
            seeds = [layout.sample_seed(cfg.seed, i) for i in idx]
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            out = pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, width=plan.width, height=plan.height,
                       num_inference_steps=cfg.steps, generator=gens, output_type="pt", true_cfg_scale=1.0,
                       max_sequence_length=text_len).images
            pixels = (out.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        else:
            seeds, pixels = [None] * len(idx), _imported_pixels(plan, idx)
        mean = std = None
        if cfg.cache_latents:
            x = pixels.to(device=device, dtype=pipe.vae.dtype) / 127.5 - 1.0
            dist = pipe.vae.encode(x[:, :, None]).latent_dist
            mean, std = dist.mean[:, :, 0], dist.std[:, :, 0]
    pad = text_len - embeds.shape[1]
    embeds = torch.nn.functional.pad(embeds, (0, 0, 0, pad))
    mask = torch.nn.functional.pad(mask, (0, pad)).bool()
    text = {layout.T5: embeds, layout.TEXT_MASK: mask} if cfg.cache_embeddings else {}
    return _samples(plan, idx, prompts, seeds, pixels, text, mean, std)


def _imported_pixels(plan: _Plan, idx: list[int]):
    """The user's images for these indices, resized to the set's size, as uint8 [B, 3, H, W]."""
    import torch

    from clear_cli.data import images

    root = Path(plan.config.from_images).expanduser()
    return torch.stack([images.load_image(root / plan.sources[i].rel, plan.width, plan.height) for i in idx])


def _samples(plan: _Plan, idx: list[int], prompts: list[str], seeds: list, pixels, text: dict, mean, std) -> list:
    """One Sample per index: its encoded image, the cached text tensors and, when asked, the latent moments."""
    from clear_cli.data import images
    from clear_cli.data.store import Sample

    cfg = plan.config
    samples = []
    for k, i in enumerate(idx):
        tensors = {name: t[k].cpu().clone() for name, t in text.items()}
        if cfg.cache_latents:
            tensors[layout.LATENT_MEAN] = mean[k].cpu().clone()
            tensors[layout.LATENT_STD] = std[k].cpu().clone()
        samples.append(Sample(index=i, prompt=prompts[k], seed=seeds[k], width=plan.width, height=plan.height,
                              image=images.encode_image(pixels[k], cfg.image_format), tensors=tensors,
                              source=plan.sources[i].rel if plan.mode == "import" else None))
    return samples


# ---------------------------------------------------------------------------------------------------------
# The job.


def _state():
    """accelerate's PartialState: rank, world size and barriers (one process: a no-op world of 1)."""
    from accelerate import PartialState

    return PartialState()


def _resolve_device(cfg: SynthConfig, state):
    from clear_cli.devices import resolve_device

    if state.num_processes > 1 and cfg.device in ("auto", "cuda"):
        return state.device  # each process its own GPU (or the CPU)
    return resolve_device(cfg.device)


def _peak_memory(device) -> tuple[int, str]:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), f"{device} allocated"
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "CPU peak RSS of the main process"


def _write_card(plan: _Plan, facts: dict, spec: dict, done: int) -> None:
    import json

    from clear_cli import __version__

    chunks = layout.num_chunks(plan.n, plan.config.batch_size)
    card = {"format": layout.FORMAT, "version": layout.FORMAT_VERSION, "written_by": f"clear-dit {__version__}",
            "mode": plan.mode, "n": plan.n, "batch_size": plan.config.batch_size, "config": plan.identity,
            "model": facts, "resolution": {"width": plan.width, "height": plan.height}, "tensors": spec,
            "latents": "VAE latent_dist mean/std before FLUX scaling: model input = (z - vae_shift_factor) * "
                       "vae_scaling_factor",
            "counts": {"samples": done, "chunks": chunks, "complete": done == plan.n}}
    atomic_write_text(plan.root / layout.CARD, json.dumps(card, indent=2, sort_keys=True) + "\n")
    atomic_write_text(plan.root / layout.README, _readme(card))


def _readme(card: dict) -> str:
    cfg, m, r = card["config"], card["model"], card["resolution"]
    rows = [("samples", f"{card['counts']['samples']} of {card['n']}"
             + (" (complete)" if card["counts"]["complete"] else " (incomplete)")),
            ("mode", card["mode"]), ("model", m["name"]), ("resolution", f"{r['width']}x{r['height']}"),
            ("text length", m["text_len"])]
    if card["mode"] == "draw":
        rows += [("prompts", cfg["prompts"]), ("steps", cfg["steps"]), ("guidance", cfg["guidance"]),
                 ("seed", cfg["seed"])]
    else:
        rows.append(("imported from", cfg["from_images"]))
    rows += [("batch size", card["batch_size"]), ("dtype", cfg["dtype"]), ("images", cfg["image_format"])]
    tensors = "\n".join(f"| `{k}` | {v['shape']} | {v['dtype']} |" for k, v in card["tensors"].items())
    return ("# Synth dataset\n\nDrawn or imported by `clear synth` (clear-dit). Read it with "
            "`clear_cli.data.SynthDataset(dir)`; the format is in docs/dataset.md.\n\n| | |\n|---|---|\n"
            + "\n".join(f"| {k} | {v} |" for k, v in rows)
            + "\n\nCached tensors per sample (shape without batch):\n\n| name | shape | dtype |\n|---|---|---|\n"
            + (tensors or "| (none) | | |") + "\n\nLatents are the VAE's latent_dist before FLUX scaling: "
            f"the transformer sees `(z - {m['vae_shift_factor']}) * {m['vae_scaling_factor']}`.\n")


def _done_samples(root: Path, n: int, batch: int) -> int:
    return sum(len(layout.chunk_indices(c, n, batch)) for c in range(layout.num_chunks(n, batch))
               if store.chunk_done(root, c, n, batch))


def _draw_chunks(plan: _Plan, pipe, device, state, chunks: list[int], done_before: int, progress: bool,
                 on_batch: Callable[[int], None] | None) -> None:
    """Deal `chunks` round-robin to processes and draw this process's share; one bar on the main process."""
    from clear_cli.logs import progress_bar as tqdm

    from clear_cli.models import text_len

    mine = chunks[state.process_index::state.num_processes]
    length = text_len(pipe)
    parts0 = store.count_parts(plan.root)
    bar = tqdm(total=plan.n, initial=done_before, unit="img", desc="synth", dynamic_ncols=True,
               disable=not (progress and state.is_main_process))
    try:
        for c in mine:
            samples = _compute_chunk(pipe, plan, c, device, length)
            store.write_chunk(plan.root, c, samples, plan.config.image_format)
            if on_batch is not None:
                on_batch(c)
            if state.is_main_process:  # count every process's finished batches, not only ours
                grown = (store.count_parts(plan.root) - parts0) * plan.config.batch_size
                bar.n = min(plan.n, done_before + grown)
                bar.refresh()
    finally:
        bar.close()


def _finish(plan: _Plan, facts: dict, spec: dict) -> int:
    store.merge_manifest(plan.root, plan.n, plan.config.batch_size)
    done = _done_samples(plan.root, plan.n, plan.config.batch_size)
    _write_card(plan, facts, spec, done)
    return done


def _load(cfg: SynthConfig, pipe, device):
    if pipe is None:
        from clear_cli.models import load_pipeline

        pipe = load_pipeline(cfg.model, device=device, dtype=cfg.dtype)
        from clear_cli.models.pipeline import require_family
        require_family(pipe, ("flux", "qwen-image"), "clear synth")
    pipe.set_progress_bar_config(disable=True)  # our bar counts images; the pipeline's would count steps
    from clear_cli.models.compile import compile_transformer

    compile_transformer(pipe, cfg.compile)
    return pipe


def synth(config: SynthConfig | None = None, *, log: Log | None = None, progress: bool = True, pipe=None,
          on_batch: Callable[[int], None] | None = None, **options) -> SynthResult:
    """Draw (or import) a synth dataset; rerun the same call to resume. Options are SynthConfig's fields.

    `clear_cli.synth(n=64, model="tiny", res=256, out="out/s")`. Under `accelerate launch` every process
    calls it and gets its share of the batches. `log`: one line per step of the run (None: quiet); `pipe`: an
    already loaded pipeline (its model name is still `model`); `on_batch(chunk)`: called after each committed
    batch of this process.
    """
    cfg = merge_options(SynthConfig, config, options, job="synth")
    state = _state()
    say = sayer(log) if state.is_main_process else sayer(None)
    with OutLock(cfg.out, "synth") if state.is_main_process and cfg.out else contextlib.nullcontext():
        return _synth(cfg, state, pipe, progress, on_batch, say)


def _synth(cfg: SynthConfig, state, pipe, progress: bool, on_batch, say) -> SynthResult:
    import torch

    from clear_cli.devices import resolve_dtype

    device = _resolve_device(cfg, state) if pipe is None else pipe.transformer.device
    dtype = resolve_dtype(cfg.dtype, device) if pipe is None else pipe.transformer.dtype
    plan = _plan(cfg, _dtype_name(dtype))
    from clear_cli.models import fit

    fit.check_synth(cfg, device, plan.width, plan.height)  # a batch at this size fits the device, before any write
    card = _check_out(plan)  # every process checks, so all of them fail alike on bad input
    pipe = _load(cfg, pipe, device)
    facts = _model_facts(pipe, cfg.model)
    if card is not None and not cfg.overwrite and card.get("model", {}).get("text_len") != facts["text_len"]:
        raise UsageError(f"--out {plan.root}: drawn at text length {card['model'].get('text_len')}, "
                         f"this model uses {facts['text_len']}", "pass --overwrite or another --out")
    spec = _tensor_spec(plan, pipe, facts)
    state.wait_for_everyone()  # every process has checked --out before the main one changes it
    if state.is_main_process:
        if card is not None and cfg.overwrite:
            store.clear_owned(plan.root)
        store.remove_stale_temps(plan.root)
        for sub in (layout.IMAGES, layout.TENSORS, layout.PARTS):
            (plan.root / sub).mkdir(parents=True, exist_ok=True)
        _write_card(plan, facts, spec, _done_samples(plan.root, plan.n, cfg.batch_size))
    state.wait_for_everyone()
    todo = store.pending_chunks(plan.root, plan.n, cfg.batch_size)
    done_before = _done_samples(plan.root, plan.n, cfg.batch_size)
    state.wait_for_everyone()  # nobody writes until every process has listed the same pending batches
    say(f"synth: {len(todo)} batch(es) of {cfg.batch_size} to draw into {plan.root} ({done_before} of {plan.n} "
        f"samples already there, {state.num_processes} process(es))")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        _draw_chunks(plan, pipe, device, state, todo, done_before, progress, on_batch)
        state.wait_for_everyone()
    finally:
        if state.is_main_process:  # also after a crash: the manifest and card show what is finished
            done = _finish(plan, facts, spec)
    seconds = time.perf_counter() - t0
    if not state.is_main_process:
        done = _done_samples(plan.root, plan.n, cfg.batch_size)
    new = done - done_before
    peak, kind = _peak_memory(device)
    return SynthResult(out=plan.root, n=plan.n, done=done, new=new, seconds=seconds,
                       images_per_s=new / seconds if seconds > 0 else 0.0, peak_memory_bytes=peak,
                       memory_kind=kind, complete=done == plan.n, is_main=state.is_main_process, notes=plan.notes)


def verify(out: str | Path, *, repair: bool = False, device: str = "auto", pipe=None, progress: bool = True,
           on_batch: Callable[[int], None] | None = None) -> VerifyReport:
    """Check every sample of a dataset; with `repair=True` redraw the batches that hold broken samples.

    Under `accelerate launch` the main process checks and every process shares the redrawing.
    """
    root = Path(out).expanduser()
    card = layout.read_card(root)
    n = int(card["n"])
    state = _state()
    found = _check_all(root, card, progress) if state.is_main_process else None
    if state.num_processes > 1:  # every process must take the same decisions below
        from accelerate.utils import broadcast_object_list

        box = [found]
        broadcast_object_list(box)
        found = box[0]
    report = _report(root, n, found, state.is_main_process)
    if not repair or report.clean:
        return report
    with OutLock(root, "synth --verify --repair") if state.is_main_process else contextlib.nullcontext():
        return _repair(root, card, found, report, device, pipe, progress, on_batch, state)


def _repair(root: Path, card: dict, found, report, device: str, pipe, progress: bool, on_batch, state):
    n, batch = int(card["n"]), int(card["batch_size"])
    bad_chunks = found[2]
    cfg = _config_from_card(card, root, device)
    dtype_name = card["config"]["dtype"]
    plan = _plan(cfg, dtype_name)
    _check_sources(plan, card)
    dev = _resolve_device(cfg, state) if pipe is None else pipe.transformer.device
    pipe = _load(cfg, pipe, dev)
    facts = _model_facts(pipe, cfg.model)
    spec = _tensor_spec(plan, pipe, facts)
    if spec != card.get("tensors", {}) or _dtype_name(pipe.transformer.dtype) != dtype_name:
        raise ClearError(f"{root}: this model/dtype would write tensors unlike the card's",
                         f"repair with the model and dtype the set was drawn with ({cfg.model}, {dtype_name})")
    state.wait_for_everyone()
    if state.is_main_process:
        store.remove_stale_temps(root)
        for c in bad_chunks:  # uncommit first: a repair killed halfway leaves the batch pending, not "done"
            layout.part_path(root, c).unlink(missing_ok=True)
    state.wait_for_everyone()
    redrawn = [i for c in bad_chunks for i in layout.chunk_indices(c, n, batch)]
    try:
        _draw_chunks(plan, pipe, dev, state, bad_chunks, n - len(redrawn), progress, on_batch)
        state.wait_for_everyone()
    finally:
        if state.is_main_process:
            _finish(plan, facts, spec)
    report.redrawn = redrawn
    if state.is_main_process:
        report.after = _report(root, n, _check_all(root, layout.read_card(root), progress), True)
    return report


def _check_all(root: Path, card: dict, progress: bool) -> tuple[dict, dict, list[int], bool]:
    """(missing, corrupt, chunks holding either, manifest stale) over the whole dataset."""
    from clear_cli.logs import progress_bar as tqdm

    n, batch = int(card["n"]), int(card["batch_size"])
    missing: dict[int, str] = {}
    corrupt: dict[int, str] = {}
    bad_chunks: list[int] = []
    for c in tqdm(range(layout.num_chunks(n, batch)), desc="verify", unit="batch", disable=not progress):
        res = store.check_chunk(root, card, c)
        missing.update(res.missing)
        corrupt.update(res.corrupt)
        if not res.ok:
            bad_chunks.append(c)
    return missing, corrupt, bad_chunks, _manifest_stale(root, n, batch)


def _report(root: Path, n: int, found: tuple, is_main: bool) -> VerifyReport:
    missing, corrupt, _, stale = found
    return VerifyReport(root, n, n - len(missing) - len(corrupt), missing, corrupt, stale, is_main=is_main)


def _manifest_stale(root: Path, n: int, batch: int) -> bool:
    want = []
    for c in range(layout.num_chunks(n, batch)):
        part = layout.read_part(root, c)
        if part is not None and part.get("indices") == layout.chunk_indices(c, n, batch):
            want.extend(layout.dumps(r) + "\n" for r in part["records"])
    try:
        have = (root / layout.MANIFEST).read_text(encoding="utf-8")
    except OSError:
        return True
    return have != "".join(want)


def _config_from_card(card: dict, root: Path, device: str) -> SynthConfig:
    c = card["config"]
    cfg = SynthConfig(n=int(card["n"]), model=c["model"], res=f"{c['width']}x{c['height']}",
                      batch_size=int(c["batch_size"]), cache_embeddings=bool(c["cache_embeddings"]),
                      cache_latents=bool(c["cache_latents"]), image_format=c["image_format"], device=device,
                      dtype=c["dtype"], out=str(root))
    if c["mode"] == "import":
        cfg.from_images = c["from_images"]
    else:
        cfg.prompts, cfg.steps, cfg.guidance, cfg.seed = c["prompts"], int(c["steps"]), float(c["guidance"]), \
            int(c["seed"])
        cfg.prompt_column = c.get("prompt_column") or "prompt"
    return cfg


def _check_sources(plan: _Plan, card: dict) -> None:
    """--repair must draw from the same prompts / images as the original run."""
    old = card["config"]
    key = "source_fingerprint" if plan.mode == "import" else "prompts_fingerprint"
    if plan.identity.get(key) != old.get(key):
        what = old.get("from_images") if plan.mode == "import" else old.get("prompts")
        raise ClearError(f"{what} changed since {plan.root} was made; a repair would not match the rest",
                         "restore the original file(s), or start over with --overwrite")


