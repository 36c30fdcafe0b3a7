"""`clear distill`: train only the attention projections of a linearized FLUX to match the original (DESIGN.md §4).

    import clear_cli
    result = clear_cli.distill("recipes/tiny.yaml", sets=["train.steps=50"], out="out/d")
    # result.weights -> out/d/clear_attn.safetensors (load with `clear gen --weights ...`)

One transformer serves as teacher and student: `linearize(..., keep_teacher=True)` keeps frozen copies of the
original image-branch projections inside the CLEAR processors, and a pass inside `teacher_mode` computes the
original model (frozen copies, full attention) without touching any parameter. Per micro batch:

    x_t = (1 - s) x0 + s noise                       s from FLUX's unshifted training sigmas
    v_teacher, A_teacher = teacher pass (no grad)    A = attention outputs of the selected layers
    v_student, A_student = student pass (CLEAR + trained weights)
    loss = fm * MSE(v_student, noise - x0) + pred * MSE(v_student, v_teacher) + attn * mean_l MSE(A_s, A_t)

Runs in one process or under `accelerate launch -m clear_cli distill RECIPE` (DDP, DeepSpeed, FSDP through
accelerate's config); the global batch is the same for any number of processes, and each step's data is a
function of (seed, step) only, so resuming or changing the process count gives the same losses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clear_cli.config import apply_overrides, doc, merge_options, to_dict
from clear_cli.errors import ClearError, UsageError
from clear_cli.extras import available, install_line, require
from clear_cli.files import (OutLock, atomic_dir, atomic_write_text, owned_present, remove_owned, save_png,
                             save_safetensors)
from clear_cli.flux import BASE_RES, PIXELS_PER_TOKEN
from clear_cli.logs import Log, sayer
from clear_cli.training.recipe import (
    Recipe, problem_text, recipe_data, recipe_hash, recipe_problems, resume_differences,
)

WEIGHTS_FILE = "clear_attn.safetensors"
RECIPE_FILE = "recipe.yaml"
LOG_FILE = "log.jsonl"
CHECKPOINTS = "checkpoints"
VALIDATION = "validation"
TRAINABLE_FILE = "trainable.safetensors"  # inside a checkpoint: the trained tensors only (not the frozen model)
STATE_FILE = "state.json"  # inside a checkpoint, written last: its presence marks the checkpoint complete
OWNED = (WEIGHTS_FILE, RECIPE_FILE, LOG_FILE, CHECKPOINTS, VALIDATION, "logs")  # what --overwrite may delete
LOSS_TERMS = ("fm", "pred", "attn")


@dataclass
class DistillConfig:
    """One `clear distill` run: the recipe and how to run it; each field is the CLI option of the same name.
    The recipe's own keys change through `sets` (`train.steps=100`), as in the YAML."""

    recipe: str | None = doc(None, "recipe YAML, e.g. recipes/tiny.yaml or recipes/flux_dev.yaml (Python: also a "
                                   "Recipe or a mapping)")
    sets: list[str] = doc([], "override a recipe key, e.g. train.steps=100 (repeatable)")
    out: str | None = doc(None, "output directory (default: the recipe's `out`, else out/distill)")
    resume: str | None = doc(None, "auto (latest checkpoint in --out, else start) or a checkpoint directory "
                                   "OUT/checkpoints/step_N")
    overwrite: bool = doc(False, "delete a previous run in --out and start over")
    device: str = doc("auto", "auto (accelerate's choice), cpu or cuda")
    compile: str | None = doc(None, "torch.compile of the FLUX blocks: auto (CUDA, from 2K up), on or off (default: "
                                    "the recipe's `compile`)")


@dataclass
class DistillResult:
    """What a run did (every process gets one with the same losses; `is_main` on the one that reports)."""

    out: Path
    weights: Path | None
    steps: int
    start_step: int
    log: list[dict] = field(default_factory=list)  # this run's log records, one per step
    seconds: float = 0.0
    trainable_params: int = 0
    teacher_copy_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    is_main: bool = True


# --------------------------------------------------------------------------------------------- small helpers

