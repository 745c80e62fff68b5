"""Models by name, or any user model through ``package.module:factory``.

A factory receives what the data's input spec offers (``InputSpec.factory_args``: images give
``channels`` and ``image_size``) and ``num_classes``, those its signature accepts, plus the
config's ``kwargs``; it returns an ``nn.Module`` mapping a batch of model inputs to what the task
trains on (classification: N x classes; ``Task.check_output`` says).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradleak import plugins
from gradleak.errors import ConfigError
from gradleak.modality import InputSpec, Task, load_modalities
from gradleak.registry import Registry
from gradleak.resources import check_fits

ModelFactory = Callable[..., nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")


def resolve_factory(name: str, *, key: str = "model.name") -> ModelFactory:
    """A registered name, or ``package.module:factory`` imported from the user's code."""
    if ":" not in name:
        load_modalities()
        return MODELS.get(name, key=key)
    return plugins.load(name, key=key)


def build_model(
    name: str,
    *,
    spec: InputSpec,
    num_classes: int,
    kwargs: dict[str, Any] | None = None,
    task: Task | None = None,
) -> nn.Module:
    """Instantiate a model whose input and output follow the dataset and the task (default:
    classification)."""
    factory = resolve_factory(name)
    given = {**spec.factory_args(), "num_classes": num_classes}
    params = inspect.signature(factory).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    call = {k: v for k, v in given.items() if takes_all or k in params}
    _check_size(factory, name, {**call, **(kwargs or {})})
    try:
        model = factory(**call, **(kwargs or {}))
    except TypeError as exc:  # most often a keyword the factory does not take
        raise ConfigError("model.kwargs", f"{name}: {exc}") from None
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the factory's own failure, reported as such
        who = f"the plugin {name}" if ":" in name else name
        raise ConfigError(
            "model.name" if ":" in name else "model.kwargs", f"{who} {plugins.describe(exc)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            "model.name", f"{name} returned {type(model).__name__}, not a torch nn.Module"
        )
    if task is None:
        from gradleak.fl.tasks import Classification

        task = Classification()
    _probe(model, name, spec, num_classes, task)
    return model


def _probe(model: nn.Module, name: str, spec: InputSpec, num_classes: int, task: Task) -> None:
    """One forward pass on two blank examples (eval mode, no gradient, no statistics updated): a
    model that fails on the data's shape, or does not return what the task trains on
    (classification: N x num_classes), is refused now by name, not in the middle of training."""
    device = next(iter(model.parameters()), torch.zeros(0)).device
    x = spec.model_inputs(spec.blank(2)).to(device)
    was = model.training
    try:
        with torch.no_grad():
            out = plugins.guarded(name, "model.name", lambda: model.eval()(x))
    finally:
        model.train(was)
    problem = task.check_output(out, x, num_classes)
    if problem is not None:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        inputs = " x ".join(str(d) for d in x.shape)
        raise ConfigError("model.name", f"{name} maps {inputs} inputs to {shape}, {problem}")


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
        count, size = (
            sum(t.numel() for t in tensors),
            sum(t.numel() * t.element_size() for t in tensors),
        )
    except (Exception, SystemExit):  # noqa: BLE001 - the real build below reports the factory's own errors
        return
    check_fits(
        MODEL_COPIES * size,
        f"{MODEL_COPIES} copies of {name}'s {count:,} weights",
        "model.kwargs",
        "choose a smaller model",
    )
