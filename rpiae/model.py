"""RPiAE: Representation-Pivoted Autoencoder (arXiv 2603.19206), as released by the authors.

    image (B,3,H,W) in [0,1]
      -> encoder E (DINOv2-B/14-reg4)            tokens  (B, 256, 768)
      -> vb_feature_encoder (Variational Bridge)  moments (B, 128, 16, 16) -> mean = latent
    latent (B,64,16,16)
      -> vb_feature_decoder                       tokens  (B, 256, 768)
      -> decoder D (ViT-XL pixel decoder)         image   (B, 3, 256, 256), un-normalised

`state_dict()` has exactly the release's 770 keys, so the authors' checkpoint loads strictly.
A model with latent statistics (`set_latent_stats`, `config.latent_norm`) has two more,
`latent_mean` and `latent_var`, and its latent is the normalised one.

PS-VAE (arXiv 2512.17909) is the same skeleton and so the same class, configured
(`config.family == "ps-vae"`, presets `ps-vae`, `ps-vae-siglip2`, `ps-vae-tiny`): E is
DINOv2 (or SigLIP2), the bridge is its semantic encoder/decoder with a 96-channel latent,
D its pixel decoder. Every graph, runtime and command reads the sizes from the config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from rpiae.checkpoints import CheckpointError, load_strict, read_model_checkpoint, save_model
from rpiae.config import LATENT_NORM_EPS, PRESETS, RPiAEConfig, get_preset
from rpiae.hub import resolve
from rpiae.modules import DiagonalGaussian, PixelDecoder, RepresentationEncoder, VBDecoder, VBEncoder


# the submodules each inference graph runs
GRAPH_MODULES = {"encode": ("encoder", "vb_feature_encoder"), "decode": ("vb_feature_decoder", "decoder")}


class RPiAE(nn.Module):
    def __init__(self, config: RPiAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = RepresentationEncoder(config)
        self.vb_feature_encoder = VBEncoder(config)
        self.vb_feature_decoder = VBDecoder(config)
        self.decoder = PixelDecoder(config)
        self.register_buffer("mean", torch.empty(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.empty(1, 3, 1, 1), persistent=False)
        self.reset_constants()
        if config.latent_norm:
            self.register_buffer("latent_mean", torch.zeros(config.latent_shape))
            self.register_buffer("latent_var", torch.ones(config.latent_shape))
        self.eval()

    @torch.no_grad()
    def reset_constants(self) -> None:
        """(Re)compute the normalisation constants (buffers that are not weights) from the config,
        on the weights' device; the encoder's resized position embedding is refreshed by every
        load of its weights."""
        device = next(self.parameters()).device
        self.mean = torch.tensor(self.config.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.config.std, device=device).view(1, 3, 1, 1)
        if self.encoder is not None:
            self.encoder.reset_constants()

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "RPiAE":
        """A randomly initialised model of a named size (`rpiae-b`, `tiny`, `ps-vae`, ...)."""
        cfg = get_preset(name)
        if overrides:
            cfg = RPiAEConfig.from_dict({**cfg.to_dict(), **overrides})
        return cls(cfg)

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: RPiAEConfig | str | None = None) -> "RPiAE":
        """Load the authors' release `.pt`, one of this project's `.safetensors` files, or a
        folder in the Hub layout (`rpiae push` / `AutoencoderRPiAE.save_pretrained`).

        The project's files carry their config; for the release the config is matched from
        the tensor shapes against the presets (pass `config=` for a custom size).
        """
        config, sd = read_model_checkpoint(path, config)
        with torch.device("meta"):  # no random init, no second copy: the weights are the file's tensors
            model = cls(config if config is not None else infer_config(sd))
        load_strict(model, sd, f"checkpoint {path}", assign=True)  # its post-hook refreshes the pos-embed
        model.reset_constants()
        model.source = str(path)
        return model.eval()

    @classmethod
    def from_pretrained(
        cls, repo_or_path: str | Path = "qihoo360/RPiAE", revision: str | None = None, filename: str | None = None,
        local_files_only: bool | None = None,
    ) -> "RPiAE":
        """Load from the Hugging Face Hub (downloaded once, then from its cache) or a local
        file/folder. Default: the authors' release (`qihoo360/RPiAE`). Honours HF_HUB_OFFLINE."""
        return cls.from_checkpoint(resolve(repo_or_path, revision, filename, local_files_only))

    def save(self, path: str | Path, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> Path:
        """Write the project's format: safetensors with the config in its metadata."""
        return save_model(self, path, dtype=dtype, metadata=metadata)

    def keep_graphs(self, graphs) -> "RPiAE":
        """Drop the modules only the other graph runs (a backend opened for one graph: an
        encode job does not hold the pixel decoder). Returns self; the dropped graph can no
        longer run."""
        kept = {m for g in graphs for m in GRAPH_MODULES[g]}
        for m in {m for modules in GRAPH_MODULES.values() for m in modules} - kept:
            setattr(self, m, None)
        return self

    # -- the two inference graphs --------------------------------------------------------
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """E's patch tokens (B, N, C) of images in [0, 1]."""
        return self.encoder(images)

    def posterior(self, images: torch.Tensor) -> DiagonalGaussian:
        return self.vb_feature_encoder(self.encoder(images))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> posterior mean (B, Cz, 16, 16), normalised if the model
        carries latent statistics."""
        z = self.posterior(images).mean
        if self.config.latent_norm:
            z = (z - self.latent_mean) / torch.sqrt(self.latent_var + self.config.latent_norm_eps)
        return z

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pixel decoder on tokens (B, N, C) -> image (B, 3, 256, 256), un-normalised."""
        return self.decoder(tokens) * self.std + self.mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, Cz, 16, 16) -> (B, 3, 256, 256); not clamped (post-processing clamps)."""
        if self.config.latent_norm:
            z = z * torch.sqrt(self.latent_var + self.config.latent_norm_eps) + self.latent_mean
        return self.decode_tokens(self.vb_feature_decoder(z))

    def set_latent_stats(self, mean: torch.Tensor, var: torch.Tensor, eps: float | None = None) -> "RPiAE":
        """Carry per-element latent statistics (each of shape latent_shape) from now on: encode
        returns (z - mean) / sqrt(var + eps), decode undoes it (eps: the authors' default,
        `LATENT_NORM_EPS`). Returns self."""
        shape = self.config.latent_shape
        for name, t in (("mean", mean), ("var", var)):
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"latent statistics: {name} has shape {tuple(t.shape)}, the model's latent is {shape}"
                )
        if not bool(torch.isfinite(mean).all() and torch.isfinite(var).all()) or bool((var < 0).any()):
            raise ValueError("latent statistics: mean/var must be finite and var >= 0")
        self.config = dataclasses.replace(self.config, latent_norm=True,
                                          latent_norm_eps=float(LATENT_NORM_EPS if eps is None else eps))
        ref = next(self.parameters())
        self.register_buffer("latent_mean", mean.detach().to(ref.device, torch.float32).clone())
        self.register_buffer("latent_var", var.detach().to(ref.device, torch.float32).clone())
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    # -- helpers ----------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Parameters (trainable and fixed) per part, as the paper's Table 6 counts them."""
        parts = {
            "encoder": self.encoder,
            "vb_encoder": self.vb_feature_encoder,
            "vb_decoder": self.vb_feature_decoder,
            "pixel_decoder": self.decoder,
        }
        return {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}

    @staticmethod
    def add_token_noise(tokens: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training-time noise z + sigma * N(0, I), sigma = tau * U(0, 1) per sample."""
        b = tokens.shape[0]
        shape = (b,) + (1,) * (tokens.dim() - 1)
        sigma = tau * torch.rand(shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
        noise = torch.randn(tokens.shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
        return tokens + sigma * noise


def infer_config(sd: dict[str, torch.Tensor]) -> RPiAEConfig:
    """Match a state dict against the presets by shapes (heads cannot be read off weights)."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    for cfg in PRESETS.values():
        with torch.device("meta"):
            ref = RPiAE(cfg).state_dict()
        if {k: tuple(v.shape) for k, v in ref.items()} == shapes:
            return cfg
    raise CheckpointError(
        f"the checkpoint's {len(shapes)} tensors match no preset ({', '.join(PRESETS)}); "
        "it is not an RPiAE checkpoint, or it has a custom size: pass its config explicitly"
    )