def mixed_dtype(mixed_precision: str) -> torch.dtype:
    """Storage dtype of the frozen weights: bf16/fp16 under mixed precision, else fp32 (trained ones stay fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def lr_lambda(schedule: str, steps: int, warmup: int):
    """Multiplier on lr at optimizer step k (0-based): linear warmup, then constant / linear / cosine to 0."""

    def f(k: int) -> float:
        if warmup > 0 and k < warmup:
            return (k + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (k - warmup) / max(1, steps - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_optimizer(params: list[torch.nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    t = recipe.train
    if t.optimizer == "prodigy":
        Prodigy = require("prodigyopt", "train.optimizer: prodigy").Prodigy

        # Bias correction and a safeguarded warmup are what Prodigy's authors advise for diffusion fine-tuning.
        return Prodigy(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                       use_bias_correction=True, safeguard_warmup=t.warmup_steps > 0)
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)


def transformer_call(model, x: torch.Tensor, batch, guidance: float | None) -> torch.Tensor:
    """The velocity FLUX predicts for x, called exactly as FluxPipeline calls its transformer (Qwen-Image: as
    QwenImagePipeline does, with the text mask and img_shapes)."""
    if batch.text_mask is not None:
        h, w = batch.grid
        return model(hidden_states=x, timestep=batch.sigmas.to(x.dtype), encoder_hidden_states=batch.t5,
                     encoder_hidden_states_mask=batch.text_mask, img_shapes=[[(1, h, w)]] * x.shape[0],
                     return_dict=False)[0]
    g = None
    if guidance is not None:
        g = torch.full((x.shape[0],), float(guidance), device=x.device, dtype=torch.float32)
    return model(hidden_states=x, timestep=batch.sigmas.to(x.dtype), guidance=g, pooled_projections=batch.pooled,
                 encoder_hidden_states=batch.t5, txt_ids=batch.txt_ids, img_ids=batch.img_ids,
                 return_dict=False)[0]


def loss_terms(model, transformer, batch, recipe: Recipe, layers: list[int]) -> dict[str, torch.Tensor]:
    """The three losses of one micro batch (fp32 scalars); `model` may be the accelerate-wrapped `transformer`."""
    from clear_cli.attention.linearize import capture_attention, teacher_mode

    w = recipe.loss
    guidance = recipe.train.guidance if transformer.config.guidance_embeds else None
    x_t = batch.noisy().to(batch.t5.dtype)  # latents are kept in fp32; the model reads its compute dtype
    use_attn = w.attn > 0 and bool(layers)
    zero = torch.zeros((), device=x_t.device)
    v_teacher, att_teacher = None, {}
    if w.pred > 0 or use_attn:
        with torch.no_grad(), teacher_mode(transformer), capture_attention(transformer, layers if use_attn else []) \
                as att_teacher:
            v_teacher = transformer_call(model, x_t, batch, guidance)
    with capture_attention(transformer, layers if use_attn else []) as att_student:
        v_student = transformer_call(model, x_t, batch, guidance)
    v = v_student.float()
    terms = {"fm": F.mse_loss(v, batch.target().float()) if w.fm > 0 else zero,
             "pred": F.mse_loss(v, v_teacher.float()) if w.pred > 0 else zero,
             "attn": zero}
    if use_attn:
        terms["attn"] = torch.stack([F.mse_loss(att_student[i].float(), att_teacher[i].float())
                                     for i in layers]).mean()
    terms["loss"] = w.fm * terms["fm"] + w.pred * terms["pred"] + w.attn * terms["attn"]
    return terms


def trainable_state(transformer) -> dict[str, torch.Tensor]:
    from clear_cli.attention.linearize import trainable_attention_parameters

    return {k: p.detach() for k, p in trainable_attention_parameters(transformer).items()}


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under OUT/checkpoints (those with their state file), oldest first."""
    root = out / CHECKPOINTS
    found = []
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith("step_") and d.name[5:].isdigit() and (d / STATE_FILE).is_file():
                found.append((int(d.name[5:]), d))
    return sorted(found)


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


# --------------------------------------------------------------------------------------------- pre-flight

@dataclass
class _Plan:
    """A checked run: nothing on disk has been touched yet."""

    recipe: Recipe
    source: str
    out: Path
    card: dict
    resume_from: Path | None
    start_step: int
    overwrite: bool
    notes: list[str]


