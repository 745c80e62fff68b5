"""The optimisation family: one engine (``GradientInversion``) whose settings make DLG, iDLG,
Inverting Gradients, GradInversion and the batch-statistics attack; each preset is registered in
``attacks.ATTACKS`` under its name, taking changes to its settings as keyword arguments, and under
its name + ``-adaptive``, the same attack adapted to the defences the server knows of."""

from __future__ import annotations

from collections.abc import Callable

from gradleak.attacks.base import ADAPTIVE, ATTACKS
from gradleak.attacks.optimisation.engine import GradientInversion
from gradleak.attacks.optimisation.settings import PRESET_SOURCES, PRESETS, AttackSettings, preset


def _preset_attack(name: str, adaptive: bool) -> Callable[..., GradientInversion]:
    def make(**settings: object) -> GradientInversion:
        return GradientInversion(
            preset(name, **settings), name + ADAPTIVE * adaptive, adaptive=adaptive
        )

    make.__doc__ = PRESET_SOURCES[name] + (
        "; adapted to the known defences (attacks/optimisation/adaptive.py)" if adaptive else ""
    )
    return make


for _name in PRESETS.names():
    ATTACKS.register(_name)(_preset_attack(_name, False))
    ATTACKS.register(_name + ADAPTIVE)(_preset_attack(_name, True))

__all__ = ["PRESETS", "PRESET_SOURCES", "AttackSettings", "GradientInversion", "preset"]
