"""gradleak's leakage audit in the user's own NVFlare job (NVFlare 2.9).

``RelativeDataLeakageValueFilter`` is a task-result filter that takes the arguments of NVFlare's
own filter of that name (its gradient-inversion research example: ``data_root``,
``dataset_json``, ``frequency``, ``start_round``, ``inverter_name``, ``sim_metric_name``,
``prior_filename``, ``image_key``, ``rdlv_reduce``, ``rdlv_threshold``, ``data_kinds``,
``save_best_matches``), with the same defaults and the same rounds: round ``r`` (NVFlare's, from
0) is audited when ``r % frequency == 0 and r >= start_round``. gradleak's attack replaces the
example's inverter and similarity components (their names are accepted and kept, not used); what
gradleak needs beyond them comes as further keyword arguments: the model (a class path, or the
model-spec dict ``{"path": ..., "args": {...}}``), the local training facts, the image size and
normalisation, the audit directory and the attack's settings.

It audits full weights (``WEIGHTS``, as the Client API sends them) and weight differences
(``WEIGHT_DIFF``) alike, for any site name. The global model is taken from the task as the site
received it (the filter listens to NVFlare's ``BEFORE_TASK_EXECUTION`` event: the task data is gone
by the time result filters run). Above the threshold the DXO is emptied, as NVFlare's filter does
(FedAvg then leaves the site out of the round). Any failure is recorded in the audit directory
and the update withheld: the filter never raises into the job.

``LeakageAuditor`` is the server's side: a task-result filter on the server that attacks every
result it receives (the honest-but-curious server) and records it, never changing it (its rows
say ``withheld: false``; a failure is recorded as a row with ``audit_error``).

NVFlare builds only allow-listed classes: add ``"gradleak.integrations.nvflare"`` to the
``class_allow_list`` of each site's (and the server's) ``local/resources.json``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable
from nvflare.app_common.app_constant import AppConstants

from gradleak.integrations.auditor import AuditResult, Training, UpdateAuditor

# The Client API's meta key of the steps a site trained this round.
NUM_STEPS = "NUM_STEPS_CURRENT_ROUND"


def audited_round(round: int, frequency: int, start_round: int) -> bool:
    """NVFlare's predicate: round ``round`` (from 0) is audited."""
    return round % frequency == 0 and round >= start_round


def _copy(data: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v.detach().clone() if isinstance(v, torch.Tensor) else np.array(v, copy=True)
        for k, v in data.items()
    }


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


