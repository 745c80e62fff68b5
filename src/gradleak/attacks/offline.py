"""Attacking a saved update: what ``gradleak attack`` does with a user's own files.

Everything written (reconstructions are private data) goes into the output directory only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradleak.attacks.base import Attack, Progress, ServerView
from gradleak.attacks.files import UpdateMetadata, load_metadata, load_tensors
from gradleak.errors import ConfigError
from gradleak.metrics import score
from gradleak.rundir import OwnedDir


@dataclass(frozen=True)
class SavedUpdate:
    """A saved update, read and checked: what the server sees, the output directory (claimed),
    and the optional true images and starting image."""

    view: ServerView
    meta: UpdateMetadata
    owner: OwnedDir
    truth: tuple[torch.Tensor, torch.Tensor | None] | None
    prior: torch.Tensor | None


def load_saved_update(
    *,
    model: str,
    global_path: Path | None,
    update_path: Path,
    meta_path: Path,
    out: Path,
    truth_path: Path | None = None,
    prior_path: Path | None = None,
) -> SavedUpdate:
    """Read and check every input (a bad one is one clear error, before any work), and make
    ``out`` gradleak's (``rundir.OwnedDir`` of kind ``attack``). Without ``global_path`` the
    global model is the model as built (a local model directory's weights)."""
    owner = OwnedDir(out, "attack")
    owner.check_claimable()
    meta = load_metadata(meta_path)
    net = meta.build_model(model)
    view = ServerView(
        model=net,
        global_state=load_tensors(global_path) if global_path else _own_weights(net),
        update=load_tensors(update_path),
        meta=meta.update_meta(),
        spec=meta.spec(),
        num_classes=meta.num_classes,
        known_labels=meta.known_labels(),
    )
    truth = meta.load_truth(truth_path) if truth_path else None
    prior = meta.load_prior(prior_path) if prior_path else None
    return SavedUpdate(view, meta, owner.claim(), truth, prior)


def _own_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights the model was built with (a model directory's own): the global model when no
    ``--global`` file is given."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def attack_saved_update(
    saved: SavedUpdate,
    attack: Attack,
    *,
    seed: int = 0,
    device: str = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the attack on a saved update and write ``OUT/attack.json`` (what it found and how),
    the reconstruction in the modality's own format (``UpdateMetadata.write_result``: images as
    ``reconstruction.npz`` and ``.png``) and, with the true examples, ``OUT/metrics.json``. Returns
    the summary."""
    view, owner, truth, prior = saved.view, saved.owner, saved.truth, saved.prior
    reason = attack.applies(view)
    if reason is not None:
        raise ConfigError("--preset", f"{attack.name} does not apply to this update: {reason}")
    rec = attack.run(view, seed=seed, prior=prior, progress=progress, device=device)
    summary: dict[str, Any] = {
        "attack": attack.name,
        "feasible": rec.feasible,
        "reason": rec.reason,
        "confidence": rec.confidence,
        "labels": None if rec.labels is None else rec.labels.tolist(),
        "label_strategy": rec.label_strategy,
        "restart_scores": rec.restart_scores,
        "final_loss": rec.trace[-1] if rec.trace else None,
        "iterations": rec.iterations,
        "seconds": rec.seconds,
        "settings": attack.settings.model_dump() if hasattr(attack, "settings") else {},
    }
    found = None
    if truth is not None and rec.feasible and rec.examples is not None:
        examples, labels = truth
        found = score(rec.examples, examples, view.spec, rec.labels, labels)
        summary["metrics"] = {
            **found.summary(),
            "per_example": {
                **{k: v.tolist() for k, v in found.values.items()},
                "assignment": found.assignment.tolist(),
            },
        }
        owner.write_text("metrics.json", json.dumps(summary["metrics"], indent=2))
    saved.meta.write_result(owner, rec, truth[0] if truth else None, found)
    owner.write_text("attack.json", json.dumps(summary, indent=2))
    return summary
