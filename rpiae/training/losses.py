"""The differentiable path of each stage (`StageForward`, the module DDP wraps) and the loss
terms built on it that are not a network of their own (LPIPS and the discriminator are)."""

from __future__ import annotations

import torch
from torch import nn

from rpiae.model import RPiAE


def adaptive_weight(loss_a: torch.Tensor, loss_b: torch.Tensor, param: torch.Tensor, eps: float, max_value: float) -> torch.Tensor:
    """clamp(||d loss_a / d param|| / (||d loss_b / d param|| + eps), 0, max), detached."""
    ga = torch.autograd.grad(loss_a, param, retain_graph=True)[0]
    gb = torch.autograd.grad(loss_b, param, retain_graph=True)[0]
    return (ga.norm() / (gb.norm() + eps)).clamp(0.0, max_value).detach()


def image_gradient_l1(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean |d recon - d target| over horizontal and vertical neighbouring-pixel differences."""
    dx = (recon[..., :, 1:] - recon[..., :, :-1]) - (target[..., :, 1:] - target[..., :, :-1])
    dy = (recon[..., 1:, :] - recon[..., :-1, :]) - (target[..., 1:, :] - target[..., :-1, :])
    return 0.5 * (dx.abs().mean() + dy.abs().mean())


def _border_jumps(img: torch.Tensor, patch: int, dim: int) -> torch.Tensor:
    """Along `dim`, at each border between `patch`-pixel patches: the step across the border
    minus the mean of the steps just before and after it. A seam (an offset between two
    patches) shows in full; a smooth ramp or a blur that runs through the border does not."""
    def at(i: int) -> torch.Tensor:  # the pixels at offset i from each border (i = 0: first pixel after it)
        n = img.shape[dim]
        return img.narrow(dim, patch + i, n - patch - 1).unfold(dim, 1, patch).squeeze(-1)

    across, before, after = at(0) - at(-1), at(-1) - at(-2), at(1) - at(0)
    return across - 0.5 * (before + after)


def patch_seam_l1(recon: torch.Tensor, target: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean |jump(recon) - jump(target)| over the decoder's patch borders, rows and columns, where
    jump is the step across a border minus the mean of the steps beside it (`_border_jumps`):
    it penalises discontinuities the input does not have, not the blur inside patches."""
    return 0.5 * sum(
        (_border_jumps(recon, patch, d) - _border_jumps(target, patch, d)).abs().mean() for d in (-1, -2)
    )


class StageForward(nn.Module):
    """The differentiable path of one stage (the module DDP wraps)."""

    def __init__(
        self, model: RPiAE, stage: int, tau: float, sample_posterior: bool = False, recipe: str = "rpiae",
        train_decoder: bool = True,
    ) -> None:
        super().__init__()
        self.model, self.stage, self.tau, self.sample_posterior = model, stage, tau, sample_posterior
        self.recipe, self.train_decoder = recipe, train_decoder

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.recipe == "ps-vae":
            return self.semantic_pixel(x)
        m = self.model
        if self.stage == 1:
            tokens = m.tokens(x)  # (B, N, C), E trainable
            noised = RPiAE.add_token_noise(tokens, self.tau) if self.tau > 0 else tokens
            return {"tokens": tokens, "recon": m.decode_tokens(noised)}
        with torch.no_grad():
            tokens = m.tokens(x)  # E frozen
        if self.stage == 2:
            noised = RPiAE.add_token_noise(tokens, self.tau) if self.tau > 0 else tokens
            post = m.vb_feature_encoder(noised)
            z = post.sample() if self.sample_posterior else post.mean  # (B, Cz, 16, 16)
            tokens_hat = m.vb_feature_decoder(z)
            return {
                "tokens": tokens,
                "tokens_hat": tokens_hat,
                "kl": post.kl(),
                "recon": m.decode_tokens(tokens_hat),  # D frozen; gradients reach the VB
            }
        with torch.no_grad():  # stage III: E and VB frozen, D on the posterior mean
            dec_tokens = m.vb_feature_decoder(m.vb_feature_encoder(tokens).mean)
            if self.tau > 0:
                dec_tokens = RPiAE.add_token_noise(dec_tokens, self.tau)
        return {"recon": m.decode_tokens(dec_tokens)}

    def semantic_pixel(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """PS-VAE: E's tokens through the semantic autoencoder, then D. Stage 1 stops D's
        gradient at the semantic decoder's output; stage 2 lets it reach E."""
        m = self.model
        if self.stage == 1:
            with torch.no_grad():
                tokens = m.tokens(x)  # (B, N, C), E frozen
        else:
            tokens = m.tokens(x)  # E trainable
        noised = RPiAE.add_token_noise(tokens, self.tau) if self.tau > 0 else tokens
        post = m.vb_feature_encoder(noised)
        z = post.sample() if self.sample_posterior else post.mean  # (B, Cz, 16, 16)
        tokens_hat = m.vb_feature_decoder(z)  # (B, N, C)
        if self.stage == 2:
            recon = m.decode_tokens(tokens_hat)
        elif self.train_decoder:
            recon = m.decode_tokens(tokens_hat.detach())
        else:
            with torch.no_grad():
                recon = m.decode_tokens(tokens_hat)  # logged only
        return {"tokens": tokens, "tokens_hat": tokens_hat, "kl": post.kl(), "recon": recon}
