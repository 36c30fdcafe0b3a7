"""`clear demo`: the whole workflow on the built-in tiny FLUX, in a few minutes on a CPU.

    import clear_cli
    result = clear_cli.demo(out="out/demo")
    print(result.summary)

Five stages, each through the Python API of its command (no subprocesses), each writing under OUT:

    synth    the tiny teacher draws `n` scenes at `res` px          OUT/synth/
    distill  recipes/tiny.yaml (+ the demo's `--set` overrides)            OUT/distill/clear_attn.safetensors
    eval     teacher vs CLEAR before (zero-shot) and after distillation    OUT/eval/report.html, eval.json
             on held-out prompts, same seeds                               (zero-shot file: OUT/weights/)
    export   the distilled weights as a LoRA stock diffusers loads         OUT/weights/clear_lora.safetensors
    gen      one image at `gen_res` px (cascade) with the LoRA, before      OUT/images/
             and after, each against the same cascade in full attention

Resume: OUT/demo.json records the settings and, per stage, a key (its settings and the fingerprints of its
inputs) and its outputs' fingerprints. A rerun reuses every finished stage whose key and outputs still match,
continues an interrupted one where its command can (synth batches, distill checkpoints, eval's cached images),
and redoes the rest. Other settings in the same OUT are refused (pass --overwrite or another --out).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clear_cli.config import doc, merge_options
from clear_cli.errors import ClearError, UsageError
from clear_cli.files import OutLock, atomic_write_text, check_out_dir, foreign_entries, remove_owned
from clear_cli.flux import PIXELS_PER_TOKEN, TINY_MODELS
from clear_cli.logs import Log, sayer

STATE_FILE = "demo.json"
SUMMARY_FILE = "summary.md"
FORMAT = "clear-demo/1"
STAGES = ("synth", "distill", "eval", "export", "gen")
# Everything the demo may delete with --overwrite: nothing else in OUT is ever touched.
OWNED = (STATE_FILE, SUMMARY_FILE, "synth", "distill", "eval", "weights", "images", "eval_prompts.txt")
MODELS = TINY_MODELS
# Fields that do not change what the demo computes, so they may differ on resume.
_NOT_IDENTITY = ("out", "overwrite", "threads", "device")



@dataclass
class DemoConfig:
    """The demo's settings (CLI options map 1:1); the defaults fit 5 minutes on 2 CPU cores."""

    out: str = doc("out/demo", "output folder; rerun the same command to resume")
    model: str = doc("tiny", "tiny (the built-in FLUX that draws shapes) or tiny-random (plumbing checks only)")
    res: int = doc(128, "size in pixels of the synth data, distillation and eval (the tiny model's own: 128)")
    n: int = doc(96, "scenes the teacher draws for distillation")
    synth_steps: int = doc(12, "denoising steps per synth image")
    window: int = doc(2, "CLEAR window radius in tokens (2 on tiny's 8x8 grid: 9 of 64 image keys, enough to hurt)")
    distill_steps: int = doc(300, "distillation optimizer steps (batch 8, as recipes/tiny.yaml)")
    checkpoint_every: int = doc(50, "distillation checkpoint interval in steps (what an interrupted run resumes from)")
    recipe: str | None = doc(None, "distillation recipe (default: recipes/tiny.yaml of this checkout; the synth "
                                    "captions are tiny_prompts.txt beside it)")
    sets: list[str] = doc([], "extra recipe overrides key=value, applied after the demo's own (e.g. train.lr=1e-3)")
    eval_n: int = doc(12, "held-out prompts evaluated (captions of scenes the data never saw)")
    eval_steps: int = doc(12, "denoising steps per eval image")
    lora_rank: int = doc(64, "rank of the exported LoRA (tiny's projections are 128 x 128)")
    gen_res: int = doc(256, "size of the generated image (a cascade from `res`, as FLUX goes 1K -> 8K)")
    seed: int = doc(0, "seed of the synth data, the eval images and the generated image")
    device: str = doc("auto", "auto, cpu or cuda (the tiny model is quick on a CPU)")
    threads: int | None = doc(1, "CPU threads for torch while the demo runs (None: torch's default); tiny's "
                                 "ops are too small to gain from more, and spinning threads stall shared cores")
    overwrite: bool = doc(False, "delete the demo's own outputs in --out and start over")

    def validate(self) -> list[str]:
        bad = []
        if self.model not in MODELS:
            bad.append(f"--model {self.model!r}: the demo runs on the built-in tiny FLUX (tiny or tiny-random); "
                       "for FLUX.1-dev run the five commands (README)")
        if self.res < 32 or self.res % 16:
            bad.append(f"--res {self.res}: must be a multiple of 16, at least 32")
        if self.gen_res < self.res or self.gen_res % 16:
            bad.append(f"--gen-res {self.gen_res}: must be a multiple of 16, at least --res ({self.res})")
        for name in ("n", "synth_steps", "window", "distill_steps", "eval_n", "eval_steps", "lora_rank"):
            if getattr(self, name) < 1:
                bad.append(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.eval_n < 2:
            bad.append(f"--eval-n {self.eval_n}: at least 2 (eval leaves the first image out of its timing)")
        if self.checkpoint_every < 0:
            bad.append(f"--checkpoint-every {self.checkpoint_every}: must be >= 0 (0 = only at the end)")
        if self.threads is not None and self.threads < 1:
            bad.append(f"--threads {self.threads}: must be at least 1")
        for s in self.sets:
            if "=" not in s:
                bad.append(f"--set {s!r}: expected key=value (e.g. --set train.lr=1e-3)")
        return bad


@dataclass
class StageRun:
    """One stage of this run: `ran`, `resumed` (continued an interrupted run) or `reused` (already complete)."""

    name: str
    status: str
    seconds: float  # spent in this run
    total_seconds: float  # spent by the run(s) that made its outputs
    outputs: dict[str, str] = field(default_factory=dict)


@dataclass
class DemoResult:
    """What the demo made: the stages, the figures, the summary table (also in OUT/summary.md)."""

    out: Path
    stages: list[StageRun]
    eval: dict
    gen: dict
    export: dict
    summary: str
    report: Path
    images: list[Path]
    seconds: float


# --------------------------------------------------------------------------------------------- small helpers

def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sha(path: Path) -> str | None:
    from clear_cli.models.weights import file_sha256

    return file_sha256(path) if path.is_file() else None


def _repo_recipes() -> Path:
    """recipes/ of this checkout (the recipes are not package data)."""
    return Path(__file__).resolve().parents[2] / "recipes"


def teacher_fingerprint(model: str) -> str:
    """Which teacher drew: the shipped tiny weights can be retrained, and every stage's outputs depend on them."""
    if model == "tiny":
        from clear_cli.models.tiny import TINY_WEIGHTS

        return _sha(TINY_WEIGHTS) or "random (no trained weights)"
    return model


def identity(cfg: DemoConfig) -> dict:
    """The settings that shape the results; a resume must match them (`n` keeps its old key, `samples`)."""
    return {("samples" if k == "n" else k): v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IDENTITY}


def _coerce(config: DemoConfig | None, options: dict) -> DemoConfig:
    if "samples" in options:  # the name before 0.2
        options["n"] = options.pop("samples")
    cfg = merge_options(DemoConfig, config, options, job="demo")
    problems = cfg.validate()
    if problems:
        raise UsageError("; ".join(problems))
    return cfg


class _State:
    """OUT/demo.json: settings + per-stage {key, done, seconds, outputs}; rewritten atomically after each change."""

    def __init__(self, out: Path, settings: dict, stages: dict | None = None):
        self.path = out / STATE_FILE
        self.settings = settings
        self.stages: dict[str, dict] = stages or {}

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"format": FORMAT, "settings": self.settings,
                                                 "stages": self.stages}, indent=1) + "\n")


