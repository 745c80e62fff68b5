"""The built-in models, in plain torch (no torchvision)."""

from __future__ import annotations

import math

import torch
from torch import nn

from gradleak.models.registry import MODELS


class LeNet(nn.Module):
    """The sigmoid LeNet of Deep Leakage from Gradients (Zhu et al., 2019).

    Three 5 x 5 convolutions with 12 channels, strides 2, 2, 1, sigmoid activations, one linear
    layer. Sigmoid keeps second derivatives non-zero, which is why the inversion literature uses it.
    ``init="uniform"`` draws every weight and bias from U(-0.5, 0.5), the DLG initialisation.
    """

    def __init__(
        self,
        channels: int = 3,
        image_size: int = 32,
        num_classes: int = 10,
        width: int = 12,
        init: str = "default",
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, 5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        side = math.ceil(math.ceil(image_size / 2) / 2)
        self.fc = nn.Linear(width * side * side, num_classes)
        if init == "uniform":
            for p in self.parameters():
                nn.init.uniform_(p, -0.5, 0.5)
        elif init != "default":
            raise ValueError(f"init must be 'default' or 'uniform', got {init!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


class ConvNet(nn.Module):
    """A small CNN with batch norm: three conv-BN-ReLU blocks, global average pooling, a linear
    head."""

    def __init__(self, channels: int = 3, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]

        self.features = nn.Sequential(
            *block(channels, width, 1), *block(width, 2 * width, 2), *block(2 * width, 4 * width, 2)
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: a 3 x 3 stem without max-pooling, stages of basic blocks."""

    def __init__(
        self, channels: int, num_classes: int, widths: list[int], blocks: list[int]
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        layers, c_in = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n):
                layers.append(BasicBlock(c_in, w, 2 if (j == 0 and i > 0) else 1))
                c_in = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))


class MLP(nn.Module):
    """Flatten, then fully connected ReLU layers."""

    def __init__(self, channels: int, image_size: int, num_classes: int, hidden: list[int]) -> None:
        super().__init__()
        dims = [channels * image_size * image_size, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@MODELS.register("lenet")
def lenet(
    channels: int, image_size: int, num_classes: int, width: int = 12, init: str = "default"
) -> nn.Module:
    return LeNet(channels, image_size, num_classes, width, init)


@MODELS.register("convnet")
def convnet(channels: int, num_classes: int, width: int = 32) -> nn.Module:
    return ConvNet(channels, num_classes, width)


@MODELS.register("resnet18")
def resnet18(channels: int, num_classes: int, width: int = 64) -> nn.Module:
    """ResNet-18 (He et al., 2016), CIFAR stem; ``width`` scales every stage."""
    return ResNet(channels, num_classes, [width, 2 * width, 4 * width, 8 * width], [2, 2, 2, 2])


@MODELS.register("resnet20")
def resnet20(channels: int, num_classes: int, width: int = 16) -> nn.Module:
    """ResNet-20 for CIFAR: three stages of three basic blocks, 16/32/64 channels."""
    return ResNet(channels, num_classes, [width, 2 * width, 4 * width], [3, 3, 3])


@MODELS.register("mlp")
def mlp(
    channels: int, image_size: int, num_classes: int, hidden: list[int] | None = None
) -> nn.Module:
    return MLP(channels, image_size, num_classes, hidden if hidden is not None else [256, 128])
