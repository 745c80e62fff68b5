"""A site's own network for the NVFlare drop-in tests (not in gradleak's zoo), importable by
class path as NVFlare's configs name components: ``site_model.SiteNet``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiteNet(nn.Module):
    """A small CNN for 3 x 16 x 16 images."""

    def __init__(self, width: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc = nn.Linear(width * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(F.relu(self.conv(x))).flatten(1))
