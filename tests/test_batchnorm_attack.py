"""The attack on batch-norm networks: the statistics a train-mode update reveals, each ingredient of
the ``bn-statistics`` preset in its intended direction, and eval-mode updates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradleak.attacks import GradientInversion, preset
from gradleak.attacks.base import ServerView
from gradleak.attacks.optimisation.replay import ClientReplay
from gradleak.data.dataset import Dataset
from gradleak.data.partition import ClientData
from gradleak.errors import ConfigError
from gradleak.fl import Classification, LocalTraining, train_client
from gradleak.images import ImageSpec
from gradleak.images.data import normalize
from gradleak.images.metrics import psnr, ssim
from gradleak.models import build_model

MEAN, STD = (0.45, 0.45, 0.45), (0.25, 0.25, 0.25)


def _view(seed=0, size=16, width=8, batch_norm="train", model="resnet20", n=1, bs=1):
    """A one-image (or n-image) update of a small untrained ResNet on a smooth random RGB image."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 4, 4, generator=g)
    images = F.interpolate(
        base, size=(size, size), mode="bilinear", align_corners=False
    ).contiguous()
    client = ClientData(1, Dataset(images, torch.randint(0, 10, (n,), generator=g)), bs)
    torch.manual_seed(seed)
    spec = ImageSpec((3, size, size), MEAN, STD)
    net = build_model(model, spec=spec, num_classes=10, kwargs={"width": width})
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    update, _ = train_client(
        net,
        state,
        client,
        round=1,
        spec=spec,
        task=Classification(),
        seed=seed,
        settings=LocalTraining(lr=0.1, batch_norm=batch_norm),
    )
    view = ServerView.of(net, state, update, spec=spec, num_classes=10)
    return client, view


def _quality(rec, client) -> tuple[float, float]:
    truth = client.data.examples
    return float(psnr(rec.examples, truth)), float(ssim(rec.examples, truth))


def _tile_view(i=0, batch_norm="train", model="resnet18", width=16):
    """A one-image update of an untrained ResNet on a 32 x 32 tile of a bundled photograph."""
    from gradleak.images.sources import TilesSource

    tiles = TilesSource(image_size=32).load(seed=0)
    idx = int(torch.nonzero(tiles.test.targets == i % tiles.num_classes).flatten()[0])
    client = ClientData(1, tiles.test.subset([idx]), 1)
    torch.manual_seed(i)
    net = build_model(
        model, spec=tiles.spec, num_classes=tiles.num_classes, kwargs={"width": width}
    )
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    update, _ = train_client(
        net,
        state,
        client,
        round=1,
        spec=tiles.spec,
        task=Classification(),
        seed=i,
        settings=LocalTraining(lr=0.1, batch_norm=batch_norm),
    )
    view = ServerView.of(net, state, update, spec=tiles.spec, num_classes=tiles.num_classes)
    return client, view


@pytest.fixture(scope="module")
def photo():
    return _tile_view(0)


def test_the_revealed_statistics_recover_a_one_image_resnet18_update(photo) -> None:
    client, view = photo
    fast = dict(iterations=300, restarts=1)
    rec = GradientInversion(preset("bn-statistics", **fast)).run(view, seed=0)
    start = float(psnr(rec.start, client.data.examples))
    got, got_ssim = _quality(rec, client)
    assert got > start + 15 and got_ssim > 0.6
    # The statistics are what moves the image: without them only the priors act.
    off = GradientInversion(preset("bn-statistics", bn=0.0, **fast)).run(view, seed=0)
    assert abs(_quality(off, client)[0] - start) < 1.0


def test_per_layer_normalisation_and_decay_beat_nvflares_plain_sum(photo) -> None:
    client, view = photo
    fast = dict(iterations=300, restarts=1)
    ours = GradientInversion(preset("bn-statistics", **fast)).run(view, seed=0)
    plain = GradientInversion(
        preset("bn-statistics", bn_normalize=False, bn_layer_decay=1.0, **fast)
    ).run(view, seed=0)
    assert _quality(ours, client)[0] > _quality(plain, client)[0] + 8


def test_the_batch_norm_term_weighs_layers_by_decay_and_scale(photo) -> None:
    from gradleak.attacks.optimisation.engine import _Objective

    _, view = photo
    replay = ClientReplay(view, unroll=False, functional=False)
    settings = preset("bn-statistics")
    terms = _Objective(settings, view, replay, torch.device("cpu")).bn
    assert len(terms) == 20  # resnet18: stem, 16 in the blocks, 3 shortcuts
    assert [t.weight_mean for t in terms] == pytest.approx([0.85**i for i in range(20)])
    assert [t.weight_var for t in terms] == [t.weight_mean for t in terms]
    revealed = replay.revealed_bn_stats()
    for t in terms:
        assert t.scale_mean == pytest.approx(float(revealed[t.name][1].sqrt().norm()), rel=1e-6)
        assert t.scale_var == pytest.approx(float(revealed[t.name][1].norm()), rel=1e-6)
    plain = _Objective(preset("gradinversion"), view, replay, torch.device("cpu")).bn
    # NVFlare's term: a plain sum
    assert all(t.scale_mean == t.scale_var == t.weight_mean == 1.0 for t in plain)


