"""Auditing one update of a user's own app, with no gradleak config: the framework-free core
that the Flower mod, the Flower strategy wrapper and the NVFlare filters call.

``UpdateAuditor`` holds what stays fixed for a run (the model, the attack, the metric, the prior,
the threshold, the audit directory); ``audit`` takes what changes with every update: the global
weights, the update (new weights or their difference), the local training facts (``Training``:
read by the caller from the round's message, never frozen at import), the client's examples for
scoring and the round and client names. It attacks the update as the server receives it
(gradleak's ``LeakageAudit``), writes one row (and the images) to the audit directory, and says
whether the update should be withheld (RDLV above the threshold). The attack runs with the
caller's random state saved and restored, so an audited run trains exactly as it would without the
audit.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradleak.errors import ConfigError, GradleakError
from gradleak.fl.update import ClientUpdate, UpdateMeta, check_state
from gradleak.integrations.auditdir import AuditDir, client_name, finite_or_none
from gradleak.integrations.models import ModelSpec, describe, model_factory
from gradleak.seeding import derive_seed


@dataclass(frozen=True)
class Training:
    """How the client trained this round (what the protocol tells the server): SGD with ``lr``
    and ``momentum`` for ``epochs`` over its examples in batches of ``batch_size`` (None: all at
    once), or for ``local_steps`` steps."""

    lr: float
    epochs: int = 1
    batch_size: int | None = None
    momentum: float = 0.0
    local_steps: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.lr, int | float) and self.lr > 0, "lr", "a positive number"),
            (isinstance(self.epochs, int) and self.epochs > 0, "epochs", "a positive integer"),
            (
                self.batch_size is None
                or (isinstance(self.batch_size, int) and self.batch_size > 0),
                "batch_size",
                "a positive integer or None",
            ),
            (
                isinstance(self.momentum, int | float) and 0 <= self.momentum < 1,
                "momentum",
                "a number in [0, 1)",
            ),
            (
                self.local_steps is None
                or (isinstance(self.local_steps, int) and self.local_steps > 0),
                "local_steps",
                "a positive integer or None",
            ),
        ]
        for ok, key, what in checks:
            if not ok:
                raise ConfigError(key, f"{getattr(self, key)!r} is not {what}")

    def meta(self, num_samples: int, round: int) -> UpdateMeta:
        """The protocol metadata of an update of ``num_samples`` examples."""
        bs = min(self.batch_size or num_samples, num_samples)
        per_epoch = math.ceil(num_samples / bs)
        if self.local_steps is not None and self.local_steps % per_epoch:
            raise ConfigError(
                "local_steps",
                f"{self.local_steps} steps are not whole epochs of {per_epoch} batches of {bs} "
                f"from {num_samples} examples",
            )
        steps = self.local_steps or self.epochs * per_epoch
        epochs = max(1, steps // per_epoch) if self.local_steps else self.epochs
        return UpdateMeta(
            client_id=0,
            round=round,
            num_samples=num_samples,
            lr=float(self.lr),
            epochs=epochs,
            steps=steps,
            batch_size=bs,
            momentum=float(self.momentum),
        )


@dataclass
class AuditResult:
    """One audit's row (as written to the audit directory) and its verdict."""

    row: dict[str, Any]
    withhold: bool
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rdlv(self) -> float | None:
        return self.row.get("rdlv")


@contextlib.contextmanager
def isolated_randomness() -> Iterator[None]:
    """Run a block without touching the caller's random streams (torch, numpy, random)."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def as_tensors(state: Mapping[str, Any], reference: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A name -> tensor mapping from torch tensors or numpy arrays (as Flower's and NVFlare's
    records hold them); names not in ``reference`` are kept for the model check to name."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        t = v.detach() if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v, copy=True))
        ref = reference.get(k)
        out[k] = t.to(ref.dtype) if ref is not None and t.dtype != ref.dtype else t
    return out


def last_linear_outputs(model: nn.Module) -> int:
    """The number of classes: the outputs of the model's last linear layer."""
    found = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ConfigError("num_classes", "the model has no linear layer: give num_classes")
    return int(found[-1])


