"""`gradleak attack` on files made by a model the product has never seen."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from typer.testing import CliRunner

from gradleak.cli import app

runner = CliRunner()

USER_MODEL = '''
import torch
from torch import nn

class Tiny(nn.Module):
    """A sigmoid CNN that is not in gradleak's zoo."""
    def __init__(self, channels, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(channels, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6 * 6 * 6, num_classes)
    def forward(self, x):
        return self.head(torch.sigmoid(self.conv(x)).flatten(1))

def make(channels, num_classes):
    torch.manual_seed(0)
    return Tiny(channels, num_classes)
'''


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    (tmp_path / "acme_models.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("acme_models", None)
    import acme_models

    model = acme_models.make(3, 5)
    g = torch.Generator().manual_seed(1)
    image = F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(12, 12), mode="bilinear")
    label = torch.tensor([2])
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    x = (image - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    # One local SGD step, written here without gradleak.
    glob = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = torch.autograd.grad(F.cross_entropy(model(x), label), list(model.parameters()))
    lr = 0.1
    update = {k: -lr * gr for (k, _), gr in zip(model.named_parameters(), grads, strict=True)}
    save_file(glob, str(tmp_path / "global.safetensors"))
    torch.save(update, tmp_path / "update.pt")
    meta = {
        "num_images": 1,
        "image_shape": [3, 12, 12],
        "num_classes": 5,
        "lr": lr,
        "local_steps": 1,
        "batch_size": 1,
        "mean": mean,
        "std": std,
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    np.savez(tmp_path / "truth.npz", images=image.numpy(), labels=label.numpy())
    return tmp_path


def _args(d, *extra):
    return [
        "attack",
        "--model",
        "acme_models:make",
        "--global",
        str(d / "global.safetensors"),
        "--update",
        str(d / "update.pt"),
        "--meta",
        str(d / "meta.json"),
        "--out",
        str(d / "out"),
        "-q",
        *extra,
    ]


def test_attack_reconstructs_a_user_models_update(user_files) -> None:
    d = user_files
    result = runner.invoke(
        app, _args(d, "--truth", str(d / "truth.npz"), "--set", "iterations=400")
    )
    assert result.exit_code == 0, result.output
    rec = np.load(d / "out/reconstruction.npz")
    assert rec["images"].shape == (1, 3, 12, 12) and rec["labels"].tolist() == [2]
    assert 0.0 <= rec["images"].min() and rec["images"].max() <= 1.0
    metrics = json.loads((d / "out/metrics.json").read_text())
    assert metrics["label_accuracy"] == 1.0 and metrics["psnr"] > 20
    truth = np.load(d / "truth.npz")["images"]
    assert metrics["mse"] == pytest.approx(float(((rec["images"] - truth) ** 2).mean()), rel=1e-4)
    assert (d / "out/reconstruction.png").stat().st_size > 0
    assert json.loads((d / "out/attack.json").read_text())["label_strategy"] == "idlg"
    assert "PSNR" in result.output


def test_mismatched_update_names_the_tensor(user_files) -> None:
    d = user_files
    update = torch.load(d / "update.pt", weights_only=True)
    update["head.weight"] = update["head.weight"][:, :10]
    torch.save(update, d / "update.pt")
    result = runner.invoke(app, _args(d))
    assert result.exit_code == 2
    assert (
        "update: tensor 'head.weight' has shape (5, 10), the model expects (5, 216)"
        in result.output
    )
    assert not (d / "out").exists()


def test_bad_metadata_and_settings(user_files) -> None:
    d = user_files
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "mean": [0.5]}))
    result = runner.invoke(app, _args(d))
    assert result.exit_code == 2 and "mean and std need 3 values" in result.output
    (d / "meta.json").write_text(json.dumps(meta))
    result = runner.invoke(app, _args(d, "--set", "iterations=0"))
    assert (
        result.exit_code == 2
        and "attack.iterations: Input should be greater than 0" in result.output
    )
    result = runner.invoke(app, _args(d, "--preset", "nope"))
    assert result.exit_code == 2 and "unknown attack preset 'nope'" in result.output


def test_pickled_code_in_a_pt_file_is_refused(user_files) -> None:
    d = user_files

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"head.weight": Evil()}, d / "update.pt")
    result = runner.invoke(app, _args(d))
    assert result.exit_code == 2 and "cannot read" in result.output and "pwned" not in result.output


def test_prior_start_and_device_option(user_files) -> None:
    d = user_files
    from PIL import Image

    Image.new("RGB", (30, 30), (200, 40, 40)).save(d / "prior.png")
    args = _args(
        d,
        "--preset",
        "gradinversion",
        "--prior",
        str(d / "prior.png"),
        "--set",
        "bn=0",
        "--set",
        "iterations=5",
        "--set",
        "init_noise=0",
        "--device",
        "cpu",
    )
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    start = np.load(d / "out/reconstruction.npz")["prior"]
    assert np.allclose(start[0, :, 0, 0], [200 / 255, 40 / 255, 40 / 255], atol=1e-6)
    bad = runner.invoke(app, _args(d, "--device", "gpu"))
    assert bad.exit_code == 2 and "device: 'gpu' is not one of auto, cpu, cuda" in bad.output
