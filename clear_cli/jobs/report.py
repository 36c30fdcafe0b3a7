"""What `clear eval` writes: an HTML report and a PNG grid, and the summary table's rows, all from the result dict.

The terminal table (rich) is drawn by the CLI (clear_cli/cli/eval.py) from `table_rows`.

The HTML report sits in the eval folder and links the cached images by relative path, so the folder can be moved
or served as it is. It shows the first `MAX_ROWS` prompts: teacher | student | difference (x4) per student
(cascade mode: full-attention cascade | CLEAR cascade | difference). Difference images go to `diff_<name>/`.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any

from clear_cli.files import atomic_write_text, save_png

MAX_ROWS = 64
GRID_ROWS = 8
DIFF_GAIN = 4

# (key, label, format, lower is better)
STUDENT_ROWS = [
    ("fid", "FID vs teacher", "{:.3f}", True),
    ("fid_ref", "FID vs reference", "{:.3f}", True),
    ("clip_score", "CLIP score", "{:.2f}", False),
    ("clip_image", "CLIP image sim.", "{:.4f}", False),
    ("dino", "DINO sim.", "{:.4f}", False),
    ("lpips", "LPIPS", "{:.4f}", True),
    ("ssim", "SSIM", "{:.4f}", False),
    ("psnr", "PSNR (dB)", "{:.2f}", False),
    ("seconds_per_image", "s / image", "{:.3g}", True),
    ("speedup", "speedup", "{:.2f}x", False),
    ("attn_tflops_per_image", "attention TFLOP / image", "{:.4g}", True),
    ("attn_flops_ratio", "attention FLOPs vs teacher", "{:.3f}", True),
]
CASCADE_ROWS = [
    ("ssim", "SSIM", "{:.4f}", False),
    ("psnr", "PSNR (dB)", "{:.2f}", False),
    ("lpips", "LPIPS", "{:.4f}", True),
    ("seconds_per_image", "s / image (CLEAR)", "{:.3g}", True),
    ("full_seconds_per_image", "s / image (full)", "{:.3g}", True),
]


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return fmt.format(value)


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the summary table: metrics down, teacher and students across."""
    if result.get("mode") == "cascade":
        studs = result["cascade"]["students"]
        header = ["metric (CLEAR vs full-attention cascade)"] + [s["name"] for s in studs]
        rows = [[label] + [_fmt(s.get(k), f) for s in studs] for k, label, f, _ in CASCADE_ROWS]
        return header, rows
    studs, teacher = result["students"], result["teacher"] or {}
    header = ["metric", "teacher"] + [f"{s['name']} (r={s['window']}" + (f", f={s['down_factor']}" if
                                      s["down_factor"] > 1 else "") + ")" for s in studs]
    rows = []
    for k, label, f, _ in STUDENT_ROWS:
        if all(s.get(k) is None for s in studs) and teacher.get(k) is None:
            continue
        if k == "psnr" and any(s.get("psnr_identical") for s in studs):
            label += f" (cap {result['psnr_cap_db']:g})"
        if k.startswith("fid") and result.get("small_n"):
            label += f" (small n={result['n']})"
        rows.append([label, _fmt(teacher.get(k), f)] + [_fmt(s.get(k), f) for s in studs])
    return header, rows


def _pairs(result: dict) -> list[tuple[str, str, str]]:
    """(name, reference folder, compared folder) per column group, plus the file-name patterns."""
    if result.get("mode") == "cascade":
        return [(s["name"], s["folder"], s["folder"]) for s in result["cascade"]["students"]]
    return [(s["name"], "teacher", s["folder"]) for s in result["students"]]


def _paths(result: dict, out: Path, i: int, ref: str, cmp_: str) -> tuple[Path, Path]:
    if result.get("mode") == "cascade":
        return out / ref / f"{i:05d}_full.png", out / cmp_ / f"{i:05d}.png"
    return out / ref / f"{i:05d}.png", out / cmp_ / f"{i:05d}.png"


def diff_image(a, b):
    """|a - b| x DIFF_GAIN as an RGB image (black = identical)."""
    import numpy as np
    from PIL import Image

    x = np.asarray(a.convert("RGB"), dtype=np.int16)
    y = np.asarray(b.convert("RGB"), dtype=np.int16)
    return Image.fromarray(np.clip(np.abs(x - y) * DIFF_GAIN, 0, 255).astype(np.uint8))


def _write_diffs(result: dict, out: Path, n: int) -> dict[tuple[str, int], Path]:
    from PIL import Image

    diffs = {}
    for name, ref, cmp_ in _pairs(result):
        for i in range(n):
            a, b = _paths(result, out, i, ref, cmp_)
            if not (a.is_file() and b.is_file()):
                continue
            target = out / f"diff_{name}" / f"{i:05d}.png"
            if not target.is_file() or target.stat().st_mtime < max(a.stat().st_mtime, b.stat().st_mtime):
                with Image.open(a) as ia, Image.open(b) as ib:
                    save_png(diff_image(ia, ib), target)
            diffs[(name, i)] = target
    return diffs


