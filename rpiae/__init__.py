"""rpiae: train, export and serve the RPiAE image tokenizer."""

from rpiae.config import PRESETS, RPiAEConfig, get_preset
from rpiae.model import RPiAE
from rpiae.version import __version__

__all__ = ["PRESETS", "RPiAE", "RPiAEConfig", "get_preset", "__version__"]
