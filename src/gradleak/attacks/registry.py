"""Every attack family and modality registered: what looks an attack up by name calls this first."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from gradleak.attacks.base import ATTACKS, Attack
from gradleak.modality import load_modalities

FAMILIES = ("gradleak.attacks.optimisation", "gradleak.attacks.exact")


def load_attacks() -> None:
    """Import the attack families and the modalities (which may bring attacks of their own)."""
    for module in FAMILIES:
        importlib.import_module(module)
    load_modalities()


def attack_factory(name: str, *, key: str = "audit.preset") -> Callable[..., Attack]:
    """The factory of the attack registered as ``name`` (a ``ConfigError`` naming ``key`` lists the
    known ones)."""
    load_attacks()
    return ATTACKS.get(name, key=key)