def _open_out(cfg: DemoConfig) -> _State:
    """Check OUT before anything is written: ours to resume, ours to overwrite, or empty."""
    out = Path(cfg.out).expanduser()
    settings = identity(cfg)
    state_path = out / STATE_FILE
    old: dict | None = None
    if state_path.is_file():
        try:
            old = json.loads(state_path.read_text())
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict) or old.get("format") != FORMAT:
            if not cfg.overwrite:
                raise UsageError(f"{state_path} is not a demo record this version reads",
                                 "pass --overwrite to start over, or another --out")
            old = None
    elif out.is_dir():
        stray = foreign_entries(out, (), keep=(".demo.lock",))  # .demo.lock: an older version's lock file
        if stray:
            raise UsageError(f"--out {out} is not empty and holds no demo (found {stray[0]})",
                             "pick a new or empty directory; --overwrite deletes only the demo's own files")
    if old is not None and not cfg.overwrite:
        diffs = [f"{k}: {old['settings'].get(k)!r} -> {v!r}" for k, v in settings.items()
                 if old.get("settings", {}).get(k) != v]
        if diffs:
            raise UsageError(f"--out {out} holds a demo run with other settings ({'; '.join(diffs)})",
                             "rerun with the same options to resume, pass --overwrite to start over, or another --out")
        return _State(out, settings, old.get("stages", {}))
    if cfg.overwrite:
        remove_owned(out, OWNED)
    out.mkdir(parents=True, exist_ok=True)
    state = _State(out, settings)
    state.save()
    return state


