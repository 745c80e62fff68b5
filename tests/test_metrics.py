"""Metrics against independent computations: a hand-written Gaussian SSIM, scikit-image's PSNR."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio

from gradleak.images import ImageSpec
from gradleak.images.metrics import distances, mse, psnr, ssim
from gradleak.metrics import assign, label_accuracy, score


def _reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of Wang et al. (2004) written out: Gaussian window sigma 1.5 truncated at 3.5 sigma,
    C1 = (0.01)^2, C2 = (0.03)^2 for data range 1, mean over the map without its 5-pixel border."""
    f = lambda x: gaussian_filter(x, 1.5, truncate=3.5)  # noqa: E731
    mu_a, mu_b = f(a), f(b)
    va, vb, cov = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return float(m[5:-5, 5:-5].mean())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("noise", [0.02, 0.2])
def test_ssim_matches_the_written_out_formula(seed: int, noise: float) -> None:
    rng = np.random.default_rng(seed)
    a = gaussian_filter(rng.random((32, 32)), 1.0)
    b = np.clip(a + noise * rng.standard_normal((32, 32)), 0, 1)
    got = float(ssim(torch.from_numpy(b)[None, None], torch.from_numpy(a)[None, None]))
    assert got == pytest.approx(_reference_ssim(b, a), abs=1e-6)


def test_ssim_of_colour_images_averages_channels() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 24, 24)), rng.random((3, 24, 24))
    got = float(ssim(torch.from_numpy(a)[None], torch.from_numpy(b)[None]))
    assert got == pytest.approx(np.mean([_reference_ssim(a[c], b[c]) for c in range(3)]), abs=1e-6)


@pytest.mark.parametrize(
    ("channels", "size"), [(1, 4), (1, 7), (1, 8), (3, 10), (3, 11), (1, 16), (3, 32), (1, 33)]
)
def test_ssim_equals_scikit_image_on_every_size(channels: int, size: int) -> None:
    """Against scikit-image's structural_similarity (the reference), image by image, on sizes below,
    at and above the 11-pixel window, grey and colour."""
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(size)
    a = rng.random((5, channels, size, size))
    b = np.clip(a + 0.3 * rng.standard_normal(a.shape), 0, 1)
    got = ssim(torch.from_numpy(a), torch.from_numpy(b))
    win = 11 if size >= 11 else size - (1 - size % 2)
    for i in range(5):
        ref = structural_similarity(
            a[i],
            b[i],
            data_range=1.0,
            channel_axis=0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            win_size=win,
        )
        assert float(got[i]) == pytest.approx(ref, abs=1e-10)


def test_ssim_identity_and_small_images() -> None:
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert float(ssim(x[:1], 1 - x[:1])) < 0.5


def test_psnr_and_mse_against_scikit_image() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.random((3, 1, 16, 16)), rng.random((3, 1, 16, 16))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    for i in range(3):
        assert float(psnr(ta, tb)[i]) == pytest.approx(
            peak_signal_noise_ratio(b[i], a[i], data_range=1)
        )
        assert float(mse(ta, tb)[i]) == pytest.approx(((a[i] - b[i]) ** 2).mean())


def test_metrics_clamp_to_the_unit_range() -> None:
    truth = torch.full((1, 1, 4, 4), 1.0)
    assert float(mse(torch.full((1, 1, 4, 4), 3.0), truth)) == 0.0
    with pytest.raises(ValueError, match="image shapes differ"):
        mse(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))


def test_matching_pairs_each_original_with_its_reconstruction() -> None:
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(5, 1, 16, 16, generator=g)
    perm = torch.tensor([3, 0, 4, 1, 2])
    recon = (truth[perm] + 0.05 * torch.randn(5, 1, 16, 16, generator=g)).clamp(0, 1)
    spec = ImageSpec.square(1, 16)
    idx = assign(recon, truth, spec)
    assert torch.equal(perm[torch.as_tensor(idx)], torch.arange(5))  # recon[idx[j]] is truth[j]
    s = score(recon, truth, spec)
    # Each original compared with its own reconstruction, not with the batch.
    expected = psnr(recon[torch.as_tensor(idx)], truth)
    assert torch.allclose(s.psnr, expected)
    assert float(s.psnr.mean()) > 25


def test_the_matching_cost_is_every_pair_s_mean_squared_error() -> None:
    g = torch.Generator().manual_seed(3)
    recon, truth = torch.rand(7, 3, 5, 5, generator=g), torch.rand(4, 3, 5, 5, generator=g)
    expected = torch.stack(
        [
            torch.stack([mse(recon[i : i + 1], truth[j : j + 1])[0] for j in range(4)])
            for i in range(7)
        ]
    )
    assert torch.allclose(distances(recon, truth), expected, atol=1e-6)


def test_label_accuracy_is_order_free() -> None:
    assert label_accuracy(torch.tensor([2, 1, 1]), torch.tensor([1, 2, 1])) == 1.0
    assert label_accuracy(torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2])) == pytest.approx(1 / 3)
