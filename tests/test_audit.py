"""The leakage audit: the RDLV formula on hand-made images, the gate, and audited runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from gradleak.audit import rdlv
from gradleak.experiments import RunStore, run_experiment
from gradleak.experiments.config import validate_config
from gradleak.images import ImageSpec

SPEC = ImageSpec.square(1, 16)


def _ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    return structural_similarity(
        a[0].numpy().astype(np.float64),
        b[0].numpy().astype(np.float64),
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )


def _images():
    g = torch.Generator().manual_seed(0)
    truth = torch.nn.functional.interpolate(
        torch.rand(2, 1, 4, 4, generator=g), size=(16, 16), mode="bilinear"
    )
    prior = (0.5 + 0.2 * torch.rand(2, 1, 16, 16, generator=g)).clamp(0, 1)
    recon = torch.stack(
        [
            (truth[1] + 0.05 * torch.randn(1, 16, 16, generator=g)).clamp(0, 1),
            (truth[0] + 0.15 * torch.randn(1, 16, 16, generator=g)).clamp(0, 1),
        ]
    )
    return truth, prior, recon


def _formula(recon, prior, truth, r: int, i: int) -> float:
    """RDLV of image i reconstructed as recon[r], against the prior of image i."""
    s, p = _ssim(recon[r], truth[i]), _ssim(prior[i], truth[i])
    return (s - p) / abs(p)


def test_rdlv_formula_on_hand_made_images() -> None:
    truth, prior, recon = _images()
    out = rdlv(recon, prior, truth, SPEC, metric="ssim")
    # Each image is paired with its own reconstruction: 0 is of image 1, 1 of image 0.
    assert out.best == [1, 0]
    expected = [_formula(recon, prior, truth, 1, 0), _formula(recon, prior, truth, 0, 1)]
    assert out.per_example == pytest.approx(expected, rel=1e-6)
    assert out.value == pytest.approx(max(expected), rel=1e-6)
    assert rdlv(recon, prior, truth, SPEC, metric="ssim", reduce="min").value == pytest.approx(
        min(expected), rel=1e-6
    )
    # One prior for every image (the audit's mean image) is broadcast
    one = rdlv(recon, prior[:1], truth, SPEC, metric="ssim")
    assert one.per_example == pytest.approx(
        [_formula(recon, prior[[0, 0]], truth, 1, 0), _formula(recon, prior[[0, 0]], truth, 0, 1)],
        rel=1e-6,
    )


def test_rdlv_is_zero_when_nothing_was_learned_and_mse_variant() -> None:
    truth, prior, _ = _images()
    assert rdlv(prior, prior, truth, SPEC, metric="ssim").value == pytest.approx(0.0, abs=1e-12)
    out = rdlv(truth, prior, truth, SPEC, metric="mse")
    p = [float(((prior[i] - truth[i]) ** 2).mean()) for i in range(2)]
    assert out.per_example == pytest.approx(
        [(p[0] - 0.0) / p[0], (p[1] - 0.0) / p[1]]
    )  # all the error removed: 1


def test_scoring_a_large_batch_costs_one_ssim_per_image(monkeypatch) -> None:
    """Batch 300: the matching pairs every image with its own (shuffled, noisy) reconstruction, and
    SSIM is computed on exactly 300 pairs (once for the reconstructions, once for the priors), not
    300 x 300."""
    from gradleak.images import metrics as image
    from gradleak.modality import Metric

    g = torch.Generator().manual_seed(1)
    truth = torch.rand(300, 1, 8, 8, generator=g)
    perm = torch.randperm(300, generator=g)
    recon = (truth[perm] + 0.02 * torch.randn(300, 1, 8, 8, generator=g)).clamp(0, 1)
    prior = torch.full_like(truth, 0.5)
    pairs = []
    real = image.METRICS["ssim"]
    counted = Metric("ssim", lambda a, b: pairs.append(len(a)) or real(a, b), higher_is_better=True)
    monkeypatch.setitem(image.METRICS, "ssim", counted)
    out = rdlv(recon, prior, truth, ImageSpec.square(1, 8), metric="ssim")
    assert torch.equal(perm[torch.as_tensor(out.best)], torch.arange(300))
    assert sum(pairs) == 600


def _audited(threshold=None, clients=(1,), rounds=2, defenses=()):
    return validate_config(
        {
            "name": "audited",
            "device": "cpu",
            "data": {"source": "digits", "image_size": 8},
            "partition": {
                "scheme": "explicit",
                "clients": [{"size": 1, "batch_size": 1}, {"size": 40, "batch_size": 8}],
            },
            "model": {"name": "mlp", "kwargs": {"hidden": [32]}},
            "training": {"rounds": rounds, "lr": 0.1},
            "defenses": list(defenses),
            "audit": {
                "clients": list(clients),
                "preset": "inverting-gradients",
                "attack": {"iterations": 150},
                "threshold": threshold,
            },
        }
    )


def test_audited_rows_carry_the_leakage(tmp_path) -> None:
    run_experiment(_audited(), tmp_path)
    rows = RunStore(tmp_path).results.read()
    audited = [r for r in rows if r.get("audited")]
    assert [(r["round"], r["client"]) for r in audited] == [(1, 1), (2, 1)]
    for r in audited:
        assert r["rdlv"] > 0.1 and r["label_accuracy"] == 1.0 and r["attack_seconds"] > 0
        assert {"ssim", "psnr", "mse", "label_strategy", "defenses"} <= set(r)
    assert all("rdlv" not in r for r in rows if r["client"] == 2)
    saved = np.load(tmp_path / "audit/round_0001/client_1.npz")
    assert saved["reconstructions"].shape == (1, 1, 8, 8)
    assert (tmp_path / "audit/round_0002/client_1.png").exists()


def test_the_threshold_withholds_leaking_updates_and_the_run_completes(tmp_path) -> None:
    run_experiment(_audited(threshold=0.0), tmp_path)
    store = RunStore(tmp_path)
    rows = store.results.read()
    assert all(r["withheld"] for r in rows if r["client"] == 1)
    assert not any(r["withheld"] for r in rows if r["client"] == 2)
    assert [r["aggregated"] for r in store.rounds.read()] == [1, 1]


def test_defences_apply_before_the_audit(tmp_path) -> None:
    noisy = _audited(rounds=1, defenses=[{"name": "gaussian", "sigma": 1.0}])
    run_experiment(noisy, tmp_path / "noisy")
    run_experiment(_audited(rounds=1), tmp_path / "clean")
    leak = {
        name: RunStore(tmp_path / name).results.read()[0]["rdlv"] for name in ("noisy", "clean")
    }
    assert leak["noisy"] < leak["clean"] - 0.2
    row = RunStore(tmp_path / "noisy").results.read()[0]
    assert (
        row["defenses"] == "gaussian(sigma=1.0, include_buffers=False)"
        and row["noise_scale"] == 1.0
    )


def test_audit_config_errors_name_the_key() -> None:
    from gradleak.errors import ConfigError

    raw = json.loads(json.dumps(_audited().resolved()))
    raw["audit"]["attack"] = {"iterations": 0}
    with pytest.raises(
        ConfigError, match=r"^audit.attack.iterations: Input should be greater than 0"
    ):
        validate_config(raw)
    raw["audit"]["attack"] = {}
    raw["defenses"] = [{"name": "adaptive-gaussian", "sigma0": -1}]
    with pytest.raises(
        ConfigError, match=r"^defenses.0.sigma0: Input should be greater than or equal to 0"
    ):
        validate_config(raw)
    raw["defenses"] = [{"name": "blur"}]
    with pytest.raises(
        ConfigError, match=r"^defenses.0.name: 'blur' is not one of adaptive-gaussian"
    ):
        validate_config(raw)
    # Clients that freeze batch norm reveal no statistics: an attack made of them alone is refused.
    raw["defenses"] = []
    raw["training"]["batch_norm"] = "eval"
    raw["audit"]["preset"] = "bn-statistics"
    with pytest.raises(
        ConfigError,
        match=r"^audit.preset: bn-statistics: the client ran its batch-norm layers in eval",
    ):
        validate_config(raw)
    raw["audit"]["preset"] = "gradinversion"  # it also matches the update: allowed
    assert validate_config(raw).training.batch_norm == "eval"


def test_a_diverged_update_is_recorded_not_attacked(tmp_path) -> None:
    # Noise near float32's limit makes the update, then the global model, overflow.
    cfg = _audited(rounds=3, defenses=[{"name": "gaussian", "sigma": 1e38}])
    run_experiment(cfg, tmp_path)
    rows = [r for r in RunStore(tmp_path).results.read() if r.get("audited")]
    assert len(rows) == 3
    assert rows[-1]["rdlv"] is None and "not finite" in rows[-1]["audit_note"]
    from gradleak.report.html import build_run_report

    assert build_run_report(tmp_path).exists()