# --------------------------------------------------------------------------------------------- the runner

class _Demo:
    """The five stages over one OUT, in the order `demo()` runs them; constructing it checks the recipe and
    overrides without writing anything. Each stage is skipped when its recorded outputs are still there.

    synth     the teacher draws --n scenes at --res px, --synth-steps steps, seeded --seed (clear_cli.synth)
    distill   --distill-steps steps of recipes/tiny.yaml (--recipe, --set), checkpoints every --checkpoint-every
    evaluate  teacher vs zero-shot CLEAR vs distilled CLEAR on --eval-n held-out prompts, --eval-steps steps
    export    the distilled weights as a rank --lora-rank LoRA
    generate  one image at --gen-res px (a cascade from --res) with the LoRA and zero-shot, each vs full attention
    """

    def __init__(self, cfg: DemoConfig, say: Log, progress: bool):
        self.cfg, self.say, self.progress = cfg, say, progress
        self.state: _State | None = None  # set once OUT is opened (and locked)
        self.out = Path(cfg.out).expanduser()
        self.runs: list[StageRun] = []
        self.recipe = Path(cfg.recipe).expanduser() if cfg.recipe else _repo_recipes() / "tiny.yaml"
        self.train_prompts = self.recipe.parent / "tiny_prompts.txt"  # the captions recipes/tiny.yaml names
        missing = [p for p in (self.recipe, self.train_prompts) if not p.is_file()]
        if missing:
            raise UsageError(f"{missing[0]} not found (the demo reads the recipes of a clear checkout)",
                             "run it from a clone of the repository (pip install -e .), or pass --recipe FILE")
        self.synth_dir = self.out / "synth"
        self.distill_dir = self.out / "distill"
        self.eval_dir = self.out / "eval"
        self.weights_dir = self.out / "weights"
        self.images_dir = self.out / "images"
        self.distilled = self.distill_dir / "clear_attn.safetensors"
        self.zero_shot = self.weights_dir / "zero_shot_attn.safetensors"
        self.lora = self.weights_dir / "clear_lora.safetensors"
        self.eval_prompts = self.out / "eval_prompts.txt"
        self.teacher = teacher_fingerprint(cfg.model)
        self.check_recipe()

    def check_recipe(self) -> None:
        """Bad --set keys or values fail now, not after the data is drawn (the data itself is checked by distill)."""
        from clear_cli.training.recipe import problem_text, recipe_data, recipe_problems

        _, problems, _ = recipe_problems(recipe_data(self.recipe, self.overrides()))
        if problems:
            raise UsageError(problem_text(f"{self.recipe} with the demo's overrides", problems))

    # -- one stage: reuse, resume or run ----------------------------------------------------------------------
    def stage(self, index: int, name: str, what: str, key: dict, check: Callable[[dict], bool],
              run: Callable[[bool], dict]) -> dict:
        """`check(record)`: are the recorded outputs still there and unchanged? `run(resume)` -> outputs record."""
        k = _hash({**key, "teacher": self.teacher})
        rec = self.state.stages.get(name)
        head = f"[{index}/{len(STAGES)}] {name}: {what}"
        if rec and rec.get("key") == k and rec.get("done") and check(rec.get("outputs", {})):
            self.say(f"{head} -- reused (complete in {self.out / STATE_FILE})")
            self.runs.append(StageRun(name, "reused", 0.0, float(rec.get("seconds", 0.0)), rec["outputs"]))
            return rec["outputs"]
        resume = bool(rec) and rec.get("key") == k  # same inputs, interrupted (or outputs damaged): continue
        spent = float(rec.get("seconds", 0.0)) if resume else 0.0
        self.say(f"{head}{' -- resuming' if resume else ''}")
        self.state.stages[name] = {"key": k, "done": False, "seconds": spent, "outputs": {}}
        self.state.save()
        t0 = time.perf_counter()
        try:
            outputs = run(resume)
        except ClearError as e:
            raise ClearError(f"demo stage {name}: {e.message}", e.hint, e.exit_code) from e
        except BaseException:
            self.state.stages[name]["seconds"] = spent + time.perf_counter() - t0
            self.state.save()
            raise
        dt = time.perf_counter() - t0
        self.state.stages[name] = {"key": k, "done": True, "seconds": round(spent + dt, 2), "outputs": outputs}
        self.state.save()
        self.runs.append(StageRun(name, "resumed" if resume else "ran", dt, spent + dt, outputs))
        self.say(f"      {name} done in {dt:.1f} s")
        return outputs

    # -- 1. synth -----------------------------------------------------------------------------------------
    def synth(self) -> dict:
        c = self.cfg
        opts = dict(model=c.model, prompts=str(self.train_prompts), n=c.n, res=str(c.res),
                    steps=c.synth_steps, seed=c.seed, out=str(self.synth_dir), batch_size=4, device=c.device)

        def manifest_sha() -> str | None:
            return _sha(self.synth_dir / "manifest.jsonl")

        def check(o: dict) -> bool:
            from clear_cli.data import dataset_card

            try:
                complete = bool(dataset_card(self.synth_dir).get("counts", {}).get("complete"))
            except ClearError:
                return False
            return complete and manifest_sha() == o.get("manifest_sha256")

        def run(resume: bool) -> dict:
            from clear_cli.jobs.synth import synth

            r = synth(**opts, overwrite=not resume and self.synth_dir.exists(), progress=self.progress)
            if not r.complete:
                raise ClearError(f"synth finished {r.done} of {r.n} samples", "rerun the demo to finish it")
            self.say(f"      {r.summary()}")
            return {"dataset": str(self.synth_dir), "manifest_sha256": manifest_sha(),
                    "images_per_s": round(r.images_per_s, 3)}

        return self.stage(1, "synth", f"the {c.model} teacher draws {c.n} scenes at {c.res} px "
                          f"({c.synth_steps} steps)", {"synth": opts}, check, run)

    # -- 2. distill ---------------------------------------------------------------------------------------
    def overrides(self) -> list[str]:
        c = self.cfg
        return [f"model={c.model}", f"data={self.synth_dir}", f"window={c.window}", "down_factor=1",
                f"resolution={c.res}", f"train.steps={c.distill_steps}", f"checkpoint.every={c.checkpoint_every}",
                "validation.every=0", *c.sets]

    def distill(self, data: dict) -> dict:
        c = self.cfg
        sets = self.overrides()
        key = {"recipe_sha256": _sha(self.recipe), "sets": sets, "data": data["manifest_sha256"]}

        def check(o: dict) -> bool:
            return _sha(self.distilled) == o.get("sha256")

        def run(resume: bool) -> dict:
            from clear_cli.jobs.distill import distill, list_checkpoints

            cont = resume and bool(list_checkpoints(self.distill_dir))
            r = distill(str(self.recipe), sets=sets, out=str(self.distill_dir),
                        resume="auto" if cont else None, overwrite=not cont and self.distill_dir.exists(),
                        device="cpu" if c.device == "cpu" else "auto", progress=self.progress)
            last = r.log[-1] if r.log else {}
            self.say(f"      distilled {r.steps} steps ({r.steps - r.start_step} in this run), "
                     f"{r.trainable_params / 1e6:.2f}M trained parameters"
                     + (f", last loss {last['loss']:.4f}" if last else ""))
            return {"weights": str(self.distilled), "sha256": _sha(self.distilled), "steps": r.steps,
                    "trainable_params": r.trainable_params, "log": str(self.distill_dir / "log.jsonl")}

        return self.stage(2, "distill", f"{self.recipe.name} at window {c.window}, {c.distill_steps} steps "
                          f"(--set {' '.join(sets[2:])})", key, check, run)

    # -- 3. eval ------------------------------------------------------------------------------------------
    def write_zero_shot(self, distilled: Path) -> None:
        """The student before distillation: the base model's own values of every tensor distillation trains."""
        from safetensors import safe_open

        from clear_cli.models import load_pipeline
        from clear_cli.models.weights import save_attention_weights

        with safe_open(str(distilled), "pt") as f:
            keys, dtype = list(f.keys()), f.get_tensor(next(iter(f.keys()))).dtype
        base = load_pipeline(self.cfg.model).transformer.state_dict()
        missing = [k for k in keys if k not in base]
        if missing:  # pooling weights (down_factor > 1) have no base value; the demo runs f = 1
            raise ClearError(f"{distilled.name} holds tensors the base model lacks ({missing[0]})",
                             "the demo distils with down_factor 1")
        save_attention_weights(self.zero_shot, {k: base[k].to(dtype) for k in keys},
                               {"format": "clear", "window": self.cfg.window, "down_factor": 1,
                                "base_model": self.cfg.model, "steps": 0})

    def evaluate(self, weights: dict) -> dict:
        c = self.cfg
        from clear_cli.tiny.scenes import held_out_prompts

        prompts = held_out_prompts(c.eval_n)
        opts = dict(model=c.model, n=c.eval_n, res=str(c.res), steps=c.eval_steps, seed=c.seed,
                    metrics="ssim,psnr,speed")
        key = {"eval": opts, "prompts": prompts, "distilled": weights["sha256"], "window": c.window}

        def check(o: dict) -> bool:
            return (self.eval_dir / "eval.json").is_file() and _sha(self.zero_shot) == o.get("zero_shot_sha256")

        def run(resume: bool) -> dict:
            from clear_cli.jobs.evaluate import evaluate

            atomic_write_text(self.eval_prompts, "".join(p + "\n" for p in prompts))
            self.write_zero_shot(self.distilled)
            res = evaluate([str(self.zero_shot), str(self.distilled)], **opts, prompts=str(self.eval_prompts),
                           out=str(self.eval_dir), device=c.device, overwrite=not resume, log=self.say,
                           progress=self.progress)
            return {"eval_json": str(self.eval_dir / "eval.json"), "report": str(self.eval_dir / res["report"]),
                    "grid": str(self.eval_dir / res["grid"]), "zero_shot": str(self.zero_shot),
                    "zero_shot_sha256": _sha(self.zero_shot)}

        return self.stage(3, "eval", f"teacher vs CLEAR before and after distillation on {c.eval_n} held-out "
                          f"prompts at {c.res} px (same seeds)", key, check, run)

    # -- 4. export ----------------------------------------------------------------------------------------
    def export(self, weights: dict) -> dict:
        c = self.cfg
        key = {"distilled": weights["sha256"], "rank": c.lora_rank, "model": c.model}

        def check(o: dict) -> bool:
            return _sha(self.lora) == o.get("sha256")

        def run(resume: bool) -> dict:
            from clear_cli.jobs.export import export

            r = export(str(self.distilled), format="lora", rank=c.lora_rank, model=c.model, out=str(self.lora),
                       overwrite=True, device="cpu" if c.device == "cpu" else "auto", progress=self.progress)
            for line in r.summary_lines():
                self.say(f"      {line}")
            errs = [x.error for x in r.layers]
            return {"lora": str(r.path), "sha256": _sha(r.path), "bytes": r.size_bytes, "rank": c.lora_rank,
                    "layers": len(r.layers), "mean_error": sum(errs) / len(errs) if errs else 0.0,
                    "max_error": max(errs) if errs else 0.0}

        return self.stage(4, "export", f"the distilled weights as a rank-{c.lora_rank} LoRA (diffusers keys)", key,
                          check, run)

    def _gen_log(self, msg: str) -> None:
        """gen logs every stage's schedule; the demo keeps warnings, the written files and the comparison."""
        text = msg.strip()
        if text.startswith(("warning:", "wrote", "compare:")):
            self.say(f"      {text}")

    # -- 5. gen -------------------------------------------------------------------------------------------
    def generate(self, lora: dict, ev: dict) -> dict:
        c = self.cfg
        from clear_cli.tiny.scenes import held_out_prompts

        prompt = held_out_prompts(1)[0]
        key = {"lora": lora["sha256"], "zero_shot": ev["zero_shot_sha256"], "res": c.gen_res, "seed": c.seed,
               "prompt": prompt, "model": c.model}

        def check(o: dict) -> bool:
            return all(Path(p).is_file() for p in o.get("files", []))

        def run(resume: bool) -> dict:
            from clear_cli.jobs.generate import generate

            rows, files = {}, []
            for label, w in (("before", self.zero_shot), ("after", self.lora)):
                o = generate(prompt, model=c.model, res=str(c.gen_res), weights=str(w),
                             out=str(self.images_dir / f"{label}.png"), seed=c.seed, compare=True, overwrite=True,
                             device=c.device, log=self._gen_log, progress=False)[0]
                rows[label] = {"path": str(o.path), "compare": str(o.compare_path), "full": str(o.full_path),
                               "psnr": o.psnr, "ssim": o.ssim, "seconds": round(o.seconds, 3),
                               "stages": [f"{s['width']}x{s['height']} {s['attention']}" for s in o.stages]}
                files += [str(o.path), str(o.compare_path), str(o.full_path)]
            return {"prompt": prompt, "res": c.gen_res, **rows, "files": files}

        return self.stage(5, "gen", f"one image at {c.gen_res} px with the LoRA (and zero-shot), each against "
                          "the same cascade in full attention", key, check, run)


