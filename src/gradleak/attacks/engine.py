"""The one optimisation engine behind DLG, iDLG, Inverting Gradients and GradInversion.

Per restart, the objective is ``match_weight * D(simulated update, real update) + priors`` (the
weight optionally decaying over the iterations, ``match_schedule``); all restarts run as one batch
(``torch.func.vmap``) and their images are optimised together. The restart with the lowest final
matching loss is returned.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.func import vmap

from gradleak.attacks.labels import recover_labels
from gradleak.attacks.settings import AttackSettings
from gradleak.attacks.simulate import ClientReplay
from gradleak.attacks.view import Reconstruction, ServerView
from gradleak.errors import ConfigError

Progress = Callable[[int, float], None]


def total_variation(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Anisotropic total variation of N x C x H x W images (mean over pixels)."""
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    if kind == "l1":
        return dx.abs().mean() + dy.abs().mean()
    return dx.pow(2).mean() + dy.pow(2).mean()


def distance(
    sim: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None, kind: str
) -> torch.Tensor:
    """Distance of two flattened updates, optionally weighted per element (None: all ones)."""
    w = weights if weights is not None else 1.0
    if kind == "l2":
        return (w * (sim - target).pow(2)).sum()
    if kind == "l1":
        return (w * (sim - target).abs()).sum()
    dot = (w * sim * target).sum()
    norms = (w * sim.pow(2)).sum().sqrt() * (w * target.pow(2)).sum().sqrt()
    return 1 - dot / norms.clamp_min(1e-12)


