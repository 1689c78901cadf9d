"""The shared trainer: config loading, the training loop, safetensors + JSON checkpoints."""

from genrerank.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model,
    read_meta,
    save_checkpoint,
)
from genrerank.training.config import TrainConfig, load_run_config
from genrerank.training.trainer import Trainer, seed_everything

__all__ = [
    "CheckpointError",
    "TrainConfig",
    "Trainer",
    "load_checkpoint",
    "load_model",
    "load_run_config",
    "read_meta",
    "save_checkpoint",
    "seed_everything",
]
