"""Objective-decoupled three-stage training of RPiAE, as the authors' code runs it.

- Stage I: E and D. L1 + LPIPS on D(noised E tokens) + w_piv * MSE(E(x), pivot(x)) + GAN.
- Stage II: the Variational Bridge only. MSE(VB-dec(z), clean tokens) + KL + light L1, with z
  the posterior mean (`sample_posterior` samples it, as the paper describes).
- Stage III: D only, on VB-dec(posterior mean), with L1 + LPIPS + GAN (a fresh discriminator).

The PS-VAE recipe (`recipe="ps-vae"`, arXiv 2512.17909) runs on the same machinery:

- Stage 1, S-VAE: E frozen; the semantic encoder/decoder (the bridge) on MSE + cosine
  feature reconstruction of E's tokens + KL, with z sampled from the posterior; D learns on
  the semantic decoder's output with its gradient stopped (L1 + LPIPS).
- Stage 2, PS-VAE: everything trains, E group by group from its last block down
  (`progressive_unfreeze`). L1 + LPIPS + GAN on D(sem-dec(z)), with z sampled from
  sem-enc(E(x)), + feature reconstruction of a frozen copy of E's tokens + KL.

One `Trainer` runs one stage; the next stage starts from the previous stage's raw weights
(`--resume runs/s1/last` with `--stage 2`), and a stage resumes itself from its own `last`
checkpoint (model, EMA, optimisers, schedulers, step, RNG). Every difference from the
paper's description is a config switch; see `docs/TRAINING.md`.

What a resume repeats exactly: on the CPU, every step (the same losses and weights as the
uninterrupted run, bit for bit). On CUDA, the data order, augmentation and RNG streams; the
arithmetic is bit-exact only with `deterministic=true` (deterministic cuDNN/cuBLAS/SDPA
kernels, no cuDNN autotuning; slower), and even then not for the backward of
`F.interpolate` (no deterministic CUDA kernel; PyTorch warns). The checkpoint keeps the RNG
state of the GPU that rank 0 computes on, so a run resumes on a machine with fewer (or
more) GPUs. Losses stay on the device during a step and are read once per optimiser step.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from rpiae.fileio import atomic_dir, atomic_file
from rpiae.imageio import quantize_8bit, to_uint8
from rpiae.metrics import patch_border_ratio, psnr, ssim
from rpiae.model import RPiAE
from rpiae.training.checkpoint import CHECKPOINT_NAME, load_trainer_state, trainer_state
from rpiae.training.config import TrainConfig
from rpiae.training.discriminator import Discriminator, hinge_d_loss, quantize_fake, real_fake_logits
from rpiae.training.losses import StageForward, adaptive_weight, image_gradient_l1, patch_seam_loss
from rpiae.training.lpips import LPIPS, lpips_loss
from rpiae.training.schedule import disc_lr_lambda, lr_lambda
from rpiae.training.stages import FROZEN_COPY_STAGE, encoder_groups, stage_parts, trainable_names, unfrozen_groups


def configure_kernels(deterministic: bool, device: torch.device) -> None:
    """Process-wide kernel choices for training on `device`: deterministic algorithms when
    asked (cuBLAS needs its workspace size fixed before its first call, hence the environment
    variable), else cuDNN autotuning on CUDA (the crop size is fixed, so cuDNN's search for the
    fastest convolution runs once per shape)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # interpolate's backward has no such kernel
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


