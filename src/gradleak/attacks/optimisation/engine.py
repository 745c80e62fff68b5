"""The one optimisation engine behind DLG, iDLG, Inverting Gradients and GradInversion.

Per restart, the objective is ``match_weight * D(simulated update, real update)`` (the weight
optionally decaying over the iterations, ``match_schedule``) plus what else the server knows: the
batch-norm statistics the buffers reveal, the classifier's input where the update reveals it, and
image priors. All restarts run as one batch (``torch.func.vmap``); the restart with the lowest
final objective is returned.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from gradleak.attacks.base import Progress, Reconstruction, ServerView
from gradleak.attacks.exact.analytic import batch_linear_inputs, checked_linear_input
from gradleak.attacks.exact.labels import recover_labels
from gradleak.attacks.optimisation.adaptive import Adaptation
from gradleak.attacks.optimisation.replay import ClientReplay, Replayed
from gradleak.attacks.optimisation.settings import AttackSettings, without_statistics
from gradleak.errors import ConfigError
from gradleak.fl.update import UpdateMismatch


def total_variation(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Anisotropic total variation of N x C x H x W images (mean over pixels)."""
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    if kind == "l1":
        return dx.abs().mean() + dy.abs().mean()
    return dx.pow(2).mean() + dy.pow(2).mean()


# Updates are compared in chunks of at least this many elements: consecutive small tensors are
# concatenated (one fused kernel instead of many small ones: LeNet's update is one chunk), large
# ones stand alone (on an 11M-parameter ResNet-18, concatenating the whole update cost a third of an
# iteration; benchmarks/attacks.py throughput).
CHUNK_ELEMENTS = 1 << 20


