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
  labels    per-class label counts at batch 1,024 of scikit-learn's digits (8 x 8; 10 classes),
            an mlp with hidden [64] and one with hidden [2048] (a 2,048-wide embedding, as
            ResNet-50's), untrained and trained for 3 epochs, 20 batches each drawn with repeats
            (even seeds uniform, odd seeds with Dirichlet(0.5) class shares), one gradient each:
            share of batches whose counts are exact by iLRG (ilrg_counts; declined counts as not
            exact), by recover_labels (iLRG, else the mean-softmax fallback), and by the two
            estimators from the bias gradient with the model's mean softmax on the public test
            split (label_counts) and with its per-class means (counts_from_class_probs); iLRG's
            declines, wrong-but-accepted answers (must be 0), worst count error, seconds; and
            iLRG's share of exact batches at batch 4 to 256 on the same models (its reach)
Results go to benchmarks/results/exact_CASE.json and stdout.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from cases import run_cases
from gradleak.attacks.base import ServerView
from gradleak.attacks.exact.labels import counts_from_class_probs, ilrg_counts, label_counts
from gradleak.attacks.registry import attack_factory
from gradleak.data.partition import ClientData
from gradleak.fl import Classification, LocalTraining, train_client
from gradleak.images import ImageSpec
from gradleak.images.sources import DigitsSource, TilesSource
from gradleak.metrics import score
from gradleak.models import build_model

SEEDS = 3
BATCHES = 20


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


def _batch(targets: torch.Tensor, seed: int, size: int = 1024) -> torch.Tensor:
    """Indices of a batch drawn with repeats: uniformly over the split for even seeds, with
    class shares from a Dirichlet(0.5) draw (skewed counts) for odd ones."""
    g = torch.Generator().manual_seed(seed)
    if seed % 2 == 0:
        return torch.randint(0, len(targets), (size,), generator=g)
    shares = torch.distributions.Dirichlet(torch.full((10,), 0.5)).sample()
    classes = torch.multinomial(shares, size, replacement=True, generator=g)
    pools = [torch.nonzero(targets == c).flatten() for c in range(10)]
    return torch.stack(
        [pools[c][torch.randint(0, len(pools[c]), (1,), generator=g)][0] for c in classes.tolist()]
    )


def _labels() -> dict:
    data = DigitsSource(image_size=8).load(seed=0)
    x_all, y_all = data.spec.model_inputs(data.train.examples), data.train.targets
    out = {}
    for hidden in (64, 2048):
        for trained in (False, True):
            torch.manual_seed(0)
            net = build_model("mlp", spec=data.spec, num_classes=10, kwargs={"hidden": [hidden]})
            if trained:
                opt = torch.optim.SGD(net.parameters(), lr=0.1)
                for _ in range(3):
                    for i in range(0, len(y_all), 32):
                        opt.zero_grad()
                        F.cross_entropy(net(x_all[i : i + 32]), y_all[i : i + 32]).backward()
                        opt.step()
            with torch.no_grad():
                probs = F.softmax(net(data.spec.model_inputs(data.test.examples)), -1)
                accuracy = float(
                    (
                        net(data.spec.model_inputs(data.test.examples)).argmax(-1)
                        == data.test.targets
                    )
                    .float()
                    .mean()
                )
            mean = probs.mean(0)
            per_class = torch.stack([probs[data.test.targets == c].mean(0) for c in range(10)])
            head = net.net[-1]
            hits = {"ilrg": 0, "recover_labels": 0, "label_counts": 0, "counts_from_class_probs": 0}
            declined = wrong_accepted = 0
            errors, seconds = [], []
            torch.manual_seed(0)
            for seed in range(BATCHES):
                idx = _batch(y_all, seed)
                x, y = x_all[idx], y_all[idx]
                net.zero_grad()
                F.cross_entropy(net(x), y).backward()
                gw, gb = head.weight.grad.detach(), head.bias.grad.detach()
                truth = sorted(y.tolist())
                counts = torch.bincount(y, minlength=10).tolist()
                start = time.perf_counter()
                r = ilrg_counts(gw, gb, head.weight.detach(), head.bias.detach(), 1024)
                seconds.append(time.perf_counter() - start)
                errors.append(float((r.estimate - torch.tensor(counts)).abs().max()))
                est = label_counts(gb, mean, 1024)
                hits["ilrg"] += r.counts == counts
                declined += r.counts is None
                wrong_accepted += r.counts is not None and r.counts != counts
                hits["recover_labels"] += (
                    (r.counts == counts) if r.counts is not None else (est == truth)
                )
                hits["label_counts"] += est == truth
                hits["counts_from_class_probs"] += (
                    counts_from_class_probs(gb, 1024, per_class) == truth
                )
            reach = {}
            for size in (4, 8, 16, 32, 64, 128, 256):
                exact = 0
                for seed in range(BATCHES):
                    idx = _batch(y_all, seed, size)
                    net.zero_grad()
                    F.cross_entropy(net(x_all[idx]), y_all[idx]).backward()
                    r = ilrg_counts(
                        head.weight.grad,
                        head.bias.grad,
                        head.weight.detach(),
                        head.bias.detach(),
                        size,
                    )
                    truth = torch.bincount(y_all[idx], minlength=10).tolist()
                    exact += r.counts == truth
                    wrong_accepted += r.counts is not None and r.counts != truth
                reach[size] = exact / BATCHES
            out[f"mlp [{hidden}] {'trained' if trained else 'untrained'}"] = {
                "ilrg_exact_share_by_batch": reach,
                "test_accuracy": accuracy,
                "exact_share": {k: v / BATCHES for k, v in hits.items()},
                "ilrg_declined": declined,
                "ilrg_wrong_but_accepted": wrong_accepted,  # at every batch size
                "ilrg_max_count_error": {
                    "median": float(np.median(errors)),
                    "max": float(np.max(errors)),
                },
                "ilrg_seconds_per_batch": float(np.mean(seconds)),
            }
            print(out, flush=True)
    return out


if __name__ == "__main__":
    run_cases({"spear": _spear, "cpa": _cpa, "labels": _labels}, "exact", __doc__)
