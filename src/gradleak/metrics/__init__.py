"""Leakage metrics: image similarity, matching of reconstructions to originals."""

from gradleak.metrics.image import METRICS, mse, psnr, ssim
from gradleak.metrics.matching import ReconstructionScore, assign, distances, label_accuracy, score

__all__ = ["METRICS", "ReconstructionScore", "assign", "distances", "label_accuracy", "mse", "psnr", "score", "ssim"]