def chunks(
    tensors: list[torch.Tensor], weights: list[float | torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """Flat chunks of the tensors, in order, each tensor scaled by its weight (a number, or a
    tensor of its shape: one weight per coordinate; None: all 1)."""
    out: list[torch.Tensor] = []
    run: list[torch.Tensor] = []
    size = 0
    for i, t in enumerate(tensors):
        flat = t.reshape(-1)
        if weights is not None:
            w = weights[i]
            flat = flat * (w.reshape(-1) if isinstance(w, torch.Tensor) else w)
        run.append(flat)
        size += flat.numel()
        if size >= CHUNK_ELEMENTS:
            out.append(torch.cat(run) if len(run) > 1 else run[0])
            run, size = [], 0
    if run:
        out.append(torch.cat(run) if len(run) > 1 else run[0])
    return out


class UpdateDistance:
    """Distance of simulated updates to one real update, both given tensor by tensor, tensor k
    weighted by ``weights[k]`` (a number, or one per coordinate; None: all 1):

    - ``l2``: ``sum_k w_k |s_k - t_k|^2``;  ``l1``: ``sum_k w_k |s_k - t_k|_1``;
    - ``cosine``: ``1 - <s, t>_w / (|s|_w |t|_w)`` with ``<s, t>_w = sum_k w_k <s_k, t_k>``.

    With ``bounds`` (per tensor, the lower and upper bound of what each received value stands for,
    as a quantisation's cells), ``t`` is the point of the bounds nearest the simulated update,
    ``clamp(s, lower, upper)``: only the distance outside the cells counts.

    The target's chunks (and its norm) are prepared once; each call chunks the simulated update.
    """

    def __init__(
        self,
        target: list[torch.Tensor],
        weights: list[float | torch.Tensor] | None,
        kind: str,
        bounds: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.kind = kind
        # fold the weights into the tensors: their square roots for the quadratic forms
        self.scale = (
            None if weights is None else (weights if kind == "l1" else [_sqrt(w) for w in weights])
        )
        self.bounds = None
        if bounds is not None:  # weights are >= 0, so clamping commutes with the scaling
            self.bounds = (
                chunks([lo.detach() for lo, _ in bounds], self.scale),
                chunks([hi.detach() for _, hi in bounds], self.scale),
            )
        self.target = chunks([t.detach() for t in target], self.scale)
        self.target_norm = math.sqrt(sum(float(torch.dot(t, t)) for t in self.target))

    def __call__(self, sim: list[torch.Tensor]) -> torch.Tensor:
        sims = chunks(sim, self.scale)
        targets = self.target
        if self.bounds is not None:
            targets = [
                torch.minimum(torch.maximum(s, lo), hi)
                for s, lo, hi in zip(sims, *self.bounds, strict=True)
            ]
        parts = zip(sims, targets, strict=True)
        if self.kind == "l2":
            return sum(F.mse_loss(s, t, reduction="sum") for s, t in parts)
        if self.kind == "l1":
            return sum(F.l1_loss(s, t, reduction="sum") for s, t in parts)
        dot, ss, tt = 0.0, 0.0, 0.0
        for s, t in parts:
            dot, ss = dot + torch.dot(s, t), ss + torch.dot(s, s)
            if self.bounds is not None:
                tt = tt + torch.dot(t, t)
        t_norm = tt.sqrt() if self.bounds is not None else self.target_norm
        return 1 - dot / (ss.sqrt() * t_norm).clamp_min(1e-12)


def _sqrt(w: float | torch.Tensor) -> float | torch.Tensor:
    return w.sqrt() if isinstance(w, torch.Tensor) else math.sqrt(w)


def distance(
    sim: list[torch.Tensor], target: list[torch.Tensor], weights: list[float] | None, kind: str
) -> torch.Tensor:
    """``UpdateDistance(target, weights, kind)(sim)``, for a single comparison."""
    return UpdateDistance(target, weights, kind)(sim)


def lr_factor(settings: AttackSettings) -> Callable[[int], float]:
    """The learning-rate multiplier at each iteration for the chosen schedule."""
    t_max, warm = settings.iterations, settings.warmup
    if settings.schedule == "step":
        marks = [t_max * 3 // 8, t_max * 5 // 8, t_max * 7 // 8]
        return lambda t: 0.1 ** sum(t >= m for m in marks)
    if settings.schedule == "cosine":
        return lambda t: (
            (t + 1) / warm
            if t < warm
            else 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, t_max - warm)))
        )
    return lambda t: 1.0


def match_factor(settings: AttackSettings) -> Callable[[int], float]:
    """The matching weight's multiplier at each iteration (``match_schedule``)."""
    if settings.match_schedule == "cosine":
        return lambda t: 0.5 * (1 + math.cos(math.pi * t / settings.iterations))
    return lambda t: 1.0


EVAL_MODE_PROBLEM = (
    "the client ran its batch-norm layers in eval mode, so its update reveals no batch statistics, "
    "and "
    "match_weight is 0: nothing ties the images to the update (use inverting-gradients or "
    "gradinversion)"
)


# -- CPU convolution back end ----------------------------------------------------------------------

# oneDNN costs ~0.2 ms per convolution call whatever its size, several times PyTorch's native
# kernels on tiny inputs, but it is 2x faster on ResNet-sized ones (benchmarks/attacks.py
# throughput). With ``conv_backend: auto`` it is on when the model's convolutions take more than
# this many multiply-adds per image (the sigmoid LeNet at 32 x 32: 0.7 M; the width-16 convnet:
# 2.8 M; resnet18 at width 16: 35 M). The rule reads only shapes, so results never depend on timing.
ONEDNN_MIN_MACS = 10_000_000


def conv_macs(model: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Multiply-adds of the model's ``nn.Conv*`` layers for one image (a forward pass on zeros)."""
    total = 0

    def count(module: nn.Module, _: tuple, out: torch.Tensor) -> None:
        nonlocal total
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        total += out.numel() * per_output

    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    handles = [m.register_forward_hook(count) for m in convs]
    was_training = model.training
    try:
        if convs:
            with torch.no_grad():
                model.eval()(torch.zeros(1, *image_shape, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


@contextmanager
def _onednn(enabled: bool) -> Iterator[None]:
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def batch_norm_layers(view: ServerView) -> list[str]:
    """Names of the model's batch-norm layers, in the model's order."""
    return [
        n for n, m in view.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def statistics_unmoved(view: ServerView) -> bool:
    """Whether the update carries batch-norm running statistics and none of them changed
    (withheld by a defence, or the client ran batch norm in eval mode): nothing of the client's
    data is in them."""
    stats = [
        f"{layer}.{kind}"
        for layer in batch_norm_layers(view)
        for kind in ("running_mean", "running_var")
        if f"{layer}.{kind}" in view.update
    ]
    return bool(stats) and not any(bool(view.update[n].any()) for n in stats)


# -- the image parameterisation --------------------------------------------------------------------


class _Images:
    """The optimised variables and the images they make: a full-resolution image plus ``scales``
    coarser levels (1/2, 1/4, ... resolution) upsampled bilinearly; all R x N x C x H x W."""

    def __init__(self, z0: torch.Tensor, scales: int, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.base = z0.clone().requires_grad_(True)
        r, n, c, h, w = z0.shape
        self.levels = [
            torch.zeros(
                r, n, c, max(1, h >> k), max(1, w >> k), device=z0.device, requires_grad=True
            )
            for k in range(1, scales + 1)
        ]
        self.lo, self.hi = lo, hi

    @property
    def variables(self) -> list[torch.Tensor]:
        return [self.base, *self.levels]

    def _coarse(self) -> torch.Tensor | float:
        r, n, c, h, w = self.base.shape
        out: torch.Tensor | float = 0.0
        for level in self.levels:
            up = F.interpolate(
                level.reshape(r * n, c, *level.shape[-2:]),
                size=(h, w),
                mode="bilinear",
                align_corners=False,
            )
            out = out + up.reshape(r, n, c, h, w)
        return out

    def images(self) -> torch.Tensor:
        return self.base + self._coarse() if self.levels else self.base

    @torch.no_grad()
    def project(self) -> None:
        """Keep every image inside the box: clamp the full-resolution part around the coarse
        ones."""
        if not self.levels:
            self.base.clamp_(min=self.lo, max=self.hi)
            return
        coarse = self._coarse()
        self.base.copy_(torch.maximum(torch.minimum(self.base, self.hi - coarse), self.lo - coarse))


# -- the objective ---------------------------------------------------------------------------------


class StatisticsTerm(NamedTuple):
    """One batch-norm layer's part of the statistics term: the statistics the update reveals, the
    scales its two distances are divided by, and their weights (the layer decay, times the share
    of signal under known noise for an adaptive attack)."""

    name: str
    mean: torch.Tensor
    var: torch.Tensor
    scale_mean: float
    scale_var: float
    weight_mean: float
    weight_var: float


class _Objective:
    """The objective of one restart, ``(images, labels) -> (total, matching term)``, vmap-able."""

    def __init__(
        self,
        s: AttackSettings,
        view: ServerView,
        replay: ClientReplay,
        dev: torch.device,
        adaptation: Adaptation | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        """``adaptation``: the known defences (an adaptive attack); None: the update is taken at
        face value."""
        self.s, self.replay = s, replay
        self.match_weight = s.match_weight  # the current (scheduled) weight, set by the loop
        self.names = view.parameter_names
        self.matching = s.match_weight > 0
        if self.matching:
            pg = view.pseudo_gradient()
            target = [pg[n].to(dev) for n in self.names]
            weights: list[float | torch.Tensor] | None = self._layer_weights(len(self.names))
            bounds = None
            if adaptation is not None:
                weights, bounds = adaptation.matching(
                    self.names, target, weights, view, s.objective
                )
            self.distance = UpdateDistance(target, weights, s.objective, bounds)
        # batch-norm statistics: what the buffers reveal, per layer, with its scales and weights
        self.bn: list[StatisticsTerm] = []
        if (
            s.bn > 0
            and replay.bn_mode == "train"
            and not (s.bn_if_revealed and statistics_unmoved(view))
        ):
            revealed, kept = replay.revealed_bn_stats(), replay.kept()
            for i, (name, (mean, var)) in enumerate(revealed.items()):
                if adaptation is not None:
                    var = var.clamp_min(0)  # a variance is never negative, whatever the noise
                scale_m, scale_v = 1.0, 1.0
                if s.bn_normalize:
                    scale_m = float(var.clamp_min(0).sqrt().norm().clamp_min(1e-12))
                    scale_v = float(var.norm().clamp_min(1e-12))
                decay = s.bn_layer_decay**i
                gain_m, gain_v = (
                    adaptation.statistic_weights(name, mean.numel(), kept[name], scale_m, scale_v)
                    if adaptation is not None
                    else (1.0, 1.0)
                )
                self.bn.append(
                    StatisticsTerm(
                        name, mean, var, scale_m, scale_v, decay * gain_m, decay * gain_v
                    )
                )
        # feature inversion: the classifier's input of every image, where one step reveals it
        self.feature_target: torch.Tensor | None = None
        if s.features > 0 and replay.captures_features:
            self.feature_target = self._feature_target(view, labels)
            if self.feature_target is None:
                replay.captures_features = False
            else:
                self.feature_target = self.feature_target.to(dev)
                self.feature_scale = float(self.feature_target.pow(2).sum().clamp_min(1e-24))

    @staticmethod
    def _feature_target(view: ServerView, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The classifier's inputs, flattened in the images' order: exact from its weight and bias
        gradients for one image, and for a batch whose labels are known or recovered (None where
        the gradient does not determine them, without labels, or where a defence changed it)."""
        w_name, b_name = view.classifier()
        if {w_name, b_name} & Adaptation.of(view).changed():
            return None  # not revealed: what the solve would give is the defence's artefact
        pg = view.pseudo_gradient()
        if view.num_examples == 1:
            return checked_linear_input(pg[w_name], pg[b_name])
        if labels is None:
            return None
        found = batch_linear_inputs(
            pg[w_name],
            pg[b_name],
            view.global_state[w_name],
            view.global_state[b_name],
            labels,
        )
        return None if found is None else found.reshape(-1)

    def _layer_weights(self, count: int) -> list[float] | None:
        """Per-tensor weights of the distance (None when all are equal)."""
        if self.s.layer_weights == "equal" or count < 2:
            return None
        return [1 - 0.9 * i / (count - 1) for i in range(count)]

    def __call__(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(total, matching term) of one restart: z normalised images, y label distributions."""
        s = self.s
        out: Replayed = self.replay.simulate(z, y, update=self.matching)
        total = z.new_zeros(())
        match = z.new_zeros(())
        if self.matching:
            match = self.distance([out.update[n] for n in self.names])
            total = total + self.match_weight * match
        if s.tv:
            total = total + s.tv * total_variation(z, s.tv_kind)
        if s.l2:
            total = total + s.l2 * z.pow(2).mean()
        if self.bn:
            stats = self.replay.weighted_bn_stats(out.stats)
            bn = z.new_zeros(())
            for t in self.bn:
                mean, var = stats[t.name]
                d_m = torch.linalg.vector_norm(mean - t.mean) / t.scale_mean
                d_v = torch.linalg.vector_norm(var - t.var) / t.scale_var
                w_m, w_v = t.weight_mean, t.weight_var
                bn = bn + (w_m * (d_m + d_v) if w_m == w_v else w_m * d_m + w_v * d_v)
            total = total + s.bn * bn
        if self.feature_target is not None and out.features is not None:
            diff = out.features.reshape(-1) - self.feature_target
            total = total + s.features * diff.pow(2).sum() / self.feature_scale
        return total, match


@dataclass
class _Setup:
    """Everything one attack run needs before its loop: the objective, the variables and the
    mapping between normalised and pixel space."""

    objective: _Objective
    images: _Images
    y: torch.Tensor  # label logits (optimised) or one-hot labels, R x N x classes
    labels: torch.Tensor | None  # the recovered (or known) labels; None: optimised
    strategy: str
    x0: torch.Tensor  # starting images in pixel space, R x N x C x H x W
    mean: torch.Tensor
    std: torch.Tensor


class GradientInversion:
    """Reconstructs a client's images from its update, as configured by ``AttackSettings``.

    Images are optimised in the normalised space the model sees (as the published codes do, so
    learning rates and prior weights mean what they meant there), boxed to the range that pixels
    in [0, 1] map to, and returned de-normalised in [0, 1].
    """

    def __init__(
        self, settings: AttackSettings, name: str = "gradient-inversion", *, adaptive: bool = False
    ) -> None:
        """``adaptive``: read the view's known defences and adapt the objective to them
        (``attacks.optimisation.adaptive``); else take the update at face value (the stock
        attack)."""
        self.settings = settings
        self.name = name
        self.adaptive = adaptive
        self.wants_labels = settings.labels == "known"
        self._adaptation: Adaptation | None = None  # set on the instance that attacks one view

    # -- adapting to the known defences -------------------------------------------------------
    def adapted(self, view: ServerView) -> GradientInversion:
        """The attack as it runs on ``view``: itself (stock), or one with the settings and the
        objective that the view's known defences call for (adaptive)."""
        if not self.adaptive:
            return self
        adaptation = Adaptation.of(view)
        settings = self.settings
        if settings.bn > 0 and not adaptation.statistics_usable():
            settings = without_statistics(settings)
        out = GradientInversion(settings, self.name)
        out._adaptation = adaptation
        return out

    def adapts(self, view: ServerView) -> bool:
        """Whether the known defences make this attack differ from its stock version on ``view``
        (False for a stock attack): an audit need not run both when they are the same."""
        if not self.adaptive or not view.known_defenses:
            return False
        adaptation, s = Adaptation.of(view), self.settings
        if s.bn > 0 and adaptation.changes_statistics(view, batch_norm_layers(view)):
            return True
        return s.match_weight > 0 and adaptation.changes_matching(view.parameter_names, view)

    # -- the attack protocol ------------------------------------------------------------------
    def applies(self, view: ServerView) -> str | None:
        """Image classifiers only: the images are optimised through the model's class scores."""
        if getattr(view.spec, "kind", None) != "image":
            return f"optimises images; the examples are {getattr(view.spec, 'kind', 'unknown')}"
        try:
            view.classifier()
        except UpdateMismatch as exc:
            return str(exc)
        s = self.settings
        if not self.adaptive and s.bn > 0 and s.match_weight == 0:
            if statistics_unmoved(view):
                # Fitting "no change" would fit the global model's own statistics: what the server
                # could synthesise without any update, not this client's data.
                return (
                    "the update carries no batch-norm statistic change (withheld, or eval mode): "
                    "nothing of the client's to fit"
                )
        return None

    def refuses(self, training: Any) -> tuple[str, str] | None:
        """An update of eval-mode batch norm reveals no statistics: a preset that matches nothing
        else has nothing to work with."""
        s = self.settings
        if getattr(training, "batch_norm", "train") == "eval" and s.bn > 0 and s.match_weight == 0:
            return "audit.preset", EVAL_MODE_PROBLEM
        return None

    def _initial_images(
        self, view: ServerView, prior: torch.Tensor | None, gen: torch.Generator
    ) -> torch.Tensor:
        """Starting images in pixel space, R x N x C x H x W."""
        spec = view.spec
        s, (c, h, w) = self.settings, spec.shape
        shape = (s.restarts, view.num_examples, c, h, w)
        mean = torch.tensor(spec.mean).view(1, 1, c, 1, 1)
        std = torch.tensor(spec.std).view(1, 1, c, 1, 1)
        if s.init == "uniform":
            return torch.rand(shape, generator=gen)
        if s.init == "noise":  # standard normal in the normalised space
            return mean + std * torch.randn(shape, generator=gen)
        base = (
            mean.expand(shape) if (s.init == "constant" or prior is None) else prior.expand(shape)
        )
        return base.float() + s.init_noise * std * torch.randn(shape, generator=gen)

    def uses_onednn(self, view: ServerView, device: torch.device) -> bool:
        """Whether CPU convolutions run on oneDNN (``conv_backend``; auto: by the model's size)."""
        if device.type != "cpu" or self.settings.conv_backend == "native":
            return False
        if self.settings.conv_backend == "onednn":
            return True
        return conv_macs(view.model, view.spec.shape) >= ONEDNN_MIN_MACS

    def _replay(self, view: ServerView, dev: torch.device) -> ClientReplay:
        """The client's round replayed on candidate images; refuses settings the update cannot
        serve."""
        s = self.settings
        unroll = {"always": True, "never": False, "auto": view.meta.steps > 1}[s.unroll]
        exact_features = view.meta.steps == 1 and view.classifier()[1] is not None
        replay = ClientReplay(
            view,
            unroll=unroll,
            functional=s.restarts > 1,
            device=dev,
            relu_beta=s.relu_surrogate if s.match_weight > 0 else 0.0,
            features=s.features > 0 and exact_features,
        )
        if s.bn > 0 and not replay.bn_layers and not s.bn_if_revealed:
            raise ConfigError(
                "attack.bn", "batch-norm matching needs a model with batch-norm layers"
            )
        if s.bn > 0 and s.match_weight == 0 and replay.bn_mode == "eval":
            raise ConfigError("attack.bn", EVAL_MODE_PROBLEM)
        if s.labels == "known" and view.known_labels is None:
            raise ConfigError("attack.labels", "'known' labels need labels in the server's view")
        return replay

    def _setup(
        self, view: ServerView, seed: int, prior: torch.Tensor | None, dev: torch.device
    ) -> _Setup:
        """The objective, the starting images (drawn on the CPU, so a seed gives the same start on
        any device) and the labels: recovered from the update, or optimised jointly."""
        s = self.settings
        replay = self._replay(view, dev)
        gen = torch.Generator().manual_seed(seed)
        c = view.spec.shape[0]
        mean = torch.tensor(view.spec.mean, dtype=torch.float32).view(1, 1, c, 1, 1).to(dev)
        std = torch.tensor(view.spec.std, dtype=torch.float32).view(1, 1, c, 1, 1).to(dev)
        x0 = self._initial_images(view, prior, gen)
        if s.boxed:
            x0 = x0.clamp(0, 1)
        z0 = ((x0.to(dev) - mean) / std).contiguous()
        n, k = view.num_examples, view.num_classes
        labels, strategy = (None, "optimize")
        if s.labels != "optimize":
            labels, strategy = recover_labels(view, z0[0])
        y0 = (
            torch.randn(s.restarts, n, k, generator=gen)
            if labels is None
            else F.one_hot(labels, k).float().expand(s.restarts, n, k).contiguous()
        ).to(dev)
        images = _Images(z0, s.scales, (0 - mean) / std, (1 - mean) / std)
        y = y0.clone().requires_grad_(labels is None)
        objective = _Objective(s, view, replay, dev, self._adaptation, labels)
        return _Setup(objective, images, y, labels, strategy, x0, mean, std)

    def _optimise(self, run: _Setup, progress: Progress | None, trace: list[torch.Tensor]) -> int:
        """The optimisation loop; returns the iterations done (L-BFGS stops once it stalls)."""
        s, images, y, objective = self.settings, run.images, run.y, run.objective
        optimise_labels = run.labels is None
        variables = images.variables + ([y] if optimise_labels else [])

        def evaluate() -> torch.Tensor:
            totals, _ = self._terms(run)
            loss = totals.sum()
            grads = torch.autograd.grad(loss, variables)
            for v, g in zip(variables, grads, strict=True):
                v.grad = g.sign() if (s.signed and v is not y) else g
            trace.append(totals.detach())
            return loss.detach()

        if s.optimizer == "lbfgs":
            opt: torch.optim.Optimizer = torch.optim.LBFGS(
                variables, lr=s.lr, line_search_fn="strong_wolfe"
            )
        else:
            opt = torch.optim.Adam(variables, lr=s.lr, fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(s))
        match_at = match_factor(s)
        stalled, previous, done = 0, math.inf, 0
        for it in range(s.iterations):
            done = it + 1
            objective.match_weight = s.match_weight * match_at(it)
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
                images.project()
            if progress is not None:
                progress(it + 1, float(loss))
            if not math.isfinite(float(loss)):
                break
        objective.match_weight = s.match_weight * match_at(s.iterations)
        return done

    def _terms(self, run: _Setup) -> tuple[torch.Tensor, torch.Tensor]:
        """(total, matching term) of every restart: one ``vmap`` batch, or one plain call."""
        optimise_labels = run.labels is None

        def per_restart(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return run.objective(z, F.softmax(y, dim=-1) if optimise_labels else y)

        z = run.images.images()
        if self.settings.restarts > 1:
            return vmap(per_restart)(z, run.y)
        total, match = per_restart(z[0], run.y[0])
        return total[None], match[None]

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
        start from with ``init: prior`` (the dataset's mean colour when absent)."""
        attack = self.adapted(view)
        return attack._run(view, seed=seed, prior=prior, progress=progress, device=device)

    def _run(
        self,
        view: ServerView,
        *,
        seed: int,
        prior: torch.Tensor | None,
        progress: Progress | None,
        device: torch.device | str,
    ) -> Reconstruction:
        start = time.perf_counter()
        dev = torch.device(device)
        trace: list[torch.Tensor] = []
        run = self._setup(view, seed, prior, dev)
        with _onednn(self.uses_onednn(view, dev)) if dev.type == "cpu" else nullcontext():
            done = self._optimise(run, progress, trace)
            totals, matches = self._terms(run)
        totals = totals.detach()
        scores = torch.where(torch.isfinite(totals), totals, torch.full_like(totals, math.inf))
        best = int(scores.argmin())
        final_labels = (
            run.labels if run.labels is not None else run.y.detach()[best].argmax(-1).cpu()
        )
        z = run.images.images().detach()
        return Reconstruction(
            examples=(z[best : best + 1] * run.std + run.mean)[0].clamp(0, 1).cpu(),
            labels=final_labels,
            label_strategy=run.strategy,
            start=run.x0[best].clamp(0, 1),
            restart_scores=[float(v) for v in scores],
            match_scores=[float(v) for v in matches.detach()],
            trace=[float(t[best]) for t in trace],
            iterations=done,
            seconds=time.perf_counter() - start,
        )
