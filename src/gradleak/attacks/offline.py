"""Attacking a saved update: what ``gradleak attack`` does with a user's own files.

Everything written (reconstructions are private data) goes into the output directory only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradleak.attacks.engine import GradientInversion, Progress
from gradleak.attacks.files import load_metadata, load_tensors
from gradleak.attacks.settings import AttackSettings
from gradleak.attacks.view import ServerView
from gradleak.errors import DataError
from gradleak.metrics import score
from gradleak.models import build_model
from gradleak.report.images import grid_png
from gradleak.rundir import OwnedDir
from gradleak.safeio import npz_bytes


def load_truth(path: Path, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """True images (N x C x H x W in [0, 1]) and optional labels from an npz file."""
    t = load_tensors(path)
    if "images" not in t:
        raise DataError(f"{path} has no 'images' array")
    images = t["images"].float()
    if tuple(images.shape) != shape:
        raise DataError(f"{path}: images have shape {tuple(images.shape)}, the update is of {shape}")
    return images, t["labels"].long() if "labels" in t else None


def load_prior(path: Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """A starting image (1 x C x H x W in [0, 1]) from an npz 'images' array or an image file."""
    if path.suffix.lower() == ".npz":
        images = load_tensors(path).get("images")
        if images is None or tuple(images.shape[1:]) != shape:
            raise DataError(f"{path}: expected 'images' of shape N x {shape[0]} x {shape[1]} x {shape[2]}")
        return images.float()
    from gradleak.data.formats import read_image

    return torch.from_numpy(read_image(path, shape[1], shape[0]))[None]


@dataclass(frozen=True)
class SavedUpdate:
    """A saved update, read and checked: what the server sees, the output directory (claimed),
    and the optional true images and starting image."""

    view: ServerView
    owner: OwnedDir
    truth: tuple[torch.Tensor, torch.Tensor | None] | None
    prior: torch.Tensor | None


def load_saved_update(
    *,
    model: str,
    global_path: Path,
    update_path: Path,
    meta_path: Path,
    out: Path,
    truth_path: Path | None = None,
    prior_path: Path | None = None,
) -> SavedUpdate:
    """Read and check every input (a bad one is one clear error, before any work), and make
    ``out`` gradleak's (``rundir.OwnedDir`` of kind ``attack``)."""
    owner = OwnedDir(out, "attack")
    owner.check_claimable()
    meta = load_metadata(meta_path)
    c, h, w = meta.image_shape
    net = build_model(model, channels=c, image_size=h, num_classes=meta.num_classes)
    view = ServerView(
        model=net,
        global_state=load_tensors(global_path),
        update=load_tensors(update_path),
        meta=meta.update_meta(),
        image_shape=meta.image_shape,
        num_classes=meta.num_classes,
        mean=tuple(meta.mean),
        std=tuple(meta.std),
        known_labels=torch.tensor(meta.labels) if meta.labels is not None else None,
    )
    truth = load_truth(truth_path, (meta.num_images, c, h, w)) if truth_path else None
    prior = load_prior(prior_path, (c, h, w)) if prior_path else None
    return SavedUpdate(view, owner.claim(), truth, prior)


def attack_saved_update(
    saved: SavedUpdate,
    settings: AttackSettings,
    *,
    seed: int = 0,
    device: str = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the attack on a saved update and write ``OUT/reconstruction.npz``,
    ``OUT/reconstruction.png``, ``OUT/attack.json`` and, with the true images, ``OUT/metrics.json``.
    Returns the summary."""
    view, owner, truth, prior = saved.view, saved.owner, saved.truth, saved.prior
    rec = GradientInversion(settings).run(view, seed=seed, prior=prior, progress=progress, device=device)

    owner.write_bytes("reconstruction.npz", npz_bytes(images=rec.images.numpy().astype(np.float32),
                      labels=rec.labels.numpy(), prior=rec.prior.numpy().astype(np.float32)))  # fmt: skip
    summary: dict[str, Any] = {
        "labels": rec.labels.tolist(),
        "label_strategy": rec.label_strategy,
        "restart_scores": rec.restart_scores,
        "final_loss": rec.trace[-1] if rec.trace else None,
        "iterations": rec.iterations,
        "seconds": rec.seconds,
        "settings": settings.model_dump(),
    }
    rows = [("reconstruction", rec.images), ("start", rec.prior)]
    if truth is not None:
        images, labels = truth
        s = score(rec.images, images, rec.labels, labels)
        summary["metrics"] = {**s.summary(), "per_image": {
            "psnr": s.psnr.tolist(), "ssim": s.ssim.tolist(), "mse": s.mse.tolist(),
            "assignment": s.assignment.tolist()}}  # fmt: skip
        owner.write_text("metrics.json", json.dumps(summary["metrics"], indent=2))
        rows = [("original", images), ("reconstruction", rec.images[torch.as_tensor(s.assignment)]),
                ("start", rec.prior[torch.as_tensor(s.assignment)])]  # fmt: skip
    owner.write_bytes("reconstruction.png", grid_png(rows))
    owner.write_text("attack.json", json.dumps(summary, indent=2))
    return summary
