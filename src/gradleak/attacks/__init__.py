"""Attacks an honest-but-curious server can run on one client's update."""

from gradleak.attacks.engine import GradientInversion
from gradleak.attacks.labels import idlg_label, label_counts, label_set, recover_labels
from gradleak.attacks.settings import PRESET_SOURCES, PRESETS, AttackSettings, preset
from gradleak.attacks.view import Reconstruction, ServerView, UpdateMismatch

__all__ = [
    "PRESETS",
    "PRESET_SOURCES",
    "AttackSettings",
    "GradientInversion",
    "Reconstruction",
    "ServerView",
    "UpdateMismatch",
    "idlg_label",
    "label_counts",
    "label_set",
    "preset",
    "recover_labels",
]
