"""The client's local training, replayed differentiably on candidate images.

The model runs through ``torch.func.functional_call`` and each step's gradient keeps its graph
(``create_graph`` with plain autograd for a single restart, ``torch.func.grad`` when restarts are
batched with ``vmap``), so the simulated update is a function of the candidate images through every
local step: the matching term reaches the images (unlike NVFlare's GradInversion, whose simulated
update is computed from detached tensors). Batch-norm layers normalise with batch statistics, as
in client training, and their running statistics are replayed from the captured batch statistics.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_

from gradleak.attacks.surrogate import surrogate_relu
from gradleak.attacks.view import ServerView


@dataclass(frozen=True)
class BatchNormLayer:
    name: str
    momentum: float


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
    ) -> None:
        """``functional``: gradients by ``torch.func.grad`` (needed under ``vmap``), else by
        ``torch.autograd.grad(create_graph=True)``, which has less overhead per operation.
        ``relu_beta > 0``: ReLUs get a surrogate second derivative (``attacks.surrogate``)."""
        self.view = view
        self.relu_beta = relu_beta
        self.unroll = unroll
        self.functional = functional
        model = copy.deepcopy(view.model).train()
        self.bn_layers = [
            BatchNormLayer(n, m.momentum if m.momentum is not None else 0.1)
            for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.register_forward_pre_hook(self._capture)
        replace_all_batch_norm_modules_(model)  # batch statistics only, no in-place buffer updates
        self.model = model.to(device)
        self.device = torch.device(device)
        self.params = {
            # detach(): a new tensor, so the view's own weights are never marked or changed
            n: view.global_state[n].detach().float().to(device).requires_grad_(not functional)
            for n in view.parameter_names
        }
        self._stats: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    # batch-norm statistics ----------------------------------------------------------------
    def _capture(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if self._stats is not None:
            x = inputs[0]
            dims = [0, *range(2, x.ndim)]
            self._stats.append((x.mean(dims), x.var(dims, unbiased=True)))

    def revealed_bn_stats(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The mean batch statistics the update reveals per batch-norm layer: running = global +
        delta, then undo K momentum steps assuming equal batch statistics in each step."""
        out, k = [], self.view.meta.steps
        for layer in self.bn_layers:
            keep = (1 - layer.momentum) ** k
            stats = []
            for buf in ("running_mean", "running_var"):
                key = f"{layer.name}.{buf}"
                g = self.view.global_state[key].float().to(self.device)
                u = self.view.update[key].float().to(self.device)
                stats.append((g + u - keep * g) / (1 - keep))
            out.append((stats[0], stats[1]))
        return out

    # the replay ------------------------------------------------------------------------------
    def _loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        self._stats = []
        with surrogate_relu(self.relu_beta):
            logits = functional_call(self.model, params, (x,))
        stats, self._stats = self._stats, None
        loss = -(y * F.log_softmax(logits, dim=-1)).sum(-1).mean()
        return loss, stats

    def _step_grad(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        if self.functional:
            return grad(self._loss, has_aux=True)(params, x, y)
        loss, stats = self._loss(params, x, y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        return dict(zip(params, grads, strict=True)), stats

    def simulate(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], list[list[tuple[torch.Tensor, torch.Tensor]]]]:
        """(pseudo-gradient of every parameter, batch-norm statistics of every step).

        ``x``: normalised candidate images (N x C x H x W); ``y``: label distributions (N x classes).
        Without unrolling, one gradient on all images. Unrolled: the client's SGD steps (its
        learning rate, momentum, batch size and epochs, batches taken in order), and the
        pseudo-gradient ``-(w_K - w_0) / lr``.
        """
        step_grad = self._step_grad
        if not self.unroll:
            g, stats = step_grad(self.params, x, y)
            return g, [stats]
        meta = self.view.meta
        p, velocity, all_stats = dict(self.params), None, []
        n, bs = len(x), meta.batch_size
        for _ in range(meta.epochs):
            for s in range(0, n, bs):
                g, stats = step_grad(p, x[s : s + bs], y[s : s + bs])
                all_stats.append(stats)
                if meta.momentum:
                    velocity = g if velocity is None else {
                        k: meta.momentum * velocity[k] + g[k] for k in g
                    }  # fmt: skip
                    g = velocity
                p = {k: p[k] - meta.lr * g[k] for k in p}
        return {k: (self.params[k] - p[k]) / meta.lr for k in p}, all_stats

    def running_stat_deltas(
        self, all_stats: list[list[tuple[torch.Tensor, torch.Tensor]]]
    ) -> dict[str, torch.Tensor]:
        """Replay of the running statistics over the steps: the buffer deltas of the update."""
        out = {}
        for i, layer in enumerate(self.bn_layers):
            for j, buf in enumerate(("running_mean", "running_var")):
                key = f"{layer.name}.{buf}"
                r0 = self.view.global_state[key].float().to(self.device)
                r = r0
                for stats in all_stats:
                    r = (1 - layer.momentum) * r + layer.momentum * stats[i][j]
                out[key] = r - r0
        return out