class UpdateAuditor:
    """Audit updates of one app's model, writing to one audit directory.

    Args:
        model: the user's model: a factory (class or function), an ``nn.Module`` (copied), a class
            path ``"package.module.Class"`` or NVFlare's model spec ``{"path": ..., "args": ...}``.
        out: the audit directory (created, or reopened when it is gradleak's audit).
        model_args: keyword arguments of the model's class or factory.
        mean, std: the per-channel normalisation of the client's input pipeline (the examples the
            caller passes are model inputs, normalised so); default 0 and 1 (pixels in [0, 1]).
        num_classes: the classifier's outputs (default: the last linear layer's).
        attack: the attack, by gradleak's name (``inverting-gradients``, ``dlg``, ``idlg``,
            ``gradinversion``, ...); ``settings``: changes to its settings (e.g. iterations).
        also: further attacks run on every update (the worst is recorded).
        metric, reduce: the similarity of the RDLV (``ssim``, ``psnr``, ``mse``) and how a
            client's RDLV is reduced over its examples (``max`` or ``min``).
        threshold: withhold an update whose RDLV exceeds this (None: record only).
        prior: what the server would guess without the update, the RDLV's baseline: ``"mean"``
            (the normalisation's mean colour) or public images (N x C x H x W pixels in [0, 1],
            their mean image is used).
        max_examples: clients with more training examples are recorded as not attacked (the
            attack's cost grows with the batch it reconstructs).
        save_images: write originals, priors and reconstructions (they are private data: the
            audit directory must stay where the client's data may be).
        seed: the audit's seed (each update's attack draws from it, the round and the client).
        framework: recorded in each row (``flower``, ``nvflare``, ``python``).
    """

    def __init__(
        self,
        model: ModelSpec,
        *,
        out: str | Path,
        model_args: Mapping[str, Any] | None = None,
        mean: tuple[float, ...] | float | None = None,
        std: tuple[float, ...] | float | None = None,
        num_classes: int | None = None,
        attack: str = "inverting-gradients",
        settings: Mapping[str, Any] | None = None,
        also: tuple[str, ...] | list[str] = (),
        metric: str = "ssim",
        reduce: str = "max",
        threshold: float | None = None,
        prior: str | torch.Tensor = "mean",
        max_examples: int = 64,
        save_images: bool = True,
        seed: int = 0,
        framework: str = "python",
        device: str = "cpu",
    ) -> None:
        from gradleak.audit.config import AuditConfig

        self.build = model_factory(model, model_args)
        self.model_name = describe(model)
        self.out = Path(out)
        self.mean, self.std = mean, std
        self.num_classes = num_classes
        self.config = AuditConfig(
            preset=attack,
            attack=dict(settings or {"iterations": 300}),
            also=list(also),
            metric=metric,
            reduce=reduce,  # type: ignore[arg-type]
            threshold=threshold,
            save_images=save_images,
        )
        if isinstance(prior, str) and prior not in ("mean", "none"):
            raise ConfigError("prior", f"{prior!r} is not 'mean' or a tensor of public images")
        self.prior = prior
        self.max_examples, self.seed = max_examples, seed
        self.framework, self.device = framework, device
        self._dir: AuditDir | None = None
        self._audits: dict[tuple[int, ...], Any] = {}

    # -- the pieces --------------------------------------------------------------------------------
    @property
    def directory(self) -> AuditDir:
        """The audit directory, claimed on first use (in the process that audits)."""
        if self._dir is None:
            self._dir = AuditDir.claim(self.out)
        return self._dir

    def _spec(self, shape: tuple[int, ...]) -> Any:
        from gradleak.images.spec import ImageSpec

        if len(shape) != 3:
            raise ConfigError("examples", f"images must be N x C x H x W, got {('N', *shape)}")
        c = shape[0]

        def per_channel(v: Any, default: float) -> tuple[float, ...]:
            if v is None:
                return (default,) * c
            if isinstance(v, int | float):
                return (float(v),) * c
            return tuple(float(x) for x in v)

        return ImageSpec(
            (int(shape[0]), int(shape[1]), int(shape[2])),
            per_channel(self.mean, 0.0),
            per_channel(self.std, 1.0),
        )

    def _leakage_audit(self, spec: Any, model: nn.Module, prior: torch.Tensor) -> Any:
        from gradleak.audit.filter import LeakageAudit

        key = spec.shape
        if key not in self._audits:
            classes = self.num_classes or last_linear_outputs(model)
            self._audits[key] = LeakageAudit(
                self.config,
                model=model,
                spec=spec,
                num_classes=classes,
                prior=prior,
                out_dir=None,
                defenses="",
                device=self.device,
            )
        return self._audits[key]

    def _prior(self, spec: Any) -> torch.Tensor:
        if isinstance(self.prior, torch.Tensor):
            p = self.prior.detach().float()
            if p.dim() == 3:
                p = p.unsqueeze(0)
            if tuple(p.shape[1:]) != tuple(spec.shape):
                raise ConfigError(
                    "prior", f"prior images are {tuple(p.shape[1:])}, the data {spec.shape}"
                )
            return p.mean(0, keepdim=True).clamp(0, 1)
        return spec.prior("none", None)  # the mean colour: needs no public data

    def _pixels(self, examples: torch.Tensor, spec: Any) -> torch.Tensor:
        """The client's model inputs as pixels in [0, 1] (its normalisation undone)."""
        from gradleak.images.data import denormalize

        x = denormalize(examples.detach().float().cpu(), spec.mean, spec.std)
        low, high = float(x.min()), float(x.max())
        if low < -1e-3 or high > 1 + 1e-3:
            raise ConfigError(
                "mean/std",
                f"the examples undo to pixels in [{low:.3g}, {high:.3g}], not [0, 1]: give the "
                "normalisation (mean, std) of the client's input pipeline",
            )
        return x.clamp(0, 1).contiguous()

    # -- the audit ---------------------------------------------------------------------------------
    def audit(
        self,
        *,
        global_state: Mapping[str, Any],
        update: Mapping[str, Any],
        examples: torch.Tensor,
        labels: torch.Tensor,
        training: Training,
        round: int,
        client: object,
        update_kind: str = "weights",
        extra: Mapping[str, Any] | None = None,
    ) -> AuditResult:
        """Attack one update and record it (see the class). ``update_kind``: ``weights`` (the
        client's new weights) or ``diff`` (new minus global). Raises on bad inputs; ``safe_audit``
        records a failure instead."""
        with isolated_randomness():  # building the model and attacking draw random numbers
            return self._audit(
                global_state=global_state,
                update=update,
                examples=examples,
                labels=labels,
                training=training,
                round=round,
                client=client,
                update_kind=update_kind,
                extra=extra,
            )

    def _audit(
        self,
        *,
        global_state: Mapping[str, Any],
        update: Mapping[str, Any],
        examples: torch.Tensor,
        labels: torch.Tensor,
        training: Training,
        round: int,
        client: object,
        update_kind: str,
        extra: Mapping[str, Any] | None,
    ) -> AuditResult:
        start = time.perf_counter()
        name = client_name(client)
        spec = self._spec(tuple(examples.shape[1:]))
        model = self.build()
        reference = model.state_dict()
        glob = as_tensors(global_state, reference)
        check_state(reference, glob, "global model", finite=False)
        received = as_tensors(update, reference)
        check_state(reference, received, f"update ({update_kind})", finite=False)
        if update_kind == "weights":
            delta = {k: received[k] - glob[k] for k in reference}
        elif update_kind == "diff":
            delta = {k: received[k] for k in reference}
        else:
            raise ConfigError("update_kind", f"{update_kind!r} is not 'weights' or 'diff'")
        n = int(examples.shape[0])
        if int(labels.shape[0]) != n:
            raise ConfigError("labels", f"{labels.shape[0]} labels for {n} examples")
        meta = training.meta(n, round)
        buffers = frozenset(k for k, _ in model.named_buffers())
        update_obj = ClientUpdate(delta, meta, buffers)
        row: dict[str, Any] = {
            "round": int(round),
            "client": name,
            "num_samples": n,
            "batch_size": meta.batch_size,
            "lr": meta.lr,
            "epochs": meta.epochs,
            "steps": meta.steps,
            "momentum": meta.momentum,
            "update_norm": update_obj.l2_norm(),
            "update_kind": update_kind,
            "threshold": self.config.threshold,
            "framework": self.framework,
            **dict(extra or {}),
        }
        finite = all(
            bool(torch.isfinite(v).all())
            for v in (*delta.values(), *glob.values())
            if v.is_floating_point()
        )
        if n > self.max_examples:
            record: dict[str, Any] = {
                "audited": False,
                "rdlv": None,
                "audit_note": f"at least {n} training examples, more than max_examples "
                f"{self.max_examples}: not attacked",
            }
            matched = None
        elif not finite:
            record = {
                "audited": True,
                "rdlv": None,
                "attack": self.config.preset,
                "audit_note": "update or global model not finite; not attacked",
            }
            matched = None
        else:
            truth = self._pixels(examples, spec)
            prior = self._prior(spec)
            audit = self._leakage_audit(spec, model, prior)
            view = audit.view(glob, update_obj, labels.detach().long().cpu())
            record, matched = audit.examine(
                view,
                truth,
                labels.detach().long().cpu(),
                seed=derive_seed(self.seed, "audit", round, name),
            )
            record.pop("defenses", None)
            if matched is not None and self.config.save_images:
                priors = prior.expand(n, *prior.shape[1:])
                record["images"] = self.directory.save_images(round, name, truth, priors, matched)
        threshold = self.config.threshold
        rdlv = record.get("rdlv")
        withhold = threshold is not None and rdlv is not None and rdlv > threshold
        row.update({k: finite_or_none(v) for k, v in record.items()})
        row.update(withheld=withhold, seconds=time.perf_counter() - start)
        self._record(row)
        return AuditResult(row, withhold)

    def safe_audit(self, *, round: int, client: object, **kwargs: Any) -> AuditResult:
        """``audit``, failing closed: any error is recorded as a row with ``audit_error`` and the
        update withheld (never raised into the framework)."""
        try:
            return self.audit(round=round, client=client, **kwargs)
        except Exception as exc:  # noqa: BLE001 - recorded; the federation goes on
            return self.failure(round, client, exc, extra=kwargs.get("extra"))

    def failure(
        self,
        round: int,
        client: object,
        exc: BaseException | str,
        extra: Any = None,
        *,
        withhold: bool = True,
    ) -> AuditResult:
        """Record a failed audit and return it: the update withheld (failing closed), unless the
        caller cannot withhold (``withhold=False``: a server that only observes)."""
        why = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}".strip()
        row = {
            "round": int(round),
            "client": client_name(client),
            "num_samples": 1,
            "batch_size": 1,
            "audited": False,
            "withheld": withhold,
            "rdlv": None,
            "threshold": self.config.threshold,
            "framework": self.framework,
            "audit_error": why,
            **dict(extra or {}),
        }
        try:
            self._record(row)
        except (OSError, GradleakError):
            pass  # the row could not be written either: the verdict still withholds
        return AuditResult(row, withhold, error=why)

    def _record(self, row: dict[str, Any]) -> None:
        d = self.directory
        d.write_meta(
            {
                "modality": "image",
                "model": self.model_name,
                "attack": self.config.preset,
                "settings": self.config.attack,
                "also": self.config.also,
                "metric": self.config.metric,
                "reduce": self.config.reduce,
                "threshold": self.config.threshold,
                "prior": "public images" if isinstance(self.prior, torch.Tensor) else self.prior,
                "framework": self.framework,
            }
        )
        d.append(row)


def collect(
    data: Any,
    *,
    input_key: str | int = 0,
    label_key: str | int = 1,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(examples, labels) of a client's data: a pair of tensors, or an iterable of batches (a
    ``DataLoader``) or of single examples (a ``Dataset``), each a pair or a dict (``input_key``,
    ``label_key``: quickstart loaders yield ``{"img": ..., "label": ...}``). Stops past ``limit``
    examples (the caller then knows the client holds more than it will attack)."""
    if isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return data[0], torch.as_tensor(data[1])
    xs, ys, count = [], [], 0
    for batch in data:
        if isinstance(batch, Mapping):
            x, y = batch[input_key], batch[label_key]
        else:
            x, y = batch[0], batch[1]
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        if y.dim() == 0:  # a dataset of single examples, not a loader of batches
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        xs.append(x)
        ys.append(y)
        count += len(xs[-1])
        if limit is not None and count > limit:
            break
    if not xs:
        raise ConfigError("data", "the client's data holds no examples")
    return torch.cat(xs), torch.cat(ys)


DataSource = Callable[..., Any]
