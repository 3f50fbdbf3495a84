"""The error every model-loading path raises."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model spec could not be resolved or loaded (message says what was expected and how to fix it)."""


__all__ = ["ModelLoadError"]
