"""The seams a modality plugs into: an input spec and a task (an attack is the third,
``attacks.base.Attack``). The core (federation, audit, defences, store, engines, report) depends on
these protocols and on registries, never on pixels or tokens.

- ``InputSpec``: what one example is, how a batch becomes what the model reads, how examples are
  compared (the leakage metrics, each knowing its direction, and the cheap cost that pairs
  reconstructions with originals), what the server would guess without an update (the prior of
  RDLV), and how a batch is shown in a report. Its ``kind`` is the data-kind tag (NVFlare-style)
  that
  travels with every update and audit row.
- ``Task``: the loss clients train with and the evaluation the server reports.
- ``Renderer``: how captioned rows of examples are shown, found by the data kind: a file beside an
  audit's examples (images: a PNG grid) and an HTML fragment for the report (everything escaped).

A modality is a package that registers its input spec, data sources, models, tasks and attacks
in the registries below (and in ``models.MODELS``, ``attacks.ATTACKS``); it is found through the
``gradleak.modalities`` entry point of its distribution, so adding one edits no core file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from gradleak.registry import Registry

if TYPE_CHECKING:
    from gradleak.data.dataset import Dataset


@dataclass(frozen=True)
class Metric:
    """A leakage metric on pairs of examples: ``fn(a, b)`` gives one value per pair (N,)."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    higher_is_better: bool

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fn(a, b)


@runtime_checkable
class InputSpec(Protocol):
    """What one example of a modality is, and how examples are fed, compared, guessed and shown."""

    kind: ClassVar[str]  # the data-kind tag: "image", "text", ...

    def model_inputs(self, examples: torch.Tensor) -> torch.Tensor:
        """A batch of examples as the model reads it (images: normalised; text: token ids)."""
        ...

    @property
    def metrics(self) -> dict[str, Metric]:
        """The leakage metrics of this modality, by name; each knows whether higher is better."""
        ...

    def cost(self, recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """R x M: how far each reconstruction is from each original (lower is closer); cheap, since
        it only pairs them before the metrics run on the pairs."""
        ...

    def factory_args(self) -> dict[str, Any]:
        """What a model factory of this modality receives (e.g. channels and image_size)."""
        ...

    def blank(self, n: int) -> torch.Tensor:
        """``n`` neutral examples (a model's shape probe)."""
        ...

    def prior(self, name: str, public: Dataset) -> torch.Tensor:
        """What the server would guess without the update (RDLV's baseline), one example or one per
        example, by ``name`` (the audit's ``prior``), from public data the server holds."""
        ...


@runtime_checkable
class Task(Protocol):
    """What clients optimise and what the server reports of the global model."""

    name: ClassVar[str]

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss of a batch (``inputs`` as ``InputSpec.model_inputs`` made them)."""
        ...

    def evaluate(
        self, model: nn.Module, test: Dataset, spec: InputSpec, *, device: Any
    ) -> tuple[float, float]:
        """(accuracy, mean loss) of ``model`` on ``test``."""
        ...

    def check_output(self, output: Any, inputs: torch.Tensor, num_classes: int) -> str | None:
        """None when ``output`` (the model's output on ``inputs``) is what this task trains on;
        else what it should have been (the model probe reports it before any training)."""
        ...


Rows = Sequence[tuple[str, torch.Tensor]]  # captioned rows of examples


@dataclass(frozen=True)
class Renderer:
    """How a modality shows examples: ``file(rows)`` is written as ``NAME.{suffix}`` beside an
    audit's examples; ``html(rows, alt)`` is a report fragment (everything in it escaped);
    ``accepts(array)`` says whether an array read back from a run directory is a batch of examples
    it can show (a damaged or hostile file is left out of the report). A modality whose examples
    cannot be shown without their spec (text: token ids need the tokenizer's vocabulary) gives
    ``bind``, which makes the renderer of one spec's examples (``for_spec``)."""

    suffix: str
    file: Callable[[Rows], bytes]
    html: Callable[[Rows, str], str]
    accepts: Callable[[Any], bool]
    bind: Callable[[InputSpec], Renderer] | None = None

    def for_spec(self, spec: InputSpec) -> Renderer:
        """The renderer of ``spec``'s examples (itself when it needs no spec)."""
        return self if self.bind is None else self.bind(spec)


TASKS: Registry[type[Task]] = Registry("task")
RENDERERS: Registry[Renderer] = Registry("renderer")
# The metadata of a saved update (``gradleak attack --meta``), by data kind
# (``attacks.files.UpdateMetadata``).
METADATA: Registry[type] = Registry("modality")

# Modalities: name -> the package that registers its components (imported on first use).
MODALITIES: dict[str, str] = {}


def load_modalities() -> list[str]:
    """Import every installed modality package (the ``gradleak.modalities`` entry points), so that
    its sources, models, tasks and attacks are registered; return their names."""
    if not MODALITIES:
        for ep in entry_points(group="gradleak.modalities"):
            MODALITIES[ep.name] = ep.value
    for module in MODALITIES.values():
        importlib.import_module(module)
    return sorted(MODALITIES)


__all__ = [
    "METADATA",
    "MODALITIES",
    "RENDERERS",
    "TASKS",
    "InputSpec",
    "Metric",
    "Renderer",
    "Rows",
    "Task",
    "load_modalities",
]
