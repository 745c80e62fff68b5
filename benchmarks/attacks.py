"""Quality and speed of the attack presets, each on a fixed case; JSON per case.

    .venv/bin/python benchmarks/attacks.py CASE [CASE ...]     (or: all)

Cases (natural-photo tiles are scikit-image's photographs cut to 32 x 32, one per photograph):
  dlg                  DLG, DLG LeNet (U(-0.5, 0.5) init) on unnormalised pixels as in the DLG code,
                       one 32 x 32 tile, 300 L-BFGS steps, 10 seeds
  idlg-labels          the iDLG label rule on 200 one-image updates (random tile, label and init)
  inverting-gradients  Inverting Gradients (cosine, TV 1e-2, signed Adam 0.1, step decay), known
                       label, untrained sigmoid LeNet, 8 tiles, at 4,800, 2,000 and 1,000 iterations
  restarts             time of 8 restarts against 1 (200 iterations, same image)
  fedavg               5 local SGD steps at lr 1e-4 unrolled, Inverting Gradients settings at 1,500
                       iterations, 4 tiles
  gradinversion        GradInversion on an untrained convnet (width 16), one-image update: full vs
                       batch-norm prior off vs matching term off, one tile per photograph (8)
  analytic             analytic recovery of one image through an MLP's first layer, 10 images
  throughput           iterations per second, FLOPs of one iteration, and the fraction of the
                       machine's measured matrix-multiply rate that this reaches
Results go to benchmarks/results/attack_CASE.json and stdout.
"""

from __future__ import annotations

import sys
import time
from statistics import mean

import torch
from cases import run_cases

from gradleak.attacks import GradientInversion, ServerView, preset
from gradleak.attacks.analytic import first_layer_images
from gradleak.attacks.labels import idlg_label
from gradleak.data.partition import ClientData
from gradleak.data.sources import TilesSource
from gradleak.fl import LocalTraining, train_client
from gradleak.metrics import psnr, score
from gradleak.models import build_model

TILES = TilesSource(image_size=32).load(seed=0)


