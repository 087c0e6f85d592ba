"""The image folder the recorded `rpiae eval` results run on: the offline sample photos
(scikit-image / scikit-learn, at their native sizes) and seeded random crops of them.

    python scripts/eval_crops.py --out /tmp/evalphotos                 # 9 photos + 300 crops
    python scripts/eval_crops.py --out DIR --count 500 --seed 1

Each crop takes 35-100 % of its photo's shorter side, an aspect ratio between 3:4 and 4:3,
a random position, and a horizontal flip half of the time; all files are PNG (lossless), so
`rpiae eval`'s own centre crop is the only resampling. The same seed writes the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from rpiae.samples import sample_photos_uint8


def write_crops(out: Path, count: int, seed: int = 0) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    photos = sample_photos_uint8()
    names = sorted(photos)
    files = []
    for name in names:
        files.append(out / f"photo-{name}.png")
        Image.fromarray(np.ascontiguousarray(photos[name])).save(files[-1])
    rng = np.random.default_rng(seed)
    for k in range(count):
        name = names[int(rng.integers(len(names)))]
        img = photos[name]
        h, w = img.shape[:2]
        side = rng.uniform(0.35, 1.0) * min(h, w)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch, cw = min(h, round(side / np.sqrt(aspect))), min(w, round(side * np.sqrt(aspect)))
        top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        crop = img[top : top + ch, left : left + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        files.append(out / f"crop-{k:04d}-{name}.png")
        Image.fromarray(np.ascontiguousarray(crop)).save(files[-1])
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="Folder to write the PNGs into.")
    ap.add_argument("--count", type=int, default=300, help="Random crops to write (besides the photos).")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    files = write_crops(args.out, args.count, args.seed)
    print(f"wrote {len(files)} images to {args.out}")


if __name__ == "__main__":
    main()