def _check_data(recipe: Recipe, problems: list[str]) -> dict:
    from clear_cli.data import dataset_card

    root = Path(recipe.data).expanduser()
    if not root.is_dir():
        problems.append(f"data: {recipe.data} does not exist (make it with `clear synth --model {recipe.model} "
                        f"--out {recipe.data}`)")
        return {}
    try:
        card = dataset_card(root)
    except ClearError as e:
        problems.append(f"data: {e.message}" + (f" ({e.hint})" if e.hint else ""))
        return {}
    counts = card.get("counts", {})
    if not counts.get("complete"):
        problems.append(f"data: {root} is incomplete ({counts.get('samples', 0)} of {card.get('n')} samples; rerun "
                        "the same `clear synth` command to finish it)")
    else:  # sizes, paths and (up to a few GiB) the shards' sha256: a damaged set is refused, not trained on
        from clear_cli.data.store import integrity_problems

        try:
            damage = integrity_problems(root)
        except ClearError as e:
            damage = [e.message]
        if damage:
            more = f" (+{len(damage) - 1} more)" if len(damage) > 1 else ""
            problems.append(f"data: {root} is damaged: {damage[0]}{more} (run `clear synth --verify {root} "
                            "--repair` to redraw what is broken)")
    text_keys = ("t5_embeds", "text_mask") if card.get("model", {}).get("family") == "qwen-image" else \
        ("t5_embeds", "pooled_embeds")
    missing = [k for k in (*text_keys, "latent_mean", "latent_std") if k not in card.get("tensors", {})]
    if missing:
        problems.append(f"data: {root} has no cached {', '.join(missing)} (draw it with --cache-embeddings "
                        "--cache-latents)")
    drawn_by = str(card.get("model", {}).get("name", ""))
    if drawn_by and not _same_model(drawn_by, recipe.model):
        problems.append(f"data: drawn by model {drawn_by!r}, the recipe distils {recipe.model!r} (the teacher must "
                        "be the model that drew the data)")
    res = card.get("resolution", {})
    w, h = int(res.get("width", 0)), int(res.get("height", 0))
    if recipe.resolution is not None and (w, h) != (recipe.resolution, recipe.resolution):
        problems.append(f"resolution: {recipe.resolution} but the data was drawn at {w}x{h} (latents are cached "
                        f"at that size: set resolution: {w if w == h else 'null'} or draw the data again)")
    gh, gw = h // PIXELS_PER_TOKEN, w // PIXELS_PER_TOKEN
    if w and h and recipe.down_factor > 1 and (gh % recipe.down_factor or gw % recipe.down_factor):
        problems.append(f"down_factor: {recipe.down_factor} does not divide the {gh}x{gw} token grid of "
                        f"the {w}x{h} data")
    return card


def _check_out(recipe: Recipe, out: Path, resume: str | None, overwrite: bool,
               problems: list[str], notes: list[str]) -> tuple[Path | None, int]:
    """Where to resume from (None = start fresh) and the step it reached."""
    if resume is not None and overwrite:
        problems.append("--resume and --overwrite: choose one (resume continues a run, overwrite starts over)")
        return None, 0
    if out.exists() and not out.is_dir():
        problems.append(f"--out {out} is a file, not a directory")
        return None, 0
    ckpt: Path | None = None
    if resume not in (None, "auto"):
        ckpt = Path(resume).expanduser()
        if not (ckpt / STATE_FILE).is_file():
            problems.append(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE}); checkpoints are "
                            f"{out / CHECKPOINTS}/step_N, or use --resume auto")
            return None, 0
    elif resume == "auto":
        found = list_checkpoints(out)
        if found:
            ckpt = found[-1][1]
        else:
            notes.append(f"no checkpoint in {out / CHECKPOINTS}: starting from step 0")
    if ckpt is None:
        taken = out.is_dir() and bool(owned_present(out, OWNED))
        if taken and resume == "auto" and not (out / WEIGHTS_FILE).exists():
            taken = False  # stopped before its first checkpoint: nothing to continue, start over (log trimmed)
        if taken and not overwrite:
            problems.append(f"--out {out} already holds a distillation run (pass --resume auto to continue it, "
                            "--overwrite to start over, or another --out)")
        return None, 0
    state = _read_json(ckpt / STATE_FILE) or {}
    old = state.get("recipe")
    if isinstance(old, dict):
        diffs = resume_differences(old, recipe)
        if diffs:
            problems.append(f"--resume {ckpt}: the recipe changed in {', '.join(diffs)} (only steps, out, "
                            "checkpoint, validation and report_to may change on resume; use another --out)")
    step = int(state.get("step", 0))
    if step > recipe.train.steps:
        problems.append(f"--resume {ckpt}: already at step {step}, beyond train.steps {recipe.train.steps}")
    return ckpt, step


