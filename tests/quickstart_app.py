"""A Flower app shaped like Flower's quickstart-pytorch: its own small CNN ``Net``, a loader of
``{"img", "label"}`` batches normalised with mean 0.5 and std 0.5, SGD with momentum 0.9, the
learning rate sent in the round's config, FedAvg on the server. The data are bundled photograph
tiles instead of CIFAR-10 (nothing is downloaded), and the loader's shuffle is seeded so that two
runs train alike. The drop-in tests run it with and without gradleak's audit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy
from torch.utils.data import DataLoader

# What the app's pyproject.toml would set ([tool.flwr.app.config]); run_simulation passes none.
RUN_CONFIG = {"num-server-rounds": 2, "local-epochs": 1, "batch-size": 2, "lr": 0.05}
SIZES = (3, 4)  # training images of partitions 0 and 1


class Net(nn.Module):
    """Model (simple CNN adapted from 'PyTorch: A 60 Minute Blitz')"""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def images(partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The partition's training images (pixels in [0, 1]) and labels."""
    from gradleak.images.bundled import load_tiles

    x, y, _ = load_tiles(["astronaut", "coffee", "chelsea"], 32, 64, 4, 0, scale=0.25)
    start = sum(SIZES[:partition_id])
    return x[start : start + SIZES[partition_id]], y[start : start + SIZES[partition_id]]


def load_data(partition_id: int, num_partitions: int, batch_size: int) -> DataLoader:
    """The partition's train loader, normalised as quickstart's (mean 0.5, std 0.5)."""
    x, y = images(partition_id)
    x = (x - 0.5) / 0.5
    data = [{"img": x[i], "label": y[i]} for i in range(len(x))]
    shuffle = torch.Generator().manual_seed(partition_id)
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=shuffle)


def train(net: nn.Module, trainloader: DataLoader, epochs: int, lr: float, device: Any) -> float:
    """Train the model on the training set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for batch in trainloader:
            images = batch["img"].to(device)
            labels = batch["label"].to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def client_app(mods: list[Callable[..., Message]] | None = None) -> ClientApp:
    """The ClientApp; ``mods``: what the user adds to ``@app.train(mods=[...])``."""
    app = ClientApp()

    @app.train(mods=mods or [])
    def train_fn(msg: Message, context: Context) -> Message:
        model = Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        partition_id = context.node_config["partition-id"]
        num_partitions = context.node_config["num-partitions"]
        batch_size = RUN_CONFIG["batch-size"]
        trainloader = load_data(partition_id, num_partitions, batch_size)
        train_loss = train(
            model, trainloader, RUN_CONFIG["local-epochs"], msg.content["config"]["lr"], "cpu"
        )
        model_record = ArrayRecord(model.state_dict())
        metrics = {"train_loss": train_loss, "num-examples": len(trainloader.dataset)}
        content = RecordDict({"arrays": model_record, "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    return app


def server_app(
    out: dict[str, Any], wrap: Callable[[Strategy], Strategy] | None = None
) -> ServerApp:
    """The ServerApp: FedAvg (``wrap``: what the user wraps it in) for the configured rounds;
    the final arrays land in ``out["arrays"]``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(0)
        arrays = ArrayRecord(Net().state_dict())
        strategy: Strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0)
        if wrap is not None:
            strategy = wrap(strategy)
        result = strategy.start(
            grid=grid,
            initial_arrays=arrays,
            train_config=ConfigRecord({"lr": RUN_CONFIG["lr"]}),
            num_rounds=RUN_CONFIG["num-server-rounds"],
        )
        out["arrays"] = result.arrays.to_torch_state_dict()

    return app
