"""How a Kontext target should see its reference image under CLEAR: the rules of clear_cli/attention/layout.py,
measured on the tiny model (issue 18).

    python bench/reference_rule.py                 # ~1-3 min on 2 CPU cores
    python bench/reference_rule.py --quick         # plumbing only
    python bench/reference_rule.py --weights out/transfer/clear_tiny/distill/clear_attn.safetensors \
        --out out/reference_rule_distilled        # with the teacher's distilled CLEAR weights (bench/transfer.py)

FluxKontextPipeline on the shipped tiny teacher (zero-shot: it was never trained on references), a 128x128 target
(8x8 tokens) with a 128x96 reference (8 wide x 6 high: another size), the reference a held-out scene rendered by
`clear_cli.tiny.scenes`, its caption the prompt, 12 steps, seed i for image i. Every CLEAR variant against the
same call with full attention (PSNR / SSIM of the decoded images), and its image-query work: the (query, key) pairs
of the mask over those of full attention.

Rules: `global` (reference tokens global like text: what every backend runs), `shared` (the same circle in the
shared (y, x) coordinates, across images), `own` (each image its own circle only: the target never sees the
reference). Writes OUT/reference_rule.json and prints a markdown table (BENCHMARKS.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

RULES = ("global", "shared", "own")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python bench/reference_rule.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/reference_rule")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", default=None, help="CLEAR weights for the teacher (e.g. the transfer bench's "
                                                    "out/transfer/clear_tiny/distill/clear_attn.safetensors)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import FluxKontextPipeline
    from PIL import Image

    import clear_cli
    from clear_cli.attention.layout import ImageGrid, TokenLayout, layout_mask
    from clear_cli.metrics.pixel import mean_psnr, psnr, ssim
    from clear_cli.models import load_pipeline, text_len
    from clear_cli.tiny import scenes

    n, steps, windows = (2, 2, (2,)) if args.quick else (8, 12, (2, 3, 4))
    base = load_pipeline("tiny")
    pipe = FluxKontextPipeline.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    seeds = [scenes.HELD_OUT_SEED + i for i in range(n)]
    refs, caps = scenes.make_batch(seeds, 128)
    ref_images = [Image.fromarray((r[16:112] * 255).round().astype("uint8")) for r in refs]  # 128 wide x 96 high
    t = text_len(pipe)

    def images() -> torch.Tensor:
        out = []
        for i in range(n):
            im = pipe(prompt=caps[i], image=ref_images[i], height=128, width=128, max_area=128 * 128,
                      _auto_resize=False, num_inference_steps=steps, guidance_scale=3.5, max_sequence_length=t,
                      generator=torch.Generator().manual_seed(i), output_type="pt").images
            out.append(im.float().clamp(0, 1))
        return torch.cat(out)

    t0 = time.perf_counter()
    full = images()
    lay = TokenLayout(t, (ImageGrid(0, 0, 8, 8), ImageGrid(1, 64, 6, 8)))
    img = slice(t, lay.seq_len)
    full_img_pairs = lay.n_image ** 2
    rows = []
    if args.weights:
        from clear_cli.models.weights import apply_attention_weights, load_attention_weights

        w = load_attention_weights(args.weights)
        windows = (w.window,)
    for r in windows:
        for rule in RULES:
            clear_cli.linearize(pipe, window=r, backend="reference", reference_rule=rule)
            if args.weights and rule == RULES[0]:
                apply_attention_weights(pipe.transformer, w)   # stays for the other rules (same processors)
            x = images()
            pairs = int(layout_mask(lay, r, rule)[img, img].sum())
            rows.append({"window": r, "rule": rule, "psnr_db": round(mean_psnr(psnr(x, full))[0], 3),
                         "ssim": round(float(ssim(x, full).mean()), 4),
                         "image_pairs_over_full": round(pairs / full_img_pairs, 4)})
            print(f"r={r} {rule}: {rows[-1]}", file=sys.stderr, flush=True)
    clear_cli.unlinearize(pipe)
    res = {"rows": rows, "weights": args.weights, "n": n, "steps": steps, "target": "128x128 (8x8 tokens)",
           "reference": "128x96 (8x6 tokens)", "text_len": t, "quick": args.quick,
           "command": "python bench/reference_rule.py " + shlex.join(sys.argv[1:] if argv is None else argv),
           "wall_seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from clear_cli.files import atomic_write_text

    atomic_write_text(out / "reference_rule.json", json.dumps(res, indent=2) + "\n")
    print("| r | rule | PSNR (dB) | SSIM | image pairs / full |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['window']} | {row['rule']} | {row['psnr_db']:.2f} | {row['ssim']:.4f} | "
              f"{row['image_pairs_over_full']:.3f} |")
    print(f"wall {res['wall_seconds']} s")
    return res


if __name__ == "__main__":
    main()
