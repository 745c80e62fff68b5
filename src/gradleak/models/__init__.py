"""The model zoo: plain-torch models registered by name."""

from gradleak.models import zoo as _zoo  # noqa: F401  (registers the built-in models)
from gradleak.models.registry import MODELS, build_model, resolve_factory

__all__ = ["MODELS", "build_model", "resolve_factory"]
