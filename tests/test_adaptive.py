"""Attacks that know the defence: each beats the stock attack on its defence (same update, same
seed, same settings), its pieces against independent computations, and the audit that runs both
and keeps the worst."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradleak.attacks import ServerView
from gradleak.attacks.optimisation.adaptive import Adaptation, cell
from gradleak.attacks.optimisation.engine import UpdateDistance
from gradleak.attacks.registry import attack_factory
from gradleak.audit.config import AuditConfig
from gradleak.audit.filter import LeakageAudit
from gradleak.data.dataset import Dataset
from gradleak.data.partition import ClientData
from gradleak.defenses import (
    AdaptiveGaussian,
    BatchNormStatsLocal,
    GroupGaussian,
    Prune,
    Quantize,
)
from gradleak.defenses.compress import quantize_tensor
from gradleak.fl import Classification, LocalTraining, train_client
from gradleak.fl.filters import FilterContext, apply_filters
from gradleak.images import ImageSpec
from gradleak.metrics import score
from gradleak.models import build_model

SPEC = ImageSpec((1, 16, 16), (0.45,), (0.25,))


def _client(seed: int = 0) -> ClientData:
    """One smooth random 16 x 16 image with a random label."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 1, 4, 4, generator=g)
    image = F.interpolate(base, size=(16, 16), mode="bilinear", align_corners=False)
    return ClientData(1, Dataset(image.contiguous(), torch.randint(0, 10, (1,), generator=g)), 1)


def _defended(model_name: str, defenses: list, seed: int = 0):
    """(model, global state, client, the filters' output) of one SGD step on one image."""
    client = _client(seed)
    torch.manual_seed(seed)
    model = build_model(model_name, spec=SPEC, num_classes=10)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    update, _ = train_client(
        model,
        state,
        client,
        round=1,
        settings=LocalTraining(lr=0.1),
        spec=SPEC,
        task=Classification(),
        seed=seed,
    )
    filters = [d.build(index=i, sample_rate=1.0) for i, d in enumerate(defenses)]
    ctx = FilterContext(round=1, client=client, global_state=state, seed=3)
    return model, state, client, apply_filters(filters, update, ctx)


def _stock_and_adaptive(model_name: str, defenses: list, preset: str, seed: int = 0):
    """The scores (ssim, psnr) of the stock attack and of its adaptive counterpart against the
    client's true image, on the same defended update, seed and settings."""
    model, state, client, out = _defended(model_name, defenses, seed)
    view = ServerView.of(
        model, state, out.update, spec=SPEC, num_classes=10, known_defenses=out.known
    )
    scores = []
    for name in (preset, f"{preset}-adaptive"):
        attack = attack_factory(name)(iterations=300)
        rec = attack.run(view, seed=0)
        s = score(rec.examples, client.data.examples, SPEC, rec.labels, client.data.targets)
        scores.append((s.summary()["ssim"], s.summary()["psnr"]))
    return scores


def test_adaptive_attack_matches_only_what_a_pruning_kept() -> None:
    """99% of each tensor pruned: the stock attack also matches the zeros (values the client never
    sent), the adaptive one only the 1% it kept. Measured: SSIM 0.26 against 0.80."""
    (ssim_stock, psnr_stock), (ssim_adapt, psnr_adapt) = _stock_and_adaptive(
        "mlp", [Prune(sparsity=0.99)], "inverting-gradients"
    )
    assert ssim_adapt > ssim_stock + 0.3
    assert psnr_adapt > psnr_stock + 5


def test_adaptive_attack_matches_quantised_values_only_up_to_their_cells() -> None:
    """int8 on LeNet, iDLG (L2, L-BFGS): the stock attack fits the rounded values, the adaptive one
    the cells they stand for. Measured: 25.5 dB against 35.0 dB."""
    (_, psnr_stock), (_, psnr_adapt) = _stock_and_adaptive(
        "lenet", [Quantize(format="int8")], "idlg"
    )
    assert psnr_adapt > psnr_stock + 5


def test_adaptive_attack_weighs_each_group_by_its_known_noise() -> None:
    """The classifier drowned in noise (10 x its scale), the convolutions lightly noised (0.1 x):
    the stock cosine follows the noise of the classifier, the adaptive one weighs each tensor by
    1 / sigma^2. Measured: SSIM 0.25 against 0.62, 15.2 dB against 17.8 dB."""
    defense = GroupGaussian(sigma0=0.5, groups={"weights": 0.1, "classifier": 10})
    (ssim_stock, psnr_stock), (ssim_adapt, psnr_adapt) = _stock_and_adaptive(
        "lenet", [defense], "inverting-gradients"
    )
    assert ssim_adapt > ssim_stock + 0.2
    assert psnr_adapt > psnr_stock + 1.5