class Trainer:
    """One stage: its trainable parameters, EMA copy, frozen copy of E, loss networks and
    optimisers; `train_step` (one optimiser step), evaluation, and its checkpoint."""

    def __init__(
        self,
        model: RPiAE,
        cfg: TrainConfig,
        out_dir: str | Path,
        lpips: LPIPS | None = None,
        disc: Discriminator | None = None,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world: int = 1,
        steps_per_epoch: int = 1,
    ) -> None:
        self.cfg, self.stage = cfg, cfg.stage
        self.out_dir = Path(out_dir)
        self.device = torch.device(device)
        configure_kernels(cfg.deterministic, self.device)
        self.rank, self.world = rank, world
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.step = 0
        self.skipped_files = 0

        self.model = model.to(self.device)
        names = set(trainable_names(model, cfg))
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        self.params = {n: p for n, p in model.named_parameters() if n in names}

        # a frozen copy of E as it is now, always eval: RPiAE stage I's pivot, PS-VAE stage 2's
        # semantic target
        self.pivot = None
        if self.stage == FROZEN_COPY_STAGE[cfg.recipe]:
            self.pivot = copy.deepcopy(model.encoder).requires_grad_(False).eval()

        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        self.ema_params = dict(self.ema.named_parameters())
        # the EMA update walks these two lists in one fused call (same order)
        self._ema_pairs = ([self.ema_params[n] for n in self.params], list(self.params.values()))

        self.lpips = lpips.to(self.device) if lpips is not None else None
        self.disc = disc.to(self.device) if disc is not None else None
        use_gan = self.disc is not None and cfg.gan_weight > 0 and cfg.decoder_stage
        if not use_gan:
            self.disc = None
        self.set_modes()

        self.stage_forward = StageForward(
            model, self.stage, cfg.noise_tau, cfg.sample_posterior, cfg.recipe, cfg.decoder_stage, cfg.noise_after_bridge
        )
        # PS-VAE stage 2: E's parameter -> its block group (0 = the top); all of them are in the
        # optimiser from the start, a group still frozen has requires_grad off (no gradient, so
        # AdamW skips it)
        self.unfreeze_plan = encoder_groups(model, cfg.unfreeze_groups, names) if cfg.unfreezes_progressively else {}
        self._unfrozen = -1
        self.apply_unfreeze()
        self._wrap_ddp()

        self._make_optimisers()

        # where the adaptive weights compare gradient norms: E's last parameter (DINOv2: the last
        # block's layer_scale2) for the pivot, D's last layer for the GAN term
        self.last_enc_param = list(model.encoder.parameters())[-1]
        self.last_dec_param = model.decoder.decoder_pred.weight

    def _wrap_ddp(self) -> None:
        """`self.fwd`: the stage's forward, in DDP on more than one rank (rebuilt when the set of
        parameters that need gradients changes, which DDP fixes at construction)."""
        self.fwd = self.stage_forward
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.fwd = DDP(self.stage_forward, device_ids=ids, broadcast_buffers=False)

    def apply_unfreeze(self) -> bool:
        """Set requires_grad of E's block groups for the current step (PS-VAE stage 2 with
        `progressive_unfreeze`); True when the set changed since the last call."""
        if not self.unfreeze_plan:
            return False
        n = unfrozen_groups(self.cfg, self.epoch_float, 1 + max(self.unfreeze_plan.values()))
        if n == self._unfrozen:
            return False
        params = dict(self.model.named_parameters())
        for name, group in self.unfreeze_plan.items():
            params[name].requires_grad_(group < n)
        self._unfrozen = n
        return True

    def _make_optimisers(self) -> None:
        """AdamW and its learning-rate schedule for the trainable parameters, and for the
        discriminator's heads (their own schedule, stepped on their own updates)."""
        cfg = self.cfg
        self.opt = torch.optim.AdamW(
            list(self.params.values()), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self.lr_factor = lr_lambda(cfg, self.steps_per_epoch)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.lr_factor)
        self.disc_opt = self.disc_sched = None
        if self.disc is not None:
            head_params = [p for p in self.disc.heads.parameters()]
            betas, wd = (cfg.betas, cfg.weight_decay) if cfg.disc_optim_tied else (cfg.disc_betas, cfg.disc_weight_decay)
            self.disc_opt = torch.optim.AdamW(head_params, lr=cfg.disc_lr, betas=betas, weight_decay=wd)
            self.disc_sched = torch.optim.lr_scheduler.LambdaLR(self.disc_opt, disc_lr_lambda(cfg, self.steps_per_epoch))

    @property
    def autocast(self):
        """bf16 autocast on CUDA (a fresh context each use); nothing on the CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    # -- modes -------------------------------------------------------------------------------
    def set_modes(self) -> None:
        """Trainable parts in train mode, frozen parts in eval mode; the discriminator in eval
        mode (no spectral-norm power iteration) until its own step."""
        m = self.model
        m.eval()
        for prefix in stage_parts(self.cfg):
            getattr(m, prefix.rstrip(".")).train()
        if self.disc is not None:
            self.disc.eval()

    @property
    def epoch_float(self) -> float:
        return self.step / self.steps_per_epoch

    def gan_active(self) -> bool:
        return self.disc is not None and self.epoch_float >= self.cfg.gan_start_epoch

    def disc_active(self) -> bool:
        return self.disc is not None and self.epoch_float >= self.cfg.disc_start_epoch

    # -- losses ----------------------------------------------------------------------------------
    def compute_losses(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """Total loss of one micro-batch, its parts (floats) and the reconstruction."""
        loss, logs, recon = self._losses(x)
        return loss, host_floats(logs), recon

    def _losses(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Total loss, its parts (detached tensors, left on the device: no host sync) and the
        reconstruction of one micro-batch."""
        cfg, logs = self.cfg, {}
        with self.autocast:
            out = self.fwd(x)
        recon = out["recon"].float()
        l1 = (recon - x).abs().mean()
        logs["l1"] = l1.detach()

        if cfg.recipe == "ps-vae":
            loss = self._semantic_loss(x, out, logs)
            if cfg.decoder_stage:
                rec = self._reconstruction_loss(recon, x, l1, logs)
                loss = loss + rec + self._gan_term(rec, recon, logs)
            logs["loss"] = loss.detach()
            return loss, logs, recon

        if self.stage == 2:
            feat = F.mse_loss(out["tokens_hat"].float(), out["tokens"].float())
            kl = out["kl"].float().mean()
            loss = cfg.feature_weight * feat + cfg.kl_weight * kl + cfg.l1_weight * l1
            logs.update(feat=feat.detach(), kl=kl.detach(), loss=loss.detach())
            return loss, logs, recon

        rec = self._reconstruction_loss(recon, x, l1, logs)
        loss = rec

        if self.stage == 1:
            with torch.no_grad(), self.autocast:
                target = self.pivot(x)
            piv = F.mse_loss(out["tokens"].float(), target.float())
            if self.step < cfg.pivot_warmup_steps:
                w_piv = torch.tensor(cfg.pivot_weight, device=x.device)
            else:
                w_piv = cfg.pivot_weight * adaptive_weight(rec, piv, self.last_enc_param, cfg.pivot_eps, cfg.pivot_max)
            loss = loss + w_piv * piv
            logs.update(pivot=piv.detach(), w_piv=w_piv.detach())

        loss = loss + self._gan_term(rec, recon, logs)
        logs["loss"] = loss.detach()
        return loss, logs, recon

    def _reconstruction_loss(
        self, recon: torch.Tensor, x: torch.Tensor, l1: torch.Tensor, logs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """l1_weight * L1 (given) + grad_weight * image-gradient L1 + seam_weight * patch-seam term
        + lpips_weight * LPIPS."""
        cfg = self.cfg
        rec = cfg.l1_weight * l1
        if cfg.grad_weight > 0:
            g = image_gradient_l1(recon, x)
            rec = rec + cfg.grad_weight * g
            logs["grad"] = g.item()
        if cfg.seam_weight > 0:
            seam = patch_seam_loss(recon, x, self.model.config.decoder_patch_size)
            rec = rec + cfg.seam_weight * seam
            logs["seam"] = seam.item()
        if self.lpips is not None and cfg.lpips_weight > 0:
            with self.autocast:
                lp = lpips_loss(self.lpips, recon, x).float()
            rec = rec + cfg.lpips_weight * lp
            logs["lpips"] = lp.detach()
        return rec

    def _gan_term(self, rec: torch.Tensor, recon: torch.Tensor, logs: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """gan_weight * w_gan * G once the GAN term is active (else 0), w_gan the ratio of the
        reconstruction and GAN gradient norms at D's last layer."""
        if not self.gan_active():
            return 0.0
        cfg = self.cfg
        fake = quantize_fake(recon) if cfg.gen_fake_quantize else recon
        with self.autocast:
            logits = self.disc(fake * 2 - 1)
        g = -logits.float().mean()
        w_gan = adaptive_weight(rec, g, self.last_dec_param, cfg.gan_eps, cfg.gan_max)
        logs.update(gan=g.detach(), w_gan=w_gan.detach())
        return cfg.gan_weight * w_gan * g

    def _semantic_loss(self, x: torch.Tensor, out: dict[str, torch.Tensor], logs: dict[str, torch.Tensor]) -> torch.Tensor:
        """PS-VAE: feature_weight * MSE + feature_cos_weight * (1 - cosine) between the semantic
        decoder's tokens and the target tokens, + kl_weight * KL. The target is E's tokens in
        stage 1 (E frozen) and the frozen copy's in stage 2 (E trains)."""
        cfg = self.cfg
        if self.pivot is not None:
            with torch.no_grad(), self.autocast:
                target = self.pivot(x)
        else:
            target = out["tokens"]
        tokens_hat, target = out["tokens_hat"].float(), target.float()  # (B, N, C)
        feat = F.mse_loss(tokens_hat, target)
        cos = 1.0 - F.cosine_similarity(tokens_hat, target, dim=-1).mean()
        kl = out["kl"].float().mean()
        logs.update(feat=feat.detach(), feat_cos=cos.detach(), kl=kl.detach())
        return cfg.feature_weight * feat + cfg.feature_cos_weight * cos + cfg.kl_weight * kl

    # -- one optimiser step ----------------------------------------------------------------------
    def train_step(self, micro_batches: Sequence[torch.Tensor]) -> dict[str, float]:
        """Generator (and discriminator) update on `grad_accum` micro-batches; returns mean logs."""
        self.set_modes()
        if self.apply_unfreeze() and self.world > 1:
            self._wrap_ddp()
        n = len(micro_batches)
        sums: dict[str, torch.Tensor] = {}
        fakes = []
        self.opt.zero_grad(set_to_none=True)
        for i, x in enumerate(micro_batches):
            x = x.to(self.device, non_blocking=True)
            sync = self.world == 1 or i == n - 1
            ctx = self.fwd.no_sync() if not sync else nullcontext()
            with ctx:
                loss, logs, recon = self._losses(x)
                (loss / n).backward()
            fakes.append((x, recon.detach()))
            for k, v in logs.items():
                sums[k] = sums[k] + v / n if k in sums else v / n
        self.opt.step()
        lr = self.opt.param_groups[0]["lr"]  # the rate this step ran with (the scheduler moves it on next)
        self.sched.step()
        self.update_ema()
        if self.disc_active():
            sums.update(self._disc_step(fakes))
        self.step += 1
        out = host_floats(sums)  # the step's one read of the device
        out["lr"] = lr
        if "d_loss" in out:
            out["d_lr"] = self._d_lr
        return out

    def disc_step(self, fakes: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """One discriminator update (hinge loss) on the micro-batches of this step.

        Fakes, by default, come from a fresh forward of the *updated* model in eval mode (no
        token noise), clamped and rounded to 8 bits, as the authors' step makes them.
        """
        logs = host_floats(self._disc_step(fakes))
        return {**logs, "d_lr": self._d_lr}

    def _disc_step(self, fakes: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """`disc_step` with its loss left on the device; its learning rate in `self._d_lr`."""
        n = len(fakes)
        if self.cfg.disc_fresh_fakes:
            fakes = [(x, self.reconstruct(x, use_ema=False, batch=len(x))) for x, _ in fakes]
        self.disc.train()
        self.disc_opt.zero_grad(set_to_none=True)
        self._d_lr = self.disc_opt.param_groups[0]["lr"]
        d_sum = None
        for x, recon in fakes:
            fake = quantize_8bit(recon).to(x.device)
            with self.autocast:
                real_logits, fake_logits = real_fake_logits(self.disc, x * 2 - 1, fake * 2 - 1, self.cfg.disc_fake_first)
            d_loss = hinge_d_loss(real_logits.float(), fake_logits.float())
            (d_loss / n).backward()
            d_sum = d_loss.detach() / n if d_sum is None else d_sum + d_loss.detach() / n
        # The authors call the discriminator outside DDP, so each rank keeps its own heads;
        # here the (small) head gradients are averaged so that all ranks train one discriminator.
        if self.world > 1:
            for p in self.disc.heads.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
        self.disc_opt.step()
        self.disc_sched.step()
        self.set_modes()
        return {"d_loss": d_sum}

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- ema + (1 - decay) * (param - ema), for every trainable tensor in one fused call."""
        ema, params = self._ema_pairs
        if ema:
            torch._foreach_lerp_(ema, params, 1.0 - self.cfg.ema_decay)

    # -- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, use_ema: bool = True, batch: int = 8) -> torch.Tensor:
        """The stage's inference path (RPiAE stage I: D(E(x)); otherwise the full autoencoder),
        no noise, in eval mode; on the images' device. The training modes are restored after."""
        m = self.ema if use_ema else self.model
        m.eval()  # also refreshes E's cached pos-embed after the weights changed
        tokens_only = self.cfg.recipe == "rpiae" and self.stage == 1  # no bridge trained yet
        outs = []
        for i in range(0, len(images), batch):
            x = images[i : i + batch].to(self.device)
            with self.autocast:
                y = m.decode_tokens(m.tokens(x)) if tokens_only else m(x)
            outs.append(y.float().to(images.device))
        self.set_modes()
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def validate(self, images: torch.Tensor) -> dict[str, float]:
        """Held-out PSNR/SSIM of the EMA model's 8-bit reconstructions, and how visible D's
        patch grid is in them (`rpiae.metrics.patch_border_ratio`, about 1 for photos)."""
        recon = quantize_8bit(self.reconstruct(images)).numpy()
        target = images.numpy()
        return {
            "val_psnr": float(psnr(recon, target).mean()),
            "val_ssim": float(ssim(recon, target).mean()),
            "val_border_ratio": float(patch_border_ratio(recon, self.model.config.decoder_patch_size).mean()),
        }

    def save_samples(self, images: torch.Tensor, path: str | Path) -> Path:
        """PNG grid: originals on top, EMA reconstructions below."""
        from PIL import Image

        recon = self.reconstruct(images).clamp(0, 1)
        top = torch.cat(list(images.clamp(0, 1)), dim=2)
        bottom = torch.cat(list(recon), dim=2)
        grid = torch.cat([top, bottom], dim=1)
        arr = to_uint8(grid.numpy())
        path = Path(path)
        with atomic_file(path) as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")
        return path

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return trainer_state(self)

    def load_state_dict(self, state: dict) -> None:
        load_trainer_state(self, state)
        self.set_modes()

    def save_checkpoint(self, name: str = "last") -> Path:
        """`out/<name>/checkpoint.pt`, written atomically (rank 0 only)."""
        path = self.out_dir / name
        if self.rank == 0:
            with atomic_dir(path, overwrite=True) as tmp:
                torch.save(self.state_dict(), tmp / CHECKPOINT_NAME)
        return path


def host_floats(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Tensors (on any device) and floats as Python floats, with one device-to-host read."""
    names = list(values)
    tensors = [values[k] for k in names if isinstance(values[k], torch.Tensor)]
    read = iter(torch.stack([t.detach().float().reshape(()).to(tensors[0].device) for t in tensors]).tolist()
                if tensors else [])
    return {k: next(read) if isinstance(values[k], torch.Tensor) else float(values[k]) for k in names}

