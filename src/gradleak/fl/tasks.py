"""What clients optimise: classification (cross-entropy on logits), for any input spec whose
model outputs class scores. Modalities register further tasks in ``modality.TASKS`` (causal
language modelling, ...)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gradleak.data.dataset import Dataset
from gradleak.modality import TASKS, InputSpec


@TASKS.register("classification")
class Classification:
    """Mean cross-entropy of the class scores; the server reports accuracy and mean cross-entropy
    on the test split."""

    name: ClassVar[str] = "classification"
    batch_size: ClassVar[int] = 512  # test examples evaluated at once

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(inputs), targets)

    def check_output(self, output: Any, inputs: torch.Tensor, num_classes: int) -> str | None:
        n = len(inputs)
        if isinstance(output, torch.Tensor) and tuple(output.shape) == (n, num_classes):
            return None
        return f"not {n} x {num_classes} class scores"

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, test: Dataset, spec: InputSpec, *, device: Any = "cpu"
    ) -> tuple[float, float]:
        correct, loss_sum = 0, 0.0
        for start in range(0, len(test), self.batch_size):
            x = spec.model_inputs(test.examples[start : start + self.batch_size]).to(device)
            y = test.targets[start : start + self.batch_size].to(device)
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
        n = max(len(test), 1)
        return correct / n, loss_sum / n
