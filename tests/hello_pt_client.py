"""A hello-pt-shaped NVFlare Client API script: the site's own network (``site_model.SiteNet``),
its images read from ``DATA_DIR/<site>/data.json`` and normalised with mean 0.5 and std 0.5, SGD
with momentum 0.9 (one optimiser for the whole job, as hello-pt keeps it), the steps sent as
``NUM_STEPS_CURRENT_ROUND``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import nvflare.client as flare
import torch
from PIL import Image
from torch import nn
from torch.optim import SGD

from site_model import SiteNet


def load(site_dir: Path) -> torch.utils.data.DataLoader:
    listing = json.loads((site_dir / "data.json").read_text())["training"]
    x = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(site_dir / item["image"]).convert("RGB")))
            .permute(2, 0, 1)
            .float()
            / 255.0
            for item in listing
        ]
    )
    y = torch.tensor([item["label"][0] for item in listing])
    data = torch.utils.data.TensorDataset((x - 0.5) / 0.5, y)
    return torch.utils.data.DataLoader(
        data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", type=str, required=True)
    parser.add_argument("--learning_rate", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()

    flare.init()
    site = flare.system_info()["site_name"]
    torch.manual_seed(0)
    model = SiteNet()
    loss = nn.CrossEntropyLoss()
    optimizer = SGD(model.parameters(), lr=args.learning_rate, momentum=0.9)
    train_loader = load(Path(args.data_dir) / site)

    while flare.is_running():
        input_model = flare.receive()
        model.load_state_dict(input_model.params)
        model.train()
        steps = args.epochs * len(train_loader)
        for _ in range(args.epochs):
            for images, labels in train_loader:
                optimizer.zero_grad()
                loss(model(images), labels).backward()
                optimizer.step()
        params = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        flare.send(flare.FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": steps}))


if __name__ == "__main__":
    main()
