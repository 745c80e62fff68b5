"""The optimisation family: one engine (``GradientInversion``) whose settings make DLG, iDLG,
Inverting Gradients, GradInversion and the batch-statistics attack; each preset is registered in
``attacks.ATTACKS`` under its name, taking changes to its settings as keyword arguments."""

from __future__ import annotations

from collections.abc import Callable

from gradleak.attacks.base import ATTACKS
from gradleak.attacks.optimisation.engine import GradientInversion
from gradleak.attacks.optimisation.settings import PRESET_SOURCES, PRESETS, AttackSettings, preset


def _preset_attack(name: str) -> Callable[..., GradientInversion]:
    def make(**settings: object) -> GradientInversion:
        return GradientInversion(preset(name, **settings), name)

    make.__doc__ = PRESET_SOURCES[name]
    return make


for _name in PRESETS.names():
    ATTACKS.register(_name)(_preset_attack(_name))

__all__ = ["PRESETS", "PRESET_SOURCES", "AttackSettings", "GradientInversion", "preset"]
