"""The user's own code in gradleak (``package.module:name`` in a config or on the command line).

A plugin is imported and called inside gradleak's process, so whatever it raises, or a
``sys.exit`` in it, would otherwise end a command with a traceback or, worse, with exit status 0
and nothing written. ``load`` turns a failing import into one line naming the plugin; ``guarded``
does the same for a call; ``blame`` finds, for any exception that escaped later (a model's
forward pass failing on some batch), the plugin frame it came from, so the command can still end
with one line naming the plugin and a non-zero status.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from gradleak.errors import ConfigError

T = TypeVar("T")

# Modules imported as plugins (their names), for ``blame``.
_MODULES: set[str] = set()


def describe(exc: BaseException) -> str:
    """What ``exc`` says, as the end of a sentence about who raised it."""
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r})"
    text = str(exc).replace("\n", " ").strip()
    return f"raised {type(exc).__name__}" + (f": {text}" if text else "")


def load(spec: str, *, key: str) -> Callable[..., Any]:
    """The callable named by ``package.module:name``; an import that fails in any way (or exits)
    is a ``ConfigError`` naming ``key`` and the plugin."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(key, f"{spec!r} is not package.module:name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(key, f"cannot import {module_name!r}: {exc}") from None
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the plugin's own failure, reported as such
        raise ConfigError(key, f"importing the plugin {module_name!r} {describe(exc)}") from None
    _MODULES.add(module.__name__)
    obj = getattr(module, attr, None)
    if not callable(obj):
        raise ConfigError(key, f"{module_name!r} has no callable {attr!r}")
    return obj


def guarded(spec: str, key: str, call: Callable[[], T]) -> T:
    """``call()``, with anything the plugin ``spec`` raises (or a ``sys.exit``) turned into a
    ``ConfigError`` naming ``key`` and the plugin."""
    try:
        return call()
    except ConfigError:
        raise
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the plugin's own failure, reported as such
        raise ConfigError(key, f"the plugin {spec} {describe(exc)}") from None


def blame(exc: BaseException) -> str | None:
    """One line naming the plugin whose code raised ``exc`` (the innermost plugin frame of its
    traceback), or None when no plugin's code is in it."""
    if not _MODULES:
        return None
    found = None
    for frame, line in traceback.walk_tb(exc.__traceback__):
        name = frame.f_globals.get("__name__", "")
        if name in _MODULES or any(name.startswith(m + ".") for m in _MODULES):
            found = (name, frame.f_code.co_filename, line)
    if found is None:
        return None
    name, filename, line = found
    return f"the plugin module {name} ({filename}, line {line}) {describe(exc)}"


def is_plugin_exit(exc: SystemExit) -> bool:
    """Whether a ``SystemExit`` came from a plugin's ``sys.exit`` (not from gradleak's CLI)."""
    return blame(exc) is not None


__all__ = ["blame", "describe", "guarded", "is_plugin_exit", "load"]
