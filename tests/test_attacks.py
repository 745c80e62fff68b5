"""Attacks: label rules, analytic recovery, the differentiable replay, and the engine."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gradleak.attacks import GradientInversion, ServerView, UpdateMismatch, preset
from gradleak.attacks.exact.analytic import (
    batch_linear_inputs,
    checked_linear_input,
    classifier_inputs,
    first_layer_images,
    linear_input,
)
from gradleak.attacks.exact.labels import idlg_label, label_counts, recover_labels
from gradleak.attacks.optimisation.engine import distance, match_factor
from gradleak.attacks.optimisation.replay import ClientReplay
from gradleak.attacks.optimisation.surrogate import surrogate_relu
from gradleak.data.dataset import Dataset
from gradleak.data.partition import ClientData
from gradleak.errors import ConfigError
from gradleak.fl import Classification, LocalTraining, train_client
from gradleak.images import ImageSpec
from gradleak.images.data import normalize
from gradleak.images.metrics import psnr
from gradleak.metrics import score
from gradleak.models import build_model

MEAN, STD = (0.45,), (0.25,)


def _setup(
    model_name="lenet",
    n=1,
    bs=1,
    size=16,
    classes=10,
    epochs=1,
    lr=0.1,
    momentum=0.0,
    seed=0,
    kwargs=None,
    labels=None,
    batch_norm="train",
):
    """A model, a client with n smooth random images, and the server's view of its update."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, size // 4, size // 4, generator=g)
    images = F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    y = (
        torch.as_tensor(labels)
        if labels is not None
        else torch.randint(0, classes, (n,), generator=g)
    )
    client = ClientData(1, Dataset(images.contiguous(), y), bs)
    torch.manual_seed(seed)
    spec = ImageSpec((1, size, size), MEAN, STD)
    model = build_model(model_name, spec=spec, num_classes=classes, kwargs=kwargs or {})
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    update, _ = train_client(
        model,
        state,
        client,
        round=1,
        spec=spec,
        task=Classification(),
        seed=seed,
        settings=LocalTraining(epochs=epochs, lr=lr, momentum=momentum, batch_norm=batch_norm),
    )
    view = ServerView.of(model, state, update, spec=spec, num_classes=classes)
    return model, state, client, update, view


# -- labels ---------------------------------------------------------------------------------------


def test_idlg_rule_recovers_every_single_image_label() -> None:
    hits = 0
    for seed in range(40):
        *_, client, _, view = _setup(seed=seed)
        w, _ = view.classifier()
        hits += idlg_label(view.pseudo_gradient()[w]) == int(client.data.targets[0])
    assert hits == 40


def test_label_counts_rounds_to_the_batch_size() -> None:
    probs = torch.full((4,), 0.25)
    # g_b = p - n_c / N with N = 6 and counts (3, 0, 1, 2)
    g_b = probs - torch.tensor([3, 0, 1, 2]) / 6
    assert label_counts(g_b, probs, 6) == [0, 0, 0, 2, 3, 3]


@pytest.mark.parametrize("seed", range(5))
def test_label_counts_are_n_labels_even_from_noise(seed) -> None:
    g = torch.Generator().manual_seed(seed)
    noisy = 50 * torch.randn(10, generator=g)
    assert len(label_counts(noisy, torch.full((10,), 0.1), 8)) == 8
    assert len(label_counts(torch.full((10,), 5.0), torch.full((10,), 0.1), 3)) == 3  # all clamped


def test_batch_labels_with_repeats_from_the_bias() -> None:
    labels = [1, 1, 2, 5, 5, 5]
    *_, view = _setup("convnet", n=6, bs=6, kwargs={"width": 8}, labels=labels)
    probe = normalize(torch.rand(8, 1, 16, 16), MEAN, STD)
    got, strategy = recover_labels(view, probe)
    assert strategy == "ilrg"
    assert got.tolist() == labels


# -- analytic -------------------------------------------------------------------------------------


