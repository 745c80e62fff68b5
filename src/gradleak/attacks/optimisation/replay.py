"""The client's local training, replayed differentiably on candidate images.

The model runs through ``torch.func.functional_call`` and each step's gradient keeps its graph
(``create_graph`` with plain autograd for a single restart, ``torch.func.grad`` when restarts are
batched with ``vmap``), so the simulated update is a function of the candidate images through every
local step: the matching term reaches the images (unlike NVFlare's GradInversion, whose simulated
update is computed from detached tensors).

Batch-norm layers run as the client's did (``ServerView.bn_mode``): in train mode they normalise
with batch statistics, which the replay captures per layer and step (the update's running-statistic
deltas reveal their momentum-weighted mean); in eval mode they normalise with the global model's
running statistics, and the buffers reveal nothing.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_

from gradleak.attacks.base import ServerView
from gradleak.attacks.optimisation.surrogate import surrogate_relu
from gradleak.fl.client import set_batch_norm_mode

Stats = dict[
    str, tuple[torch.Tensor, torch.Tensor]
]  # layer name -> (batch mean, unbiased batch var)


@dataclass(frozen=True)
class BatchNormLayer:
    name: str
    momentum: float | None  # None: a cumulative average (PyTorch's momentum=None)


@dataclass(frozen=True)
class Replayed:
    """What one replay of the client's round yields for candidate images."""

    update: dict[str, torch.Tensor] | None  # pseudo-gradient per parameter (None: not computed)
    stats: list[Stats]  # batch-norm statistics of every local step (train mode only)
    features: torch.Tensor | None  # the classifier's input in the first step (when asked for)


