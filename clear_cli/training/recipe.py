"""The distillation recipe: dataclasses with one-line field docs, loaded from YAML with `--set` overrides.

    recipe = load_recipe("recipes/tiny.yaml", ["train.steps=50", "window=2"])

Every problem in a file (unknown key with a did-you-mean, wrong type, bad value) is reported at once by
`clear_cli.config.load_config`; cross-field checks live in each section's `validate()`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from clear_cli.config import apply_overrides, doc, read_yaml, to_dict
from clear_cli.errors import UsageError
from clear_cli.flux import DEFAULT_MODEL

DEFAULT_OUT = "out/distill"


@dataclass
class TrainConfig:
    """How the optimizer runs."""

    steps: int = doc(10_000, "optimizer steps (each sees one global batch)")
    batch_size: int = doc(32, "global batch per optimizer step = micro batch x processes x gradient_accumulation; "
                              "the same whatever the number of processes")
    gradient_accumulation: int = doc(1, "micro batches accumulated per optimizer step on each process")
    optimizer: Literal["adamw", "prodigy"] = doc("prodigy", "adamw, or prodigy (pip install prodigyopt)")
    lr: float = doc(1.0, "peak learning rate (Prodigy: a multiplier on its own estimate, 1.0 as the authors)")
    schedule: Literal["constant", "cosine", "linear"] = doc("constant", "learning-rate schedule after warmup")
    warmup_steps: int = doc(0, "linear warmup steps from 0 to lr")
    weight_decay: float = doc(0.0, "decoupled weight decay")
    betas: list[float] = doc([0.9, 0.999], "Adam betas (Prodigy uses them too)")
    max_grad_norm: float = doc(1.0, "clip the gradient norm to this (0 = no clipping)")
    mixed_precision: Literal["no", "bf16", "fp16"] = doc("bf16", "no, bf16 or fp16 (frozen weights are stored in "
                                                                 "this dtype; trained ones stay fp32)")
    gradient_checkpointing: bool = doc(True, "recompute blocks in backward: less memory, ~30% more time")
    seed: int = doc(0, "seed of the data order, noise and timesteps (a function of seed and step, so resume "
                       "and any process count see the same batches)")
    latents: Literal["sample", "mean"] = doc("sample", "x0 from the cached VAE posterior: a sample (mean + std * eps) "
                                                       "or its mean")
    timesteps: Literal["uniform", "logit_normal"] = doc("uniform", "sigma sampling: uniform over the unshifted "
                                                                   "training sigmas (authors) or logit-normal")
    logit_mean: float = doc(0.0, "logit_normal: mean of the normal before the sigmoid")
    logit_std: float = doc(1.0, "logit_normal: std of the normal before the sigmoid")
    guidance: float = doc(3.5, "guidance embedding value fed to guidance-distilled models (FLUX.1-dev: 3.5)")

    def validate(self) -> list[str]:
        bad: list[str] = []
        if self.steps < 1:
            bad.append(f"steps: must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            bad.append(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.gradient_accumulation < 1:
            bad.append(f"gradient_accumulation: must be >= 1, got {self.gradient_accumulation}")
        elif self.batch_size >= 1 and self.batch_size % self.gradient_accumulation:
            bad.append(f"batch_size: {self.batch_size} is not a multiple of gradient_accumulation "
                       f"{self.gradient_accumulation}")
        if not self.lr > 0:
            bad.append(f"lr: must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            bad.append(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            bad.append(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad.append(f"betas: expected two numbers in [0, 1), got {self.betas}")
        if self.max_grad_norm < 0:
            bad.append(f"max_grad_norm: must be >= 0, got {self.max_grad_norm}")
        if not self.logit_std > 0:
            bad.append(f"logit_std: must be > 0, got {self.logit_std}")
        if self.guidance < 0:
            bad.append(f"guidance: must be >= 0, got {self.guidance}")
        return bad


@dataclass
class LossConfig:
    """Loss = fm * L_fm + pred * L_pred + attn * L_attn (DESIGN.md §4)."""

    fm: float = doc(1.0, "weight of the flow-matching loss: MSE(v_student, noise - x0)")
    pred: float = doc(0.5, "weight of the prediction loss: MSE(v_student, v_teacher)")
    attn: float = doc(0.5, "weight of the attention loss: MSE of attention outputs, mean over attn_layers")
    attn_layers: list[int] | None = doc(None, "processor indices for the attention loss (19 double then 38 single "
                                              "for FLUX); null = the authors' choice (single-stream, index % 4 == 0)")

    def validate(self) -> list[str]:
        bad = [f"{name}: must be >= 0, got {getattr(self, name)}" for name in ("fm", "pred", "attn")
               if getattr(self, name) < 0]
        if self.fm == 0 and self.pred == 0 and self.attn == 0:
            bad.append("fm, pred, attn: at least one loss weight must be > 0")
        if self.attn_layers is not None:
            neg = [i for i in self.attn_layers if i < 0]
            if neg:
                bad.append(f"attn_layers: processor indices are >= 0, got {neg}")
            if len(set(self.attn_layers)) != len(self.attn_layers):
                bad.append(f"attn_layers: repeated indices in {self.attn_layers}")
        return bad


@dataclass
class CheckpointConfig:
    """accelerate `save_state` checkpoints under OUT/checkpoints/step_N."""

    every: int = doc(1000, "save a checkpoint every N optimizer steps (0 = only at the end)")
    keep: int = doc(3, "keep the last K checkpoints (older ones are deleted; 0 = keep all)")

    def validate(self) -> list[str]:
        bad = []
        if self.every < 0:
            bad.append(f"every: must be >= 0, got {self.every}")
        if self.keep < 0:
            bad.append(f"keep: must be >= 0, got {self.keep}")
        return bad


@dataclass
class ValidationConfig:
    """Images drawn by the student (and once by the teacher) while training, under OUT/validation/."""

    prompts: list[str] = doc(["a red fox in a snowy forest, morning light",
                              "a lighthouse on a cliff at sunset, wide shot"], "prompts drawn at each validation")
    every: int = doc(1000, "draw validation images every N steps (0 = only at the end; no prompts = never)")
    steps: int = doc(28, "sampling steps per validation image")
    guidance: float = doc(3.5, "guidance scale when sampling")
    seed: int = doc(0, "seed of validation image i is seed + i (the teacher's use the same)")

    def validate(self) -> list[str]:
        bad = []
        if self.every < 0:
            bad.append(f"every: must be >= 0, got {self.every}")
        if self.steps < 1:
            bad.append(f"steps: must be >= 1, got {self.steps}")
        empty = [i for i, p in enumerate(self.prompts) if not str(p).strip()]
        if empty:
            bad.append(f"prompts: prompt(s) {empty} are empty")
        return bad


@dataclass
class Recipe:
    """One distillation run: which model and data, the CLEAR geometry, training, loss, checkpoints, validation."""

    data: str = doc("", "synth dataset directory (`clear synth --out DIR`) with cached embeddings and latents")
    model: str = doc(DEFAULT_MODEL, "hub id, local diffusers directory, tiny or tiny-random; must be the model that "
                                     "drew the data")
    out: str | None = doc(None, f"output directory (null = {DEFAULT_OUT}; --out overrides)")
    window: int = doc(16, "CLEAR window radius in tokens (16 px each for FLUX)")
    down_factor: int = doc(1, "f > 1 adds (H/f)(W/f) pooled keys with learnable f x f weights")
    backend: Literal["auto", "reference", "tiled", "flex", "triton"] = doc(
        "auto", "CLEAR kernel: auto = triton on CUDA (else flex), the differentiable tiled one on CPU")
    resolution: int | None = doc(None, "training side in pixels; null = the data's (must equal it: latents are cached)")
    train: TrainConfig = doc(TrainConfig(), "optimizer, batch, precision, sampling of timesteps")
    loss: LossConfig = doc(LossConfig(), "loss weights and attention-loss layers")
    checkpoint: CheckpointConfig = doc(CheckpointConfig(), "checkpoint frequency and retention")
    validation: ValidationConfig = doc(ValidationConfig(), "validation prompts and frequency")
    report_to: Literal["none", "tensorboard", "wandb"] = doc("none", "extra loss logging besides OUT/log.jsonl")
    compile: Literal["auto", "on", "off"] = doc("auto", "torch.compile of the FLUX blocks: auto (CUDA, from 2K up), "
                                                "on or off")

    def validate(self) -> list[str]:
        bad = []
        if not str(self.data).strip():
            bad.append("data: missing: name a synth dataset directory (make one with `clear synth --out DIR`)")
        if not str(self.model).strip():
            bad.append("model: empty")
        if self.window < 1:
            bad.append(f"window: must be >= 1 (radius in tokens), got {self.window}")
        if self.down_factor < 1:
            bad.append(f"down_factor: must be >= 1, got {self.down_factor}")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 16):
            bad.append(f"resolution: must be a positive multiple of 16, got {self.resolution}")
        return bad

    @property
    def out_dir(self) -> Path:
        return Path(self.out or DEFAULT_OUT)


# Fields that decide the trained weights; a resumed run must agree on all of them (steps may grow).
_RESUME_IGNORES = ("out", "checkpoint", "validation", "report_to", "backend", "compile")


def recipe_hash(recipe: Recipe) -> str:
    """sha256 (16 hex) of everything that decides the trained weights (not out/checkpoint/validation/logging)."""
    data = {k: v for k, v in to_dict(recipe).items() if k not in _RESUME_IGNORES}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def resume_differences(old: dict, new: Recipe) -> list[str]:
    """Keys whose values differ between a saved recipe (as a dict) and `new`, ignoring steps and logistics."""
    now = to_dict(new)
    diffs: list[str] = []
    for key in sorted(set(old) | set(now)):
        if key in _RESUME_IGNORES:
            continue
        a, b = old.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k != "steps"]
        elif a != b:
            diffs.append(key)
    return diffs


def _drop(data: dict, path: str) -> None:
    node, keys = data, re.sub(r"\[\d+\]", "", path).split(".")
    for k in keys[:-1]:
        node = node.get(k) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(keys[-1], None)


def recipe_problems(data: dict) -> tuple[Recipe | None, list[str], Recipe | None]:
    """(recipe or None, every problem, partial) for a recipe mapping.

    `clear_cli.config` checks values (validate()) only once every type is right; so that one run names every
    problem, the keys with problems are dropped and the rest is checked again. `partial` is the recipe built from
    what remains (defaults in place of the bad keys), for checks beyond the recipe itself (the data directory).
    """
    from clear_cli.config import _from_dict

    data = copy.deepcopy(data)
    errors: list[str] = []
    recipe = _from_dict(Recipe, copy.deepcopy(data), "", errors)
    rest = copy.deepcopy(data)
    new = list(errors)
    for _ in range(8):  # each pass can only reach checks the previous one skipped
        if not new:
            break
        for e in new:
            _drop(rest, e.split(": ", 1)[0])
        more: list[str] = []
        _from_dict(Recipe, copy.deepcopy(rest), "", more)
        new = [e for e in more if e not in errors]
        errors += new
    partial = recipe if not errors else _from_dict(Recipe, copy.deepcopy(rest), "", [])
    return (None if errors else recipe), errors, partial


def recipe_data(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    """The recipe file as a mapping with `--set` overrides applied (not checked yet)."""
    data = read_yaml(path) if path is not None else {}
    return apply_overrides(data, overrides or [])


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML (or the defaults when None), apply `--set key=value` overrides, check everything.

    One UsageError lists every problem (unknown keys with a did-you-mean, wrong types, bad values).
    """
    recipe, problems, _ = recipe_problems(recipe_data(path, overrides))
    if problems:
        raise UsageError(problem_text(str(path) if path is not None else "recipe", problems))
    return recipe


def problem_text(source: str, problems: list[str]) -> str:
    n = len(problems)
    return f"{source}: {n} problem{'s' if n > 1 else ''}: " + "; ".join(problems)