def test_analytic_recovery_of_a_one_image_mlp_update_is_exact() -> None:
    *_, client, _, view = _setup("mlp", kwargs={"hidden": [64]})
    rec = first_layer_images(view)
    assert (rec - client.data.examples).abs().max() < 1e-5


def test_linear_input_and_classifier_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    x, delta = torch.randn(7, generator=g), torch.randn(4, generator=g)
    assert torch.allclose(linear_input(torch.outer(delta, x), delta), x, atol=1e-6)
    # Two samples of classes 0 and 2 whose error signals do not overlap: both inputs come back.
    a, b = torch.randn(5, generator=g), torch.randn(5, generator=g)
    d_a, d_b = torch.tensor([-0.7, 0.4, 0.0, 0.3]), torch.tensor([0.0, 0.5, -0.9, 0.4])
    gw = torch.outer(d_a, a) + torch.outer(d_b, b)
    got = classifier_inputs(gw, d_a + d_b, torch.tensor([0, 2]))
    assert set(got) == {0, 2}
    assert torch.allclose(got[0], a, atol=1e-6) and torch.allclose(got[2], b, atol=1e-6)


def test_a_single_input_is_given_only_where_the_gradient_is_one_sample_s() -> None:
    torch.manual_seed(0)
    layer, h = torch.nn.Linear(16, 10), torch.rand(1, 16)
    F.cross_entropy(layer(h), torch.tensor([3])).backward()
    gw, gb = layer.weight.grad, layer.bias.grad
    got = checked_linear_input(gw, gb)
    assert got is not None and torch.allclose(got, h[0], atol=1e-5)
    pruned = gw * (gw.abs() >= gw.abs().quantile(0.9))  # 90% of the weight gradient pruned
    noised = gw + 0.05 * gw.abs().max() * torch.randn_like(gw)
    assert checked_linear_input(pruned, gb) is None and checked_linear_input(noised, gb) is None
    two = torch.rand(2, 16)  # a two-sample gradient is not one product
    layer.zero_grad()
    F.cross_entropy(layer(two), torch.tensor([3, 5])).backward()
    assert checked_linear_input(layer.weight.grad, layer.bias.grad) is None


def _classifier_inputs_of(view: ServerView, images: torch.Tensor, bn_mode: str) -> torch.Tensor:
    """What the global model's classifier layer takes for these images (the client's BN mode)."""
    model = build_model(
        "convnet", spec=view.spec, num_classes=view.num_classes, kwargs={"width": 4}
    )
    model.load_state_dict(view.global_state)
    model.train(bn_mode == "train")
    seen: list[torch.Tensor] = []
    model.head.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0]))
    with torch.no_grad():
        model(normalize(images, view.spec.mean, view.spec.std))
    return seen[0]


@pytest.mark.parametrize("batch_norm", ["eval", "train"])
def test_batch_classifier_inputs_are_exact_with_known_labels(batch_norm) -> None:
    *_, client, _, view = _setup(
        "convnet", n=4, bs=4, labels=[1, 4, 6, 9], kwargs={"width": 4}, batch_norm=batch_norm
    )
    pg, (w, b) = view.pseudo_gradient(), view.classifier()
    args = (pg[w], pg[b], view.global_state[w], view.global_state[b])
    truth = _classifier_inputs_of(view, client.data.examples, batch_norm)
    got = batch_linear_inputs(*args, client.data.targets)
    assert got is not None and got.shape == truth.shape
    assert float((got - truth).norm() / truth.norm()) < 1e-4
    # Wrong labels do not reproduce the gradients; more images than classes cannot be solved.
    assert batch_linear_inputs(*args, torch.tensor([1, 4, 6, 8])) is None
    assert batch_linear_inputs(*args, torch.arange(11) % 10) is None