def test_coarse_scales_move_the_low_frequencies_further_per_step(photo) -> None:
    _, view = photo

    def first_step(scales: int) -> torch.Tensor:
        rec = GradientInversion(
            preset(
                "bn-statistics", scales=scales, iterations=1, restarts=1, warmup=0, schedule="none"
            )
        ).run(view, seed=0)
        return rec.examples - rec.start

    low = {k: F.avg_pool2d(first_step(k), 8).norm() for k in (0, 3)}
    assert low[3] > 2 * low[0]


def test_feature_inversion_brings_the_classifier_input_to_the_revealed_one(photo) -> None:
    from gradleak.attacks.exact.analytic import linear_input

    client, view = photo
    w, b = view.classifier()
    pg = view.pseudo_gradient()
    target = linear_input(pg[w], pg[b])
    replay = ClientReplay(view, unroll=False, functional=False, features=True)

    def feature_error(weight: float) -> float:
        rec = GradientInversion(
            preset("bn-statistics", features=weight, bn=0.0, iterations=100, restarts=1)
        ).run(view, seed=0)
        x = normalize(rec.examples, view.spec.mean, view.spec.std)
        with torch.no_grad():
            f = replay.simulate(x, torch.zeros(1, 8), update=False).features
        return float((f.flatten() - target).norm() / target.norm())

    assert feature_error(1.0) < 0.5 * feature_error(0.0)


def test_the_forward_only_replay_gives_the_same_statistics(photo) -> None:
    client, view = photo
    replay = ClientReplay(view, unroll=False, functional=False, features=True)
    x = normalize(client.data.examples, view.spec.mean, view.spec.std)
    y = F.one_hot(client.data.targets, 8).float()
    full, light = replay.simulate(x, y), replay.simulate(x, y, update=False)
    assert light.update is None and full.update is not None
    for name, (mean, var) in full.stats[0].items():
        assert torch.equal(light.stats[0][name][0], mean) and torch.equal(
            light.stats[0][name][1], var
        )
    assert torch.equal(light.features, full.features)


def test_unrolled_steps_without_matching_keep_every_statistic_exact() -> None:
    # 4 images in batches of 2: the second step runs at the weights the first one left.
    client, view = _view(n=4, bs=2, width=4, model="resnet20")
    replay = ClientReplay(view, unroll=True, functional=False)
    x = normalize(client.data.examples, MEAN, STD).requires_grad_()
    y = F.one_hot(client.data.targets, 10).float()
    full, light = replay.simulate(x, y), replay.simulate(x, y, update=False)
    assert light.update is None and len(light.stats) == len(full.stats) == 2
    for a, b in zip(full.stats, light.stats, strict=True):
        for name in a:
            torch.testing.assert_close(b[name][0], a[name][0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b[name][1], a[name][1], rtol=1e-5, atol=1e-6)
    # Both still reach the images; only the path through the first step's weight change differs.
    name = next(iter(light.stats[1]))
    (g_light,) = torch.autograd.grad(light.stats[1][name][1].sum(), x, retain_graph=True)
    (g_full,) = torch.autograd.grad(full.stats[1][name][1].sum(), x)
    assert (
        g_light[2:].abs().sum() > 0 and torch.count_nonzero(g_light[:2]) == 0
    )  # batch 2's own images
    assert (
        torch.count_nonzero(g_full[:2]) > 0
    )  # the full replay also sees batch 1 through the weights


def test_an_eval_mode_update_is_matched_by_inverting_gradients() -> None:
    client, view = _view(seed=1, width=8, batch_norm="eval")
    assert view.bn_mode == "eval"
    # the paper's attack alone (no feature or statistics term): the replay's matching is judged
    paper = preset("inverting-gradients", iterations=300, features=0.0, bn=0.0)
    rec = GradientInversion(paper).run(view, seed=0)
    assert rec.match_scores[0] < 0.01  # final 1 - cosine: the replay normalises as the client did
    # The train-mode replay of the same update cannot match it.
    import dataclasses

    forced = dataclasses.replace(view, meta=dataclasses.replace(view.meta, bn_mode="train"))
    wrong = GradientInversion(paper).run(forced, seed=0)
    assert wrong.match_scores[0] > 10 * rec.match_scores[0]


def test_bn_statistics_refuse_an_eval_mode_update_before_any_work() -> None:
    _, view = _view(batch_norm="eval")
    with pytest.raises(
        ConfigError, match="attack.bn: the client ran its batch-norm layers in eval mode"
    ):
        GradientInversion(preset("bn-statistics")).run(view)


def test_inverting_gradients_uses_the_statistics_only_where_they_moved() -> None:
    # The preset's statistics term (bn_if_revealed) on a train-mode update: it changes the result;
    # with the running statistics withheld (all changes zero) it is dropped, and the attack is the
    # one without it, to the bit.
    import dataclasses

    _, view = _view(seed=2, width=4)
    withheld = dataclasses.replace(
        view,
        update={k: (torch.zeros_like(v) if "running" in k else v) for k, v in view.update.items()},
    )

    def run(v: ServerView, **over) -> torch.Tensor:
        return (
            GradientInversion(preset("inverting-gradients", iterations=15, **over))
            .run(v, seed=0)
            .examples
        )

    assert not torch.equal(run(view), run(view, bn=0.0))
    assert torch.equal(run(withheld), run(withheld, bn=0.0))
