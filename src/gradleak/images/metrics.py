"""Image similarity on images in [0, 1]: MSE, PSNR, SSIM, each per image pair.

The inputs are de-normalised images (N x C x H x W); they are clamped to [0, 1] first, so that a
reconstruction is never rewarded for values no image can hold.
"""

from __future__ import annotations

import numpy as np
import torch

from gradleak.modality import Metric
from gradleak.resources import check_fits


def _prep(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim != 4:
        raise ValueError(f"expected N x C x H x W images, got shape {tuple(a.shape)}")
    return a.detach().double().clamp(0, 1), b.detach().double().clamp(0, 1)


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image pair (N,)."""
    a, b = _prep(a, b)
    return (a - b).pow(2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image pair (N,), peak 1; identical images give inf."""
    return 10 * torch.log10(1.0 / mse(a, b))


# The Gaussian window of Wang et al. (2004), as scikit-image builds it: sigma 1.5, truncated at 3.5
# sigma (11 taps), reflected at the borders ("reflect": d c b a | a b c d).
SIGMA, TRUNCATE = 1.5, 3.5
K1, K2 = 0.01, 0.03
# Image pairs filtered at once.
BATCH = 128


def _filter_matrix(n: int, dtype: torch.dtype) -> torch.Tensor:
    """The n x n matrix of scipy.ndimage.gaussian_filter1d(sigma 1.5, truncate 3.5, mode "reflect")
    on a line of n pixels: row i holds the window's weights at the (reflected) pixels it reads."""
    r = int(TRUNCATE * SIGMA + 0.5)
    t = np.arange(-r, r + 1)
    w = np.exp(-0.5 * (t / SIGMA) ** 2)
    w /= w.sum()
    source = np.pad(np.arange(n), r, mode="symmetric")  # reflect, repeatedly on short lines
    m = np.zeros((n, n))
    for i in range(n):
        np.add.at(m[i], source[i : i + 2 * r + 1], w)
    return torch.from_numpy(m).to(dtype)


def _gaussian_filter(x: torch.Tensor) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter(x, 1.5, truncate=3.5, mode="reflect") over the last two axes of
    every image and channel at once, as two matrix products (separable)."""
    *lead, h, w = x.shape
    mh = _filter_matrix(h, x.dtype).to(x.device)
    mw = _filter_matrix(w, x.dtype).to(x.device)
    y = (x.reshape(-1, w) @ mw.T).reshape(
        *lead, h, w
    )  # along rows: one product for the whole batch
    return (y.transpose(-1, -2).reshape(-1, h) @ mh.T).reshape(*lead, w, h).transpose(-1, -2)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image pair (N,): scikit-image's SSIM with the Gaussian window of
    Wang et al. (sigma 1.5, population covariance), data range 1, averaged over channels; the map's
    border of half the window (the largest odd window that fits, on images under 11 pixels) is left
    out of the mean. Computed for the whole batch at once (tested against scikit-image)."""
    a, b = _prep(a, b)
    side = min(a.shape[-2:])
    win = 11 if side >= 11 else side - (1 - side % 2)
    if win < 1:
        raise ValueError(f"images of {side} pixels are too small for SSIM")
    if len(a) > BATCH:  # bounded memory: the filter holds five float64 copies of what it is given
        return torch.cat(
            [ssim(a[i : i + BATCH], b[i : i + BATCH]) for i in range(0, len(a), BATCH)]
        )
    ux, uy, uxx, uyy, uxy = _gaussian_filter(torch.stack([a, b, a * a, b * b, a * b]))
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = K1**2, K2**2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (win - 1) // 2
    h, w = s.shape[-2:]
    return s[..., pad : h - pad, pad : w - pad].mean(dim=(2, 3)).mean(dim=1)


# Rows of the cost matrix computed at once (bounds the temporary products).
CHUNK = 256


def distances(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """``out[i, j]`` = mean squared error of ``recon[i]`` and ``truth[j]`` (pixels clamped to
    [0, 1]), R x M, from ``|a|^2 + |b|^2 - 2 a.b`` row chunk by row chunk, the product in float32
    (it only ranks the pairs; the metrics are computed in float64 on the pairs chosen). Its
    memory is checked before it is allocated."""
    r, m = len(recon), len(truth)
    d = int(np.prod(truth.shape[1:]))
    check_fits(
        8 * r * m + 4 * (2 * CHUNK * max(m, d) + m * d),
        f"matching {r} reconstructions to {m} originals",
        "audit.clients",
        "audit clients with smaller batches",
    )
    b = truth.detach().reshape(m, d).float().clamp(0, 1)
    bb = b.double().pow(2).sum(1)
    out = torch.empty(r, m, dtype=torch.float64)
    for lo in range(0, r, CHUNK):
        a = recon[lo : lo + CHUNK].detach().reshape(-1, d).float().clamp(0, 1)
        out[lo : lo + CHUNK] = (
            a.double().pow(2).sum(1)[:, None] + bb[None] - 2 * (a @ b.T).double()
        ).clamp_min(0) / d
    return out


METRICS = {
    "ssim": Metric("ssim", ssim, higher_is_better=True),
    "psnr": Metric("psnr", psnr, higher_is_better=True),
    "mse": Metric("mse", mse, higher_is_better=False),
}
