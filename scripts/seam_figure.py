"""Zoomed crops of held-out reconstructions side by side, to see the decoder's patch seams.

    python scripts/seam_figure.py --val /tmp/train_tiny/data/val \\
        --model "stage III=/tmp/train_tiny/runs/s3/last/checkpoint.pt" \\
        --model "shipped=rpiae/assets/rpiae-tiny.safetensors" \\
        --crop coffee:96:96 --crop LadyBird:64:96 --out docs/images/tiny-seams.png

Each row is one --crop (an image of --val by name, top, left) of 80x80 pixels, enlarged 3x
without smoothing so the 16-pixel patch grid stays sharp; the first column is the original,
then one column per --model (any checkpoint `RPiAE.from_checkpoint` reads).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

SIDE, ZOOM, HEADER = 80, 3, 18


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val", type=Path, required=True, help="folder of 256x256 crops")
    ap.add_argument("--model", action="append", required=True, metavar="LABEL=PATH")
    ap.add_argument("--crop", action="append", required=True, metavar="NAME:TOP:LEFT")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from rpiae import RPiAE
    from rpiae.imageio import find_images, load_images

    paths = {p.stem: p for p in find_images(args.val)}
    crops = [(name, int(top), int(left)) for name, top, left in (c.split(":") for c in args.crop)]
    images = torch.from_numpy(load_images([paths[name] for name, *_ in crops]))  # (R, 3, 256, 256)
    columns = [("original", images)]
    for spec in args.model:
        label, path = spec.split("=", 1)
        with torch.no_grad():
            columns.append((label, RPiAE.from_checkpoint(path).float().eval()(images).clamp(0, 1)))

    tile = SIDE * ZOOM
    sheet = Image.new("RGB", (tile * len(columns), HEADER + tile * len(crops)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (label, batch) in enumerate(columns):
        draw.text((c * tile + 4, 3), label, fill="black")
        for r, (_, top, left) in enumerate(crops):
            a = batch[r, :, top : top + SIDE, left : left + SIDE].permute(1, 2, 0).numpy()
            img = Image.fromarray(np.round(a * 255).astype(np.uint8)).resize((tile, tile), Image.NEAREST)
            sheet.paste(img, (c * tile, HEADER + r * tile))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
