"""The bundle the recorded benchmarks run: a seeded, randomly initialised preset (no real
weights can be downloaded here; speed and memory do not depend on the weights' values).

    python scripts/bench_bundle.py --out /tmp/bundle-rpiae-b                # rpiae-b, fp32 + int8 (CPU)
    python scripts/bench_bundle.py --preset tiny --precision fp32,fp16,int8 --int8-high-precision fp16 --out B
    python scripts/bench_bundle.py --int8-weight-bits 7 --out B7          # for x86 CPUs without VNNI

INT8 is calibrated on the 9 offline sample photos plus their mirror images (18 images,
recorded in the manifest); the INT8 pass of the rpiae-b decoder peaks at 18.4 GB (measured).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from rpiae import RPiAE
from rpiae.config import PRESETS
from rpiae.export.precision import INT8_CALIBRATION_DEFAULT, INT8_CALIBRATIONS, INT8_KEEP_DEFAULT, parse_int8_keep
from rpiae.precisions import INT8_WEIGHT_BITS, INT8_WEIGHT_BITS_DEFAULT
from rpiae.verify import export_bundle
from rpiae.samples import sample_photos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="rpiae-b", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="fp32,int8")
    ap.add_argument("--int8-high-precision", default="fp32", choices=["fp16", "fp32"],
                    help="fp32 for ONNX Runtime on a CPU, fp16 for TensorRT")
    ap.add_argument("--int8-weight-bits", type=int, default=INT8_WEIGHT_BITS_DEFAULT, choices=INT8_WEIGHT_BITS,
                    help="7 for x86 CPUs without VNNI (rpiae export --int8-weight-bits)")
    ap.add_argument("--int8-calibration", default=INT8_CALIBRATION_DEFAULT, choices=INT8_CALIBRATIONS,
                    help="rpiae export --int8-calibration (speed does not depend on it: the same layers are quantised)")
    ap.add_argument("--int8-keep", default=",".join(INT8_KEEP_DEFAULT),
                    help="rpiae export --int8-keep: comma-separated parts left unquantised, or none")
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    model = RPiAE.from_preset(args.preset).eval()
    photos = sample_photos()[1]
    calib = np.concatenate([photos, photos[..., ::-1]])
    bundle = export_bundle(model, args.out, precisions=args.precision, calib=calib,
                           int8_high_precision=args.int8_high_precision, int8_weight_bits=args.int8_weight_bits,
                           int8_calibration=args.int8_calibration,
                           int8_keep=parse_int8_keep(args.int8_keep),
                           overwrite=args.overwrite)
    print(f"{bundle.root}: {', '.join(bundle.precisions('onnx'))}")


if __name__ == "__main__":
    main()
