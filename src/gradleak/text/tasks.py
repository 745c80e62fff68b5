"""Causal language modelling: the clients learn their own text (next-token cross-entropy); the
server reports next-token accuracy and mean cross-entropy on the test split (perplexity is the
exponential of that loss). Sequence classification is the core's classification task: a text
classifier returns class scores like any other."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gradleak.data.dataset import Dataset
from gradleak.modality import TASKS, InputSpec


@TASKS.register("causal-lm")
class CausalLM:
    """Mean cross-entropy of every next token (position t predicts token t + 1; the last position
    predicts nothing, which is why sources end every sequence with an end token)."""

    name: ClassVar[str] = "causal-lm"
    batch_size: ClassVar[int] = 64  # test sequences evaluated at once

    @staticmethod
    def _pairs(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(inputs)
        return logits[:, :-1].reshape(-1, logits.shape[-1]), inputs[:, 1:].reshape(-1)

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(*self._pairs(model, inputs))

    def check_output(self, output: Any, inputs: torch.Tensor, num_classes: int) -> str | None:
        if (
            isinstance(output, torch.Tensor)
            and output.ndim == 3
            and tuple(output.shape[:2]) == tuple(inputs.shape)
        ):
            return None
        n, length = inputs.shape
        return f"not {n} x {length} x vocabulary next-token scores"

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, test: Dataset, spec: InputSpec, *, device: Any = "cpu"
    ) -> tuple[float, float]:
        correct, loss_sum, count = 0, 0.0, 0
        for start in range(0, len(test), self.batch_size):
            x = spec.model_inputs(test.examples[start : start + self.batch_size]).to(device)
            logits, targets = self._pairs(model, x)
            loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(1) == targets).sum())
            count += targets.numel()
        n = max(count, 1)
        return correct / n, loss_sum / n
