"""Bringing your own update: reading a global model, an update and its metadata from files.

Tensors come from safetensors, npz (no pickles) or ``.pt`` files read with ``weights_only=True``.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, ValidationError, model_validator

from gradleak.errors import ConfigError, DataError
from gradleak.fl.update import FLOAT_DTYPES, INT_DTYPES, UpdateMeta
from gradleak.safeio import load_npz, load_safetensors, read_file, read_json
from gradleak.schema import Section


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A name -> tensor mapping from .safetensors, .npz or .pt/.pth (weights only), every tensor
    of a supported dtype (float16, bfloat16, float32, float64 or an integer) and finite: an attack
    on NaN or infinite weights would only produce garbage."""
    tensors = _read_tensors(path)
    for name, t in tensors.items():
        if t.dtype not in (*FLOAT_DTYPES, *INT_DTYPES):
            raise DataError(f"{path}: tensor {name!r} is {str(t.dtype).replace('torch.', '')}, not a supported dtype "
                            "(float16, bfloat16, float32, float64 or an integer type)")  # fmt: skip
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise DataError(f"{path}: {name} holds NaN or infinite values")
    return tensors


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".npz", ".pt", ".pth"):
        raise DataError(f"{path}: unsupported tensor file (use .safetensors, .npz or .pt)")
    data = read_file(path, kind="tensors")
    if suffix == ".safetensors":
        return load_safetensors(data, path)[0]
    if suffix == ".npz":
        arrays = load_npz(data, path)
        bad = next((k for k, a in arrays.items() if a.dtype.kind not in "fiub" or a.dtype.byteorder == ">"), None)
        if bad is not None:
            raise DataError(f"{path}: array {bad!r} is {arrays[bad].dtype}, not a supported dtype")
        return {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in arrays.items()}
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader error becomes one clear line
        raise DataError(f"cannot read {path}: {exc}".replace("\n", " ")) from None
    if isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return dict(obj)
    raise DataError(f"{path} does not hold a mapping of names to tensors")


class UpdateMetadata(Section):
    """What the protocol sends with an update (the ``--meta`` JSON file)."""

    num_images: int = Field(gt=0, description="Images the client trained on this round.")
    image_shape: tuple[int, int, int] = Field(description="Channels, height, width.")
    num_classes: int = Field(gt=1, description="Outputs of the classifier.")
    lr: float = Field(gt=0, description="The client's local learning rate.")
    epochs: int | None = Field(None, gt=0, description="Local epochs (default 1).")
    local_steps: int | None = Field(None, gt=0, description="Local SGD steps (alternative to epochs).")
    batch_size: int | None = Field(None, gt=0, description="Local batch size (default: num_images).")
    momentum: float = Field(0.0, ge=0, lt=1, description="Local SGD momentum.")
    batch_norm: Literal["train", "eval", "auto"] = Field(
        "auto", description="How the client ran batch-norm layers: train (batch statistics, running "
        "statistics updated), eval (running statistics, buffers unchanged), or auto: eval when every "
        "running mean and variance in the update is unchanged, else train.",
    )
    labels: list[int] | None = Field(None, description="The labels, where the threat model gives them to the server.")
    mean: list[float] = Field(description="Per-channel normalisation mean of the client's input pipeline.")
    std: list[float] = Field(description="Per-channel normalisation std.")

    @model_validator(mode="after")
    def _consistent(self) -> UpdateMetadata:
        c = self.image_shape[0]
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"mean and std need {c} values for {c}-channel images")
        if self.labels is not None and len(self.labels) != self.num_images:
            raise ValueError(f"{len(self.labels)} labels for {self.num_images} images")
        if self.labels is not None and not all(0 <= k < self.num_classes for k in self.labels):
            raise ValueError(f"labels must be class indices from 0 to {self.num_classes - 1}")
        if not all(s > 0 for s in self.std):
            raise ValueError("std values must be positive (each channel is divided by its std)")
        if self.epochs is not None and self.local_steps is not None:
            raise ValueError("give epochs or local_steps, not both")
        per_epoch = math.ceil(self.num_images / (self.batch_size or self.num_images))
        if self.local_steps is not None and self.local_steps % per_epoch:
            raise ValueError(f"local_steps {self.local_steps} is not a whole number of epochs of {per_epoch} steps")
        return self

    def update_meta(self) -> UpdateMeta:
        bs = self.batch_size or self.num_images
        per_epoch = math.ceil(self.num_images / bs)
        epochs = self.epochs or (self.local_steps // per_epoch if self.local_steps else 1)
        return UpdateMeta(client_id=0, round=0, num_samples=self.num_images, lr=self.lr,
                          epochs=epochs, steps=epochs * per_epoch, batch_size=bs, momentum=self.momentum,
                          bn_mode=None if self.batch_norm == "auto" else self.batch_norm)  # fmt: skip


def load_metadata(path: Path) -> UpdateMetadata:
    try:
        return UpdateMetadata.model_validate(read_json(path))
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "meta"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise ConfigError(f"{path.name}: {key}", msg) from None
