"""The model zoo and user models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradleak.errors import ConfigError
from gradleak.images import ImageSpec
from gradleak.modality import load_modalities
from gradleak.models import MODELS, build_model

load_modalities()
# The image modality's models (the text models are tested with text, tests/test_text.py).
IMAGE_MODELS = [n for n in MODELS.names() if MODELS.get(n).__module__ == "gradleak.images.models"]


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize(("channels", "size"), [(1, 16), (3, 32)])
def test_every_model_maps_images_to_logits(name: str, channels: int, size: int) -> None:
    model = build_model(name, spec=ImageSpec.square(channels, size), num_classes=7)
    model.train()  # batch norm in training mode needs more than one value per channel
    out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_lenet_is_the_dlg_architecture() -> None:
    model = build_model("lenet", spec=ImageSpec.square(3, 32), num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 12, (5, 5), (2, 2)),
        (12, 12, (5, 5), (2, 2)),
        (12, 12, (5, 5), (1, 1)),
    ]
    assert sum(isinstance(m, nn.Sigmoid) for m in model.modules()) == 3
    assert model.fc.in_features == 768  # the 12 x 8 x 8 of the DLG paper at 32 x 32


def test_lenet_uniform_init() -> None:
    model = build_model(
        "lenet", spec=ImageSpec.square(1, 16), num_classes=10, kwargs={"init": "uniform"}
    )
    values = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float(values.min()) >= -0.5 and float(values.max()) <= 0.5 and float(values.std()) > 0.25


def test_resnet18_has_the_standard_parameter_count() -> None:
    model = build_model("resnet18", spec=ImageSpec.square(3, 32), num_classes=10)
    # torchvision's CIFAR-stem ResNet-18 with 10 classes has 11,173,962 parameters.
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    r20 = build_model("resnet20", spec=ImageSpec.square(3, 32), num_classes=10)
    assert sum(p.numel() for p in r20.parameters()) == pytest.approx(272_474, rel=0.01)


def test_user_model_from_module(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_models.py").write_text(
        "import torch.nn as nn\n"
        "def tiny(channels, num_classes, hidden=5):\n"
        "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden), nn.ReLU(), "
        "nn.Linear(hidden, num_classes))\n"
        "def not_a_model(**kw):\n"
        "    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model(
        "my_models:tiny", spec=ImageSpec.square(1, 8), num_classes=4, kwargs={"hidden": 6}
    )
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 4)
    with pytest.raises(ConfigError, match="model.name: my_models:not_a_model returned int"):
        build_model("my_models:not_a_model", spec=ImageSpec.square(1, 8), num_classes=4)
    with pytest.raises(ConfigError, match="model.name: 'my_models' has no callable 'missing'"):
        build_model("my_models:missing", spec=ImageSpec.square(1, 8), num_classes=4)
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        build_model("no_such_module:f", spec=ImageSpec.square(1, 8), num_classes=4)


def test_bad_model_name_and_kwargs() -> None:
    with pytest.raises(
        ConfigError, match="model.name: unknown model 'vgg' \\(known: (.*, )?convnet, (.*, )?lenet"
    ):
        build_model("vgg", spec=ImageSpec.square(1, 8), num_classes=2)
    with pytest.raises(
        ConfigError, match="model.kwargs: convnet: .*unexpected keyword argument 'depth'"
    ):
        build_model("convnet", spec=ImageSpec.square(1, 8), num_classes=2, kwargs={"depth": 3})
