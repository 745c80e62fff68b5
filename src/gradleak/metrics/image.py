"""Image similarity on images in [0, 1]: MSE, PSNR, SSIM, each per image pair.

The inputs are de-normalised images (N x C x H x W); they are clamped to [0, 1] first, so that a
reconstruction is never rewarded for values no image can hold.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity


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


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image pair (N,): scikit-image's SSIM with the Gaussian window of
    Wang et al. (sigma 1.5, population covariance), data range 1, averaged over channels."""
    a, b = _prep(a, b)
    an, bn = a.numpy(), b.numpy()
    side = min(a.shape[-2:])
    # The 11 x 11 window of the reference SSIM; on smaller images the largest odd window that fits.
    win = 11 if side >= 11 else side - (1 - side % 2)
    out = [
        structural_similarity(
            x, y, data_range=1.0, channel_axis=0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, win_size=win,
        )  # fmt: skip
        for x, y in zip(an, bn, strict=True)
    ]
    return torch.tensor(np.asarray(out, dtype=np.float64))


METRICS = {"mse": mse, "psnr": psnr, "ssim": ssim}
HIGHER_IS_BETTER = {"mse": False, "psnr": True, "ssim": True}
