"""Cocktail Party Attack (Kariyappa et al., ICML 2023) on a fully connected layer.

The weight gradient of a fully connected layer is ``dW = D X^T``: every row is a mixture of
the B inputs with unknown coefficients.  CPA treats the rows as microphones and the inputs as
speakers: whiten the rows to B dimensions, then find the unmixing that makes the outputs
maximally non-Gaussian (FastICA, log-cosh contrast), refined with the paper's image priors
(total variation, and a mutual-independence penalty that keeps the outputs distinct).

ICA leaves each output's sign and scale free.  When the layer has a bias, ``db = D 1`` fixes
both: with ``X_hat = diag(1/a) X`` recovered, ``dW X_hat^+ = D diag(a)`` and solving
``db = (D diag(a)) (1/a)`` gives a (least squares over the neurons).

Scope: the first layer must be fully connected with at least B neurons (B <= neurons <= pixels);
for a convolutional first layer the paper inverts an FC layer's input features and then needs a
separate feature-inversion step, which is not implemented here.  Matching outputs to the
originals is the evaluator's job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from gradleak.attacks.exact.linalg import Tensorish, as_f64, range_finder_svd

Contrast = Literal["exp", "logcosh"]


@dataclass(frozen=True)
class CPAResult:
    """Recovered inputs (B x d, float64, arbitrary order) and run statistics."""

    inputs: torch.Tensor
    scale_fixed: bool
    ica_iterations: int
    converged: bool
    seconds: float
    reason: str


def _sym_decorrelate(w: np.ndarray) -> np.ndarray:
    """``(W W^T)^{-1/2} W``: the nearest matrix with orthonormal rows."""
    evals, evecs = np.linalg.eigh(w @ w.T)
    return (evecs / np.sqrt(np.maximum(evals, 1e-300))) @ evecs.T @ w


def _contrast(wz: np.ndarray, contrast: Contrast) -> tuple[np.ndarray, np.ndarray]:
    """First and second derivative of the FastICA contrast function at ``wz``."""
    if contrast == "logcosh":
        t = np.tanh(wz)
        return t, 1.0 - t**2
    e = np.exp(-0.5 * wz**2)
    return wz * e, (1.0 - wz**2) * e


def fast_ica(
    z: np.ndarray, contrast: Contrast = "exp", max_iter: int = 400, tol: float = 1e-7, seed: int = 0
) -> tuple[np.ndarray, int, bool]:
    """Symmetric FastICA on whitened rows ``z`` (k x samples).

    ``contrast``: "exp" (G = -exp(-u^2/2), robust for the heavy-tailed image derivatives; it
    gave higher SSIM here) or "logcosh" (the usual default).  Returns an orthogonal
    unmixing matrix U (k x k), the iterations used and whether it converged.
    """
    k, n = z.shape
    u = _sym_decorrelate(np.random.default_rng(seed).standard_normal((k, k)))
    for it in range(1, max_iter + 1):
        g1, g2 = _contrast(u @ z, contrast)
        u_new = _sym_decorrelate(g1 @ z.T / n - np.diag(g2.mean(axis=1)) @ u)
        change = float(np.max(np.abs(np.abs(np.einsum("ij,ij->i", u_new, u)) - 1.0)))
        u = u_new
        if change < tol:
            return u, it, True
    return u, max_iter, False


def _derivatives(rows: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """Horizontal and vertical differences of each row seen as an image, concatenated."""
    imgs = rows.reshape(len(rows), *image_shape)
    dx = np.diff(imgs, axis=-1).reshape(len(rows), -1)
    dy = np.diff(imgs, axis=-2).reshape(len(rows), -1)
    return np.hstack([dx, dy])


def _total_variation(imgs: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV per image of a (k, c, h, w) stack."""
    dx = (imgs[..., :, 1:] - imgs[..., :, :-1]).abs().mean(dim=(1, 2, 3))
    dy = (imgs[..., 1:, :] - imgs[..., :-1, :]).abs().mean(dim=(1, 2, 3))
    return dx + dy


