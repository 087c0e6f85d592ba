"""Which parts of the model each stage of each recipe trains, by state-dict prefix, and the
parameters that never train."""

from __future__ import annotations

from torch import nn

from rpiae.training.config import TrainConfig

STAGE_PARTS = {
    1: ("encoder.", "decoder."),
    2: ("vb_feature_encoder.", "vb_feature_decoder."),
    3: ("decoder.",),
}
PSVAE_STAGE_PARTS = {
    1: ("vb_feature_encoder.", "vb_feature_decoder.", "decoder."),  # D only with `svae_pixel_decoder`
    2: ("encoder.", "vb_feature_encoder.", "vb_feature_decoder.", "decoder."),
}
# the stage that fine-tunes E against a frozen copy of itself (RPiAE's pivot, PS-VAE's semantic target)
FROZEN_COPY_STAGE = {"rpiae": 1, "ps-vae": 2}
MASK_TOKEN = "encoder.encoder.embeddings.mask_token"  # unused by the model, never trained
DECODER_POS_EMBED = "decoder.decoder_pos_embed"


def stage_parts(cfg: TrainConfig) -> tuple[str, ...]:
    """State-dict prefixes of the parts this stage trains."""
    if cfg.recipe == "rpiae":
        return STAGE_PARTS[cfg.stage]
    parts = PSVAE_STAGE_PARTS[cfg.stage]
    return parts if cfg.decoder_stage else tuple(p for p in parts if p != "decoder.")


def trainable_names(model: nn.Module, cfg: TrainConfig) -> list[str]:
    fixed = {MASK_TOKEN} | (set() if cfg.train_decoder_pos_embed else {DECODER_POS_EMBED})
    return [n for n, _ in model.named_parameters() if n.startswith(stage_parts(cfg)) and n not in fixed]
