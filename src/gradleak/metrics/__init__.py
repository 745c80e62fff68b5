"""Leakage metrics of any modality: pairing reconstructions with originals, and scoring the pairs
with the metrics of the examples' input spec (each modality's own metrics live in its package)."""

from gradleak.metrics.matching import ReconstructionScore, assign, label_accuracy, score

__all__ = ["ReconstructionScore", "assign", "label_accuracy", "score"]
