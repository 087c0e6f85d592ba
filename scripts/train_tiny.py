"""Reproduce the shipped tiny tokenizer (rpiae/assets/rpiae-tiny.safetensors) on a CPU.

    python scripts/train_tiny.py --work /tmp/train_tiny            # prepare, all phases, evaluate, ship

Data: the real photos that ship with scikit-image and scikit-learn (no download). Two
photos, skimage `coffee` and sklearn `china.jpg`, are held out entirely; the evaluation set
is each of them per the inference policy (short side 256, centre crop) plus the four
256x256 corner crops of each resized to short side 384: 10 images never seen in training.

No LPIPS / DINO weights exist offline, so every stage runs with --no-lpips --no-gan (L1
reconstruction only, plus the pivot, feature and KL terms). The paper's schedule is scaled
down for 1 CPU thread; see STAGES below (an epoch here is 400 random crops).
Each stage is the same as:

    rpiae train --stage 1 --data WORK/data/train --val-data WORK/data/val --preset tiny \
        --no-lpips --no-gan --config WORK/tiny.json --out WORK/runs/s1
    rpiae train --stage 2 ... --resume WORK/runs/s1/last --out WORK/runs/s2
    rpiae train --stage 3 ... --resume WORK/runs/s2/last --out WORK/runs/s3
    rpiae train --stage 3 ... --resume WORK/runs/s3/last --set epochs=45 --out WORK/runs/s3b
    rpiae train --stage 3 ... --resume WORK/runs/s3b/last --set epochs=70 --out WORK/runs/s3c
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# paper values, except where a 1-thread CPU run needs a smaller schedule
TINY_CONFIG = {
    "batch_size": 4,
    "epoch_size": 400,  # an "epoch" = 400 random crops (100 steps)
    "lr": 3e-4,
    "min_lr": 3e-5,
    "warmup_epochs": 1.0,
    "resize_min": 256,  # scale jitter instead of the fixed 384: the data set is ~16 photos
    "resize_max": 512,
    "hflip": True,
    "num_workers": 0,
    "log_every": 10,
    "sample_every": 500,
    "save_every": 250,
    "val_every": 500,
    # stage I keeps the 20-epoch schedule's learning rate but stops at step 700 (E is held near
    # its init by the pivot, and stage III retrains D on the latent anyway)
    "stage1": {"epochs": 20, "max_steps": 700},
    "stage2": {"epochs": 6},
    "stage3": {"epochs": 20},
}

HELD_OUT = ("coffee", "china")


def photos() -> dict[str, np.ndarray]:
    """name -> uint8 (H, W, 3) or (H, W): scikit-image / scikit-learn sample photos."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    sk = load_sample_images()
    out = {
        # colour
        "astronaut": data.astronaut(),
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
        "immunohistochemistry": data.immunohistochemistry(),
        "hubble_deep_field": data.hubble_deep_field(),
        "retina": data.retina(),
        "motorcycle": data.stereo_motorcycle()[0],
        "china": sk.images[0],
        "flower": sk.images[1],
        # grayscale (replicated to RGB by the loader)
        "camera": data.camera(),
        "brick": data.brick(),
        "grass": data.grass(),
        "gravel": data.gravel(),
        "moon": data.moon(),
        "coins": data.coins(),
        "clock": data.clock(),
        "cell": data.cell(),
    }
    return out


def _to_tensor(a: np.ndarray) -> torch.Tensor:
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(a[..., :3].transpose(2, 0, 1))).float() / 255.0


def _save(x: torch.Tensor, path: Path) -> None:
    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(path)