class ClientReplay:
    """Simulates one client's round from the global weights on candidate (images, soft labels)."""

    def __init__(
        self,
        view: ServerView,
        *,
        unroll: bool,
        functional: bool,
        device: torch.device | str = "cpu",
        relu_beta: float = 0.0,
        features: bool = False,
    ) -> None:
        """``functional``: gradients by ``torch.func.grad`` (needed under ``vmap``), else by
        ``torch.autograd.grad(create_graph=True)``, which has less overhead per operation.
        ``relu_beta > 0``: ReLUs get a surrogate second derivative (``attacks.surrogate``).
        ``features``: capture the classifier's input (``Replayed.features``); setting
        ``captures_features`` to False later stops the capture."""
        self.view = view
        self.relu_beta = relu_beta
        self.unroll = unroll
        self.functional = functional
        self.bn_mode = view.bn_mode
        self.device = torch.device(device)
        model = copy.deepcopy(view.model).train()
        bn = {
            n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        }
        self.bn_layers = [BatchNormLayer(n, m.momentum) for n, m in bn.items()]
        self.buffers: dict[str, torch.Tensor] = {}
        if self.bn_mode == "train":
            for name, module in bn.items():
                module.register_forward_pre_hook(functools.partial(self._capture, name))
            replace_all_batch_norm_modules_(
                model
            )  # batch statistics only, no in-place buffer updates
        else:  # running statistics of the global model, read-only
            set_batch_norm_mode(model, "eval")
            self.buffers = {n: view.global_state[n].to(self.device) for n in view.buffer_names}
        self.captures_features = features
        self._features: list[torch.Tensor] | None = None
        if features:
            weight, _ = view.classifier()
            head = model.get_submodule(weight.rpartition(".")[0])
            head.register_forward_pre_hook(self._capture_features)
        self.model = model.to(device)
        self.params = {
            # detach(): a new tensor, so the view's own weights are never marked or changed
            n: view.global_state[n].detach().float().to(device).requires_grad_(not functional)
            for n in view.parameter_names
        }
        self._stats: Stats | None = None

    # captures during the forward pass --------------------------------------------------------
    def _capture(self, name: str, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if self._stats is not None:
            x = inputs[0]
            dims = [0, *range(2, x.ndim)]
            self._stats[name] = (x.mean(dims), x.var(dims, unbiased=True))

    def _capture_features(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if self._features is not None:
            self._features.append(inputs[0])

    # batch-norm statistics -------------------------------------------------------------------
    def _step_weights(self, layer: BatchNormLayer) -> tuple[list[float], float]:
        """(w_k, keep) with running_K = keep * running_0 + sum_k w_k * stat_k over the K local
        steps, from the layer's momentum (or, for a cumulative average, the global step count)."""
        k_steps = self.view.meta.steps
        if layer.momentum is None:
            n0 = float(self.view.global_state[f"{layer.name}.num_batches_tracked"])
            momenta = [1.0 / (n0 + k) for k in range(1, k_steps + 1)]
        else:
            momenta = [float(layer.momentum)] * k_steps
        weights, keep = [], 1.0
        for m in reversed(momenta):
            weights.append(m * keep)
            keep *= 1 - m
        return weights[::-1], keep

    def kept(self) -> dict[str, float]:
        """Per batch-norm layer, the share of the global running statistics that the client's
        steps kept (``keep`` of ``_step_weights``): a revealed statistic is the running one's
        change divided by 1 - keep."""
        return {layer.name: self._step_weights(layer)[1] for layer in self.bn_layers}

    def revealed_bn_stats(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per batch-norm layer, the momentum-weighted mean of the client's per-step batch
        statistics, exactly as its running-statistic deltas reveal it (train mode only):
        ``(running_K - keep * running_0) / (1 - keep)``; one step gives that step's statistics."""
        out = {}
        for layer in self.bn_layers:
            _, keep = self._step_weights(layer)
            pair = []
            for buf in ("running_mean", "running_var"):
                key = f"{layer.name}.{buf}"
                g = self.view.global_state[key].float().to(self.device)
                u = self.view.update[key].float().to(self.device)
                pair.append((g + u - keep * g) / (1 - keep))
            out[layer.name] = (pair[0], pair[1])
        return out

    def weighted_bn_stats(self, steps: list[Stats]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The replay's counterpart of ``revealed_bn_stats``: its per-step statistics, weighted
        alike."""
        out = {}
        for layer in self.bn_layers:
            weights, keep = self._step_weights(layer)
            mean = sum(w * s[layer.name][0] for w, s in zip(weights, steps, strict=True)) / (
                1 - keep
            )
            var = sum(w * s[layer.name][1] for w, s in zip(weights, steps, strict=True)) / (
                1 - keep
            )
            out[layer.name] = (mean, var)
        return out

    def running_stat_deltas(self, steps: list[Stats]) -> dict[str, torch.Tensor]:
        """The buffer deltas that the replayed steps produce (what the client's update holds)."""
        out = {}
        for layer in self.bn_layers:
            weights, keep = self._step_weights(layer)
            for j, buf in enumerate(("running_mean", "running_var")):
                key = f"{layer.name}.{buf}"
                r0 = self.view.global_state[key].float().to(self.device)
                r = keep * r0 + sum(
                    w * s[layer.name][j] for w, s in zip(weights, steps, strict=True)
                )
                out[key] = r - r0
        return out

    # the replay ------------------------------------------------------------------------------
    def _forward(
        self, params: dict[str, torch.Tensor], x: torch.Tensor
    ) -> tuple[torch.Tensor, Stats]:
        self._stats = {}
        with surrogate_relu(self.relu_beta):
            logits = functional_call(self.model, {**params, **self.buffers}, (x,))
        stats, self._stats = self._stats, None
        return logits, stats

    def _loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        logits, stats = self._forward(params, x)
        loss = -(y * F.log_softmax(logits, dim=-1)).sum(-1).mean()
        return loss, stats

    def _step_grad(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        keep_graph: bool = True,
    ):
        """(gradient of the step's loss per parameter, the step's statistics). ``keep_graph``:
        the gradient stays a differentiable function of the images; else it is a constant."""
        if self.functional:
            g, stats = grad(self._loss, has_aux=True)(params, x, y)
            return (g if keep_graph else {k: v.detach() for k, v in g.items()}), stats
        if keep_graph:
            loss, stats = self._loss(params, x, y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        else:  # first order: fresh leaves, and the graph kept for the statistics' backward
            leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
            loss, stats = self._loss(leaves, x, y)
            grads = [
                g.detach()
                for g in torch.autograd.grad(loss, list(leaves.values()), retain_graph=True)
            ]
        return dict(zip(params, grads, strict=True)), stats

    def simulate(self, x: torch.Tensor, y: torch.Tensor, *, update: bool = True) -> Replayed:
        """Replay the client's round on ``x`` (normalised candidate images, N x C x H x W) with
        label distributions ``y`` (N x classes).

        Without unrolling, one gradient on all images. Unrolled: the client's SGD steps (its
        learning rate, momentum, batch size and epochs, batches taken in order), and the
        pseudo-gradient ``-(w_K - w_0) / lr``.

        ``update=False`` (when nothing matches the update): no pseudo-gradient. One step is then a
        forward pass for the statistics and features alone. Unrolled steps still move the weights
        exactly as the client's did, but each step's weight change is taken as a constant of the
        images: every step's statistics stay exact functions of its own batch, and only their
        second-order dependence on earlier batches (through lr x gradient) is left out of the
        attack's derivative, which saves the double backward.
        """
        self._features = [] if self.captures_features else None
        try:
            if not self.unroll:
                if not update:
                    _, stats = self._forward(self.params, x)
                    return Replayed(None, [stats], self._first_features())
                g, stats = self._step_grad(self.params, x, y)
                return Replayed(g, [stats], self._first_features())
            meta = self.view.meta
            p, velocity, all_stats = dict(self.params), None, []
            n, bs = len(x), meta.batch_size
            for _ in range(meta.epochs):
                for s in range(0, n, bs):
                    g, stats = self._step_grad(p, x[s : s + bs], y[s : s + bs], keep_graph=update)
                    all_stats.append(stats)
                    if meta.momentum:
                        velocity = (
                            g
                            if velocity is None
                            else {k: meta.momentum * velocity[k] + g[k] for k in g}
                        )
                        g = velocity
                    p = {k: p[k] - meta.lr * g[k] for k in p}
            pseudo = {k: (self.params[k] - p[k]) / meta.lr for k in p} if update else None
            return Replayed(pseudo, all_stats, self._first_features())
        finally:
            self._features = None

    def _first_features(self) -> torch.Tensor | None:
        return self._features[0] if self._features else None
