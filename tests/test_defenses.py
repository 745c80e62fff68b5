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
    DPGaussian,
    GaussianNoise,
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
