"""Attacks an honest-but-curious server can run on one client's update.

The names below load on first use (PEP 562), so that the torch-free parts of the package (gradient
disaggregation, the MILP back-ends) import without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "GradientInversion": "gradleak.attacks.engine",
    "idlg_label": "gradleak.attacks.labels",
    "label_counts": "gradleak.attacks.labels",
    "label_set": "gradleak.attacks.labels",
    "recover_labels": "gradleak.attacks.labels",
    "PRESETS": "gradleak.attacks.settings",
    "PRESET_SOURCES": "gradleak.attacks.settings",
    "AttackSettings": "gradleak.attacks.settings",
    "preset": "gradleak.attacks.settings",
    "Reconstruction": "gradleak.attacks.view",
    "ServerView": "gradleak.attacks.view",
    "UpdateMismatch": "gradleak.attacks.view",
}

if TYPE_CHECKING:
    from gradleak.attacks.engine import GradientInversion
    from gradleak.attacks.labels import idlg_label, label_counts, label_set, recover_labels
    from gradleak.attacks.settings import PRESET_SOURCES, PRESETS, AttackSettings, preset
    from gradleak.attacks.view import Reconstruction, ServerView, UpdateMismatch


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'gradleak.attacks' has no attribute {name!r}")


__all__ = sorted(_WHERE)