def test_batch_classifier_inputs_refuse_a_repeated_label() -> None:
    # Two images of class 4: their columns of (P - Y) differ only by the small softmax differences.
    *_, client, _, view = _setup(
        "convnet", n=4, bs=4, labels=[1, 4, 4, 9], kwargs={"width": 4}, batch_norm="eval"
    )
    pg, (w, b) = view.pseudo_gradient(), view.classifier()
    args = (pg[w], pg[b], view.global_state[w], view.global_state[b])
    assert batch_linear_inputs(*args, client.data.targets) is None


# -- the replay -----------------------------------------------------------------------------------


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize(
    ("model_name", "kwargs", "batch_norm"),
    [
        ("convnet", {"width": 4}, "train"),
        ("convnet", {"width": 4}, "eval"),
        ("lenet", {}, "train"),
    ],
)
def test_unrolled_replay_equals_the_real_client_update(
    functional, model_name, kwargs, batch_norm
) -> None:
    # Full batches (batch order does not matter), 3 epochs, momentum: 3 local steps.
    *_, client, update, view = _setup(
        model_name,
        n=3,
        bs=3,
        epochs=3,
        lr=0.05,
        momentum=0.5,
        kwargs=kwargs,
        labels=[1, 4, 4],
        batch_norm=batch_norm,
    )
    replay = ClientReplay(view, unroll=True, functional=functional)
    assert replay.bn_mode == batch_norm
    x = normalize(client.data.examples, MEAN, STD)
    out = replay.simulate(x, F.one_hot(client.data.targets, 10).float())
    real = view.pseudo_gradient()
    for name in view.parameter_names:
        torch.testing.assert_close(out.update[name], real[name], rtol=1e-4, atol=1e-5)
    if batch_norm == "eval":  # running statistics normalise, nothing is captured or updated
        assert all(not s for s in out.stats)
        variances = [update.delta[f"{layer.name}.running_var"] for layer in replay.bn_layers]
        assert all(not bool(v.any()) for v in variances)
        return
    deltas = replay.running_stat_deltas(out.stats)
    assert len(deltas) == 2 * len(replay.bn_layers) and len(out.stats) == 3
    for key, delta in deltas.items():
        torch.testing.assert_close(delta, update.delta[key], rtol=1e-4, atol=1e-6)


def test_replay_takes_batches_in_order() -> None:
    *_, client, update, view = _setup("mlp", n=4, bs=2, lr=0.1, kwargs={"hidden": [16]})
    # Feed the images in the order the client drew them; the replay then matches exactly.
    from gradleak.seeding import torch_generator

    order = torch.randperm(4, generator=torch_generator(0, "client", 1, 1))
    replay = ClientReplay(view, unroll=True, functional=False)
    x = normalize(client.data.examples[order], MEAN, STD)
    sim = replay.simulate(x, F.one_hot(client.data.targets[order], 10).float()).update
    for name, g in view.pseudo_gradient().items():
        torch.testing.assert_close(sim[name], g, rtol=1e-4, atol=1e-5)


def test_the_batch_norm_mode_comes_from_the_metadata_or_from_the_buffers() -> None:
    import dataclasses

    for mode in ("train", "eval"):
        *_, update, view = _setup("convnet", kwargs={"width": 4}, batch_norm=mode)
        assert view.meta.bn_mode == mode and view.bn_mode == mode
        unsent = dataclasses.replace(view, meta=dataclasses.replace(view.meta, bn_mode=None))
        assert unsent.bn_mode == mode  # inferred: eval leaves every running statistic unchanged
    # The metadata wins over the buffers, and a model without batch norm reports train.
    *_, update, view = _setup("convnet", kwargs={"width": 4}, batch_norm="eval")
    assert (
        dataclasses.replace(view, meta=dataclasses.replace(view.meta, bn_mode="train")).bn_mode
        == "train"
    )
    assert _setup("lenet")[-1].bn_mode == "train"
    with pytest.raises(UpdateMismatch, match="bn_mode must be 'train' or 'eval'"):
        dataclasses.replace(view, meta=dataclasses.replace(view.meta, bn_mode="frozen"))


