"""Three-stage RPiAE training (docs/TRAINING.md): `rpiae train`, or `run_training` from Python.

- `config.TrainConfig`: the recipe, defaults = the authors' code; JSON/YAML overrides per stage.
- `data.ImageFolderDataset`: recursive jpg/png/webp folder, resize + random crop, bad files skipped.
- `lpips.LPIPS`, `discriminator.Discriminator`: loss networks from local weight files.
- `trainer.Trainer`: one stage's state and steps (AdamW, EMA, accumulation, DDP);
  `stages`: what each stage trains; `losses`: each stage's forward and loss terms;
  `schedule`: steps and learning rates; `checkpoint`: a stage's resumable state on disk;
  `fit.fit`: the loop that runs a stage to the end of its schedule.
"""

from rpiae.training.config import TrainConfig, load_train_config
from rpiae.training.run import TrainingError, run_training
from rpiae.training.fit import fit
from rpiae.training.trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "TrainingError", "fit", "load_train_config", "run_training"]
