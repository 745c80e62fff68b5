"""Models by name, or any user model through ``package.module:factory``.

A factory receives ``channels``, ``image_size`` and ``num_classes`` (those its signature accepts)
plus the config's ``kwargs``, and returns an ``nn.Module`` mapping N x C x H x W to N x classes.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradleak.errors import ConfigError
from gradleak.registry import Registry
from gradleak.resources import check_fits

ModelFactory = Callable[..., nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")


def resolve_factory(name: str, *, key: str = "model.name") -> ModelFactory:
    """A registered name, or ``package.module:factory`` imported from the user's code."""
    if ":" not in name:
        return MODELS.get(name, key=key)
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(key, f"cannot import {module_name!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(key, f"{module_name!r} has no callable {attr!r}")
    return factory


def build_model(
    name: str,
    *,
    channels: int,
    image_size: int,
    num_classes: int,
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Instantiate a model whose input and output follow the dataset."""
    factory = resolve_factory(name)
    given = {"channels": channels, "image_size": image_size, "num_classes": num_classes}
    params = inspect.signature(factory).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    call = {k: v for k, v in given.items() if takes_all or k in params}
    _check_size(factory, name, {**call, **(kwargs or {})})
    try:
        model = factory(**call, **(kwargs or {}))
    except TypeError as exc:
        raise ConfigError("model.kwargs", f"{name}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError("model.name", f"{name} returned {type(model).__name__}, not a torch nn.Module")
    return model


# Copies of the weights a run holds at once (global model, a client's copy, its gradients and
# momentum, the update, the aggregate, the attack's simulated training): a rough bound.
MODEL_COPIES = 8


def _check_size(factory: ModelFactory, name: str, kwargs: dict[str, Any]) -> None:
    """Build the model on the meta device (no memory) and refuse one whose weights the machine
    cannot hold ``MODEL_COPIES`` times; a factory that cannot build on meta is not checked."""
    try:
        with torch.device("meta"):
            probe = factory(**kwargs)
        tensors = [*probe.parameters(), *probe.buffers()]
        count, size = sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)
    except Exception:  # noqa: BLE001 - the real build below reports the factory's own errors
        return
    check_fits(MODEL_COPIES * size, f"{MODEL_COPIES} copies of {name}'s {count:,} weights",
               "model.kwargs", "choose a smaller model")  # fmt: skip