# -- the pieces ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["int8", "fp16"])
def test_every_value_lies_in_the_cell_of_what_it_quantises_to(fmt) -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(5000, generator=g) * torch.logspace(-6, 0, 5000)
    q = quantize_tensor(v, fmt)
    lo, hi = cell(q, fmt)
    slack = 1e-6 * float(v.abs().max()) if fmt == "int8" else 0.0  # the scale read back from q
    assert bool((lo - slack <= v.double()).all() and (v.double() <= hi + slack).all())
    # and the cells are no wider than the grid: neighbouring values quantise elsewhere
    width = hi - lo
    if fmt == "int8":
        assert float(width.max()) == pytest.approx(float(v.abs().max()) / 127, rel=1e-5)
    else:
        outside = (hi + 1e-3 * width).float()
        assert bool((quantize_tensor(outside, fmt) != q).all())


@pytest.mark.parametrize("kind", ["l2", "cosine"])
def test_the_distance_to_the_cells_is_the_flat_formula(kind) -> None:
    g = torch.Generator().manual_seed(1)
    target = [torch.randn(7, 3, generator=g), torch.randn(5, generator=g)]
    half = [0.3 * torch.rand(7, 3, generator=g), 0.3 * torch.rand(5, generator=g)]
    bounds = [(t - h, t + h) for t, h in zip(target, half, strict=True)]
    weights = [2.0, (torch.rand(5, generator=g) > 0.5).float()]
    sim = [torch.randn(7, 3, generator=g), torch.randn(5, generator=g)]
    got = float(UpdateDistance(target, weights, kind, bounds)(sim))
    # flat: the point of the cells nearest the simulated update, every coordinate weighted
    s = np.concatenate([x.numpy().ravel() for x in sim])
    lo = np.concatenate([b[0].numpy().ravel() for b in bounds])
    hi = np.concatenate([b[1].numpy().ravel() for b in bounds])
    w = np.concatenate([np.full(21, 2.0), weights[1].numpy()])
    t = np.clip(s, lo, hi)
    if kind == "l2":
        expected = float((w * (s - t) ** 2).sum())
    else:
        expected = 1 - (w * s * t).sum() / math.sqrt((w * s * s).sum() * (w * t * t).sum())
    assert got == pytest.approx(expected, rel=1e-5)
    inside = [torch.clamp(x, lo_, hi_) for x, (lo_, hi_) in zip(sim, bounds, strict=True)]
    assert float(UpdateDistance(target, weights, kind, bounds)(inside)) == pytest.approx(
        0.0, abs=1e-6
    )


def test_noise_after_a_pruning_hides_its_zeros_and_weights_follow_the_noise() -> None:
    model, state, _, out = _defended(
        "mlp", [Prune(sparsity=0.5), GroupGaussian(sigma0=1.0, groups={"classifier": 4})]
    )
    view = ServerView.of(
        model, state, out.update, spec=SPEC, num_classes=10, known_defenses=out.known
    )
    a = Adaptation.of(view)
    assert not a.pruned  # the zeros are noise now
    names = view.parameter_names
    weights = a.noise_weights(names, view, 2)
    stds = {n: math.sqrt(a.noise_var[n]) for n in names}
    sizes = [view.update[n].numel() for n in names]
    assert np.average(weights, weights=sizes) == pytest.approx(1.0)
    for i, n in enumerate(names):  # the inverse variance, up to the common factor
        assert weights[i] * stds[n] ** 2 == pytest.approx(weights[0] * stds[names[0]] ** 2)
    # uniform noise changes nothing a cosine uses: the adaptive attack says so
    model, state, _, out = _defended("mlp", [AdaptiveGaussian(sigma0=1.0)])
    view = ServerView.of(
        model, state, out.update, spec=SPEC, num_classes=10, known_defenses=out.known
    )
    assert not attack_factory("inverting-gradients-adaptive")().adapts(view)


def test_withheld_statistics_turn_the_statistics_attack_into_update_matching() -> None:
    torch.manual_seed(0)
    model = build_model("convnet", spec=SPEC, num_classes=10, kwargs={"width": 4})
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    client = _client()
    update, _ = train_client(
        model,
        state,
        client,
        round=1,
        settings=LocalTraining(lr=0.1),
        spec=SPEC,
        task=Classification(),
        seed=0,
    )
    ctx = FilterContext(round=1, client=client, global_state=state)
    out = apply_filters([BatchNormStatsLocal().build(index=0, sample_rate=1)], update, ctx)
    view = ServerView.of(
        model, state, out.update, spec=SPEC, num_classes=10, known_defenses=out.known
    )
    stock = attack_factory("bn-statistics")(iterations=7)
    adaptive = attack_factory("bn-statistics-adaptive")(iterations=7)
    assert stock.adapted(view) is stock
    # "no change" would fit the global model's own statistics: nothing of the client's
    assert "no batch-norm statistic change" in stock.applies(view)
    assert adaptive.applies(view) is None
    assert adaptive.adapts(view)
    s = adaptive.adapted(view).settings
    assert (s.bn, s.match_weight, s.objective, s.iterations) == (0.0, 1.0, "cosine", 7)
    assert adaptive.run(view).examples is not None  # runs where the statistics are gone


