"""A training stage's checkpoint: everything that resumes it exactly (model, EMA, frozen copy,
optimisers, schedulers, step, RNG), and reading one back from `runs/<stage>/last`."""

from __future__ import annotations

from pathlib import Path

import torch

from rpiae.checkpoints import CheckpointError, read_file
from rpiae.fileio import recover_replaced

CHECKPOINT_NAME = "checkpoint.pt"


def trainer_state(trainer) -> dict:
    """What `load_trainer_state` restores of a `Trainer` (tensors and plain values, for `torch.save`)."""
    rng = {"torch": torch.get_rng_state()}
    if trainer.device.type == "cuda":
        # the generator of the GPU this rank computes on: independent of how many GPUs there are
        rng["cuda_device"] = torch.cuda.get_rng_state(trainer.device)
    state = {
        "config": trainer.model.config.to_dict(),
        "train_config": trainer.cfg.to_dict(),
        "stage": trainer.stage,
        "step": trainer.step,
        "model": trainer.model.state_dict(),
        "ema": trainer.ema.state_dict(),
        "opt": trainer.opt.state_dict(),
        "sched": trainer.sched.state_dict(),
        "rng": rng,
        "skipped_files": trainer.skipped_files,
    }
    if trainer.pivot is not None:
        state["pivot"] = trainer.pivot.state_dict()
    if trainer.disc is not None:
        state["disc"] = trainer.disc.state_dict()
        state["disc_opt"] = trainer.disc_opt.state_dict()
        state["disc_sched"] = trainer.disc_sched.state_dict()
    return state


def load_trainer_state(trainer, state: dict) -> None:
    """Continue `trainer` where `state` (same stage) stopped. Rank 0 takes the saved RNG
    state; the other ranks reseed to deterministic, distinct streams."""
    if state["stage"] != trainer.stage:
        raise ValueError(f"checkpoint is from stage {state['stage']}, this run is stage {trainer.stage}")
    trainer.model.load_state_dict(state["model"])
    trainer.ema.load_state_dict(state["ema"])
    trainer.opt.load_state_dict(state["opt"])
    trainer.sched.load_state_dict(state["sched"])
    if trainer.pivot is not None:
        trainer.pivot.load_state_dict(state["pivot"])
    if trainer.disc is not None:
        if "disc" not in state:
            raise ValueError("the checkpoint has no discriminator state but this run uses a GAN")
        trainer.disc.load_state_dict(state["disc"])
        trainer.disc_opt.load_state_dict(state["disc_opt"])
        trainer.disc_sched.load_state_dict(state["disc_sched"])
    trainer.step = int(state["step"])
    trainer.skipped_files = int(state.get("skipped_files", 0))
    rng = state["rng"]
    if trainer.rank == 0:
        torch.set_rng_state(rng["torch"])
        cuda_state = saved_cuda_rng(rng, trainer.device)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, trainer.device)
    else:
        torch.manual_seed(trainer.cfg.seed + trainer.rank + 1000 * trainer.step)


def saved_cuda_rng(rng: dict, device: torch.device) -> torch.Tensor | None:
    """The saved CUDA generator state for `device`, or None (a CPU run or checkpoint). The
    state is `cuda_device` (the saving rank's GPU); a checkpoint may instead hold `cuda`, one
    state per GPU of the machine that saved it, and then the one of this GPU's index is taken
    when it exists."""
    if device.type != "cuda":
        return None
    if rng.get("cuda_device") is not None:
        return rng["cuda_device"]
    per_gpu = rng.get("cuda") or []
    index = device.index or 0
    return per_gpu[index] if index < len(per_gpu) else None


def checkpoint_file(path: str | Path) -> Path:
    """`runs/s1/last` (a directory) or the file itself. A `last` that a killed checkpoint
    write left moved aside (`.last.old`) is put back first."""
    path = Path(path)
    recover_replaced(path)
    if path.name == CHECKPOINT_NAME:
        recover_replaced(path.parent)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def read_training_checkpoint(path: str | Path) -> dict:
    """The training checkpoint at `path` (a run's `last/` or its checkpoint.pt), read with
    `torch.load(weights_only=True)`; a file that is not one is a `CheckpointError` (one line)."""
    f = checkpoint_file(path)
    if not f.is_file():
        raise FileNotFoundError(f"no training checkpoint at {path}")
    if f.stat().st_size == 0:
        raise CheckpointError(f"{f} is empty (a copy or write that never finished?)")
    state, _ = read_file(f)
    if not isinstance(state, dict) or "stage" not in state or "config" not in state:
        raise CheckpointError(f"{f} is not a training checkpoint of this project")
    return state
