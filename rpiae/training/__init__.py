"""Three-stage RPiAE training (docs/TRAINING.md): `rpiae train`, or `run_training` from Python.

- `config.TrainConfig`: the recipe, defaults = the authors' code; JSON/YAML overrides per stage.
- `data.ImageFolderDataset`: recursive jpg/png/webp folder, resize + random crop, bad files skipped.
- `lpips.LPIPS`, `discriminator.Discriminator`: loss networks from local weight files.
- `trainer.Trainer` / `trainer.fit`: one stage (AdamW, cosine, EMA, accumulation, DDP, resume).
"""

from rpiae.training.config import TrainConfig, load_train_config
from rpiae.training.run import TrainingError, run_training
from rpiae.training.trainer import Trainer, fit

__all__ = ["TrainConfig", "Trainer", "TrainingError", "fit", "load_train_config", "run_training"]
