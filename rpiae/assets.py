"""The project's shipped small checkpoint (the `tiny` preset, trained on CPU; see
rpiae/assets/rpiae-tiny.json for how it was made and what it scores)."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
DEFAULT_CHECKPOINT = ASSETS / "rpiae-tiny.safetensors"


def default_checkpoint() -> Path:
    if not DEFAULT_CHECKPOINT.is_file():
        raise FileNotFoundError(
            f"the shipped checkpoint {DEFAULT_CHECKPOINT} is missing from this installation; pass --model/--checkpoint"
        )
    return DEFAULT_CHECKPOINT
