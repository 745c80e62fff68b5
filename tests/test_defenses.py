"""Defences against independent computations: adaptive sigma, clipping, sparsity, quantisation,
epsilon."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradleak.data.dataset import Dataset
from gradleak.data.partition import ClientData
from gradleak.defenses import (
    AdaptiveGaussian,
    BatchNormStatsLocal,
    DPGaussian,
    GaussianNoise,
    GroupGaussian,
    LaplaceNoise,
    Prune,
    Quantize,
)
from gradleak.defenses.dp import epsilon
from gradleak.fl.filters import FilterContext
from gradleak.fl.update import ClientUpdate, UpdateMeta


def _update(seed: int = 0) -> ClientUpdate:
    g = torch.Generator().manual_seed(seed)
    delta = {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g) * 0.01,
        "conv.bias": torch.zeros(8),  # all zero: excluded from the percentile
        "fc.weight": torch.randn(10, 32, generator=g) * 0.02,
        "bn.running_mean": torch.randn(8, generator=g),
        "bn.num_batches_tracked": torch.tensor(3),
    }
    return ClientUpdate(
        delta,
        UpdateMeta(1, 2, 4, 0.1, 1, 1, 4),
        frozenset({"bn.running_mean", "bn.num_batches_tracked"}),
    )


def _ctx(round: int = 2, participation: int = 2) -> FilterContext:
    data = Dataset(torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long))
    return FilterContext(
        round=round,
        client=ClientData(1, data, 1),
        global_state={},
        seed=7,
        participation=participation,
    )


def test_adaptive_sigma_is_sigma0_times_the_95th_percentile_of_nonzero_values() -> None:
    u, ctx = _update(), _ctx()
    out = AdaptiveGaussian(sigma0=3.0).build(index=0, sample_rate=1.0)(u, ctx)
    values = np.concatenate(
        [u.delta[k].numpy().ravel() for k in ("conv.weight", "conv.bias", "fc.weight")]
    )
    expected = 3.0 * np.percentile(np.abs(values[values != 0]), 95)
    assert out.record["noise_scale"] == pytest.approx(expected, rel=1e-6)  # float32 values
    noise = torch.cat(
        [
            (out.update.delta[k] - u.delta[k]).flatten()
            for k in ("conv.weight", "conv.bias", "fc.weight")
        ]
    )
    assert float(noise.std()) == pytest.approx(expected, rel=0.1)
    # Buffers are untouched by default; counters always.
    assert torch.equal(out.update.delta["bn.running_mean"], u.delta["bn.running_mean"])
    assert torch.equal(
        out.update.delta["bn.num_batches_tracked"], u.delta["bn.num_batches_tracked"]
    )
    inc = AdaptiveGaussian(sigma0=3.0, include_buffers=True).build(index=0, sample_rate=1.0)(
        u, _ctx()
    )
    assert not torch.equal(inc.update.delta["bn.running_mean"], u.delta["bn.running_mean"])
    assert torch.equal(
        inc.update.delta["bn.num_batches_tracked"], u.delta["bn.num_batches_tracked"]
    )


def test_noise_is_seeded_per_round_and_client_and_leaves_the_input() -> None:
    u = _update()
    f = GaussianNoise(sigma=0.1).build(index=0, sample_rate=1.0)
    a, b, c = f(u, _ctx(round=2)), f(u, _ctx(round=2)), f(u, _ctx(round=3))
    assert torch.equal(a.update.delta["fc.weight"], b.update.delta["fc.weight"])
    assert not torch.equal(a.update.delta["fc.weight"], c.update.delta["fc.weight"])
    assert torch.equal(u.delta["fc.weight"], _update().delta["fc.weight"])
    zero = AdaptiveGaussian(sigma0=0.0).build(index=0, sample_rate=1.0)(u, _ctx())
    assert zero.update is u


def test_laplace_noise_has_the_laplace_spread() -> None:
    big = ClientUpdate({"w": torch.zeros(200_000)}, UpdateMeta(1, 1, 1, 0.1, 1, 1, 1))
    out = LaplaceNoise(scale=0.5).build(index=0, sample_rate=1.0)(big, _ctx())
    x = out.update.delta["w"].double()
    assert float(x.abs().mean()) == pytest.approx(0.5, rel=0.02)  # E|X| = b
    assert float(x.std()) == pytest.approx(0.5 * math.sqrt(2), rel=0.02)


def test_dp_gaussian_clips_to_the_norm_and_zeroes_buffers() -> None:
    u, ctx = _update(), _ctx()
    params = ("conv.weight", "conv.bias", "fc.weight")
    norm = math.sqrt(sum(float(u.delta[k].double().pow(2).sum()) for k in params))
    clip = norm / 4
    out = DPGaussian(clip=clip, noise_multiplier=0.0).build(index=0, sample_rate=1.0)(u, ctx)
    clipped = math.sqrt(sum(float(out.update.delta[k].double().pow(2).sum()) for k in params))
    assert clipped == pytest.approx(clip, rel=1e-6)
    assert torch.allclose(out.update.delta["fc.weight"], u.delta["fc.weight"] / 4, atol=1e-7)
    assert out.record["dp_norm_before_clip"] == pytest.approx(norm)
    assert float(out.update.delta["bn.running_mean"].abs().sum()) == 0.0
    assert math.isinf(out.record["dp_epsilon"])
    small = DPGaussian(clip=10 * norm, noise_multiplier=0.0).build(index=0, sample_rate=1.0)(
        u, _ctx()
    )
    assert torch.equal(
        small.update.delta["fc.weight"], u.delta["fc.weight"]
    )  # under the bound: unchanged


def test_dp_epsilon_matches_opacus_own_computation() -> None:
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    ctx = _ctx(round=12, participation=9)
    out = DPGaussian(clip=1.0, noise_multiplier=1.3, delta=1e-5).build(index=0, sample_rate=0.5)(
        _update(), ctx
    )
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=0.5, noise_multiplier=1.3, steps=9, orders=orders)
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert out.record["dp_epsilon"] == pytest.approx(eps, rel=1e-9)
    assert epsilon(1.3, 0.5, 18, 1e-5) > out.record["dp_epsilon"]  # more rounds, more epsilon


def test_dp_noise_has_the_calibrated_scale() -> None:
    big = ClientUpdate({"w": torch.zeros(100_000)}, UpdateMeta(1, 1, 1, 0.1, 1, 1, 1))
    out = DPGaussian(clip=2.0, noise_multiplier=0.5).build(index=0, sample_rate=1.0)(big, _ctx())
    assert float(out.update.delta["w"].std()) == pytest.approx(1.0, rel=0.02)  # 0.5 x 2


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_pruning_zeroes_the_smallest_fraction_of_each_tensor(sparsity) -> None:
    u, ctx = _update(), _ctx()
    out = Prune(sparsity=sparsity).build(index=0, sample_rate=1.0)(u, ctx)
    w, pw = u.delta["fc.weight"].numpy().ravel(), out.update.delta["fc.weight"].numpy().ravel()
    k = int(sparsity * w.size)
    assert int((pw == 0).sum()) == k
    kept = np.abs(w[pw != 0])
    if k:
        assert kept.min() >= np.sort(np.abs(w))[k - 1]
    assert np.array_equal(pw[pw != 0], w[pw != 0])
    assert torch.equal(out.update.delta["bn.running_mean"], u.delta["bn.running_mean"])


def test_quantisation_against_numpy() -> None:
    u = _update()
    q8 = Quantize(format="int8").build(index=0, sample_rate=1.0)(u, _ctx())
    w = u.delta["fc.weight"].numpy()
    scale = np.abs(w).max() / 127
    np.testing.assert_allclose(
        q8.update.delta["fc.weight"].numpy(), np.round(w / scale) * scale, rtol=1e-6
    )
    assert len(np.unique(q8.update.delta["fc.weight"].numpy())) <= 255
    q16 = Quantize(format="fp16").build(index=0, sample_rate=1.0)(u, _ctx())
    np.testing.assert_array_equal(
        q16.update.delta["fc.weight"].numpy(), w.astype(np.float16).astype(np.float32)
    )


def test_two_filters_of_a_kind_record_apart() -> None:
    ctx = _ctx()
    first = GaussianNoise(sigma=0.1).build(index=0, sample_rate=1.0)(_update(), ctx)
    second = GaussianNoise(sigma=0.2).build(index=1, sample_rate=1.0)(first.update, ctx)
    assert first.record == {"noise_scale": 0.1} and second.record == {"noise_scale_1": 0.2}


# -- per-group noise and batch-norm statistics kept from the server ---------------------------


def _grouped_update(seed: int = 0) -> ClientUpdate:
    """An update with every group: conv weights, batch-norm affine and statistics, a counter, and
    a classifier, each of its own magnitude."""
    g = torch.Generator().manual_seed(seed)
    delta = {
        "conv.weight": torch.randn(16, 3, 3, 3, generator=g) * 1e-3,
        "bn.weight": torch.randn(16, generator=g) * 1e-2,
        "bn.bias": torch.randn(16, generator=g) * 2e-2,
        "bn.running_mean": torch.randn(16, generator=g) * 0.3,
        "bn.running_var": torch.randn(16, generator=g) * 0.5,
        "bn.num_batches_tracked": torch.tensor(1),
        "fc.weight": torch.randn(10, 64, generator=g) * 5e-2,
        "fc.bias": torch.randn(10, generator=g) * 0.1,
    }
    buffers = frozenset({"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"})
    return ClientUpdate(delta, UpdateMeta(1, 2, 4, 0.1, 1, 1, 4), buffers)


GROUP_MEMBERS = {
    "weights": ("conv.weight",),
    "bn-affine": ("bn.weight", "bn.bias"),
    "bn-stats": ("bn.running_mean", "bn.running_var"),
    "classifier": ("fc.weight", "fc.bias"),
}


def test_group_gaussian_scales_each_group_by_its_own_percentile() -> None:
    u = _grouped_update()
    multipliers = {"bn-stats": 2.0, "classifier": 0.5}
    f = GroupGaussian(sigma0=3.0, percentile=90, groups=multipliers).build(index=0, sample_rate=1)
    out = f(u, _ctx())
    for group, names in GROUP_MEMBERS.items():
        values = np.concatenate([u.delta[k].numpy().ravel() for k in names])
        expected = 3.0 * np.percentile(np.abs(values), 90) * multipliers.get(group, 1.0)
        field = f"noise_scale_{group.replace('-', '_')}"
        assert out.record[field] == pytest.approx(expected, rel=1e-6)
        noise = torch.cat([(out.update.delta[k] - u.delta[k]).flatten() for k in names]).double()
        if noise.numel() > 100:  # enough draws to estimate the spread
            assert float(noise.std()) == pytest.approx(expected, rel=0.15)
        assert float(noise.abs().max()) > 0
    assert torch.equal(
        out.update.delta["bn.num_batches_tracked"], u.delta["bn.num_batches_tracked"]
    )
    (known,) = out.known  # what the server is told: each tensor's scale
    stds = known.stds()
    assert stds["bn.running_var"] == pytest.approx(out.record["noise_scale_bn_stats"])
    assert stds["fc.bias"] == pytest.approx(out.record["noise_scale_classifier"])
    assert "bn.num_batches_tracked" not in stds
    clean = GroupGaussian(sigma0=3.0, groups={"weights": 0}).build(index=1, sample_rate=1)(
        u, _ctx()
    )
    assert torch.equal(clean.update.delta["conv.weight"], u.delta["conv.weight"])
    assert clean.record["noise_scale_weights_1"] == 0.0  # the second filter's fields are suffixed


def test_group_gaussian_finds_the_groups_of_a_real_model() -> None:
    from gradleak.defenses.base import parameter_groups
    from gradleak.images import ImageSpec
    from gradleak.models import build_model

    model = build_model(
        "resnet18", spec=ImageSpec.square(1, 16), num_classes=10, kwargs={"width": 4}
    )
    state = model.state_dict()
    buffers = frozenset(n for n, _ in model.named_buffers())
    groups = parameter_groups(ClientUpdate(dict(state), UpdateMeta(1, 1, 1, 0.1, 1, 1, 1), buffers))
    bn = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for name in state:
        layer, _, leaf = name.rpartition(".")
        if leaf == "num_batches_tracked":
            assert name not in groups
        elif leaf in ("running_mean", "running_var"):
            assert groups[name] == "bn-stats"
        elif layer in bn:
            assert groups[name] == "bn-affine"
        elif layer == "fc":
            assert groups[name] == "classifier"
        else:
            assert groups[name] == "weights", name


def test_bn_stats_local_sends_no_statistic_change() -> None:
    u = _grouped_update()
    out = BatchNormStatsLocal().build(index=0, sample_rate=1)(u, _ctx())
    for k in ("bn.running_mean", "bn.running_var"):
        assert not out.update.delta[k].any()
        assert u.delta[k].any()  # the input is left as it was
    for k in ("conv.weight", "bn.weight", "fc.weight", "bn.num_batches_tracked"):
        assert torch.equal(out.update.delta[k], u.delta[k])
    assert out.known[0].mode == "local" and out.record["bn_stats_withheld"] == "local"


def test_bn_stats_secure_sum_hides_each_client_and_aggregates_the_mean() -> None:
    """No client's statistic change reaches the server's view, and the global statistics after the
    round are the sample-weighted mean of the clients' own changes (computed here from each
    client's training alone)."""
    from gradleak.attacks import ServerView
    from gradleak.fl import FedAvg, LocalTraining, train_client
    from gradleak.fl.simulator import Simulator
    from gradleak.fl.tasks import Classification
    from gradleak.images import ImageSpec
    from gradleak.models import build_model

    spec = ImageSpec((1, 8, 8), (0.5,), (0.25,))
    torch.manual_seed(0)
    model = build_model("convnet", spec=spec, num_classes=3, kwargs={"width": 4})
    state0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    clients = [
        ClientData(cid, Dataset(torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 3), 4)
        for cid, n in ((1, 4), (2, 12))
    ]
    training = LocalTraining(lr=0.1)
    seen: list = []

    class Hooks:
        def round_started(self, round, clients) -> None:  # noqa: ANN001
            pass

        def client_done(self, result) -> None:  # noqa: ANN001
            seen.append(result.update)

        def round_done(self, result, state) -> None:  # noqa: ANN001
            pass

    sim = Simulator(
        model=model,
        clients=clients,
        test=clients[0].data,
        spec=spec,
        task=Classification(),
        strategy=FedAvg(),
        training=training,
        seed=0,
        filters=[BatchNormStatsLocal(mode="secure-sum").build(index=0, sample_rate=1)],
    )
    final = sim.run(dict(state0), first_round=1, last_round=1, hooks=Hooks())
    stats = [k for k in state0 if k.endswith(("running_mean", "running_var"))]
    raw = [
        train_client(
            model, state0, c, round=1, settings=training, spec=spec, task=Classification(), seed=0
        )[0]
        for c in clients
    ]
    for k in stats:
        expected = state0[k].double() + (4 * raw[0].delta[k] + 12 * raw[1].delta[k]).double() / 16
        assert torch.allclose(final[k].double(), expected, rtol=0, atol=1e-6)
        assert raw[0].delta[k].any()
    for update in seen:
        view = ServerView.of(model, state0, update, spec=spec, num_classes=3)
        assert all(not view.update[k].any() for k in stats)
        assert update.secure == frozenset(stats)
    # the marking survives the update's file format (a resumed run reads it back)
    again = ClientUpdate.from_bytes(seen[0].to_bytes(), "update")
    assert again.secure == seen[0].secure and not again.sent()[stats[0]].any()


def test_bn_stats_secure_sum_is_refused_where_updates_travel_in_clear() -> None:
    from gradleak.errors import ConfigError
    from gradleak.experiments.config import validate_config
    from gradleak.experiments.engines import check_config

    raw = {
        "data": {"source": "digits", "image_size": 8},
        "partition": {"scheme": "explicit", "clients": [{"size": 4, "batch_size": 2}] * 2},
        "defenses": [{"name": "bn-stats-local", "mode": "secure-sum"}],
        "engine": {"name": "flower"},
    }
    with pytest.raises(ConfigError, match="defenses.0"):
        check_config(validate_config(raw), 2)
    check_config(validate_config({**raw, "engine": {"name": "inprocess"}}), 2)
