"""Attacks an honest-but-curious server can run on one client's update, grouped by family:
``optimisation`` (gradient inversion), ``exact`` (analytic recovery, labels), ``disaggregation``
(secure sums). ``base`` holds the protocol every attack follows and the registry ``ATTACKS``.

The names below load on first use (PEP 562), so that the torch-free parts of the package (gradient
disaggregation, the MILP back-ends) import without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "ATTACKS": "gradleak.attacks.base",
    "Attack": "gradleak.attacks.base",
    "Reconstruction": "gradleak.attacks.base",
    "ServerView": "gradleak.attacks.base",
    "UpdateMismatch": "gradleak.fl.update",
    "GradientInversion": "gradleak.attacks.optimisation",
    "PRESETS": "gradleak.attacks.optimisation",
    "PRESET_SOURCES": "gradleak.attacks.optimisation",
    "AttackSettings": "gradleak.attacks.optimisation",
    "preset": "gradleak.attacks.optimisation",
    "idlg_label": "gradleak.attacks.exact.labels",
    "label_counts": "gradleak.attacks.exact.labels",
    "label_set": "gradleak.attacks.exact.labels",
    "recover_labels": "gradleak.attacks.exact.labels",
    "load_attacks": "gradleak.attacks.registry",
}

if TYPE_CHECKING:
    from gradleak.attacks.base import ATTACKS, Attack, Reconstruction, ServerView
    from gradleak.attacks.exact.labels import idlg_label, label_counts, label_set, recover_labels
    from gradleak.attacks.optimisation import (
        PRESET_SOURCES,
        PRESETS,
        AttackSettings,
        GradientInversion,
        preset,
    )
    from gradleak.attacks.registry import load_attacks
    from gradleak.fl.update import UpdateMismatch


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'gradleak.attacks' has no attribute {name!r}")


__all__ = sorted(_WHERE)