def plan(recipe: str | Path | Recipe | dict | None = None, *, overrides: list[str] | None = None,
         out: str | Path | None = None, resume: str | Path | None = None, overwrite: bool = False,
         num_processes: int = 1) -> _Plan:
    """Check a run without side effects: every problem in one UsageError (recipe, data, output, resume)."""
    if isinstance(recipe, (Recipe, dict)):
        data = to_dict(recipe) if isinstance(recipe, Recipe) else recipe
        data, source = apply_overrides(data, overrides or []), "recipe"
    else:
        data, source = recipe_data(recipe, overrides), str(recipe) if recipe is not None else "recipe"
    if out is not None:
        data["out"] = str(out)
    parsed, problems, partial = recipe_problems(data)
    notes: list[str] = []
    if parsed is None:
        # Check the data too, so one run names every problem; skip checks that lean on keys already reported.
        bad = {e.split(": ", 1)[0] for e in problems}
        if partial is not None and not bad & {"data", "model", "resolution", "down_factor"}:
            _check_data(partial, problems)
        elif partial is not None and "data" not in bad and not Path(partial.data).expanduser().is_dir():
            problems.append(f"data: {partial.data} does not exist (make it with `clear synth --out {partial.data}`)")
        raise UsageError(problem_text(source, problems))
    rec: Recipe = parsed
    card = _check_data(rec, problems)
    if card and rec.resolution is None:
        res = card["resolution"]
        if int(res["width"]) == int(res["height"]):
            rec = dataclasses.replace(rec, resolution=int(res["width"]))
    t = rec.train
    split = num_processes * t.gradient_accumulation
    if t.batch_size % split:
        problems.append(f"train.batch_size: {t.batch_size} does not split over {num_processes} process(es) x "
                        f"gradient_accumulation {t.gradient_accumulation} (make it a multiple of {split})")
    if t.mixed_precision == "fp16":
        notes.append("fp16 overflows in FLUX and its T5 encoder; prefer mixed_precision: bf16")
    if t.optimizer == "prodigy":
        if not available("prodigyopt"):
            problems.append(f"train.optimizer: prodigy is not installed ({install_line('prodigyopt')}, or "
                            "optimizer: adamw)")
    if rec.report_to != "none":
        mod = {"tensorboard": "tensorboard", "wandb": "wandb"}[rec.report_to]
        if not available(mod):
            problems.append(f"report_to: {rec.report_to} is not installed ({install_line(mod)}, or report_to: none)")
    out_dir = Path(rec.out_dir).expanduser()
    ckpt, step = _check_out(rec, out_dir, None if resume is None else str(resume), overwrite, problems, notes)
    if problems:
        raise UsageError(problem_text(source, problems))
    return _Plan(recipe=rec, source=source, out=out_dir, card=card, resume_from=ckpt, start_step=step,
                 overwrite=overwrite, notes=notes)


# --------------------------------------------------------------------------------------------- the run

def _reset_single_process_state() -> None:
    """In-process reruns (tests, notebooks): accelerate's singleton state refuses new settings unless reset.
    Never under a launcher: there the process group must stay."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _make_accelerator(recipe: Recipe, out: Path, device: str):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    _reset_single_process_state()
    # Teacher copies are buffers: DDP must not broadcast them every forward (3.6 GB per step for FLUX).
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False, find_unused_parameters=False)
    acc = Accelerator(
        mixed_precision=recipe.train.mixed_precision, gradient_accumulation_steps=recipe.train.gradient_accumulation,
        log_with=None if recipe.report_to == "none" else recipe.report_to, cpu=device == "cpu",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        step_scheduler_with_optimizer=False, kwargs_handlers=[ddp],
    )
    check_accumulation(acc, recipe)
    return acc


def check_accumulation(acc, recipe: Recipe) -> None:
    """accelerate lets its launch config (ACCELERATE_GRADIENT_ACCUMULATION_STEPS, a DeepSpeed config) override the
    recipe's accumulation, which would silently change the global batch: refuse instead."""
    if acc.gradient_accumulation_steps != recipe.train.gradient_accumulation:
        raise UsageError(f"train.gradient_accumulation is {recipe.train.gradient_accumulation} but accelerate's "
                         f"config says {acc.gradient_accumulation_steps}",
                         "make them agree (--set train.gradient_accumulation=N, or the accelerate/DeepSpeed config)")


