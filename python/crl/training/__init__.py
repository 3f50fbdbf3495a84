"""Training: configuration, the loss step, the loop with checkpoints, and export."""

from crl.training.config import TrainConfig, load_train_config

__all__ = ["TrainConfig", "load_train_config"]
