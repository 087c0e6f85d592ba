"""The training loop of one stage: `fit` feeds a `Trainer` the dataset in its epoch order
(resumable mid-epoch), logs, checkpoints, samples and validates on schedule, and writes the
stage's outputs (last checkpoint, metrics.json, the EMA model); `setup_distributed` joins a
torchrun group."""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from rpiae.data.sources import without_sigchld_handler
from rpiae.fileio import atomic_file
from rpiae.training.data import EpochSampler, ImageFolderDataset
from rpiae.training.schedule import micro_batch_size, steps_per_epoch
from rpiae.training.trainer import Trainer


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun; (0, 1, cuda or cpu) otherwise."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            return rank, world, torch.device("cuda", local)
        return rank, world, torch.device("cpu")
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _loader(trainer: Trainer, dataset: ImageFolderDataset, sampler: EpochSampler, micro: int):
    """The run's DataLoader; with workers, one that never installs torch's SIGCHLD handler (with
    it, a worker's exit at an epoch's end could end the process with SIGSEGV: see
    `rpiae.data.sources.without_sigchld_handler`)."""
    return without_sigchld_handler(torch.utils.data.DataLoader(
        dataset,
        batch_size=micro,
        sampler=sampler,
        num_workers=trainer.cfg.num_workers,
        pin_memory=trainer.device.type == "cuda",
        drop_last=True,
        # the loader's own generator: creating an iterator must not consume the global RNG,
        # or a resumed run would draw different noise than the uninterrupted one
        generator=torch.Generator().manual_seed(trainer.cfg.seed),
    ))


def _after_step(trainer: Trainer, logs: dict, total: int, spe: int, bar, log, t0: float,
                val_images: torch.Tensor | None, sample_images: torch.Tensor | None) -> None:
    """What is due after optimiser step `trainer.step`: log, checkpoint, samples, validation."""
    cfg, step, rank = trainer.cfg, trainer.step, trainer.rank
    bar.update(1)
    if step % cfg.log_every == 0 or step == total:
        bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in logs.items()}, refresh=False)
        log({"step": step, "epoch": round(trainer.epoch_float, 4), "time": round(time.time() - t0, 1), **logs})
    if cfg.save_every and step % cfg.save_every == 0 and step < total:
        trainer.save_checkpoint()
    if cfg.sample_every and step % cfg.sample_every == 0 and sample_images is not None and rank == 0:
        trainer.save_samples(sample_images, trainer.out_dir / "samples" / f"step_{step:07d}.png")
    if val_images is not None and rank == 0 and (
        (cfg.val_every and step % cfg.val_every == 0) or (not cfg.val_every and step % spe == 0)
    ):
        metrics = trainer.validate(val_images)
        log({"step": step, **metrics})
        bar.write(f"step {step}: val PSNR {metrics['val_psnr']:.2f} dB, SSIM {metrics['val_ssim']:.4f}, "
                  f"patch-border ratio {metrics['val_border_ratio']:.2f}")


def _finish(trainer: Trainer, val_images: torch.Tensor | None, sample_images: torch.Tensor | None) -> dict[str, float]:
    """The stage's outputs: last checkpoint, final samples, metrics.json and the EMA model."""
    trainer.save_checkpoint()
    metrics: dict[str, float] = {}
    if trainer.rank != 0:
        return metrics
    if sample_images is not None:
        trainer.save_samples(sample_images, trainer.out_dir / "samples" / f"final_{trainer.step:07d}.png")
    if val_images is not None:
        metrics = trainer.validate(val_images)
    metrics = {"step": trainer.step, "skipped_files": trainer.skipped_files, **metrics}
    with atomic_file(trainer.out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    trainer.ema.save(trainer.out_dir / "model.safetensors", metadata={"stage": str(trainer.stage), "step": str(trainer.step)})
    return metrics


def _truncate_log(path, step: int) -> None:
    """Drop the log rows of steps after `step`, where this run starts (or resumes): steps an
    interrupted run logged after its last checkpoint, which it is about to run again. Rows
    that cannot be read (a line cut short by a kill) go too. Rewritten atomically."""
    if not path.is_file():
        return
    lines = path.read_text(errors="replace").splitlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
            continue
        keep.append(line)
    if keep != lines:
        with atomic_file(path) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in keep))


def fit(
    trainer: Trainer,
    dataset: ImageFolderDataset,
    val_images: torch.Tensor | None = None,
    sample_images: torch.Tensor | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Run (or continue) the stage to the end of its schedule; returns the final metrics."""
    cfg, rank, world = trainer.cfg, trainer.rank, trainer.world
    micro = micro_batch_size(cfg, world)
    sampler = EpochSampler(len(dataset), micro, rank, world, seed=cfg.seed)
    spe = steps_per_epoch(cfg, len(dataset), world)
    if spe != trainer.steps_per_epoch:
        raise ValueError(f"trainer was built for {trainer.steps_per_epoch} steps per epoch, the data gives {spe}")
    total = min(cfg.epochs * spe, cfg.max_steps) if cfg.max_steps else cfg.epochs * spe
    loader = _loader(trainer, dataset, sampler, micro)
    if sample_images is None:
        sample_images = val_images[:4] if val_images is not None else None
    log_path = trainer.out_dir / "log.jsonl"
    trainer.out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # what this run is, readable without loading a checkpoint
        with atomic_file(trainer.out_dir / "config.json") as tmp:
            tmp.write_text(json.dumps({"model": trainer.model.config.to_dict(), "train": cfg.to_dict()}, indent=2) + "\n")
    if rank == 0:
        _truncate_log(log_path, trainer.step)
    bar = tqdm(total=total, initial=trainer.step, disable=not progress or rank != 0, desc=f"stage {cfg.stage}", dynamic_ncols=True)
    t0 = time.time()

    def log(record: dict) -> None:
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    while trainer.step < total:
        epoch, in_epoch = divmod(trainer.step, spe)
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, start_batch=in_epoch * cfg.grad_accum)
        buf: list[torch.Tensor] = []
        for x, bad in loader:
            trainer.skipped_files += int(bad.sum())
            buf.append(x)
            if len(buf) < cfg.grad_accum:
                continue
            logs, buf = trainer.train_step(buf), []
            _after_step(trainer, logs, total, spe, bar, log, t0, val_images, sample_images)
            if trainer.step >= total:
                break
    bar.close()
    if trainer.skipped_files and rank == 0:
        bar.write(f"warning: {trainer.skipped_files} unreadable image file(s) were skipped")
    return _finish(trainer, val_images, sample_images)
