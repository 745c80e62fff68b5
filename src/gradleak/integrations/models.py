"""The user's model, however an app names it: a factory (a class or a function), an ``nn.Module``
(copied), a class path ``"package.module.Class"`` with keyword arguments, or NVFlare's
model-spec dict ``{"path": "package.module.Class", "args": {...}}`` (its recipes' ``class_path``
too).

The audit needs a fresh module of the user's architecture to run the server's simulated local
training on; it never trains or changes the user's own instance.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from gradleak import plugins
from gradleak.errors import ConfigError

ModelSpec = Callable[[], nn.Module] | nn.Module | str | Mapping[str, Any]


def import_path(path: str, key: str = "model") -> Any:
    """The object named by ``"package.module.Name"`` (imported on demand, through the same guard
    as every plugin: an import that fails or exits is one ``ConfigError`` naming it)."""
    module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(key, f"{path!r} is not a dotted path such as 'package.module.Class'")
    return plugins.load(f"{module_name}:{attr}", key=key)


def model_factory(
    spec: ModelSpec, args: Mapping[str, Any] | None = None, *, key: str = "model"
) -> Callable[[], nn.Module]:
    """A callable building a fresh module of ``spec`` (``args``: keyword arguments of a class
    path or factory; a model-spec dict carries its own under ``"args"``)."""
    extra = dict(args or {})
    if isinstance(spec, nn.Module):
        if extra:
            raise ConfigError(key, "arguments are given for a model instance")
        template = copy.deepcopy(spec)
        return lambda: copy.deepcopy(template)
    if isinstance(spec, Mapping):
        # NVFlare's component spec names the class "path"; its job recipes "class_path"
        path = spec.get("path", spec.get("class_path"))
        if not isinstance(path, str):
            raise ConfigError(key, "a model-spec dict needs a 'path' (the class, dotted)")
        unknown = set(spec) - {"path", "class_path", "args"}
        if unknown:
            raise ConfigError(key, f"unknown model-spec keys {sorted(unknown)}")
        extra = {**dict(spec.get("args") or {}), **extra}
        spec = path
    target = import_path(spec, key) if isinstance(spec, str) else spec
    if not callable(target):
        raise ConfigError(key, f"{target!r} is neither a model, a factory nor a class path")

    def build() -> nn.Module:
        model = plugins.guarded(str(spec), key, lambda: target(**extra))
        if not isinstance(model, nn.Module):
            raise ConfigError(key, f"{spec!r} built a {type(model).__name__}, not a torch module")
        return model

    return build


def describe(spec: ModelSpec) -> str:
    """A short name of the model for the audit's metadata."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        return str(spec.get("path", spec.get("class_path")))
    if isinstance(spec, nn.Module):
        return f"{type(spec).__module__}.{type(spec).__qualname__}"
    return f"{getattr(spec, '__module__', '?')}.{getattr(spec, '__qualname__', repr(spec))}"
