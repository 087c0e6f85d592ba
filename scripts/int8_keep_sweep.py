"""Where INT8's reconstruction error comes from: export the same checkpoint's INT8 graphs with
each calibration method and each set of unquantised parts (`rpiae export --int8-calibration
--int8-keep`), reconstruct real photos with each (`rpiae eval --backend ort --precision int8`),
and collect the PSNR/SSIM change against PyTorch FP32 into one JSON.

    python scripts/eval_crops.py --out /tmp/evalphotos && rpiae samples /tmp/evalcalib
    python scripts/int8_keep_sweep.py --photos /tmp/evalphotos --calib /tmp/evalcalib \\
        --out bench/results/eval/int8-keep-sweep.json

ONNX Runtime's int8 kernels compute the graph's integer arithmetic exactly on every x86 CPU
(u8 x u8 where pairs could saturate), so the figures do not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = [  # (calibration, parts kept unquantised); the default is entropy, io-projections
    ("max", ""), ("entropy", ""),
    ("max", "io-projections"), ("entropy", "io-projections"),
    ("entropy", "encoder"), ("entropy", "bridge-encoder"), ("entropy", "bridge-decoder"), ("entropy", "pixel-decoder"),
    ("entropy", "io-projections,bridge-decoder"),
]


def rpiae(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "rpiae.cli", *args], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="default: the shipped small checkpoint")
    ap.add_argument("--photos", required=True, help="images to reconstruct (rpiae eval DATA)")
    ap.add_argument("--calib", required=True, help="calibration images (rpiae export --calib)")
    ap.add_argument("--out", required=True, help="JSON to write")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="rpiae-int8-sweep-") as tmp:
        for method, keep in CONFIGS:
            name = f"{method}-{keep or 'none'}".replace(",", "+")
            bundle, report = Path(tmp) / name, Path(tmp) / f"{name}.json"
            t0 = time.time()
            rpiae("export", *(["--checkpoint", args.checkpoint] if args.checkpoint else []), "--precision", "int8",
                  "--int8-high-precision", "fp32", "--int8-calibration", method, "--int8-keep", keep or "none", "--calib", args.calib,
                  "--out", str(bundle))
            rpiae("eval", args.photos, "--model", str(bundle), "--backend", "ort", "--precision", "int8", "--quiet",
                  "--json", str(report))
            row = next(r for r in json.loads(report.read_text())["rows"] if r["backend"] == "ort")
            manifest = json.loads((bundle / "manifest.json").read_text())
            int8 = {g: manifest["files"][f"{g}.int8.onnx"]["precision_report"]["per_op_type"] for g in ("encode", "decode")}
            rows.append({"calibration": method, "keep": keep.split(",") if keep else [], "images": row["n"],
                         "delta_psnr_db": row["delta"]["psnr"], "delta_ssim": row["delta"]["ssim"],
                         "int8_matmuls": {g: ops.get("MatMul", {}).get("int8", 0) + ops.get("Conv", {}).get("int8", 0)
                                          for g, ops in int8.items()},
                         "seconds": round(time.time() - t0, 1)})
            print(f"{name:40} {row['delta']['psnr']:+.3f} dB  {row['delta']['ssim']:+.5f} SSIM", flush=True)
    from rpiae.fileio import atomic_file

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp_out:
        tmp_out.write_text(json.dumps({"checkpoint": args.checkpoint or "shipped", "photos": args.photos,
                                       "calib": args.calib, "backend": "ort", "high_precision": "fp32", "rows": rows},
                                      indent=1) + "\n")


if __name__ == "__main__":
    main()