def prepare(work: Path) -> tuple[Path, Path]:
    from rpiae.imageio import fit_square
    from rpiae.training.data import resize_short

    train, val = work / "data" / "train", work / "data" / "val"
    train.mkdir(parents=True, exist_ok=True)
    val.mkdir(parents=True, exist_ok=True)
    for name, a in photos().items():
        if name in HELD_OUT:
            x = _to_tensor(a)
            _save(fit_square(x, 256), val / f"{name}_centre.png")
            big = resize_short(x, 384)
            _, h, w = big.shape
            for tag, (t, l) in {"tl": (0, 0), "tr": (0, w - 256), "bl": (h - 256, 0), "br": (h - 256, w - 256)}.items():
                _save(big[:, t : t + 256, l : l + 256], val / f"{name}_{tag}.png")
        elif a.ndim == 2:
            img = Image.fromarray(a)
            if min(img.size) > 512:
                img.thumbnail((512 * max(img.size) // min(img.size),) * 2, Image.BICUBIC)
            img.save(train / f"{name}.png")
        else:
            x = _to_tensor(a)
            if min(x.shape[1:]) > 512:
                x = resize_short(x, 512)
            _save(x, train / f"{name}.png")
    (work / "tiny.json").write_text(json.dumps(TINY_CONFIG, indent=2) + "\n")
    return train, val


@torch.no_grad()
def evaluate(model_path: Path, val: Path) -> dict:
    """Mean PSNR/SSIM of the model (as loaded from `model_path`) on the held-out images."""
    from rpiae import RPiAE
    from rpiae.training.data import load_eval_images, psnr_ssim

    model = RPiAE.from_checkpoint(model_path).float().eval()
    images, paths, _ = load_eval_images(val)
    recon = torch.cat([model(images[i : i + 4]) for i in range(0, len(images), 4)])
    psnrs, ssims = psnr_ssim(recon, images)
    baseline = {}
    for side in (32, 16):  # for scale: a thumbnail upscaled bicubically
        thumb = torch.nn.functional.interpolate(images, size=(side, side), mode="bicubic", antialias=True)
        up = torch.nn.functional.interpolate(thumb, size=images.shape[-2:], mode="bicubic")
        bp, bs = psnr_ssim(up, images)
        baseline[f"bicubic_from_{side}px"] = {"psnr_db": round(float(np.mean(bp)), 3), "ssim": round(float(np.mean(bs)), 4)}
    return {
        "psnr_db": round(float(np.mean(psnrs)), 3),
        "ssim": round(float(np.mean(ssims)), 4),
        "same_images_baselines": baseline,
        "per_image": {p.name: {"psnr_db": round(a, 3), "ssim": round(b, 4)} for p, a, b in zip(paths, psnrs, ssims)},
    }


# (run dir, stage, extra --set overrides, resume-from run dir when starting). "s3b" and "s3c"
# continue stage III from the previous run's last checkpoint (same run state: model, EMA,
# optimiser, step) with a longer schedule: the cosine is re-evaluated for 45 (then 70)
# epochs, i.e. warm restarts at steps 2000 and 4500. (The CPU time of this session was
# not known in advance; each continuation was added while the previous one ran.)
PHASES = [
    ("s1", 1, {}, None),
    ("s2", 2, {}, "s1"),
    ("s3", 3, {}, "s2"),
    ("s3b", 3, {"epochs": 45}, "s3"),
    ("s3c", 3, {"epochs": 70}, "s3b"),
]


def _command(name: str, stage: int, extra: dict, start: str | None) -> str:
    cmd = (
        f"rpiae train --stage {stage} --data WORK/data/train --val-data WORK/data/val --no-lpips --no-gan "
        f"--config WORK/tiny.json --out WORK/runs/{name}"
    )
    cmd += f" --resume WORK/runs/{start}/last" if start else " --preset tiny"
    cmd += "".join(f" --set {k}={v}" for k, v in extra.items())
    return cmd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/train_tiny"))
    ap.add_argument("--phases", default=",".join(p[0] for p in PHASES), help="which runs to (re)start or continue")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ship", type=Path, default=Path(__file__).resolve().parents[1] / "rpiae" / "assets")
    ap.add_argument("--no-ship", action="store_true", help="evaluate only; do not write rpiae/assets")
    ap.add_argument("--from-run", default=PHASES[-1][0], help="run dir (under WORK/runs) to evaluate and ship")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from rpiae.training.run import run_training

    work = args.work
    train, val = prepare(work)
    cfg_path = work / "tiny.json"
    wanted = [v for v in args.phases.split(",") if v]
    for name, stage, extra, start in PHASES:
        if name not in wanted:
            continue
        out = work / "runs" / name
        # an interrupted run continues itself (bit-exactly); otherwise start from the previous run
        resume = out / "last" if (out / "last").exists() else (work / "runs" / start / "last" if start else None)
        print(f"== {name}: stage {stage} -> {out} (resume: {resume})", flush=True)
        run_training(
            stage, train, out, preset="tiny", resume=resume, config_path=cfg_path, val_data=val,
            overrides=extra, no_lpips=True, no_gan=True,
        )
    run = work / "runs" / args.from_run
    fp16 = work / "rpiae-tiny.safetensors"
    from rpiae import RPiAE

    ckpt_path = run / "last" / "checkpoint.pt"
    src = RPiAE.from_checkpoint(ckpt_path)
    source_step = int(torch.load(ckpt_path, map_location="cpu", weights_only=True)["step"])
    src.save(fp16, dtype=torch.float16, metadata={"trained_by": "scripts/train_tiny.py", "source": f"runs/{args.from_run}"})
    metrics = evaluate(fp16, val)
    print(json.dumps({k: v for k, v in metrics.items() if k != "per_image"}), flush=True)
    steps = {}
    for name, *_ in PHASES:
        p = work / "runs" / name / "last" / "checkpoint.pt"
        if p.is_file():
            steps[name] = int(torch.load(p, map_location="cpu", weights_only=True)["step"])
    info = {
        "model": "rpiae-tiny.safetensors",
        "preset": "tiny",
        "dtype": "float16",
        "weights": f"EMA weights of runs/{args.from_run} (stage III) at step {source_step}",
        "reproduce": "python scripts/train_tiny.py --work /tmp/train_tiny   (1 CPU thread; prepares the data, runs every phase, evaluates, ships)",
        "commands": [_command(*p) for p in PHASES[: [p[0] for p in PHASES].index(args.from_run) + 1]],
        "training_config": TINY_CONFIG,
        "losses": "no LPIPS and no GAN (no VGG16/DINO weights exist offline; --no-lpips --no-gan): stage I L1 + adaptive pivot MSE; "
        "stage II feature MSE + 1e-3 KL + 0.05 L1; stage III L1",
        "steps": steps,
        "train_photos": sorted(p.stem for p in train.glob("*.png")),
        "held_out_photos": list(HELD_OUT),
        "held_out_eval": "centre 256 crop (inference policy) + 4 corner 256 crops at short side 384 of each held-out photo, 10 images; "
        "PSNR on outputs clamped to [0, 1], SSIM = skimage.metrics.structural_similarity(data_range=1, channel_axis=0); "
        "measured on the shipped fp16 file loaded back in fp32",
        "held_out": metrics,
        "measured_with": f"python scripts/train_tiny.py --work /tmp/train_tiny --phases '' --from-run {args.from_run} --no-ship",
        "cpu_threads": args.threads,
    }
    print(json.dumps(info["held_out"]["per_image"], indent=1))
    if not args.no_ship:
        import shutil

        args.ship.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fp16, args.ship / "rpiae-tiny.safetensors")
        (args.ship / "rpiae-tiny.json").write_text(json.dumps(info, indent=2) + "\n")
        print(f"shipped {args.ship / 'rpiae-tiny.safetensors'}")


if __name__ == "__main__":
    main()