def lr_factor(settings: AttackSettings) -> Callable[[int], float]:
    """The learning-rate multiplier at each iteration for the chosen schedule."""
    t_max, warm = settings.iterations, settings.warmup
    if settings.schedule == "step":
        marks = [t_max * 3 // 8, t_max * 5 // 8, t_max * 7 // 8]
        return lambda t: 0.1 ** sum(t >= m for m in marks)
    if settings.schedule == "cosine":
        return lambda t: (t + 1) / warm if t < warm else 0.5 * (
            1 + math.cos(math.pi * (t - warm) / max(1, t_max - warm))
        )  # fmt: skip
    return lambda t: 1.0


def match_factor(settings: AttackSettings) -> Callable[[int], float]:
    """The matching weight's multiplier at each iteration (``match_schedule``)."""
    if settings.match_schedule == "cosine":
        return lambda t: 0.5 * (1 + math.cos(math.pi * t / settings.iterations))
    return lambda t: 1.0


@contextmanager
def _without_onednn() -> Iterator[None]:
    """oneDNN's convolutions cost ~0.2 ms a call on tiny inputs, several times the plain kernels.
    Batched restarts (vmap) keep it: there the inputs are larger and oneDNN is faster (LeNet, 8
    restarts: 3.3 s with it, 3.8 s without; one restart: 1.5 s with it, 1.2 s without)."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


class GradientInversion:
    """Reconstructs a client's images from its update, as configured by ``AttackSettings``.

    Images are optimised in the normalised space the model sees (as the published codes do, so
    learning rates and prior weights mean what they meant there), boxed to the range that pixels
    in [0, 1] map to, and returned de-normalised in [0, 1].
    """

    def __init__(self, settings: AttackSettings) -> None:
        self.settings = settings

    # set-up ------------------------------------------------------------------------------------
    def _initial_images(
        self, view: ServerView, prior: torch.Tensor | None, gen: torch.Generator
    ) -> torch.Tensor:
        """Starting images in pixel space, R x N x C x H x W."""
        s, (c, h, w) = self.settings, view.image_shape
        shape = (s.restarts, view.num_images, c, h, w)
        mean = torch.tensor(view.mean).view(1, 1, c, 1, 1)
        std = torch.tensor(view.std).view(1, 1, c, 1, 1)
        if s.init == "uniform":
            return torch.rand(shape, generator=gen)
        if s.init == "noise":  # standard normal in the normalised space
            return mean + std * torch.randn(shape, generator=gen)
        base = mean.expand(shape) if (s.init == "constant" or prior is None) else prior.expand(shape)
        return base.float() + s.init_noise * std * torch.randn(shape, generator=gen)

    def _weights(self, names: list[str], view: ServerView, extra: int) -> torch.Tensor | None:
        """Per-element weights of the distance (None when all are equal)."""
        sizes = [view.global_state[n].numel() for n in names]
        if self.settings.layer_weights == "equal" or len(sizes) < 2:
            return None
        per = [1 - 0.9 * i / (len(sizes) - 1) for i in range(len(sizes))]
        parts = [torch.full((n,), w) for n, w in zip(sizes, per, strict=True)]
        return torch.cat([*parts, torch.ones(extra)])

    # the attack ----------------------------------------------------------------------------------
    def run(
        self,
        view: ServerView,
        *,
        seed: int = 0,
        prior: torch.Tensor | None = None,
        progress: Progress | None = None,
        device: torch.device | str = "cpu",
    ) -> Reconstruction:
        """Attack one update. ``prior``: a 1 x C x H x W (or N x C x H x W) image in [0, 1] to
        start from with ``init: prior`` (the dataset's mean colour when absent). Starting images
        are drawn on the CPU, so a seed gives the same start on any ``device``."""
        s = self.settings
        start = time.perf_counter()
        unroll = {"always": True, "never": False, "auto": view.meta.steps > 1}[s.unroll]
        batched = s.restarts > 1
        dev = torch.device(device)
        replay = ClientReplay(view, unroll=unroll, functional=batched, device=dev, relu_beta=s.relu_surrogate)
        if s.bn > 0 and not replay.bn_layers:
            raise ConfigError("attack.bn", "batch-norm matching needs a model with batch-norm layers")
        gen = torch.Generator().manual_seed(seed)
        c = view.image_shape[0]
        mean = torch.tensor(view.mean, dtype=torch.float32).view(1, 1, c, 1, 1)
        std = torch.tensor(view.std, dtype=torch.float32).view(1, 1, c, 1, 1)
        x0 = self._initial_images(view, prior, gen)
        if s.boxed:
            x0 = x0.clamp(0, 1)
        mean, std = mean.to(dev), std.to(dev)
        lo, hi = (0 - mean) / std, (1 - mean) / std
        z0 = ((x0.to(dev) - mean) / std).contiguous()
        n, k = view.num_images, view.num_classes

        if s.labels == "known" and view.known_labels is None:
            raise ConfigError("attack.labels", "'known' labels need labels in the server's view")
        labels, strategy = (None, "optimize")
        if s.labels != "optimize":
            labels, strategy = recover_labels(view, z0[0])
        optimise_labels = labels is None
        y0 = (torch.randn(s.restarts, n, k, generator=gen) if optimise_labels
              else F.one_hot(labels, k).float().expand(s.restarts, n, k).contiguous()).to(dev)  # fmt: skip

        names = view.parameter_names
        pg = view.pseudo_gradient()
        buf_keys = [f"{l.name}.{b}" for l in replay.bn_layers for b in ("running_mean", "running_var")]
        buf_keys = buf_keys if unroll else []
        target = torch.cat([pg[nm].flatten() for nm in names]
                           + [view.update[b].float().flatten() / view.meta.lr for b in buf_keys]).to(dev)  # fmt: skip
        weights = self._weights(names, view, sum(view.update[b].numel() for b in buf_keys))
        weights = weights.to(dev) if weights is not None else None
        revealed = replay.revealed_bn_stats() if s.bn > 0 else []

        def objective(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(total, matching term) of one restart: z normalised images, y label logits/one-hot."""
            y_dist = F.softmax(y, dim=-1) if optimise_labels else y
            sim, stats = replay.simulate(z, y_dist)
            parts = [sim[nm].flatten() for nm in names]
            if buf_keys:
                deltas = replay.running_stat_deltas(stats)
                parts += [deltas[b].flatten() / view.meta.lr for b in buf_keys]
            match = distance(torch.cat(parts), target, weights, s.objective)
            total = match_weight * match
            if s.tv:
                total = total + s.tv * total_variation(z, s.tv_kind)
            if s.l2:
                total = total + s.l2 * z.pow(2).mean()
            if s.bn:
                bn = 0.0
                for i, (mu_t, var_t) in enumerate(revealed):
                    mu = torch.stack([st[i][0] for st in stats]).mean(0)
                    var = torch.stack([st[i][1] for st in stats]).mean(0)
                    bn = bn + (mu - mu_t).norm() + (var - var_t).norm()
                total = total + s.bn * bn
            return total, match

        match_weight, match_at = s.match_weight, match_factor(s)  # read by objective() when called
        z = z0.clone().requires_grad_(True)
        y = y0.clone().requires_grad_(optimise_labels)
        variables = [z, y] if optimise_labels else [z]
        trace: list[torch.Tensor] = []

        def terms() -> tuple[torch.Tensor, torch.Tensor]:
            if batched:
                return vmap(objective)(z, y)
            total, match = objective(z[0], y[0])
            return total[None], match[None]

        def evaluate() -> torch.Tensor:
            totals, _ = terms()
            loss = totals.sum()
            grads = torch.autograd.grad(loss, variables)
            for v, g in zip(variables, grads, strict=True):
                v.grad = g.sign() if (s.signed and v is z) else g
            trace.append(totals.detach())
            return loss.detach()

        with _without_onednn() if dev.type == "cpu" and not batched else nullcontext():
            if s.optimizer == "lbfgs":
                opt = torch.optim.LBFGS(variables, lr=s.lr, line_search_fn="strong_wolfe")
            else:
                opt = torch.optim.Adam(variables, lr=s.lr, fused=True)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(s))
            stalled, previous, done = 0, math.inf, 0
            for it in range(s.iterations):
                done = it + 1
                match_weight = s.match_weight * match_at(it)
                if s.optimizer == "lbfgs":
                    loss = opt.step(evaluate)
                    # L-BFGS at its tolerance returns the same loss every step: stop instead
                    stalled = stalled + 1 if float(loss) >= previous else 0
                    previous = min(previous, float(loss))
                    if stalled >= 3:
                        break
                else:
                    loss = evaluate()
                    opt.step()
                sched.step()
                if s.boxed:
                    with torch.no_grad():
                        z.clamp_(min=lo, max=hi)
                if progress is not None:
                    progress(it + 1, float(loss))
                if not math.isfinite(float(loss)):
                    break
            _, matches = terms()

        matches = matches.detach()
        scores = torch.where(torch.isfinite(matches), matches, torch.full_like(matches, math.inf))
        best = int(scores.argmin())
        final_labels = labels if labels is not None else y.detach()[best].argmax(-1).cpu()
        images = (z.detach()[best : best + 1] * std + mean)[0].clamp(0, 1).cpu()
        return Reconstruction(
            images=images,
            labels=final_labels,
            label_strategy=strategy,
            prior=x0[best].clamp(0, 1),
            restart_scores=[float(v) for v in scores],
            trace=[float(t[best]) for t in trace],
            iterations=done,
            seconds=time.perf_counter() - start,
        )