class Distiller:
    """One distillation run; `distill()` calls the steps in this order (recipe keys in brackets, docs in
    recipes/flux_dev.yaml):

    load_model         the teacher, linearized with frozen teacher copies [model, window, down_factor, resolution],
                       gradient checkpointing [train.gradient_checkpointing], the attention-loss layers [loss.attn_layers]
    encode_validation  the validation prompts, encoded once [validation.prompts]
    setup              optimizer and schedule [train.optimizer, lr, schedule, warmup_steps], data loader over the synth
                       set [data, train.batch_size, gradient_accumulation], accelerate's prepare (DDP/DeepSpeed/FSDP)
    prepare_out        --overwrite / --resume in --out; the resolved recipe.yaml
    run                train_step per step (loss = fm + pred + attn terms [loss.*]), log.jsonl, trackers
                       [report_to], checkpoints [checkpoint.every, keep], validation images [validation.every],
                       then the weights file (save_weights)
    """

    def __init__(self, p: _Plan, accelerator, *, progress: bool = True, pipe=None):
        self.p = p
        self.recipe = p.recipe
        self.acc = accelerator
        self.progress = progress
        self.out = p.out
        self.notes = list(p.notes)
        self._pipe = pipe

    # -- setup ---------------------------------------------------------------------------------------------
    def load_model(self) -> None:
        """Load the pipeline, install CLEAR with teacher copies, freeze all but the attention projections."""
        from clear_cli.attention.linearize import (
            attention_modules, default_attention_layers, linearize, trainable_attention_parameters,
        )
        from clear_cli.models import load_pipeline, text_len

        r = self.recipe
        dtype = mixed_dtype(r.train.mixed_precision)
        pipe = self._pipe or load_pipeline(r.model, device=self.acc.device, dtype=dtype)
        from clear_cli.models.pipeline import require_family
        require_family(pipe, ("flux", "qwen-image"), "clear distill")
        tr = pipe.transformer
        if tr.device != self.acc.device:
            tr.to(self.acc.device)
        n_proc = len(attention_modules(tr))
        layers = list(r.loss.attn_layers) if r.loss.attn_layers is not None else default_attention_layers(tr)
        bad = [i for i in layers if not 0 <= i < n_proc]
        if bad:
            raise UsageError(f"loss.attn_layers: {bad} do not exist in {r.model} (processors 0..{n_proc - 1}: "
                             f"{tr.config.num_layers} double then {tr.config.num_single_layers} single)")
        if r.loss.attn > 0 and not layers:
            self.notes.append("the authors' attention-loss layers (single-stream, index % 4 == 0) do not exist in "
                              "this model: no attention loss (set loss.attn_layers)")
        self.layers = layers
        if text_len(pipe) != int(self.p.card.get("model", {}).get("text_len", text_len(pipe))):
            raise UsageError(f"data: drawn at text length {self.p.card['model']['text_len']}, {r.model} uses "
                             f"{text_len(pipe)}")
        tr.requires_grad_(False)
        from clear_cli.attention.kernels import check_backend

        try:
            check_backend(r.backend, self.acc.device)   # e.g. triton without CUDA
        except ValueError as e:
            raise UsageError(f"backend: {e}") from None
        linearize(tr, window=r.window, down_factor=r.down_factor, backend=r.backend, keep_teacher=True)
        params = trainable_attention_parameters(tr, freeze_others=True)
        for p in params.values():
            # Trained weights in fp32 (mixed precision computes in bf16/fp16); set once, before any optimizer sees
            # them (diffusers' cast_training_params does the same).
            p.data = p.data.float()
        if r.train.gradient_checkpointing:
            tr.enable_gradient_checkpointing()
        from clear_cli.models.compile import compile_transformer

        compile_transformer(tr, r.compile, warn=self.notes.append)
        self.pipe, self.transformer, self.params = pipe, tr, params
        self.trainable_count = sum(p.numel() for p in params.values())
        self.teacher_bytes = sum(b.numel() * b.element_size() for n, b in tr.named_buffers() if ".teacher_" in n)

    def encode_validation(self) -> None:
        """Encode the validation prompts once, then free the text encoders (training reads cached embeddings)."""
        from clear_cli.models import text_len

        r = self.recipe
        self.val_embeds = None
        from clear_cli.attention.adapters import adapter_for

        if adapter_for(self.pipe.transformer).family == "qwen-image" and r.validation.prompts \
                and self.acc.is_main_process:
            with torch.no_grad():
                t5, mask = self.pipe.encode_prompt(list(r.validation.prompts), device=self.acc.device,
                                                   max_sequence_length=text_len(self.pipe))
            if mask is None:
                mask = torch.ones(t5.shape[:2], dtype=torch.long, device=t5.device)
            self.val_embeds = (t5, mask)
        elif r.validation.prompts and self.acc.is_main_process:
            with torch.no_grad():
                t5, pooled, _ = self.pipe.encode_prompt(prompt=list(r.validation.prompts), prompt_2=None,
                                                        device=self.acc.device,
                                                        max_sequence_length=text_len(self.pipe))
            self.val_embeds = (t5, pooled)
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(self.pipe, name, None) is not None:
                setattr(self.pipe, name, None)

    def setup(self) -> None:
        from clear_cli.data import SynthDataset
        from clear_cli.training.batches import BatchSource

        r = self.recipe
        self.ds = SynthDataset(r.data)
        sched = getattr(self.pipe, "scheduler", None)
        n_train = int(getattr(getattr(sched, "config", None), "num_train_timesteps", 1000) or 1000)
        self.source = BatchSource(self.ds, seed=r.train.seed, batch_size=r.train.batch_size, latents=r.train.latents,
                                  timesteps=r.train.timesteps, logit_mean=r.train.logit_mean,
                                  logit_std=r.train.logit_std, num_train_timesteps=n_train)
        opt = build_optimizer(list(self.params.values()), r)
        lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(r.train.schedule, r.train.steps,
                                                                    r.train.warmup_steps))
        ds_plugin = getattr(self.acc.state, "deepspeed_plugin", None)
        if ds_plugin is not None:  # no DataLoader goes through prepare(): DeepSpeed needs the micro batch told
            ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = self.micro_batch
        self.model, self.opt, self.lr_sched = self.acc.prepare(self.transformer, opt, lr_sched)
        check_accumulation(self.acc, r)  # DeepSpeed's config can still change it inside prepare()
        self.acc.register_save_state_pre_hook(self._save_hook)
        self.acc.register_load_state_pre_hook(self._load_hook)

    @property
    def micro_batch(self) -> int:
        t = self.recipe.train
        return t.batch_size // (self.acc.num_processes * t.gradient_accumulation)

    # Checkpoints hold the trained tensors only: the frozen model is the base model (24 GB for FLUX).
    def _is_ours(self, model) -> bool:
        return self.acc.unwrap_model(model) is self.transformer

    def _save_hook(self, models: list, weights: list, output_dir: str) -> None:
        if len(weights) == len(models):
            for i in reversed(range(len(models))):
                if self._is_ours(models[i]):
                    weights.pop(i)
        if self.acc.is_main_process:
            state = {k: v.to("cpu").contiguous() for k, v in trainable_state(self.transformer).items()}
            save_safetensors(os.path.join(output_dir, TRAINABLE_FILE), state)

    def _load_hook(self, models: list, input_dir: str) -> None:
        for i in reversed(range(len(models))):
            if self._is_ours(models[i]):
                models.pop(i)
        path = Path(input_dir) / TRAINABLE_FILE
        if not path.is_file():
            return  # DeepSpeed/FSDP checkpoints hold the model in their own format
        from safetensors.torch import load_file

        state = load_file(str(path))
        missing = sorted(set(self.params) - set(state))
        if missing:
            raise ClearError(f"checkpoint {input_dir} lacks trained tensors {missing[:3]}",
                             "it belongs to another recipe; use another --out")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state[k].to(p.device, p.dtype))

    # -- output directory ----------------------------------------------------------------------------------
    def prepare_out(self) -> None:
        """Only now is anything written: the output directory, the resolved recipe, the trimmed log."""
        if self.acc.is_main_process:
            if self.p.overwrite and self.out.is_dir():
                remove_owned(self.out, OWNED)
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / RECIPE_FILE, self._recipe_yaml())
            self._trim_log(self.p.start_step)
        self.acc.wait_for_everyone()

    def _recipe_yaml(self) -> str:
        import yaml

        head = (f"# Resolved recipe of this run (from {self.p.source}); rerun with\n"
                f"#   clear distill {self.out / RECIPE_FILE} --resume auto\n"
                f"# recipe_hash {recipe_hash(self.recipe)}\n")
        return head + yaml.safe_dump(self.resolved_dict(), sort_keys=False)

    def resolved_dict(self) -> dict:
        data = to_dict(self.recipe)
        data["out"] = str(self.out)
        return data

    def _trim_log(self, step: int) -> None:
        """On resume keep the records up to the checkpoint's step, so the log reads as one uninterrupted run."""
        path = self.out / LOG_FILE
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
                keep.append(line)
        atomic_write_text(path, "".join(k + "\n" for k in keep))

    # -- checkpoints -----------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        """accelerate save_state on every rank into a temporary folder, renamed into place when all are done."""
        root = self.out / CHECKPOINTS
        final, tmp = root / f"step_{step}", root / f".step_{step}.tmp"
        if self.acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        try:
            self.acc.save_state(str(tmp))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint never stays (a full disk, a kill)
            raise
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            state = {"step": step, "recipe": self.resolved_dict(), "recipe_hash": recipe_hash(self.recipe),
                     "num_processes": self.acc.num_processes}
            atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            keep = self.recipe.checkpoint.keep
            if keep > 0:
                for _, old in list_checkpoints(self.out)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def resume(self) -> int:
        if self.p.resume_from is None:
            return 0
        self.acc.load_state(str(self.p.resume_from))
        self.notes.append(f"resumed from {self.p.resume_from} (step {self.p.start_step})")
        return self.p.start_step

    # -- validation images -----------------------------------------------------------------------------------
    def validate(self, step: int | None) -> None:
        """Draw the validation prompts with the student (and, with step None, the teacher) on the main process."""
        from clear_cli.attention.linearize import teacher_mode
        from clear_cli.sampling.seeds import draw

        r = self.recipe
        if self.val_embeds is None or not self.acc.is_main_process:
            return
        folder = self.out / VALIDATION / ("teacher" if step is None else f"step_{step:06d}")
        if step is None and folder.is_dir():
            return
        t5, pooled = self.val_embeds
        res = r.resolution or BASE_RES
        images = []
        with torch.no_grad(), self.acc.autocast():
            for i in range(t5.shape[0]):
                kw = dict(embeds=(t5, pooled), width=res, height=res, num_inference_steps=r.validation.steps,
                          guidance_scale=r.validation.guidance)
                if step is None:
                    with teacher_mode(self.transformer):
                        images.append(draw(self.pipe, [i], r.validation.seed, **kw)[0])
                else:
                    images.append(draw(self.pipe, [i], r.validation.seed, **kw)[0])
        with atomic_dir(folder) as tmp:
            for i, im in enumerate(images):
                save_png(im, tmp / f"{i:02d}.png")

    # -- the loop ------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over the global batch; returns the losses averaged over it (all processes)."""
        t = self.recipe.train
        sums = {k: torch.zeros((), device=self.acc.device) for k in ("loss", *LOSS_TERMS)}
        for m in range(t.gradient_accumulation):
            batch = self.source.micro(step, m, self.acc.process_index, self.acc.num_processes,
                                      t.gradient_accumulation, device=self.acc.device,
                                      dtype=mixed_dtype(t.mixed_precision))
            with self.acc.accumulate(self.model):
                terms = loss_terms(self.model, self.transformer, batch, self.recipe, self.layers)
                self.acc.backward(terms["loss"])
                if self.acc.sync_gradients:
                    if t.max_grad_norm > 0:
                        self.acc.clip_grad_norm_(list(self.params.values()), t.max_grad_norm)
                    self.opt.step()
                    self.lr_sched.step()
                    self.opt.zero_grad(set_to_none=True)
            for k in sums:
                sums[k] += terms[k].detach() / t.gradient_accumulation
        stacked = torch.stack([sums[k] for k in ("loss", *LOSS_TERMS)])
        mean = self.acc.reduce(stacked, reduction="mean")
        return {k: float(v) for k, v in zip(("loss", *LOSS_TERMS), mean.tolist())}

    def current_lr(self) -> float:
        g = self.opt.param_groups[0]
        return float(g["lr"]) * float(g.get("d", 1.0))  # Prodigy: the effective step size is d * lr

    def run(self) -> DistillResult:
        from clear_cli.logs import progress_bar as tqdm

        r = self.recipe
        t0 = time.perf_counter()
        start = self.resume()
        if r.report_to != "none":
            self.acc.init_trackers("clear-distill", config=_flat(self.resolved_dict()))
        if start == 0:
            self.validate(None)
        log: list[dict] = []
        bar = tqdm(total=r.train.steps, initial=start, desc="distill", unit="step", dynamic_ncols=True, mininterval=1.0,
                   disable=not (self.progress and self.acc.is_local_main_process))
        last_saved = start if self.p.resume_from is not None else -1
        step = start
        for step in range(start, r.train.steps):
            ts = time.perf_counter()
            losses = self.train_step(step)
            done = step + 1
            rec = {"step": done, **{k: round(v, 8) for k, v in losses.items()}, "lr": self.current_lr(),
                   "seconds": round(time.perf_counter() - ts, 4),
                   "samples_per_s": round(r.train.batch_size / max(1e-9, time.perf_counter() - ts), 3)}
            if not all(math.isfinite(v) for v in losses.values()):
                raise ClearError(f"step {done}: the loss is not finite ({losses})",
                                 "lower train.lr, use mixed_precision bf16 rather than fp16, or resume from the "
                                 "last checkpoint")
            log.append(rec)
            if self.acc.is_main_process:
                with open(self.out / LOG_FILE, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            if r.report_to != "none":
                self.acc.log({k: rec[k] for k in ("loss", *LOSS_TERMS, "lr")}, step=done)
            bar.update(1)
            bar.set_postfix(loss=f"{losses['loss']:.4f}", fm=f"{losses['fm']:.4f}", pred=f"{losses['pred']:.4f}",
                            attn=f"{losses['attn']:.4f}")
            if r.checkpoint.every and done % r.checkpoint.every == 0 and done < r.train.steps:
                self.save_checkpoint(done)
                last_saved = done
            if r.validation.every and done % r.validation.every == 0 and done < r.train.steps:
                self.validate(done)
        bar.close()
        final = r.train.steps
        if last_saved != final:
            self.save_checkpoint(final)
        self.validate(final)
        weights = self.save_weights(final)
        if r.report_to != "none":
            self.acc.end_training()
        self.acc.wait_for_everyone()
        return DistillResult(out=self.out, weights=weights, steps=final, start_step=start, log=log,
                             seconds=time.perf_counter() - t0, trainable_params=self.trainable_count,
                             teacher_copy_bytes=self.teacher_bytes, notes=self.notes,
                             is_main=self.acc.is_main_process)

    def save_weights(self, steps: int) -> Path | None:
        """OUT/clear_attn.safetensors: trained tensors under the transformer's own keys + metadata (DESIGN.md §7)."""
        path = self.out / WEIGHTS_FILE
        if not self.acc.is_main_process:
            return path
        from clear_cli.models.weights import save_attention_weights

        dtype = mixed_dtype(self.recipe.train.mixed_precision)
        tensors = {k: v.to(dtype) for k, v in trainable_state(self.acc.unwrap_model(self.model)).items()}
        r = self.recipe
        save_attention_weights(path, tensors, {
            "format": "clear", "window": r.window, "down_factor": r.down_factor, "base_model": r.model,
            "steps": steps, "recipe_hash": recipe_hash(r), "resolution": r.resolution,
            "loss_weights": {"fm": r.loss.fm, "pred": r.loss.pred, "attn": r.loss.attn},
        })
        return path


def _flat(d: dict, prefix: str = "") -> dict:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def distill(config: DistillConfig | str | Path | Recipe | dict | None = None, *, log: Log | None = None,
            progress: bool = True, pipe=None, **options: Any) -> DistillResult:
    """Distil CLEAR attention into a FLUX model from a recipe (a YAML path, a Recipe or a mapping).

    `config` or keyword `options` (DistillConfig fields); a recipe in place of `config` is `recipe`
    (`distill("recipes/tiny.yaml", sets=["train.steps=50"], out="out/d")`). sets: `key=value` recipe overrides
    (`overrides=` before 0.2); out: output directory (else the recipe's `out`); resume: None (fresh; refuses a used
    --out), "auto" (latest checkpoint in out, else fresh) or a checkpoint directory; overwrite: delete a previous
    run in out first; device: auto|cpu|cuda (cpu forces CPU even with CUDA); compile: auto|on|off over the
    recipe's; pipe: an already loaded pipeline of the recipe's model (tests); log: the notes, as lines. Under
    `accelerate launch`, every process calls it. Bad input raises one UsageError naming every problem before
    anything is written.
    """
    if "overrides" in options:  # the keyword before 0.2
        options["sets"] = options.pop("overrides")
    if config is not None and not isinstance(config, DistillConfig):
        options["recipe"] = config
        config = None
    cfg = merge_options(DistillConfig, config, options, job="distill")
    sets = list(cfg.sets)
    if cfg.compile is not None:
        from clear_cli.models.compile import check_compile

        sets.append(f"compile={check_compile(cfg.compile)}")
    recipe, out, resume, overwrite, device = cfg.recipe, cfg.out, cfg.resume, cfg.overwrite, cfg.device
    from accelerate import PartialState

    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {device!r}: distill takes auto, cpu or cuda (accelerate picks each process's "
                         "GPU)")
    cpu = device == "cpu" or not torch.cuda.is_available() or \
        os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    # Without CUDA, processes started by torchrun / accelerate only form a (gloo) group when told to use the CPU.
    n_proc = PartialState(cpu=cpu).num_processes if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 1
    p = plan(recipe, overrides=sets, out=out, resume=resume, overwrite=overwrite, num_processes=n_proc)
    _check_device(p.recipe, device, cpu)
    main = n_proc == 1 or PartialState(cpu=cpu).is_main_process
    with OutLock(p.out, "distill") if main else contextlib.nullcontext():
        return _distill(p, device, cpu, progress, pipe, log)


def _check_device(recipe: Recipe, device: str, cpu: bool) -> None:
    """What the device cannot run, refused before the model loads (not found at the first step)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible", "use --device auto or cpu")
    if cpu and recipe.train.mixed_precision == "fp16":
        raise UsageError("train.mixed_precision: fp16 does not run on the CPU",
                         "use --set train.mixed_precision=no (or bf16) for CPU training")
    if cpu and recipe.backend == "flex":
        raise UsageError("backend: flex has no backward pass on the CPU (FlexAttention trains on CUDA only)",
                         "use --set backend=auto (the tiled kernel on CPU)")


def _distill(p: _Plan, device: str, cpu: bool, progress: bool, pipe, log: Log | None) -> DistillResult:
    acc = _make_accelerator(p.recipe, p.out, "cpu" if cpu else device)
    from clear_cli.models import fit

    fit.check_distill(p.recipe, acc)  # one process's weights, optimizer and activations fit, before any write
    run = Distiller(p, acc, progress=progress, pipe=pipe)
    if acc.num_processes == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
        run.notes.append("`accelerate launch --cpu` starts a single process; for N CPU processes run "
                         "`accelerate launch --multi_gpu --num_processes N -m clear_cli distill ...` on a machine "
                         "without CUDA, or `torchrun --nproc_per_node N -m clear_cli distill ... --device cpu`")
    run.load_model()  # may still refuse (attention-loss layers, text length): nothing is written before this
    run.encode_validation()
    run.setup()
    run.prepare_out()
    result = run.run()
    say = sayer(log) if result.is_main else sayer(None)
    for note in result.notes:
        say(f"note: {note}")
    return result


