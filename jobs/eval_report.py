"""`rpiae eval`'s outputs besides the JSON: the plain-text table and the PNG grid of originals,
reconstructions and the amplified difference of the lowest-precision variant."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from rpiae.fileio import atomic_file

METRICS = ("psnr", "ssim", "lpips", "rfid")
REFERENCE = ("torch", "fp32")


def _cell(value, digits: int) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return " ".join(str(value).split()[:2])  # "skipped: --option"; the line under the table says more


def _delta(value, digits: int) -> str:
    return f"{value:+.{digits + 1}f}" if isinstance(value, float) else ""  # one digit more: deltas are small


def format_table(report: dict) -> str:
    """The report as a plain-text table, then one line per skipped metric."""
    digits = {"psnr": 2, "ssim": 4, "lpips": 4, "rfid": 3}
    head = ["backend", "precision", "n"] + [c for m in METRICS for c in (m.upper(), "Δ")] + ["seconds"]
    lines = []
    for row in report["rows"]:
        name = row["backend"] + (" (ref)" if row["reference"] else "")
        cells = [name, row["precision"], str(row["n"])]
        for m in METRICS:
            cells += [_cell(row[m], digits[m]), "" if row["reference"] else _delta(row["delta"][m], digits[m])]
        lines.append(cells + [f"{row['seconds']:.1f}"])
    widths = [max(len(c) for c in col) for col in zip(head, *lines)]

    def fmt(cells: list[str]) -> str:  # names left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(head)] + [fmt(c) for c in lines]
    for m, why in report.get("skipped_metrics", {}).items():
        out.append(f"{m}: {why}")
    if report.get("skipped_images"):
        out.append(f"{len(report['skipped_images'])} unreadable image(s) skipped (listed in the JSON report)")
    return "\n".join(out)


def _bits(precision: str) -> int:
    """The bits a precision's name states (int8: 8, bf16: 16); 32 when it states none."""
    return int("".join(c for c in precision if c.isdigit()) or 32)


def lowest_precision(rows: list):
    """The variant with the fewest bits (the reference only when it is the only row; the
    first of equals)."""
    others = [r for r in rows if r.name != REFERENCE] or rows
    return min(others, key=lambda r: _bits(r.precision))


def write_grid(path: str | Path, originals: list[np.ndarray], rows: list, label_width: int = 170) -> Path:
    """PNG: a row of originals, one row per variant (reference first), and an amplified
    difference map of the lowest-precision variant against PyTorch FP32 (against the
    originals when PyTorch FP32 is the only variant). The amplification is stated in the
    row's label: the largest whole factor (at most 32) that keeps the 99.9th percentile of
    the difference below white."""
    from PIL import ImageDraw, ImageFont

    ordered = sorted(rows, key=lambda r: r.name != REFERENCE)
    low, ref = lowest_precision(rows), ordered[0]
    base = originals if low is ref else ref.tiles
    diff = [np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=2) for a, b in zip(low.tiles, base)]
    p = float(np.percentile(np.stack(diff), 99.9)) if diff else 0.0
    gain = int(min(32, max(1, math.floor(255 / max(p, 1.0)))))
    diff_tiles = [np.repeat(np.clip(d * gain, 0, 255).round().astype(np.uint8)[..., None], 3, axis=2) for d in diff]
    against = "original" if low is ref else "torch fp32"
    labelled = [("original", originals)] + [(f"{r.backend} {r.precision}" + (" (ref)" if r is ref else ""), r.tiles)
                                          for r in ordered]
    labelled.append((f"|{low.backend} {low.precision} - {against}|\nx{gain}", diff_tiles))
    h, w = originals[0].shape[:2]
    canvas = Image.new("RGB", (label_width + w * len(originals), h * len(labelled)), "white")
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=16)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the small bitmap font
        font = ImageFont.load_default()
    for k, (label, tiles) in enumerate(labelled):
        draw.multiline_text((8, k * h + h // 2 - 20), label, fill="black", font=font)
        for j, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(tile), (label_width + j * w, k * h))
    with atomic_file(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)