class _Audits:
    """The part both filters share: building the auditor, the training facts, the site's data
    and the prior, from the filter's arguments (declared here, set by each filter)."""

    model: str | dict[str, Any] | None
    model_args: dict[str, Any] | None
    lr: float | str
    epochs: int | str
    batch_size: int | str | None
    momentum: float | str
    local_steps: int | str | None
    image_size: int
    channels: int
    mean: float | list[float] | None
    std: float | list[float] | None
    num_classes: int | None
    audit_dir: str
    attack: str
    iterations: int
    attack_settings: dict[str, Any] | None
    metric: str
    max_examples: int
    seed: int
    prior_filename: str | None
    image_key: str
    rdlv_reduce: str
    rdlv_threshold: float | None
    save_best_matches: bool

    def _make_auditor(self, framework: str) -> UpdateAuditor:
        if self.model is None:
            raise ValueError("model is required: the class path of the network, or its model spec")
        return UpdateAuditor(
            self.model,
            out=Path(self.audit_dir),
            model_args=self.model_args,
            mean=self.mean,
            std=self.std,
            num_classes=self.num_classes,
            attack=self.attack,
            settings={**(self.attack_settings or {}), "iterations": self.iterations},
            metric=self.metric,
            reduce=self.rdlv_reduce,
            threshold=self.rdlv_threshold,
            max_examples=self.max_examples,
            save_images=self.save_best_matches,
            seed=self.seed,
            framework=framework,
        )

    def _training(self, *metas: Any) -> Training:
        """The local training facts: the filter's arguments; a key name is looked up in the
        result's and the task's meta, and the steps the Client API reports override ``epochs``."""

        def fact(value: Any) -> Any:
            if isinstance(value, str):
                for meta in metas:
                    if meta and value in meta:
                        return meta[value]
                raise KeyError(f"{value!r} is in neither the result's nor the task's meta")
            return value

        steps = self.local_steps
        if steps is None:
            steps = next((m[NUM_STEPS] for m in metas if m and NUM_STEPS in m), None)
        return Training(
            lr=float(fact(self.lr)),
            epochs=int(fact(self.epochs)),
            batch_size=_int_or_none(fact(self.batch_size)),
            momentum=float(fact(self.momentum)),
            local_steps=_int_or_none(fact(steps)),
        )

    def _load(self, data_root: str, dataset_json: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The site's training list (``training`` of the MONAI-style data list) as model
        inputs: pixels in [0, 1], resized, then normalised by (mean, std)."""
        from gradleak.images.data import normalize
        from gradleak.images.formats import _stack, read_split_list

        if self.image_key != "image":
            raise ValueError(f"image_key {self.image_key!r}: data lists are read by 'image'")
        paths, labels = read_split_list(Path(dataset_json), Path(data_root))["training"]
        x = _stack(paths, self.image_size, self.channels)
        c = self.channels
        mean = self.mean if isinstance(self.mean, list | tuple) else [self.mean or 0.0] * c
        std = self.std if isinstance(self.std, list | tuple) else [self.std or 1.0] * c
        return normalize(x, tuple(mean), tuple(std)), torch.tensor(labels, dtype=torch.int64)

    def _prior(self, fl_ctx: FLContext) -> Any:
        if not self.prior_filename:
            return "mean"
        from gradleak.images.formats import read_image

        path = Path(self.prior_filename)
        root = fl_ctx.get_prop(FLContextKey.APP_ROOT)
        if not path.is_absolute() and root and (Path(root) / path).exists():
            path = Path(root) / path
        return torch.from_numpy(read_image(path, self.image_size, self.channels)).unsqueeze(0)


class RelativeDataLeakageValueFilter(_Audits, DXOFilter):  # type: ignore[misc]
    """NVFlare's RDLV filter, with gradleak's attack: see the module.

    Args (NVFlare's, same defaults):
        data_root, dataset_json: the site's data list (``{"training": [{"image", "label"}]}``).
        frequency, start_round: audit round ``r`` when ``r % frequency == 0 and r >=
            start_round`` (rounds from 0).
        inverter_name, sim_metric_name: the example's component ids (kept, not used).
        prior_filename: an image, the RDLV's baseline (default: the normalisation's mean colour).
        image_key: the data list's image key (``image``).
        rdlv_reduce, rdlv_threshold: a site's RDLV over its images; above the threshold the DXO
            is emptied.
        data_kinds: the kinds filtered (default WEIGHT_DIFF and WEIGHTS).
        save_best_matches: write the originals, prior and reconstructions.

    Args (gradleak's):
        model, model_args: the network (class path or model spec ``{"path", "args"}``).
        lr, epochs, batch_size, momentum, local_steps: the site's local SGD (a value, or a key of
            the result's or task's meta); the Client API's NUM_STEPS_CURRENT_ROUND gives the steps.
        image_size, channels, mean, std: how the learner reads the images (NVFlare's example:
            224, 3) and normalises them.
        num_classes, audit_dir, attack, iterations, attack_settings, metric, max_examples, seed:
            the audit's settings (``UpdateAuditor``).
    """

    def __init__(
        self,
        data_root: str,
        dataset_json: str,
        frequency: int = 1,
        start_round: int = 0,
        inverter_name: str = "grad_inverter",
        sim_metric_name: str = "sim_metric",
        prior_filename: str | None = None,
        image_key: str = "image",
        rdlv_reduce: str = "max",
        rdlv_threshold: float = 1.0,
        data_kinds: list[str] | None = None,
        save_best_matches: bool = False,
        model: str | dict[str, Any] | None = None,
        model_args: dict[str, Any] | None = None,
        lr: float | str = 0.01,
        epochs: int | str = 1,
        batch_size: int | str | None = None,
        momentum: float | str = 0.0,
        local_steps: int | str | None = None,
        image_size: int = 224,
        channels: int = 3,
        mean: float | list[float] | None = None,
        std: float | list[float] | None = None,
        num_classes: int | None = None,
        audit_dir: str = "gradleak-audit",
        attack: str = "inverting-gradients",
        iterations: int = 300,
        attack_settings: dict[str, Any] | None = None,
        metric: str = "ssim",
        max_examples: int = 64,
        seed: int = 0,
    ) -> None:
        kinds = data_kinds or [DataKind.WEIGHT_DIFF, DataKind.WEIGHTS]
        super().__init__(
            supported_data_kinds=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF],
            data_kinds_to_filter=kinds,
        )
        # every argument kept under its own name (NVFlare's job API reads them back)
        self.data_root, self.dataset_json = data_root, dataset_json
        self.frequency, self.start_round = frequency, start_round
        self.inverter_name, self.sim_metric_name = inverter_name, sim_metric_name
        self.prior_filename, self.image_key = prior_filename, image_key
        self.rdlv_reduce, self.rdlv_threshold = rdlv_reduce, rdlv_threshold
        self.data_kinds, self.save_best_matches = data_kinds, save_best_matches
        self.model, self.model_args = model, model_args
        self.lr, self.epochs, self.batch_size = lr, epochs, batch_size
        self.momentum, self.local_steps = momentum, local_steps
        self.image_size, self.channels, self.mean, self.std = image_size, channels, mean, std
        self.num_classes, self.audit_dir = num_classes, audit_dir
        self.attack, self.iterations, self.attack_settings = attack, iterations, attack_settings
        self.metric, self.max_examples, self.seed = metric, max_examples, seed
        # NVFlare's own checks of its arguments, at construction as there
        if not isinstance(data_root, str) or not Path(data_root).is_dir():
            raise ValueError(f"`data_root` directory does not exist at {data_root}")
        if not isinstance(dataset_json, str) or not Path(dataset_json).is_file():
            raise ValueError(f"`dataset_json` file does not exist at {dataset_json}")
        if rdlv_reduce not in ("max", "min"):
            raise ValueError(f"No such `rdlv_reduce` supported {rdlv_reduce}")
        self.auditor = self._make_auditor("nvflare")
        self._data: tuple[torch.Tensor, torch.Tensor] | None = None
        self._prior_set = False
        # site -> (round, global state, task meta) of the task being executed
        self._tasks: dict[str, tuple[Any, dict[str, Any], dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Keep the global model of each task as the site receives it."""
        if event_type != EventType.BEFORE_TASK_EXECUTION:
            return
        task = fl_ctx.get_prop(FLContextKey.TASK_DATA)
        if not isinstance(task, Shareable):
            return
        try:
            dxo = from_shareable(task)
        except Exception:  # noqa: BLE001 - not a model task
            return
        if dxo.data_kind != DataKind.WEIGHTS or not dxo.data:
            return
        meta = {**dict(task.get(ReservedHeaderKey.HEADERS) or {}), **dict(dxo.meta or {})}
        # the task's header holds its round (the DXO's meta may still name an earlier one)
        round = task.get_header(AppConstants.CURRENT_ROUND)
        if round is None:
            round = dxo.get_meta_prop(AppConstants.CURRENT_ROUND)
        with self._lock:
            self._tasks[str(fl_ctx.get_identity_name())] = (round, _copy(dxo.data), meta)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if not dxo.data:
            return None
        site = str(fl_ctx.get_identity_name())
        with self._lock:
            task = self._tasks.get(site)
        round = dxo.get_meta_prop(AppConstants.CURRENT_ROUND)
        if round is None:
            round = shareable.get_header(AppConstants.CURRENT_ROUND)
        if round is None and task is not None:
            round = task[0]
        if round is None:
            why = "no current round in the result or the task: not audited"
            result = self.auditor.failure(0, site, why, extra={"round_unknown": True})
            return self._verdict(dxo, result, fl_ctx)
        round = int(round)
        if not audited_round(round, self.frequency, self.start_round):
            return dxo
        try:
            if task is None or task[0] is not None and int(task[0]) != round:
                raise RuntimeError(
                    "the global model of this task was not seen (the filter must be a task-result "
                    "filter of the site that executed the task)"
                )
            if self._data is None:
                self._data = self._load(self.data_root, self.dataset_json)
            if not self._prior_set:
                self.auditor.prior = self._prior(fl_ctx)
                self._prior_set = True
            kind = "weights" if dxo.data_kind == DataKind.WEIGHTS else "diff"
            result = self.auditor.audit(
                global_state=task[1],
                update=dxo.data,
                update_kind=kind,
                examples=self._data[0],
                labels=self._data[1],
                training=self._training(dxo.meta, task[2]),
                round=round,
                client=site,
            )
        except Exception as exc:  # noqa: BLE001 - recorded; never raised into the job
            self.log_exception(fl_ctx, "gradleak's audit failed: the update is withheld")
            result = self.auditor.failure(round, site, exc)
        return self._verdict(dxo, result, fl_ctx)

    def _verdict(self, dxo: DXO, result: AuditResult, fl_ctx: FLContext) -> DXO:
        if result.withhold:
            why = result.error or f"RDLV {result.rdlv} is over the threshold {self.rdlv_threshold}"
            self.log_warning(fl_ctx, f"gradleak withholds the update: {why}. Remove data.")
            dxo.data = {}
        else:
            self.log_info(fl_ctx, f"gradleak RDLV: {result.rdlv}")
        return dxo


class LeakageAuditor(_Audits, DXOFilter):  # type: ignore[misc]
    """The server's side: a task-result filter on the server (``add_server_input_filter``) that
    attacks every model result it receives, as an honest-but-curious server would, scores it
    against the site's data (``truth``: what an evaluator knows, site name -> ``{"data_root",
    "dataset_json"}``) and records it. It never changes a result (no threshold); a failure is
    recorded. The global model is the task as the server sent it to that site
    (``AFTER_TASK_DATA_FILTER``).

    Args: ``truth``, then the round and RDLV arguments of ``RelativeDataLeakageValueFilter``
    (``frequency``, ``start_round``, ``prior_filename``, ``image_key``, ``rdlv_reduce``,
    ``save_best_matches``) and gradleak's (``model``, training facts, image size and
    normalisation, ``audit_dir``, attack settings).
    """

    def __init__(
        self,
        truth: dict[str, dict[str, str]],
        frequency: int = 1,
        start_round: int = 0,
        prior_filename: str | None = None,
        image_key: str = "image",
        rdlv_reduce: str = "max",
        save_best_matches: bool = False,
        model: str | dict[str, Any] | None = None,
        model_args: dict[str, Any] | None = None,
        lr: float | str = 0.01,
        epochs: int | str = 1,
        batch_size: int | str | None = None,
        momentum: float | str = 0.0,
        local_steps: int | str | None = None,
        image_size: int = 224,
        channels: int = 3,
        mean: float | list[float] | None = None,
        std: float | list[float] | None = None,
        num_classes: int | None = None,
        audit_dir: str = "gradleak-server-audit",
        attack: str = "inverting-gradients",
        iterations: int = 300,
        attack_settings: dict[str, Any] | None = None,
        metric: str = "ssim",
        max_examples: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(
            supported_data_kinds=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF],
            data_kinds_to_filter=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF],
        )
        self.truth, self.frequency, self.start_round = truth, frequency, start_round
        self.prior_filename, self.image_key = prior_filename, image_key
        self.rdlv_reduce, self.save_best_matches = rdlv_reduce, save_best_matches
        self.rdlv_threshold = None
        self.model, self.model_args = model, model_args
        self.lr, self.epochs, self.batch_size = lr, epochs, batch_size
        self.momentum, self.local_steps = momentum, local_steps
        self.image_size, self.channels, self.mean, self.std = image_size, channels, mean, std
        self.num_classes, self.audit_dir = num_classes, audit_dir
        self.attack, self.iterations, self.attack_settings = attack, iterations, attack_settings
        self.metric, self.max_examples, self.seed = metric, max_examples, seed
        self.auditor = self._make_auditor("nvflare-server")
        self._data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prior_set = False
        self._sent: dict[str, tuple[Any, dict[str, Any], dict[str, Any]]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _peer(fl_ctx: FLContext) -> str:
        peer = fl_ctx.get_peer_context()
        return str(peer.get_identity_name()) if peer is not None else "unknown"

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Keep the global model the server sends each site."""
        if event_type != EventType.AFTER_TASK_DATA_FILTER:
            return
        task = fl_ctx.get_prop(FLContextKey.TASK_DATA)
        if not isinstance(task, Shareable):
            return
        try:
            dxo = from_shareable(task)
        except Exception:  # noqa: BLE001 - not a model task
            return
        if dxo.data_kind != DataKind.WEIGHTS or not dxo.data:
            return
        round = task.get_header(AppConstants.CURRENT_ROUND)
        meta = {**dict(task.get(ReservedHeaderKey.HEADERS) or {}), **dict(dxo.meta or {})}
        with self._lock:
            self._sent[self._peer(fl_ctx)] = (round, _copy(dxo.data), meta)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if not dxo.data:
            return None  # withheld by the site: nothing reached the server
        site = self._peer(fl_ctx)
        with self._lock:
            sent = self._sent.get(site)
        round = dxo.get_meta_prop(AppConstants.CURRENT_ROUND)
        if round is None:
            round = shareable.get_header(AppConstants.CURRENT_ROUND)
        if round is None and sent is not None:
            round = sent[0]
        try:
            if round is None:
                raise RuntimeError("no current round in the result or the task")
            if not audited_round(int(round), self.frequency, self.start_round):
                return None
            if sent is None or sent[0] is not None and int(sent[0]) != int(round):
                raise RuntimeError(f"the server sent {site} no model for round {round}")
            if site not in self._data:
                if site not in self.truth:
                    raise KeyError(f"no data of site {site!r} in truth")
                spec = self.truth[site]
                self._data[site] = self._load(spec["data_root"], spec["dataset_json"])
            if not self._prior_set:
                self.auditor.prior = self._prior(fl_ctx)
                self._prior_set = True
            examples, labels = self._data[site]
            result = self.auditor.audit(
                global_state=sent[1],
                update=dxo.data,
                update_kind="weights" if dxo.data_kind == DataKind.WEIGHTS else "diff",
                examples=examples,
                labels=labels,
                training=self._training(dxo.meta, sent[2]),
                round=int(round),
                client=site,
            )
            self.log_info(fl_ctx, f"gradleak (server) RDLV of {site}: {result.rdlv}")
        except Exception as exc:  # noqa: BLE001 - recorded; the server goes on
            self.log_exception(fl_ctx, "gradleak's server-side audit failed")
            self.auditor.failure(int(round or 0), site, exc, withhold=False)
        return None  # the result goes on unchanged


__all__ = [
    "NUM_STEPS",
    "LeakageAuditor",
    "RelativeDataLeakageValueFilter",
    "audited_round",
]
