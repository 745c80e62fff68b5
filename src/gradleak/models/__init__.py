"""Models by name: every modality registers its own (``MODELS``); the user's through
``package.module:factory``."""

from gradleak.models.registry import MODELS, build_model, resolve_factory

__all__ = ["MODELS", "build_model", "resolve_factory"]
