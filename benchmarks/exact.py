"""The exact and large-batch attacks on images, through gradleak's own data, models, training and
attacks; JSON output.

    .venv/bin/python benchmarks/exact.py CASE [CASE ...]     (or: all)

Cases:
  spear     a 3,072 -> 1,000 linear + ReLU layer and a classifier (gradleak's mlp, hidden [1000]),
            one FedSGD step (lr 0.1) on a batch of 32 x 32 colour tiles of the bundled photographs
            (halved, tiles varying by at least 0.02); pixels normalised with the data's channel
            statistics ("normalised") or left in [0, 1] ("raw"); batch 4 to 24, 3 batches each:
            share of images exact (PSNR > 50 dB after matching), batches certified, declared
            failures, wrong-but-certified (must be 0), seconds per batch
  cpa       the Cocktail Party Attack on a 3,072 -> 256 layer (mlp, hidden [256]), batch 64 of the
            same tiles, 3 batches: mean matched SSIM, seconds
  labels    per-class label counts of scikit-learn's digits (8 x 8; 10 classes) through an mlp with
            a 2,048-wide ReLU layer before the classifier (64 -> 2,048 -> 10), untrained and
            trained for 3 epochs, one gradient per batch. Batch 1,024: 50 batches drawn with
            repeats (even seeds uniform, odd seeds with Dirichlet(0.5) class shares): share of
            batches whose counts are exact by the certified per-image labels (instance_labels;
            a decline counts as not exact), by iLRG (ilrg_counts), by recover_labels (the
            chain: per-image labels, iLRG, else the mean-softmax estimate) and by the two
            estimators from the bias gradient with the model's mean softmax on the public test
            split (label_counts) and with its per-class means (counts_from_class_probs); the
            methods' declines and reasons, wrong-but-accepted answers (must be 0), seconds per
            batch, iLRG's worst count error. Reach: batch 4 to 64 of distinct images, 10 batches
            each (the same two draws): share exact by the per-image labels and by iLRG,
            wrong-but-accepted, seconds, decline reasons
Results go to benchmarks/results/exact_CASE.json and stdout.
"""

from __future__ import annotations

import re
import time

import numpy as np
import torch
import torch.nn.functional as F

from cases import run_cases
from gradleak.attacks.base import ServerView
from gradleak.attacks.exact.labels import (
    counts_from_class_probs,
    ilrg_counts,
    instance_labels,
    label_counts,
)
from gradleak.attacks.registry import attack_factory
from gradleak.data.partition import ClientData
from gradleak.fl import Classification, LocalTraining, train_client
from gradleak.images import ImageSpec
from gradleak.images.sources import DigitsSource, TilesSource
from gradleak.metrics import score
from gradleak.models import build_model

SEEDS = 3


def _tiles():
    return TilesSource(image_size=32, scale=0.5, min_std=0.02, max_per_photo=None).load(seed=0)


def _attack(name: str, data, spec, batch: int, hidden: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.train), generator=g)[:batch]
    client = ClientData(1, data.train.subset(idx), batch)
    torch.manual_seed(seed)
    net = build_model("mlp", spec=spec, num_classes=data.num_classes, kwargs={"hidden": [hidden]})
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    update, _ = train_client(
        net,
        state,
        client,
        round=1,
        settings=LocalTraining(lr=0.1),
        spec=spec,
        task=Classification(),
        seed=seed,
    )
    view = ServerView.of(net, state, update, spec=spec, num_classes=data.num_classes)
    start = time.perf_counter()
    rec = attack_factory(name)().run(view, seed=seed)
    row = {
        "batch": batch,
        "seed": seed,
        "seconds": time.perf_counter() - start,
        "reason": rec.reason,
    }
    if rec.examples is None:
        return {**row, "failed": True, "exact": 0.0, "certified": False}
    s = score(rec.examples, client.data.examples, spec, rec.labels, client.data.targets)
    exact = float((s.psnr > 50).float().mean())
    return {
        **row,
        "failed": False,
        "exact": exact,
        "certified": rec.confidence == 1.0,
        "min_psnr": float(s.psnr.min()),
        "ssim": float(s.ssim.mean()),
        "label_accuracy": s.label_accuracy,
    }


