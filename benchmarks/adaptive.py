"""Stock attacks against their adaptive counterparts (which know the defence) at the same defence
strength, on the same defended updates; JSON output.

    .venv/bin/python benchmarks/adaptive.py CASE [CASE ...]     (or: all)

Cases:
  families  one defence per family on one-image updates of scikit-learn's digits (16 x 16, one SGD
            step, lr 0.1; images 0-4 of the training split, each its own client): prune (sparsity
            0.9 and 0.99), int8 quantisation, fixed Gaussian noise, adaptive Gaussian noise,
            group-gaussian with the classifier drowned (sigma0 0.5, weights x0.1, classifier x10),
            dp-gaussian (clip at half the update's norm, noise multiplier 0.01) on a LeNet,
            and bn-stats-local on a batch-norm convnet; each update is audited as
            ``LeakageAudit`` does it (300 iterations, the test split's mean image as the prior,
            SSIM-based RDLV): the stock attack's and its adaptive counterpart's RDLV per image,
            their medians, and on how many images the adaptive one leaks more
Results go to benchmarks/results/adaptive_CASE.json and stdout.
"""

from __future__ import annotations

import numpy as np
import torch

from cases import run_cases
from gradleak.audit.config import AuditConfig
from gradleak.audit.filter import LeakageAudit
from gradleak.data.partition import ClientData
from gradleak.defenses import (
    AdaptiveGaussian,
    BatchNormStatsLocal,
    DPGaussian,
    GaussianNoise,
    GroupGaussian,
    Prune,
    Quantize,
)
from gradleak.fl import Classification, LocalTraining, train_client
from gradleak.fl.filters import FilterContext, apply_filters
from gradleak.images.sources import DigitsSource
from gradleak.models import build_model

IMAGES = 5
ITERATIONS = 300


def _family(name: str, model: str, preset: str, defense, kwargs=None) -> dict:
    """Stock and adaptive RDLV of ``preset`` on IMAGES one-image updates behind ``defense``
    (a function of the raw update, for defences whose strength depends on it)."""
    data = DigitsSource(image_size=16).load(seed=0)
    spec, prior = data.spec, data.spec.prior("mean-image", data.test)
    config = AuditConfig(
        preset=preset, attack={"iterations": ITERATIONS}, save_images=False, clients="all"
    )
    rows = []
    for i in range(IMAGES):
        client = ClientData(1, data.train.subset(torch.tensor([i])), 1)
        torch.manual_seed(i)
        net = build_model(model, spec=spec, num_classes=data.num_classes, kwargs=kwargs or {})
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        update, _ = train_client(
            net,
            state,
            client,
            round=1,
            settings=LocalTraining(lr=0.1),
            spec=spec,
            task=Classification(),
            seed=i,
        )
        audit = LeakageAudit(
            config,
            model=net,
            spec=spec,
            num_classes=data.num_classes,
            prior=prior,
            out_dir=None,
            defenses=name,
        )
        ctx = FilterContext(round=1, client=client, global_state=state, seed=i)
        filters = [defense(update).build(index=0, sample_rate=1.0), audit]
        rows.append(apply_filters(filters, update, ctx).record["rdlv_by_attack"])
    stock = [r[preset] for r in rows]
    adaptive = [r[f"{preset}-adaptive"] for r in rows]
    return {
        "defense": name,
        "model": model,
        "attack": preset,
        "rdlv_stock": stock,
        "rdlv_adaptive": adaptive,
        "median_rdlv_stock": float(np.median(stock)),
        "median_rdlv_adaptive": float(np.median(adaptive)),
        "adaptive_worse_for_the_client": int(sum(a > s for a, s in zip(adaptive, stock))),
    }


def families() -> dict:
    def half_norm_clip(update):
        return DPGaussian(clip=update.l2_norm() / 2, noise_multiplier=0.01)

    cases = [
        ("prune 0.9", "lenet", "inverting-gradients", lambda u: Prune(sparsity=0.9)),
        ("prune 0.99", "lenet", "inverting-gradients", lambda u: Prune(sparsity=0.99)),
        ("quantize int8", "lenet", "idlg", lambda u: Quantize(format="int8")),
        ("gaussian 1e-3", "lenet", "inverting-gradients", lambda u: GaussianNoise(sigma=1e-3)),
        (
            "adaptive-gaussian 0.5",
            "lenet",
            "inverting-gradients",
            lambda u: AdaptiveGaussian(sigma0=0.5),
        ),
        (
            "group-gaussian 0.5, weights x0.1, classifier x10",
            "lenet",
            "inverting-gradients",
            lambda u: GroupGaussian(sigma0=0.5, groups={"weights": 0.1, "classifier": 10}),
        ),
        ("dp-gaussian z 0.01", "lenet", "inverting-gradients", half_norm_clip),
        ("bn-stats-local", "convnet", "bn-statistics", lambda u: BatchNormStatsLocal()),
    ]
    return {
        "images": IMAGES,
        "iterations": ITERATIONS,
        "families": [
            _family(*c, kwargs={"width": 8} if c[1] == "convnet" else None) for c in cases
        ],
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_cases({"families": families}, "adaptive", __doc__)