# -- the audit -------------------------------------------------------------------------------------


def _audit(also=(), adaptive=True) -> LeakageAudit:
    config = AuditConfig(
        preset="inverting-gradients",
        attack={"iterations": 300},
        also=list(also),
        adaptive=adaptive,
        save_images=False,
    )
    torch.manual_seed(0)
    model = build_model("mlp", spec=SPEC, num_classes=10)
    prior = torch.full((1, 1, 16, 16), 0.45)
    return LeakageAudit(
        config, model=model, spec=SPEC, num_classes=10, prior=prior, out_dir=None, defenses="x"
    )


def test_the_audit_runs_the_stock_and_the_adaptive_attack_and_keeps_the_worst() -> None:
    audit = _audit()
    _, _, client, out = _defended("mlp", [Prune(sparsity=0.99)])
    state = {k: v.detach().clone() for k, v in audit.model.state_dict().items()}
    ctx = FilterContext(round=1, client=client, global_state=state, seed=0, known=out.known)
    record = audit(out.update, ctx).record
    by = record["rdlv_by_attack"]
    assert set(by) == {"inverting-gradients", "inverting-gradients-adaptive"}
    assert by["inverting-gradients-adaptive"] > by["inverting-gradients"]
    assert record["rdlv"] == max(by.values())
    assert record["attack"] == "inverting-gradients-adaptive"
    # without a defence only the stock attack runs; with audit.adaptive off too
    plain = audit(out.update, FilterContext(round=1, client=client, global_state=state)).record
    assert "rdlv_by_attack" not in plain and plain["attack"] == "inverting-gradients"
    off = _audit(adaptive=False)(out.update, ctx).record
    assert "rdlv_by_attack" not in off


def test_the_audit_does_not_rerun_an_adaptive_attack_that_would_change_nothing() -> None:
    audit = _audit()
    _, _, client, out = _defended("mlp", [AdaptiveGaussian(sigma0=0.5)])
    state = {k: v.detach().clone() for k, v in audit.model.state_dict().items()}
    ctx = FilterContext(round=1, client=client, global_state=state, seed=0, known=out.known)
    by = audit(out.update, ctx).record["rdlv_by_attack"]
    assert by["inverting-gradients-adaptive"] == by["inverting-gradients"]


def test_noised_statistics_weigh_each_layer_by_its_known_noise() -> None:
    """bn-statistics-adaptive under noise on the statistics: layer l's mean distance weighs
    decay^l / (1 + rho^2), rho = sigma sqrt(C) / (1 - momentum) / |sqrt(var*)| (one step), var*
    the revealed variance clamped at 0 -- computed here from the update alone."""
    from gradleak.attacks.optimisation.engine import _Objective
    from gradleak.attacks.optimisation.replay import ClientReplay
    from gradleak.attacks.optimisation.settings import preset

    torch.manual_seed(0)
    model = build_model("convnet", spec=SPEC, num_classes=10, kwargs={"width": 4})
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    client = _client()
    update, _ = train_client(
        model,
        state,
        client,
        round=1,
        settings=LocalTraining(lr=0.1),
        spec=SPEC,
        task=Classification(),
        seed=0,
    )
    defense = GroupGaussian(sigma0=0.5, groups={"weights": 0, "bn-affine": 0, "classifier": 0})
    ctx = FilterContext(round=1, client=client, global_state=state, seed=1)
    out = apply_filters([defense.build(index=0, sample_rate=1)], update, ctx)
    sigma = out.record["noise_scale_bn_stats"]
    view = ServerView.of(
        model, state, out.update, spec=SPEC, num_classes=10, known_defenses=out.known
    )
    assert attack_factory("bn-statistics-adaptive")().adapts(view)
    replay = ClientReplay(view, unroll=False, functional=False)
    terms = _Objective(
        preset("bn-statistics"), view, replay, torch.device("cpu"), Adaptation.of(view)
    ).bn
    assert 0.05 < min(t.weight_mean / 0.85**i for i, t in enumerate(terms)) < 0.95
    for i, t in enumerate(terms):
        g, u = state[f"{t.name}.running_var"], out.update.delta[f"{t.name}.running_var"]
        var = ((g + u - 0.9 * g) / 0.1).clamp_min(0)
        rho2 = sigma**2 * var.numel() / 0.1**2 / max(float(var.sqrt().norm()), 1e-12) ** 2
        assert t.weight_mean == pytest.approx(0.85**i / (1 + rho2), rel=1e-5)
    stock = _Objective(preset("bn-statistics"), view, replay, torch.device("cpu")).bn
    assert [t.weight_mean for t in stock] == pytest.approx([0.85**i for i in range(len(stock))])