def refine_with_priors(
    z: np.ndarray,
    to_pixels: np.ndarray,
    u0: np.ndarray,
    image_shape: tuple[int, ...],
    steps: int = 100,
    tv_weight: float = 0.05,
    mi_weight: float = 1.0,
    lr: float = 2e-3,
) -> np.ndarray:
    """Refine the unmixing U with CPA's objective, maximising over U

    ``mean_i negentropy(u_i z) - tv_weight * mean_i TV(img_i)/std(img_i)
    - mi_weight * mean_{i!=j} cos^2(u_i, u_j)``

    where z is the whitened (derivative) data, img_i = u_i @ to_pixels the pixel-domain
    output and negentropy uses the "exp" contrast.  Returns U with unit rows.
    """
    zt, pt = torch.from_numpy(z), torch.from_numpy(to_pixels)
    u = torch.nn.Parameter(torch.from_numpy(u0.copy()))
    opt = torch.optim.Adam([u], lr=lr)
    k = u0.shape[0]
    eye = torch.eye(k, dtype=torch.float64)
    g_ref = -1.0 / np.sqrt(2.0)  # E[-exp(-v^2/2)] for a standard normal v
    for _ in range(steps):
        opt.zero_grad()
        un = u / u.norm(dim=1, keepdim=True)
        negentropy = ((-torch.exp(-0.5 * (un @ zt) ** 2)).mean(dim=1) - g_ref) ** 2
        img = (un @ pt).reshape(k, *image_shape)
        tv = _total_variation(img) / img.reshape(k, -1).std(dim=1)
        mi = ((un @ un.T - eye) ** 2).sum() / (k * (k - 1))
        loss = -negentropy.mean() * 1e3 + tv_weight * tv.mean() + mi_weight * mi
        loss.backward()
        opt.step()
    with torch.no_grad():
        return _sym_decorrelate((u / u.norm(dim=1, keepdim=True)).numpy())


def cocktail_party_attack(
    grad_weight: Tensorish,
    batch_size: int,
    grad_bias: Tensorish | None = None,
    image_shape: tuple[int, ...] | None = (3, 32, 32),
    contrast: Contrast = "exp",
    prior_steps: int = 0,
    seed: int = 0,
) -> CPAResult:
    """Unmix the B inputs of a fully connected layer from its weight gradient.

    ``grad_weight``: (neurons x d) gradient of the layer's weight.  ``grad_bias`` (optional)
    fixes each output's sign and scale; without it outputs have unit variance and the sign
    that makes their mean non-negative.  ``image_shape`` enables the TV prior (set None for
    non-image inputs, or ``prior_steps=0`` for plain FastICA).
    """
    start = time.monotonic()
    g = as_f64(grad_weight)
    b = int(batch_size)
    if not b <= min(g.shape):
        raise ValueError(f"batch size {b} exceeds min(neurons, inputs) = {min(g.shape)}")
    low = range_finder_svd(g, b, seed=seed)
    y = low.vt  # B x d, spans the inputs exactly
    # Unmix image derivatives: filtering commutes with mixing, and derivatives of natural
    # images are far more non-Gaussian (sparse) than their pixel values.
    yf = _derivatives(y, image_shape) if image_shape is not None else y
    yc = yf - yf.mean(axis=1, keepdims=True)
    evals, evecs = np.linalg.eigh(yc @ yc.T / yc.shape[1])
    whiten = (evecs / np.sqrt(np.maximum(evals, 1e-300))).T
    z = whiten @ yc  # white: z z^T / n = I
    u, iters, converged = fast_ica(z, contrast, seed=seed)
    if image_shape is not None and prior_steps > 0:
        u = refine_with_priors(z, whiten @ y, u, image_shape, steps=prior_steps)
    x = u @ whiten @ y  # same unmixing, applied without centring
    scale_fixed = False
    if grad_bias is not None:
        gb = as_f64(grad_bias)
        d_scaled = g @ np.linalg.pinv(x)  # = D diag(a) when x = diag(1/a) X
        inv_a, *_ = np.linalg.lstsq(d_scaled, gb, rcond=None)
        if np.all(np.abs(inv_a) > 1e-12):
            x = x / inv_a[:, None]
            scale_fixed = True
    if not scale_fixed:
        x = x * np.sign(x.mean(axis=1, keepdims=True) + 1e-300)
    reason = "ok" if converged else "FastICA hit its iteration limit"
    return CPAResult(
        torch.from_numpy(x), scale_fixed, iters, converged, time.monotonic() - start, reason
    )
