"""A reference reimplementation, in plain torch, of the reconstruction loop of inversefed (Geiping
et al., "Inverting Gradients", NeurIPS 2020; github.com/JonasGeiping/invertinggradients,
``inversefed/reconstruction_algorithms.py``, ``GradientReconstructor``), for one gradient with
known labels: the benchmarks measure gradleak's engine against it on the same update. It is not
part of gradleak.

What it reproduces, as the original's config keys: ``cost_fn='sim'`` (one minus the cosine between
the trial and the target gradient over all parameters), ``indices='def'`` and ``weights='equal'``
(every parameter tensor, equally weighted), ``optim='adam'`` with ``signed=True`` (Adam on the sign
of the image gradient), ``lr_decay=True`` (MultiStepLR, x0.1 at ``max_iterations // 2.667``,
``// 1.6`` and ``// 1.142``), ``boxed=True`` (the normalised images clamped after every step to the
range of pixels in [0, 1]), ``init='randn'`` (standard normal in the normalised space, unclamped),
``filter='none'``, anisotropic TV (mean absolute differences over the whole batch) weighted by
``total_variation``, the model in eval mode unless ``eval=False`` (the original's
``reconstruct(..., eval=...)``), restarts one after the other and ``scoring_choice='loss'``: the
restart with the lowest final matching cost (without TV) wins.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


def _tv(x: torch.Tensor) -> torch.Tensor:
    return (x[:, :, :, :-1] - x[:, :, :, 1:]).abs().mean() + (
        x[:, :, :-1, :] - x[:, :, 1:, :]
    ).abs().mean()


def _cost(trial: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    dot = sum((a * b).sum() for a, b in zip(trial, target, strict=True))
    norm_a = sum(a.pow(2).sum() for a in trial)
    norm_b = sum(b.pow(2).sum() for b in target)
    return 1 - dot / norm_a.sqrt() / norm_b.sqrt()


@dataclass(frozen=True)
class Result:
    images: torch.Tensor  # N x C x H x W, normalised (the original's output)
    cost: float  # the chosen restart's final matching cost
    seconds: float  # wall clock
    cpu_seconds: float  # this process's CPU time


def reconstruct(
    model: nn.Module,
    gradient: list[torch.Tensor],
    labels: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    shape: tuple[int, int, int],
    lr: float = 0.1,
    max_iterations: int = 4800,
    total_variation: float = 1e-6,
    restarts: int = 1,
    eval: bool = True,
    seed: int = 0,
) -> Result:
    """Images whose gradient (``model``'s parameters, in order; cross-entropy averaged over the
    batch) matches ``gradient``; ``mean``/``std``: C x 1 x 1, the normalisation the model sees."""
    start, cpu = time.perf_counter(), time.process_time()
    model.train(not eval)
    params = list(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    lo, hi = -mean / std, (1 - mean) / std
    x = torch.randn((restarts, len(labels), *shape), generator=torch.Generator().manual_seed(seed))
    scores = torch.zeros(restarts)
    for trial in range(restarts):
        x_trial = x[trial].clone().requires_grad_(True)
        opt = torch.optim.Adam([x_trial], lr=lr)
        marks = [max_iterations // 2.667, max_iterations // 1.6, max_iterations // 1.142]
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=marks, gamma=0.1)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            grads = torch.autograd.grad(loss_fn(model(x_trial), labels), params, create_graph=True)
            loss = _cost(list(grads), gradient)
            if total_variation > 0:
                loss = loss + total_variation * _tv(x_trial)
            loss.backward()
            x_trial.grad.sign_()
            return loss

        for _ in range(max_iterations):
            opt.step(closure)
            sched.step()
            with torch.no_grad():
                x_trial.data = torch.max(torch.min(x_trial, hi), lo)
        x[trial] = x_trial.detach()
        grads = torch.autograd.grad(loss_fn(model(x[trial]), labels), params)
        scores[trial] = float(_cost(list(grads), gradient))
    scores = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, torch.inf))
    best = int(scores.argmin())
    return Result(
        x[best], float(scores[best]), time.perf_counter() - start, time.process_time() - cpu
    )