def write_grid(result: dict, out: Path, path: Path, rows: int = GRID_ROWS, cell: int = 192) -> Path:
    """PNG grid: one row per prompt (first `rows`), columns reference | each student | its difference."""
    from PIL import Image, ImageDraw

    n = min(rows, result["n"])
    pairs = _pairs(result)
    cols = 1 + 2 * len(pairs)
    top = 18  # a label strip: which column is which
    grid = Image.new("RGB", (cols * cell, max(1, n) * cell + top), "white")
    draw = ImageDraw.Draw(grid)
    labels = ["full attention" if result.get("mode") == "cascade" else "teacher"]
    for name, _, _ in pairs:
        labels += [name, f"|diff| x{DIFF_GAIN}"]
    for j, text in enumerate(labels):
        draw.text((j * cell + 4, 3), text[:30], fill="black")
    for i in range(n):
        for j, (name, ref, cmp_) in enumerate(pairs):
            a, b = _paths(result, out, i, ref, cmp_)
            if not (a.is_file() and b.is_file()):
                continue
            with Image.open(a) as ia, Image.open(b) as ib:
                ia, ib = ia.convert("RGB"), ib.convert("RGB")
                if j == 0:
                    grid.paste(ia.resize((cell, cell)), (0, top + i * cell))
                grid.paste(ib.resize((cell, cell)), ((1 + 2 * j) * cell, top + i * cell))
                grid.paste(diff_image(ia, ib).resize((cell, cell)), ((2 + 2 * j) * cell, top + i * cell))
    save_png(grid, path)
    return path


def write_html(result: dict, out: Path, prompts: list[str], path: Path, max_rows: int = MAX_ROWS) -> Path:
    """A self-contained HTML page (images by relative path): summary table, then one row per prompt."""
    n = min(max_rows, result["n"])
    diffs = _write_diffs(result, out, n)
    header, rows = table_rows(result)
    esc = html.escape

    def rel(p: Path) -> str:
        return esc(os.path.relpath(p, path.parent).replace(os.sep, "/"))

    cascade = result.get("mode") == "cascade"
    ref_label = "full-attention cascade" if cascade else "teacher"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>clear eval</title><style>"
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "img{width:192px;height:auto;image-rendering:pixelated}.p{max-width:220px;text-align:left}</style></head><body>",
        f"<h1>clear eval: {esc(str(result['model']))}</h1>",
        f"<p>{result['width']}x{result['height']}, n = {result['n']}, steps {esc(str(result['steps']))}, "
        f"seed {result['seed']}, device {esc(str(result['device']))} ({esc(str(result['dtype']))}), "
        f"prompts {esc(str(result['prompts']))}.</p>",
    ]
    if result.get("small_n") and "fid" in result.get("metrics", []):
        parts.append(f"<p><b>small n:</b> FID from {result['n']} images per set is biased and noisy; the protocol "
                     "uses 5,000. Compare only runs with the same n.</p>")
    for m, why in result.get("skipped", {}).items():
        parts.append(f"<p>skipped {esc(m)}: {esc(why)}</p>")
    parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
    for r in rows:
        parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>")
    parts.append("</table>")
    pairs = _pairs(result)
    parts.append(f"<h2>Images (first {n} of {result['n']}; difference = |a - b| x {DIFF_GAIN})</h2><table><tr>"
                 f"<th>#</th><th>prompt</th><th>{ref_label}</th>")
    for name, _, _ in pairs:
        parts.append(f"<th>{esc(name)}</th><th>difference</th>")
    parts.append("</tr>")
    for i in range(n):
        a0, _ = _paths(result, out, i, pairs[0][1], pairs[0][2]) if pairs else (None, None)
        parts.append(f"<tr><td>{i}</td><td class='p'>{esc(prompts[i])}</td>"
                     f"<td><img src='{rel(a0)}' alt='{ref_label} {i}'></td>" if a0 else "<tr><td></td>")
        for name, ref, cmp_ in pairs:
            _, b = _paths(result, out, i, ref, cmp_)
            d = diffs.get((name, i))
            parts.append(f"<td><img src='{rel(b)}' alt='{esc(name)} {i}'></td>"
                         + (f"<td><img src='{rel(d)}' alt='difference {i}'></td>" if d else "<td></td>"))
        parts.append("</tr>")
    parts.append("</table></body></html>")
    atomic_write_text(path, "\n".join(parts))
    return path
