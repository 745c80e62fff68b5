"""Bringing your own update: reading a global model, an update and its metadata from files, for
any modality (its metadata is registered in ``modality.METADATA``).

Tensors come from safetensors, npz (no pickles) or ``.pt`` files read with ``weights_only=True``.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, ValidationError, model_validator
from torch import nn

from gradleak.errors import ConfigError, DataError
from gradleak.fl.update import FLOAT_DTYPES, INT_DTYPES, UpdateMeta
from gradleak.modality import METADATA, InputSpec, load_modalities
from gradleak.safeio import load_npz, load_safetensors, read_file, read_json
from gradleak.schema import Section, one_line


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A name -> tensor mapping from .safetensors, .npz or .pt/.pth (weights only), every tensor
    of a supported dtype (float16, bfloat16, float32, float64 or an integer) and finite: an attack
    on NaN or infinite weights would only produce garbage."""
    tensors = _read_tensors(path)
    for name, t in tensors.items():
        if t.dtype not in (*FLOAT_DTYPES, *INT_DTYPES):
            raise DataError(
                f"{path}: tensor {name!r} is {str(t.dtype).replace('torch.', '')}, not a supported "
                "dtype "
                "(float16, bfloat16, float32, float64 or an integer type)"
            )
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
        bad = next(
            (
                k
                for k, a in arrays.items()
                if a.dtype.kind not in "fiub" or a.dtype.byteorder == ">"
            ),
            None,
        )
        if bad is not None:
            raise DataError(f"{path}: array {bad!r} is {arrays[bad].dtype}, not a supported dtype")
        return {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in arrays.items()}
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader error becomes one clear line
        raise DataError(f"cannot read {path}: {exc}".replace("\n", " ")) from None
    if isinstance(obj, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        return dict(obj)
    raise DataError(f"{path} does not hold a mapping of names to tensors")


class UpdateMetadata(Section):
    """What the protocol sends with an update (the ``--meta`` JSON file), the part every modality
    shares: the local training facts, the classes, and the labels where the threat model gives them.
    Each modality's metadata (``modality.METADATA``, chosen by the file's ``modality`` key) adds
    what
    its examples are and how to read its truth and prior."""

    num_classes: int = Field(gt=1, description="Outputs of the classifier.")
    lr: float = Field(gt=0, description="The client's local learning rate.")
    epochs: int | None = Field(None, gt=0, description="Local epochs (default 1).")
    local_steps: int | None = Field(
        None, gt=0, description="Local SGD steps (alternative to epochs)."
    )
    batch_size: int | None = Field(
        None, gt=0, description="Local batch size (default: all the client's examples)."
    )
    momentum: float = Field(0.0, ge=0, lt=1, description="Local SGD momentum.")
    labels: list[int] | None = Field(
        None, description="The labels, where the threat model gives them to the server."
    )

    @property
    def num_examples(self) -> int:
        raise NotImplementedError

    def bn_mode(self) -> str | None:
        """How the client ran batch-norm layers, where the modality sends it (None: inferred)."""
        return None

    @model_validator(mode="after")
    def _consistent(self) -> UpdateMetadata:
        n = self.num_examples
        if self.labels is not None and len(self.labels) != n:
            raise ValueError(f"{len(self.labels)} labels for {n} examples")
        if self.labels is not None and not all(0 <= k < self.num_classes for k in self.labels):
            raise ValueError(f"labels must be class indices from 0 to {self.num_classes - 1}")
        if self.epochs is not None and self.local_steps is not None:
            raise ValueError("give epochs or local_steps, not both")
        per_epoch = math.ceil(n / (self.batch_size or n))
        if self.local_steps is not None and self.local_steps % per_epoch:
            raise ValueError(
                f"local_steps {self.local_steps} is not a whole number of epochs of {per_epoch} "
                "steps"
            )
        return self

    def update_meta(self) -> UpdateMeta:
        n = self.num_examples
        bs = self.batch_size or n
        per_epoch = math.ceil(n / bs)
        epochs = self.epochs or (self.local_steps // per_epoch if self.local_steps else 1)
        return UpdateMeta(
            client_id=0,
            round=0,
            num_samples=n,
            lr=self.lr,
            epochs=epochs,
            steps=epochs * per_epoch,
            batch_size=bs,
            momentum=self.momentum,
            bn_mode=self.bn_mode(),
        )

    def known_labels(self) -> torch.Tensor | None:
        return None if self.labels is None else torch.tensor(self.labels)

    def spec(self) -> InputSpec:
        """The input spec of the client's examples."""
        raise NotImplementedError

    def build_model(self, name: str) -> nn.Module:
        """The model the update belongs to (``--model``)."""
        from gradleak.models import build_model

        return build_model(name, spec=self.spec(), num_classes=self.num_classes)

    def load_truth(self, path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The client's true examples (and labels, where the file has them), for the metrics."""
        raise NotImplementedError

    def load_prior(self, path: Path) -> torch.Tensor:
        """What the server guesses without the update, from a file (``--prior``)."""
        raise NotImplementedError

    def write_result(self, owner: Any, rec: Any, truth: torch.Tensor | None, found: Any) -> None:
        """The reconstruction in this modality's own files under ``owner`` (``found``: its score
        against ``truth``, which orders the examples as the originals, or None)."""
        raise NotImplementedError


def load_metadata(path: Path) -> UpdateMetadata:
    """The ``--meta`` file, validated by its modality's metadata (``modality``: image by
    default)."""
    raw = read_json(path)
    kind = raw.get("modality", "image") if isinstance(raw, dict) else "image"
    load_modalities()
    try:
        model = METADATA.get(str(kind), key=f"{path.name}: modality")
        return model.model_validate(raw)
    except ValidationError as exc:
        line = one_line(exc)
        raise ConfigError(f"{path.name}: {line.key or 'meta'}", line.problem) from None
