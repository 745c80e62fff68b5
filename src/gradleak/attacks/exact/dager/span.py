"""Input spans of linear layers, recovered from their weight gradients.

For a linear map y = W x applied to the tokens of a batch, the weight gradient is
sum_t delta_t x_t^T: its row space lies in span{x_t}, and equals it when the batch has fewer
tokens than the layer has input features (DAGER's core observation). This module builds an
orthonormal basis of that span in float64 and measures how far candidate inputs lie from it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = ["Span", "default_rank_margin", "input_space_gradient"]

_TINY = 1e-300
# Singular values within this factor of the noise floor's bound count as noise.
NOISE_MARGIN = 2.0


def default_rank_margin(dim: int) -> int:
    """How many dimensions below full a span must stay to be usable.

    DAGER cuts at d - 20 for d = 768-4096. Small spaces (LoRA ranks, the d = 64-128 models in
    tests) get a proportional margin instead, so that a 32-dimensional LoRA space is not declared
    saturated by 16 tokens.
    """
    return int(min(20, max(4, dim // 8)))


def input_space_gradient(grad: Tensor, *, weight_is_in_out: bool) -> Tensor:
    """Orient a weight gradient as (out, in), so that its row space is the input span.

    nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out) and needs a transpose.
    """
    return grad.T if weight_is_in_out else grad


@dataclass(frozen=True)
class Span:
    """Orthonormal basis of the span of a layer's inputs, with a distance test.

    Attributes:
        basis: (dim, rank) float64, orthonormal columns spanning the inputs.
        complement: (dim, dim - rank) float64, orthonormal basis of the orthogonal complement.
        singular_values: all singular values of the stacked gradient, descending.
        transform: optional (dim, in_features) map applied to candidates first (LoRA's A matrix:
            the LoRA B gradient spans {A x}, not {x}).
        name: where the span came from (module path), for diagnostics.
        numerical_rank: singular values above the tolerance (``rank`` may be lower, see
            ``truncated``).
        directions: (dim, dim) all right singular vectors, so that ``truncated`` needs no SVD.
    """

    basis: Tensor
    complement: Tensor
    singular_values: Tensor
    transform: Tensor | None
    name: str
    numerical_rank: int
    directions: Tensor

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])

    @classmethod
    def from_gradients(
        cls,
        grads: list[Tensor],
        *,
        rel_tol: float = 1e-5,
        transform: Tensor | None = None,
        name: str = "",
        noise: list[float] | None = None,
    ) -> Span:
        """Basis of the common input span of gradients already oriented as (out, in).

        Each gradient is scaled to unit Frobenius norm before stacking so that a small one (the
        query's, at random init) is not lost under the tolerance of a large one. Singular values
        below ``rel_tol`` x the largest are dropped, and below the noise floor when ``noise``
        gives each gradient's per-entry error (the rounding of an update sent in float32: an
        entry-wise error of std sigma puts the singular values of an m x n noise matrix below
        about sigma (sqrt(m) + sqrt(n))). Non-finite gradients give an empty span.
        """
        mats, floor = [], 0.0
        for i, g in enumerate(grads):
            g = g.detach().to(torch.float64).cpu()
            norm = torch.linalg.matrix_norm(g)
            if torch.isfinite(norm) and norm > 0:
                mats.append(g / norm)
                if noise is not None:
                    floor = max(floor, float(noise[i]) / float(norm))
        dim = int(grads[0].shape[1]) if transform is None else int(transform.shape[0])
        if not mats:
            eye = torch.eye(dim, dtype=torch.float64)
            return cls(eye[:, :0], eye, eye[0, :0], _t64(transform), name, 0, eye)
        stacked = torch.cat(mats, dim=0)
        if stacked.shape[0] < dim:  # pad so that the reduced SVD still returns a full V
            stacked = torch.cat([stacked, stacked.new_zeros(dim - stacked.shape[0], dim)])
        elif stacked.shape[0] > dim:  # same singular values and V from the square R factor
            stacked = torch.linalg.qr(stacked, mode="r").R
        rows = sum(m.shape[0] for m in mats)
        _, s, vh = torch.linalg.svd(stacked, full_matrices=False)
        cut = max(
            rel_tol * float(s[0]) if s.numel() else 0.0,
            NOISE_MARGIN * floor * (rows**0.5 + dim**0.5),
        )
        numerical = int((s >= cut).sum()) if s.numel() and s[0] > 0 else 0
        v = vh.T.contiguous()
        return cls(
            v[:, :numerical].contiguous(),
            v[:, numerical:].contiguous(),
            s,
            _t64(transform),
            name,
            numerical,
            v,
        )

    def truncated(self, rank: int) -> Span:
        """The span of the ``rank`` leading singular directions.

        Used when the numerical rank is near full but fewer tokens got a gradient (known from
        the protocol): after several local steps, or under noise, the trailing directions are
        drift and noise, and the leading ones still approximate the inputs at the global weights.
        """
        v = self.directions
        return replace(self, basis=v[:, :rank].contiguous(), complement=v[:, rank:].contiguous())

    def distances(
        self, candidates: Tensor, *, chunk_size: int = 4096, refine_below: float = 0.1
    ) -> Tensor:
        """Normalised distance of each candidate row to the span.

        distance(x) = || x/|x| - P x/|x| ||, in [0, 1]: about 1e-7..1e-5 for true inputs of a
        one-step gradient, 1e-1 and more for vectors unrelated to the batch. All rows are
        screened in float32 (2.5x faster on a 50k vocabulary), and every distance below
        ``refine_below`` is recomputed in float64 from the explicit residual, so the small
        distances that decide acceptance are exact to ~1e-15 while the large ones, used only to
        measure the gap, are within ~1e-4 relative. Chunked over rows so that a 50k-token
        vocabulary at d = 768 stays within a few hundred MB.
        """
        out = torch.empty(candidates.shape[0], dtype=torch.float64)
        use_complement = self.complement.shape[1] <= self.rank
        for start in range(0, candidates.shape[0], chunk_size):
            rows = candidates[start : start + chunk_size].detach()
            x = rows.to(torch.float32)
            if self._transform32 is not None:
                x = x @ self._transform32.T
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
            if use_complement:
                d = (x @ self._complement32).norm(dim=1)
            else:
                d = (1.0 - (x @ self._basis32).pow(2).sum(dim=1)).clamp_min(0.0).sqrt()
            d = d.to(torch.float64)
            small = d < refine_below
            if small.any():
                d[small] = self._exact(rows[small])
            out[start : start + rows.shape[0]] = d
        return out

    def explained(self, states: Tensor, *, rel_tol: float = 1e-6) -> float:
        """Share of the gradient's energy that the span of ``states`` accounts for, in [0, 1].

        A certificate for a recovery: the gradient is sum delta x^T over the batch's inputs, so
        when ``states`` are the inputs of the recovered sequences the share is ~1 for a complete
        recovery, about the recovered fraction for a partial one, and small for wrong text or
        when noise carries most of the energy. Uses the stored SVD: ||G P||^2 = sum_i s_i^2
        |P v_i|^2.
        """
        if states.numel() == 0 or self.singular_values.numel() == 0:
            return 0.0
        x = states.detach().to(torch.float64).reshape(-1, states.shape[-1])
        if self.transform is not None:
            x = x @ self.transform.T
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        keep = s > rel_tol * s[0] if s.numel() and s[0] > 0 else s > 0
        onb = vh[keep].T  # (dim, r) orthonormal basis of the states' span
        sv = self.singular_values
        k = sv.numel()
        proj = (self.directions[:, :k].T @ onb).pow(2).sum(dim=1)  # |P v_i|^2
        return float((sv.pow(2) * proj).sum() / sv.pow(2).sum().clamp_min(1e-300))

    def _exact(self, rows: Tensor) -> Tensor:
        x = rows.to(torch.float64)
        if self.transform is not None:
            x = x @ self.transform.T
        x = x / x.norm(dim=1, keepdim=True).clamp_min(_TINY)
        return (x - (x @ self.basis) @ self.basis.T).norm(dim=1)

    def __post_init__(self) -> None:
        # float32 copies for screening; a frozen dataclass needs object.__setattr__.
        object.__setattr__(self, "_basis32", self.basis.to(torch.float32))
        object.__setattr__(self, "_complement32", self.complement.to(torch.float32))
        t32 = None if self.transform is None else self.transform.to(torch.float32)
        object.__setattr__(self, "_transform32", t32)


def _t64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float64).cpu()
