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


def _border_steps(img: torch.Tensor, patch: int, dim: int, band: int) -> torch.Tensor:
    """Along `dim`, the signed steps within `band` of each border between `patch`-pixel patches:
    the step across it and `band` steps on either side, (..., (2 band + 1) x borders, ...)."""
    n = img.shape[dim]
    d = img.narrow(dim, 1, n - 1) - img.narrow(dim, 0, n - 1)  # step i: pixel i+1 - pixel i
    across = torch.arange(patch - 1, n - 1, patch, device=img.device)  # step from a patch's last pixel to the next's first
    near = (across[:, None] + torch.arange(-band, band + 1, device=img.device)).flatten()
    return d.index_select(dim, near[(near >= 0) & (near < n - 1)])


SEAM_BAND = 3  # steps on either side of a border that the seam term covers


def patch_seam_loss(recon: torch.Tensor, target: torch.Tensor, patch: int, band: int = SEAM_BAND) -> torch.Tensor:
    """Mean squared difference between the signed neighbouring-pixel steps of reconstruction and
    input near the decoder's patch borders (the step across each border and `band` steps on
    either side), rows and columns.

    Squared on purpose: an L1 on steps (`image_gradient_l1`) costs a seam of height J the same
    whether it sits in one step or is spread over many (k x J/k), so it never pushes a decoder
    to blend neighbouring patches into each other; a square costs J^2 in one step and J^2/k
    spread over k, so the cheapest seam is a gradual one. Every signed step in the band is
    matched, so a seam cannot be hidden by roughening the pixels beside it."""
    return 0.5 * sum(
        (_border_steps(recon, patch, d, band) - _border_steps(target, patch, d, band)).square().mean() for d in (-1, -2)
    )


class StageForward(nn.Module):
    """The differentiable path of one stage (the module DDP wraps)."""

    def __init__(
        self, model: RPiAE, stage: int, tau: float, sample_posterior: bool = False, recipe: str = "rpiae",
        train_decoder: bool = True, noise_after_bridge: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.stage, self.tau, self.sample_posterior = model, stage, tau, sample_posterior
        self.recipe, self.train_decoder, self.noise_after_bridge = recipe, train_decoder, noise_after_bridge

    def noised(self, tokens: torch.Tensor) -> torch.Tensor:
        return RPiAE.add_token_noise(tokens, self.tau) if self.tau > 0 else tokens

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
            if not self.noise_after_bridge:
                tokens = self.noised(tokens)  # the authors': E's tokens, as in stages I and II
            dec_tokens = m.vb_feature_decoder(m.vb_feature_encoder(tokens).mean)
            if self.noise_after_bridge:
                dec_tokens = self.noised(dec_tokens)
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
