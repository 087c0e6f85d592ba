"""Which parts of the model each stage of each recipe trains, by state-dict prefix, the
parameters that never train, and PS-VAE stage 2's progressive unfreezing of E."""

from __future__ import annotations

import math
import re

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


_BLOCK = re.compile(r"^encoder\..*\.layers?\.(\d+)\.")  # E's transformer blocks (DINOv2 `layer`, SigLIP2 `layers`)


def encoder_groups(model: nn.Module, groups: int, names: set[str] | None = None) -> dict[str, int]:
    """E's parameters (those in `names`, if given) -> the group they unfreeze with, 0 = first.

    E's n blocks split into `groups` near-equal groups from the top (block i is in group
    floor((n - 1 - i) * groups / n)); what follows the blocks (a final norm) goes with the top
    group, the embeddings with the bottom one."""
    enc = [n for n, _ in model.named_parameters() if n.startswith("encoder.") and (names is None or n in names)]
    blocks = {n: int(m.group(1)) for n in enc if (m := _BLOCK.match(n))}
    depth = max(blocks.values(), default=-1) + 1
    groups = max(1, min(groups, depth))
    plan = {}
    for n in enc:
        if n in blocks:
            plan[n] = (depth - 1 - blocks[n]) * groups // depth
        else:
            plan[n] = groups - 1 if ".embeddings." in n else 0
    return plan


def unfrozen_groups(cfg: TrainConfig, epoch: float, groups: int) -> int:
    """How many of E's `groups` block groups train at `epoch`: one, and one more every
    `unfreeze_every_epochs` (the 1e-9: an epoch such as 3 x 0.01 lands on its boundary)."""
    return min(groups, 1 + math.floor(epoch / cfg.unfreeze_every_epochs + 1e-9))