def test_revealed_statistics_of_several_steps_are_the_momentum_weighted_mean() -> None:
    # 4 images in batches of 2, one epoch: 2 steps, fed in the client's order so the replay is
    # exact.
    from gradleak.seeding import torch_generator

    *_, client, update, view = _setup("convnet", n=4, bs=2, lr=0.05, kwargs={"width": 4})
    order = torch.randperm(4, generator=torch_generator(0, "client", 1, 1))
    x = normalize(client.data.examples[order], MEAN, STD)
    y = F.one_hot(client.data.targets[order], 10).float()
    replay = ClientReplay(view, unroll=True, functional=False)
    steps = replay.simulate(x, y).stats
    assert len(steps) == 2
    m = 0.1  # BatchNorm2d's momentum: running_2 = 0.81 running_0 + 0.09 s_1 + 0.1 s_2
    weights, keep = replay._step_weights(replay.bn_layers[0])
    assert weights == pytest.approx([m * (1 - m), m]) and keep == pytest.approx((1 - m) ** 2)
    revealed, replayed = replay.revealed_bn_stats(), replay.weighted_bn_stats(steps)
    for name, (mean, var) in revealed.items():
        by_hand = [
            (m * (1 - m) * steps[0][name][j] + m * steps[1][name][j]) / (1 - keep) for j in (0, 1)
        ]
        torch.testing.assert_close(mean, by_hand[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(var, by_hand[1], rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(replayed[name][0], mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(replayed[name][1], var, rtol=1e-3, atol=1e-5)
    # Other images do not reproduce them: the term is informative.
    other = replay.weighted_bn_stats(replay.simulate(x.flip(-1), y).stats)
    assert any((other[n][1] - v).abs().max() > 1e-3 for n, (_, v) in revealed.items())


def test_revealed_batch_norm_statistics_of_one_step() -> None:
    *_, client, _, view = _setup("convnet", n=2, bs=2, kwargs={"width": 4})
    replay = ClientReplay(view, unroll=False, functional=False)
    mean0, var0 = replay.revealed_bn_stats()["features.1"]
    x = normalize(client.data.examples, MEAN, STD)
    first_conv = view.model.features[0]
    with torch.no_grad():
        h = F.conv2d(
            x, view.global_state["features.0.weight"], None, first_conv.stride, first_conv.padding
        )
    torch.testing.assert_close(mean0, h.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var0, h.var((0, 2, 3), unbiased=True), rtol=1e-3, atol=1e-5)


# -- the surrogate second derivative of ReLU -------------------------------------------------------


@pytest.mark.parametrize(
    "relu", [F.relu, torch.relu, torch.Tensor.relu, torch.nn.ReLU(), torch.nn.ReLU(inplace=True)]
)
def test_surrogate_relu_keeps_the_gradient_and_smooths_only_its_derivative(relu) -> None:
    beta = 3.0
    g = torch.Generator().manual_seed(0)
    u0 = torch.linspace(-2, 2, 41, dtype=torch.float64)
    v, w = torch.randn(2, 41, dtype=torch.float64, generator=g)
    hessian_terms = {}
    for b in (0.0, beta):
        u = u0.clone().requires_grad_()
        with surrogate_relu(b):
            y = relu(u * 1.0)
        assert torch.equal(y, u0.clamp_min(0))
        (grad_u,) = torch.autograd.grad((y * v).sum(), u, create_graph=True)
        assert torch.equal(grad_u.detach(), v * (u0 > 0))  # the backward mask is exact
        (hessian_terms[b],) = torch.autograd.grad((grad_u * w).sum(), u)
    s = torch.sigmoid(beta * u0)
    assert torch.count_nonzero(hessian_terms[0.0]) == 0  # autograd: the mask has no derivative
    torch.testing.assert_close(hessian_terms[beta], w * v * beta * s * (1 - s))


@pytest.mark.parametrize("functional", [False, True])
def test_surrogate_replay_simulates_the_real_update_and_changes_the_image_gradient(
    functional,
) -> None:
    *_, client, _, view = _setup("convnet", kwargs={"width": 4})
    x = normalize(client.data.examples, MEAN, STD)
    y = F.one_hot(client.data.targets, 10).float()
    real = view.pseudo_gradient()
    image_grads = {}
    for beta in (0.0, 3.0):
        replay = ClientReplay(view, unroll=False, functional=functional, relu_beta=beta)
        z = x.clone().requires_grad_()
        sim = replay.simulate(z, y).update
        for name in view.parameter_names:
            torch.testing.assert_close(sim[name], real[name], rtol=1e-4, atol=1e-5)
        loss = sum((sim[n] - 1.1 * real[n]).pow(2).sum() for n in view.parameter_names)
        (image_grads[beta],) = torch.autograd.grad(loss, z)
    assert (image_grads[3.0] - image_grads[0.0]).norm() > 0.01 * image_grads[0.0].norm()


def test_gradinversion_runs_batched_restarts_with_the_surrogate_and_the_decaying_match() -> None:
    *_, view = _setup("convnet", kwargs={"width": 4})
    settings = preset("gradinversion", iterations=5, restarts=2)
    assert settings.relu_surrogate > 0 and settings.match_schedule == "cosine"
    rec = GradientInversion(settings).run(view, seed=0)
    assert len(rec.restart_scores) == 2 and all(math.isfinite(v) for v in rec.restart_scores)
    factor = match_factor(settings)
    assert factor(0) == 1.0 and factor(5) == pytest.approx(0.0, abs=1e-12)
    assert match_factor(preset("inverting-gradients"))(4000) == 1.0


# -- the engine -----------------------------------------------------------------------------------


def test_dlg_recovers_the_image_and_the_optimised_label() -> None:
    *_, client, _, view = _setup(kwargs={"init": "uniform"}, seed=1)
    before = {k: v.clone() for k, v in view.global_state.items()}
    rec = GradientInversion(preset("dlg", iterations=40)).run(view, seed=0)
    # The attack leaves what it was shown untouched.
    assert all(
        torch.equal(before[k], v) and not v.requires_grad for k, v in view.global_state.items()
    )
    assert rec.label_strategy == "optimize"
    assert rec.labels.tolist() == client.data.targets.tolist()
    s = score(rec.examples, client.data.examples, view.spec, rec.labels, client.data.targets)
    assert s.summary()["mse"] < 1e-3 and s.label_accuracy == 1.0


def test_inverting_gradients_improves_on_its_start_and_uses_the_analytic_label() -> None:
    *_, client, _, view = _setup(seed=2)
    rec = GradientInversion(preset("inverting-gradients", iterations=300)).run(view, seed=0)
    assert rec.label_strategy == "idlg" and rec.labels.tolist() == client.data.targets.tolist()
    assert (
        float(psnr(rec.examples, client.data.examples))
        > float(psnr(rec.start, client.data.examples)) + 5
    )
    assert rec.trace[-1] < rec.trace[0]


def test_the_matching_term_reaches_the_images_through_the_unrolled_steps() -> None:
    # Three local SGD steps: the attack unrolls them; without the matching term only TV is left.
    *_, client, _, view = _setup(n=1, bs=1, epochs=3, lr=0.05, seed=3)
    assert view.meta.steps == 3
    settings = dict(iterations=300)
    full = GradientInversion(preset("inverting-gradients", **settings)).run(view, seed=0)
    no_match = GradientInversion(preset("inverting-gradients", match_weight=0.0, **settings)).run(
        view, seed=0
    )
    truth = client.data.examples
    assert (full.examples - no_match.examples).abs().mean() > 0.05
    assert float(psnr(full.examples, truth)) > float(psnr(no_match.examples, truth)) + 3.0
    assert float(psnr(full.examples, truth)) > float(psnr(full.start, truth)) + 5.0


def test_restarts_run_batched_and_the_best_is_kept() -> None:
    *_, client, _, view = _setup(seed=4)
    rec = GradientInversion(preset("inverting-gradients", iterations=60, restarts=3)).run(
        view, seed=0
    )
    assert len(rec.restart_scores) == 3 and len(set(rec.restart_scores)) == 3
    assert rec.examples.shape == client.data.examples.shape
    # The returned images are the restart with the lowest matching loss: recompute it.
    replay = ClientReplay(view, unroll=False, functional=False)
    z = normalize(rec.examples, MEAN, STD)
    sim = {
        k: v.detach()
        for k, v in replay.simulate(z, F.one_hot(rec.labels, 10).float()).update.items()
    }
    pg, names = view.pseudo_gradient(), view.parameter_names
    cosine = 1 - sum(float((sim[n] * pg[n]).sum()) for n in names) / math.sqrt(
        sum(float(sim[n].pow(2).sum()) for n in names)
        * sum(float(pg[n].pow(2).sum()) for n in names)
    )
    tv = float(
        (z[..., :, 1:] - z[..., :, :-1]).abs().mean()
        + (z[..., 1:, :] - z[..., :-1, :]).abs().mean()
    )
    objective = (
        cosine + preset("inverting-gradients").tv * tv
    )  # the images are boxed: no clamp loss
    best, second = sorted(rec.restart_scores)[:2]
    assert rec.restart_scores.index(best) == rec.restart_scores.index(min(rec.restart_scores))
    assert abs(objective - best) < min(1e-5, (second - best) / 2)


def test_batches_of_images_are_reconstructed_and_matched() -> None:
    *_, client, _, view = _setup(n=2, bs=2, seed=5, labels=[3, 7])
    rec = GradientInversion(preset("inverting-gradients", iterations=400)).run(view, seed=0)
    s = score(rec.examples, client.data.examples, view.spec, rec.labels, client.data.targets)
    assert rec.label_strategy == "ilrg" and s.label_accuracy == 1.0
    assert float(s.psnr.mean()) > float(psnr(rec.start, client.data.examples).mean()) + 3


def test_feature_inversion_of_a_batch_brings_each_image_to_its_revealed_input() -> None:
    # A batch of 4 with known labels in one step: the classifier inputs of every image are revealed
    # (batch_linear_inputs); with the feature term on, each reconstructed image's input comes
    # close to its own true one, which plain matching leaves far off.
    model, state, client, update, view = _setup(
        "convnet", n=4, bs=4, labels=[1, 4, 6, 9], kwargs={"width": 4}, batch_norm="eval"
    )
    view = ServerView.of(
        model, state, update, spec=view.spec, num_classes=10, known_labels=client.data.targets
    )
    truth = _classifier_inputs_of(view, client.data.examples, "eval")

    def feature_error(weight: float) -> torch.Tensor:
        rec = GradientInversion(
            preset("inverting-gradients", labels="known", features=weight, iterations=100)
        ).run(view, seed=0)
        assert rec.labels.tolist() == client.data.targets.tolist()
        got = _classifier_inputs_of(view, rec.examples, "eval")
        return (got - truth).norm(dim=1) / truth.norm(dim=1)

    on, off = feature_error(1.0), feature_error(0.0)
    assert float(on.max()) < 0.05 and float(on.mean()) < 0.3 * float(off.mean())


# -- the update distance and the convolution back end ---------------------------------------------


@pytest.mark.parametrize("kind", ["l2", "l1", "cosine"])
@pytest.mark.parametrize("weighted", [False, True])
def test_update_distance_equals_the_flat_formula(kind, weighted, monkeypatch) -> None:
    import gradleak.attacks.optimisation.engine as engine

    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 50)  # several chunks, some tensors concatenated
    g = torch.Generator().manual_seed(1)
    shapes = [(3, 4), (70,), (2, 2, 2), (5,), (40,)]
    sim = [torch.randn(sh, generator=g, dtype=torch.float64) for sh in shapes]
    target = [torch.randn(sh, generator=g, dtype=torch.float64) for sh in shapes]
    weights = [1.0, 0.5, 2.0, 0.1, 3.0] if weighted else None
    w = torch.cat(
        [torch.full((t.numel(),), wi) for t, wi in zip(target, weights or [1.0] * 5)]
    ).double()
    s, t = torch.cat([x.flatten() for x in sim]), torch.cat([x.flatten() for x in target])
    expected = {
        "l2": (w * (s - t) ** 2).sum(),
        "l1": (w * (s - t).abs()).sum(),
        "cosine": 1 - (w * s * t).sum() / ((w * s * s).sum().sqrt() * (w * t * t).sum().sqrt()),
    }[kind]
    torch.testing.assert_close(
        distance(sim, target, weights, kind), expected, rtol=1e-10, atol=1e-12
    )
    assert [c.numel() for c in engine.chunks(sim)] == [
        12 + 70,
        8 + 5 + 40,
    ]  # closed at >= 50 elements


def test_the_convolution_back_end_follows_the_model_size() -> None:
    from gradleak.attacks.optimisation.engine import ONEDNN_MIN_MACS, conv_macs

    one_conv = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.Flatten()
    )
    assert (
        conv_macs(one_conv, (3, 32, 32)) == 8 * 16 * 16 * 3 * 3 * 3
    )  # outputs x inputs per output
    views = {
        name: _setup(name, size=32, kwargs=kw)[-1]
        for name, kw in (("lenet", {}), ("resnet18", {"width": 16}))
    }
    assert conv_macs(views["lenet"].model, (1, 32, 32)) < ONEDNN_MIN_MACS
    auto = GradientInversion(preset("inverting-gradients"))
    assert not auto.uses_onednn(views["lenet"], torch.device("cpu"))
    assert auto.uses_onednn(views["resnet18"], torch.device("cpu"))
    forced = GradientInversion(preset("inverting-gradients", conv_backend="native"))
    assert not forced.uses_onednn(views["resnet18"], torch.device("cpu"))


# -- errors ---------------------------------------------------------------------------------------


def test_mismatched_updates_name_the_tensor() -> None:
    model, state, _, update, _ = _setup()
    kw = dict(spec=ImageSpec((1, 16, 16), MEAN, STD), num_classes=10)
    bad = dict(update.delta)
    bad["fc.weight"] = torch.zeros(3, 3)
    with pytest.raises(
        UpdateMismatch,
        match=r"update: tensor 'fc.weight' has shape \(3, 3\), the model expects \(10, 192\)",
    ):
        ServerView(model=model, global_state=state, update=bad, meta=update.meta, **kw)
    missing = {k: v for k, v in update.delta.items() if k != "body.0.bias"}
    with pytest.raises(
        UpdateMismatch, match="update: tensor 'body.0.bias' of the model is missing"
    ):
        ServerView(model=model, global_state=state, update=missing, meta=update.meta, **kw)
    extra = {**update.delta, "head.weight": torch.zeros(1)}
    with pytest.raises(UpdateMismatch, match="'head.weight' is not in the model"):
        ServerView(model=model, global_state=state, update=extra, meta=update.meta, **kw)


def test_settings_that_do_not_fit_the_view() -> None:
    *_, view = _setup()
    with pytest.raises(ConfigError, match="attack.bn: batch-norm matching needs"):
        GradientInversion(preset("gradinversion", iterations=1)).run(view)
    with pytest.raises(ConfigError, match="attack.labels: 'known' labels need labels"):
        GradientInversion(preset("inverting-gradients", iterations=1, labels="known")).run(view)
    with pytest.raises(ConfigError, match="unknown attack preset 'dlgg'"):
        preset("dlgg")