# --------------------------------------------------------------------------------------------- the summary

def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else fmt.format(x)


def summarize(cfg: DemoConfig, out: Path, ev: dict, ex: dict, gen: dict, runs: list[StageRun],
              wall: float) -> str:
    """The summary table as Markdown (printed, and written to OUT/summary.md)."""
    t = ev["teacher"]
    studs = {s["name"]: s for s in ev["students"]}
    before, after = studs.get("zero_shot_attn", {}), studs.get("clear_attn", {})
    grid = cfg.res // PIXELS_PER_TOKEN
    lines = [
        f"# clear demo: {cfg.model} FLUX, CLEAR window r={cfg.window} on its {grid}x{grid} token grid",
        "",
        f"Eval: {ev['n']} held-out prompts at {ev['width']}x{ev['height']}, {ev['steps']} steps, prompt i with "
        f"seed {ev['seed']}+i for every model. Distilled {cfg.distill_steps} steps on {cfg.n} scenes the "
        "teacher drew.",
        "",
        "| model | PSNR vs teacher (dB) | SSIM vs teacher | s / image | attention FLOPs vs teacher |",
        "|---|---|---|---|---|",
        f"| teacher (full attention) | - | - | {_f(t.get('seconds_per_image'), '{:.3f}')} | 1.000 |",
    ]
    for label, s in (("CLEAR before distillation (zero-shot)", before),
                     (f"CLEAR after distillation ({cfg.distill_steps} steps)", after)):
        lines.append(f"| {label} | {_f(s.get('psnr'), '{:.2f}')} | {_f(s.get('ssim'), '{:.4f}')} | "
                     f"{_f(s.get('seconds_per_image'), '{:.3f}')} | {_f(s.get('attn_flops_ratio'), '{:.3f}')} |")
    if before.get("psnr") is not None and after.get("psnr") is not None:
        lines += ["", f"Distillation moved the CLEAR student {after['psnr'] - before['psnr']:+.2f} dB PSNR and "
                      f"{after['ssim'] - before['ssim']:+.4f} SSIM towards the teacher."]
    lines += [
        "",
        f"Gen: \"{gen['prompt']}\" at {gen['res']}x{gen['res']} ({' -> '.join(gen['after']['stages'])}), "
        "against the same cascade with full attention (same base image and noise):",
        "",
        "| weights | PSNR vs full attention (dB) | SSIM | s / image |",
        "|---|---|---|---|",
    ]
    for label, key in (("zero-shot (before)", "before"), (f"distilled, LoRA rank {ex['rank']} (after)", "after")):
        g = gen[key]
        lines.append(f"| {label} | {_f(g['psnr'], '{:.2f}')} | {_f(g['ssim'], '{:.4f}')} | {g['seconds']:.2f} |")
    lines += [
        "",
        f"LoRA: {ex['layers']} layers at rank {ex['rank']}, error of the delta (relative Frobenius) mean "
        f"{ex['mean_error']:.4f}, max {ex['max_error']:.4f}; {ex['bytes'] / 1e6:.2f} MB.",
        "",
        "Speed: at this size attention is a small share of the work and the tiled CLEAR kernel has fixed costs, so "
        "the tiny model is not faster here; CLEAR pays off at 2K-8K on FLUX (BENCHMARKS.md).",
        "",
        "| stage | this run | status |",
        "|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {r.name} | {r.seconds:.1f} s | {r.status}"
                     + (f" (made in {r.total_seconds:.1f} s)" if r.status == "reused" else "") + " |")
    lines.append(f"| total | {wall:.1f} s | |")
    rel = lambda p: str(Path(p).relative_to(out)) if Path(p).is_relative_to(out) else str(p)  # noqa: E731
    files = [
        ("dataset", out / "synth"),
        ("distilled weights", out / "distill" / "clear_attn.safetensors"),
        ("zero-shot weights", out / "weights" / "zero_shot_attn.safetensors"),
        ("LoRA", Path(ex["lora"])),
        ("eval", out / "eval" / "eval.json"),
        ("report", out / "eval" / "report.html"),
        ("grid", out / "eval" / "grid.png"),
        ("image (after)", Path(gen["after"]["path"])),
        ("CLEAR | full attention", Path(gen["after"]["compare"])),
        ("image (before)", Path(gen["before"]["path"])),
    ]
    lines += ["", f"Files (under {out}):", ""]
    lines += [f"- {name}: {rel(p)}" for name, p in files]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- entry point