def tile(i: int) -> ClientData:
    """The i-th benchmark image: the first test tile of photograph i mod 8, then the next ones."""
    per_class = [torch.nonzero(TILES.test.labels == c).flatten() for c in range(TILES.num_classes)]
    idx = per_class[i % TILES.num_classes][i // TILES.num_classes]
    return ClientData(1, TILES.test.subset([int(idx)]), 1)


def view_of(model_name: str, client: ClientData, *, seed: int, lr: float = 0.1, epochs: int = 1,
            known: bool = False, kwargs: dict | None = None, raw: bool = False) -> ServerView:  # fmt: skip
    """The server's view of one client's update. ``raw``: the model sees unnormalised pixels in
    [0, 1], as in the DLG code (no ``Normalize``); otherwise the tiles' own mean and std."""
    mean, std = ((0.0,) * 3, (1.0,) * 3) if raw else (TILES.mean, TILES.std)
    torch.manual_seed(seed)
    model = build_model(model_name, channels=3, image_size=32, num_classes=TILES.num_classes,
                        kwargs=kwargs or {})  # fmt: skip
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    update, _ = train_client(model, state, client, round=1, settings=LocalTraining(epochs=epochs, lr=lr),
                             mean=mean, std=std, seed=seed)  # fmt: skip
    return ServerView.of(model, state, update, image_shape=(3, 32, 32), num_classes=TILES.num_classes,
                         mean=mean, std=std,
                         known_labels=client.data.labels.clone() if known else None)  # fmt: skip


def quality(rec, client: ClientData) -> dict:
    s = score(rec.images, client.data.images, rec.labels, client.data.labels)
    return {**s.summary(), "seconds": rec.seconds, "label_strategy": rec.label_strategy}


def case_dlg() -> dict:
    runs = []
    for seed in range(10):
        client = tile(seed)
        view = view_of("lenet", client, seed=seed, kwargs={"init": "uniform"}, raw=True)
        rec = GradientInversion(preset("dlg")).run(view, seed=seed)
        runs.append({"seed": seed, **quality(rec, client)})
        print(runs[-1], file=sys.stderr)
    return {
        "target": "at least 9 of 10 seeds under MSE 1e-3, labels recovered",
        "seeds_under_mse_1e-3": sum(r["mse"] < 1e-3 for r in runs),
        "labels_recovered": sum(r["label_accuracy"] == 1.0 for r in runs),
        "mean_seconds": mean(r["seconds"] for r in runs),
        "runs": runs,
    }


def case_idlg_labels() -> dict:
    g = torch.Generator().manual_seed(0)
    hits = 0
    for seed in range(200):
        i = int(torch.randint(0, len(TILES.train), (1,), generator=g))
        client = ClientData(1, TILES.train.subset([i]), 1)
        view = view_of("lenet", client, seed=seed)
        w, _ = view.classifier()
        hits += idlg_label(view.pseudo_gradient()[w]) == int(client.data.labels[0])
    return {"target": "200 of 200", "correct": hits, "total": 200}


def _ig(iterations: int, images: int = 8, **overrides) -> dict:
    runs = []
    for i in range(images):
        client = tile(i)
        view = view_of("lenet", client, seed=i, known=True)
        rec = GradientInversion(preset("inverting-gradients", iterations=iterations, labels="known",
                                       **overrides)).run(view, seed=i)  # fmt: skip
        runs.append({"image": i, **quality(rec, client)})
        print(iterations, runs[-1], file=sys.stderr)
    return {
        "iterations": iterations,
        "mean_psnr": mean(r["psnr"] for r in runs),
        "min_psnr": min(r["psnr"] for r in runs),
        "max_psnr": max(r["psnr"] for r in runs),
        "mean_ssim": mean(r["ssim"] for r in runs),
        "seconds_per_image": mean(r["seconds"] for r in runs),
        "runs": runs,
    }


def case_inverting_gradients() -> dict:
    return {
        "reference": "original code: 21.6 to 27.0 dB, mean 24.0 dB, 16 to 20 s per image",
        "target": "at least the same PSNR in at most half the time per image",
        "full": _ig(4800),
        "short": _ig(2000),
        "shortest": _ig(1000),
    }


def case_restarts() -> dict:
    client = tile(0)
    view = view_of("lenet", client, seed=0, known=True)
    times = {}
    for r in (1, 8):
        rec = GradientInversion(preset("inverting-gradients", iterations=200, restarts=r,
                                       labels="known")).run(view, seed=0)  # fmt: skip
        times[r] = rec.seconds
    return {"target": "8 restarts in at most 3 x the time of one", "seconds_1": times[1],
            "seconds_8": times[8], "ratio": times[8] / times[1]}  # fmt: skip


def case_fedavg() -> dict:
    runs = []
    for i in range(4):
        client = tile(i)
        view = view_of("lenet", client, seed=i, lr=1e-4, epochs=5)
        rec = GradientInversion(preset("inverting-gradients", iterations=1500)).run(view, seed=i)
        runs.append({"image": i, "steps": view.meta.steps, **quality(rec, client)})
        print(runs[-1], file=sys.stderr)
    return {"reference": "about 27 dB in 81 s", "target": "same quality in half the time",
            "mean_psnr": mean(r["psnr"] for r in runs),
            "seconds_per_image": mean(r["seconds"] for r in runs), "runs": runs}  # fmt: skip


def case_gradinversion() -> dict:
    variants = {"full": {}, "bn_prior_off": {"bn": 0.0}, "matching_off": {"match_weight": 0.0}}
    out: dict = {"target": "the full attack beats both ablations (mean PSNR and SSIM)",
                 "model": "convnet width 16, untrained", "tiles": "one per photograph (8)"}  # fmt: skip
    for name, kw in variants.items():
        runs = []
        for i in range(TILES.num_classes):
            client = tile(i)
            view = view_of("convnet", client, seed=i, kwargs={"width": 16})
            rec = GradientInversion(preset("gradinversion", **kw)).run(view, seed=i)
            runs.append({"image": i, **quality(rec, client),
                         "start_psnr": float(psnr(rec.prior, client.data.images))})  # fmt: skip
            print(name, runs[-1], file=sys.stderr)
        out[name] = {"mean_psnr": mean(r["psnr"] for r in runs),
                     "mean_ssim": mean(r["ssim"] for r in runs), "runs": runs}  # fmt: skip
    out["full_beats_both"] = all(
        out["full"][m] > out[v][m] for v in ("bn_prior_off", "matching_off") for m in ("mean_psnr", "mean_ssim")
    )
    out["full_wins_per_image"] = {
        f"{v}_{m}": sum(f[m] > r[m] for f, r in zip(out["full"]["runs"], out[v]["runs"], strict=True))
        for v in ("bn_prior_off", "matching_off") for m in ("psnr", "ssim")
    }
    return out


def case_analytic() -> dict:
    errors = []
    for i in range(10):
        client = tile(i)
        view = view_of("mlp", client, seed=i)
        errors.append(float((first_layer_images(view) - client.data.images).abs().max()))
    return {"target": "exact to 1e-5", "max_abs_error": max(errors), "errors": errors}


def _matmul_gflops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    t, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    return 2 * 1024**3 * n / (time.perf_counter() - t) / 1e9


def case_throughput() -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    client = tile(0)
    view = view_of("lenet", client, seed=0, known=True)
    attack = GradientInversion(preset("inverting-gradients", iterations=500, labels="known"))
    rec = attack.run(view, seed=0)
    its = 500 / rec.seconds
    counter = FlopCounterMode(display=False)
    with counter:
        GradientInversion(preset("inverting-gradients", iterations=1, labels="known")).run(view, seed=0)
    flops = counter.get_total_flops()
    peak = _matmul_gflops()
    return {"setup": "Inverting Gradients, LeNet, 1 image 32 x 32", "iterations_per_second": its,
            "flops_per_iteration": flops, "achieved_gflops": flops * its / 1e9,
            "matmul_gflops": peak, "fraction_of_matmul_rate": flops * its / 1e9 / peak}  # fmt: skip


CASES = {
    "dlg": case_dlg, "idlg-labels": case_idlg_labels, "inverting-gradients": case_inverting_gradients,
    "restarts": case_restarts, "fedavg": case_fedavg, "gradinversion": case_gradinversion,
    "analytic": case_analytic, "throughput": case_throughput,
}  # fmt: skip


def main() -> None:
    run_cases(CASES, "attack", __doc__)


if __name__ == "__main__":
    main()
