"""What leaves a client: the update (weight and buffer differences) and the protocol metadata."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from gradleak.errors import DataError, GradleakError


class UpdateMismatch(GradleakError):
    """Tensors that do not fit the model: a missing, extra or wrongly shaped tensor, an unsupported
    dtype, or NaN or infinite values."""


# Dtypes gradleak computes with; float8, bool and complex tensors are refused by name.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_state(
    reference: dict[str, torch.Tensor],
    state: dict[str, Any],
    what: str,
    *,
    exact_dtypes: bool = False,
    finite: bool = True,
) -> None:
    """Raise ``UpdateMismatch`` naming the first tensor of ``state`` that does not fit
    ``reference`` (a model's state dict): a missing or extra name, another shape, a dtype that is
    not the reference's (``exact_dtypes``) or not of its family (floating: float16, bfloat16,
    float32, float64; integer: integers), or NaN or infinite values (``finite``)."""
    for name, ref in reference.items():
        if name not in state:
            raise UpdateMismatch(f"{what}: tensor {name!r} of the model is missing")
        t = state[name]
        if not isinstance(t, torch.Tensor):
            raise UpdateMismatch(f"{what}: {name!r} is not a tensor")
        if tuple(t.shape) != tuple(ref.shape):
            raise UpdateMismatch(
                f"{what}: tensor {name!r} has shape {tuple(t.shape)}, the model expects "
                f"{tuple(ref.shape)}"
            )
        family = FLOAT_DTYPES if ref.is_floating_point() else INT_DTYPES
        if (exact_dtypes and t.dtype != ref.dtype) or t.dtype not in family:
            allowed = str(ref.dtype) if exact_dtypes else ", ".join(str(d) for d in family)
            raise UpdateMismatch(
                f"{what}: tensor {name!r} is {t.dtype}, not {allowed}".replace("torch.", "")
            )
        if finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UpdateMismatch(f"{what}: tensor {name!r} holds NaN or infinite values")
    for name in state:
        if name not in reference:
            raise UpdateMismatch(f"{what}: tensor {name!r} is not in the model")


@dataclass(frozen=True)
class UpdateMeta:
    """Metadata the FL protocol sends with an update; an honest-but-curious server sees all of
    it."""

    client_id: int
    round: int
    num_samples: int
    lr: float
    epochs: int
    steps: int
    batch_size: int
    momentum: float = 0.0
    # How the client's batch-norm layers ran: "train" (batch statistics, running statistics
    # updated) or "eval" (running statistics, buffers unchanged); None: not sent, so a server
    # infers it from the update (``ServerView.bn_mode``).
    bn_mode: str | None = None

    @classmethod
    def from_dict(cls, raw: Any, where: object) -> UpdateMeta:
        """The metadata as written by ``asdict``, every field of its type; else a ``DataError``."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        types = {
            "client_id": int,
            "round": int,
            "num_samples": int,
            "epochs": int,
            "steps": int,
            "batch_size": int,
            "lr": (int, float),
            "momentum": (int, float),
            "bn_mode": (str, type(None)),
        }
        if (
            not isinstance(raw, dict)
            or set(raw) - set(fields)
            or any(k not in raw for k, f in fields.items() if f.default is dataclasses.MISSING)
        ):
            raise DataError(f"{where}: the update's metadata is not gradleak's")
        for k, v in raw.items():
            if isinstance(v, bool) or not isinstance(v, types[k]):
                raise DataError(f"{where}: the update's metadata field {k!r} is {v!r}")
        return cls(**raw)


@dataclass(frozen=True)
class ClientUpdate:
    """``delta[k] = local[k] - global[k]`` for every parameter and every buffer of the model.

    ``buffers`` names the entries that are buffers (batch-norm running statistics and counters),
    not trained parameters, so that defences and aggregators can treat them apart. ``secure`` names
    the entries the client sends only into a secure sum over the round's clients (``bn-stats-local``
    with ``mode: secure-sum``): aggregation uses them like the others (the weighted mean that a
    secure sum of ``num_samples x delta`` gives), but the server never sees one client's
    (``sent``).
    """

    delta: dict[str, torch.Tensor]
    meta: UpdateMeta
    buffers: frozenset[str] = field(default_factory=frozenset)
    secure: frozenset[str] = field(default_factory=frozenset)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.delta.items() if k not in self.buffers}

    def sent(self) -> dict[str, torch.Tensor]:
        """What the server receives of this client: the delta, with the entries that reach it only
        inside a secure sum as zeros."""
        if not self.secure:
            return self.delta
        return {k: torch.zeros_like(v) if k in self.secure else v for k, v in self.delta.items()}

    def l2_norm(self) -> float:
        """L2 norm over the trained parameters (buffers excluded), independent of key order."""
        return math.fsum(float(v.double().pow(2).sum()) for v in self.parameters().values()) ** 0.5

    def to_bytes(self) -> bytes:
        """The update as a safetensors file, its metadata in the header."""
        from gradleak.safeio import safetensors_bytes

        meta = {"meta": json.dumps(asdict(self.meta)), "buffers": json.dumps(sorted(self.buffers))}
        if self.secure:
            meta["secure"] = json.dumps(sorted(self.secure))
        return safetensors_bytes(self.delta, meta)

    @classmethod
    def from_bytes(cls, data: bytes, where: object) -> ClientUpdate:
        """An update written by ``to_bytes``; a damaged file is a ``DataError`` naming ``where``."""
        from gradleak.safeio import load_safetensors, parse_json

        delta, header = load_safetensors(data, where)
        if "meta" not in header or "buffers" not in header:
            raise DataError(f"{where}: not a gradleak update (no metadata in its header)")
        meta = UpdateMeta.from_dict(parse_json(header["meta"].encode(), where), where)
        buffers = parse_json(header["buffers"].encode(), where)
        secure = parse_json(header["secure"].encode(), where) if "secure" in header else []
        for names in (buffers, secure):
            if not isinstance(names, list) or not all(
                isinstance(b, str) and b in delta for b in names
            ):
                raise DataError(f"{where}: the update names tensors it does not hold")
        return cls(delta=delta, meta=meta, buffers=frozenset(buffers), secure=frozenset(secure))