def _spear() -> dict:
    data = _tiles()
    raw = ImageSpec(data.spec.shape, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    rows = []
    for pixels, spec in (("normalised", data.spec), ("raw", raw)):
        for batch in (4, 8, 12, 16, 20, 24):
            for seed in range(SEEDS):
                row = {
                    "pixels": pixels,
                    **_attack("spear", data, spec, batch, 1000, 1000 * batch + seed),
                }
                rows.append(row)
                print(row, flush=True)
    wrong = [r for r in rows if r["certified"] and r["exact"] < 1.0]
    summary = {}
    for pixels in ("normalised", "raw"):
        for batch in (4, 8, 12, 16, 20, 24):
            mine = [r for r in rows if r["pixels"] == pixels and r["batch"] == batch]
            summary[f"{pixels} B={batch}"] = {
                "exact_images": float(np.mean([r["exact"] for r in mine])),
                "certified": sum(r["certified"] for r in mine),
                "failed": sum(r["failed"] for r in mine),
                "worst_seconds": max(r["seconds"] for r in mine),
            }
    return {"summary": summary, "wrong_but_certified": len(wrong), "runs": rows}


def _cpa() -> dict:
    data = _tiles()
    rows = [_attack("cpa", data, data.spec, 64, 256, seed) for seed in range(SEEDS)]
    return {
        "mean_ssim": float(np.mean([r["ssim"] for r in rows])),
        "worst_seconds": max(r["seconds"] for r in rows),
        "runs": rows,
    }


def _batch(
    targets: torch.Tensor, seed: int, size: int = 1024, distinct: bool = False
) -> torch.Tensor:
    """Indices of a batch: uniformly over the split for even seeds, with class shares from a
    Dirichlet(0.5) draw (skewed counts) for odd ones; with repeated images, or ``distinct``
    images (as a client's batch holds)."""
    g = torch.Generator().manual_seed(seed)
    if seed % 2 == 0:
        if distinct:
            return torch.randperm(len(targets), generator=g)[:size]
        return torch.randint(0, len(targets), (size,), generator=g)
    torch.manual_seed(seed)  # the Dirichlet draw takes no generator
    shares = torch.distributions.Dirichlet(torch.full((10,), 0.5)).sample()
    classes = torch.multinomial(shares, size, replacement=True, generator=g)
    pools = [torch.nonzero(targets == c).flatten() for c in range(10)]
    if distinct:
        counts = torch.bincount(classes, minlength=10).tolist()
        return torch.cat(
            [pools[c][torch.randperm(len(pools[c]), generator=g)[:k]] for c, k in enumerate(counts)]
        )
    return torch.stack(
        [pools[c][torch.randint(0, len(pools[c]), (1,), generator=g)][0] for c in classes.tolist()]
    )


LABEL_BATCHES = 50
REACH_BATCHES = 10
REACH_SIZES = (4, 8, 16, 32, 48, 56, 64)


def _gradients(net, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The hidden layer's and the classifier's weights, biases and float32 gradients, in
    instance_labels' order."""
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    hidden, head = net.net[1], net.net[3]
    return [
        hidden.weight.detach(),
        hidden.bias.detach(),
        hidden.weight.grad.detach().clone(),
        hidden.bias.grad.detach().clone(),
        head.weight.detach(),
        head.bias.detach(),
        head.weight.grad.detach().clone(),
        head.bias.grad.detach().clone(),
    ]


def _reasons(rows: list[str]) -> dict[str, int]:
    """How often each kind of decline occurred (the reason with its figures masked as #)."""
    out: dict[str, int] = {}
    for r in rows:
        key = re.sub(r"[0-9][0-9.e+-]*", "#", r.split(":")[0])
        out[key] = out.get(key, 0) + 1
    return out


def _labels() -> dict:
    data = DigitsSource(image_size=8).load(seed=0)
    x_all, y_all = data.spec.model_inputs(data.train.examples), data.train.targets
    x_test = data.spec.model_inputs(data.test.examples)
    out = {}
    for trained in (False, True):
        torch.manual_seed(0)
        net = build_model("mlp", spec=data.spec, num_classes=10, kwargs={"hidden": [2048]})
        if trained:
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            for _ in range(3):
                for i in range(0, len(y_all), 32):
                    opt.zero_grad()
                    F.cross_entropy(net(x_all[i : i + 32]), y_all[i : i + 32]).backward()
                    opt.step()
        with torch.no_grad():
            logits = net(x_test)
        probs = F.softmax(logits, -1)
        accuracy = float((logits.argmax(-1) == data.test.targets).float().mean())
        mean = probs.mean(0)
        per_class = torch.stack([probs[data.test.targets == c].mean(0) for c in range(10)])
        methods = ("instances", "ilrg", "recover_labels", "label_counts", "counts_from_class_probs")
        hits = dict.fromkeys(methods, 0)
        wrong = {"instances": 0, "ilrg": 0}
        declined = {"instances": [], "ilrg": []}
        seconds, errors = [], []
        for seed in range(LABEL_BATCHES):
            idx = _batch(y_all, seed)
            grads = _gradients(net, x_all[idx], y_all[idx])
            truth = sorted(y_all[idx].tolist())
            counts = torch.bincount(y_all[idx], minlength=10).tolist()
            start = time.perf_counter()
            each = instance_labels(*grads, 1024)
            r = ilrg_counts(grads[6], grads[7], grads[4], grads[5], 1024)
            est = label_counts(grads[7], mean, 1024)
            seconds.append(time.perf_counter() - start)
            from_ilrg = [c for c, m in enumerate(r.counts) for _ in range(m)] if r.counts else None
            chain = each.labels or from_ilrg or est
            hits["instances"] += each.labels == truth
            hits["ilrg"] += r.counts == counts
            hits["recover_labels"] += chain == truth
            hits["label_counts"] += est == truth
            hits["counts_from_class_probs"] += (
                counts_from_class_probs(grads[7], 1024, per_class) == truth
            )
            wrong["instances"] += each.labels is not None and each.labels != truth
            wrong["ilrg"] += r.counts is not None and r.counts != counts
            errors.append(float((r.estimate - torch.tensor(counts)).abs().max()))
            if each.labels is None:
                declined["instances"].append(each.reason)
            if r.counts is None:
                declined["ilrg"].append(r.reason)
        reach = {}
        for size in REACH_SIZES:
            row = {"instances": 0, "ilrg": 0, "wrong_instances": 0, "wrong_ilrg": 0}
            times, reasons = [], []
            for seed in range(REACH_BATCHES):
                idx = _batch(y_all, seed, size, distinct=True)
                grads = _gradients(net, x_all[idx], y_all[idx])
                truth = sorted(y_all[idx].tolist())
                counts = torch.bincount(y_all[idx], minlength=10).tolist()
                each = instance_labels(*grads, size)
                times.append(each.seconds)
                r = ilrg_counts(grads[6], grads[7], grads[4], grads[5], size)
                row["instances"] += each.labels == truth
                row["ilrg"] += r.counts == counts
                row["wrong_instances"] += each.labels is not None and each.labels != truth
                row["wrong_ilrg"] += r.counts is not None and r.counts != counts
                if each.labels is None:
                    reasons.append(each.reason)
            reach[size] = {
                "instances_exact_share": row["instances"] / REACH_BATCHES,
                "ilrg_exact_share": row["ilrg"] / REACH_BATCHES,
                "wrong_but_accepted": {
                    "instances": row["wrong_instances"],
                    "ilrg": row["wrong_ilrg"],
                },
                "instances_seconds": {"mean": float(np.mean(times)), "max": float(np.max(times))},
                "instances_declined": _reasons(reasons),
            }
            print(size, reach[size], flush=True)
        key = f"mlp 64 -> 2048 -> 10, {'trained' if trained else 'untrained'}"
        out[key] = {
            "test_accuracy": accuracy,
            "batch_1024": {
                "batches": LABEL_BATCHES,
                "exact_share": {k: v / LABEL_BATCHES for k, v in hits.items()},
                "wrong_but_accepted": wrong,
                "declined": {k: _reasons(v) for k, v in declined.items()},
                "ilrg_max_count_error": {
                    "median": float(np.median(errors)),
                    "max": float(np.max(errors)),
                },
                "seconds_per_batch": {
                    "mean": float(np.mean(seconds)),
                    "max": float(np.max(seconds)),
                },
            },
            "reach_by_batch": reach,
        }
        print(key, out[key]["batch_1024"], flush=True)
    return out


if __name__ == "__main__":
    run_cases({"spear": _spear, "cpa": _cpa, "labels": _labels}, "exact", __doc__)