def demo(config: DemoConfig | None = None, *, log: Log | None = None, progress: bool = True,
         **options: Any) -> DemoResult:
    """synth -> distill -> eval -> export -> gen on the tiny FLUX; rerun the same call to resume.

    `config` or keyword `options` (DemoConfig's fields: out, model, window, distill_steps, sets, ...).
    `log` receives the stage lines (None: quiet). Raises UsageError/ClearError (one line) on bad input or a
    failed stage, naming the stage.
    """
    import torch

    cfg = _coerce(config, options)
    say = sayer(log)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        with warnings.catch_warnings():
            if cfg.model == "tiny":
                from clear_cli.models.tiny import TINY_WEIGHTS

                if not TINY_WEIGHTS.is_file():
                    say("warning: the trained tiny weights are not in this build: the teacher is random and the "
                        "figures mean nothing")
                warnings.filterwarnings("ignore", message="trained tiny weights are not shipped")
            warnings.filterwarnings("ignore", message=".*FID from .* images per set")
            run = _Demo(cfg, say, progress)
            out = run.out
            check_out_dir(out)
            with OutLock(out, "demo"):
                run.state = _open_out(cfg)
                data = run.synth()
                weights = run.distill(data)
                ev_out = run.evaluate(weights)
                ex = run.export(weights)
                gen = run.generate(ex, ev_out)
    finally:
        torch.set_num_threads(threads)
    ev = json.loads(Path(ev_out["eval_json"]).read_text())
    wall = time.perf_counter() - t0
    text = summarize(cfg, out, ev, ex, gen, run.runs, wall)
    atomic_write_text(out / SUMMARY_FILE, text)
    images = [Path(gen["after"]["path"]), Path(gen["after"]["compare"]), Path(ev_out["grid"])]
    return DemoResult(out=out, stages=run.runs, eval=ev, gen=gen, export=ex, summary=text,
                      report=Path(ev_out["report"]), images=images, seconds=wall)


