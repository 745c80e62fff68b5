"""gradleak's leakage audit in the user's own Flower app (message API, flwr 1.41).

- ``leakage_mod(model, data=...)``: a client mod for any ClientApp (``@app.train(mods=[...])``
  or ``ClientApp(mods=[...])``). On each audited training round it attacks the reply the app is
  about to send, exactly as the server would receive it, scores the attack against the client's
  own examples and records one row in the audit directory. Every other message, and every reply
  below the threshold, passes untouched (the same object). Above the threshold, or when the audit
  fails, the reply becomes a Flower error reply (``MOD_FAILED_PRECONDITION``): the update stays on
  the client and FedAvg aggregates the others. The mod never raises into Flower.
- ``defense_mod(defense, model)``: a client mod applying one of gradleak's defences (a
  ``defenses:`` entry such as ``{"name": "dp-gaussian", "clip": 1.0, "noise_multiplier": 1.0}``)
  to every training reply, with the same noise and accounting as a gradleak run; its fields
  (``dp_epsilon``, ...) travel in the reply's ``gradleak-defense`` ConfigRecord. Mods stack: in
  ``mods=[leakage_mod(...), defense_mod(...)]`` the audit sees the defended update, as the server
  does.
- ``LeakageAuditStrategy(strategy, model, truth=...)``: wraps any Strategy as an honest-but-curious
  server: it attacks every training reply it receives, records the rows, and hands the same
  replies to the wrapped strategy (the aggregate is unchanged).

The local training facts are read per message (the learning rate from the round's config, epochs
and batch size from the run config: quickstart-pytorch's ``lr``, ``local-epochs`` and
``batch-size`` by default), and the audit's knobs can be overridden per run from ``run_config``
(``gradleak-threshold``, ``gradleak-iterations``, ...: ``RUN_CONFIG_KNOBS``). Importing this
module changes no global setting of Flower (environment, home directory, log levels).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from gradleak.integrations.auditor import (
    AuditResult,
    Training,
    UpdateAuditor,
    collect,
    isolated_randomness,
)
from gradleak.integrations.defense import UpdateDefense
from gradleak.integrations.models import ModelSpec

log = logging.getLogger("gradleak")

# A training fact: a number, the name of a key (the round's config first, then the run config),
# or a function of (message, context).
Fact = float | int | str | Callable[[Message, Context], Any] | None

# run_config keys that override the audit's knobs for one run (``flwr run --run-config``).
RUN_CONFIG_KNOBS = {
    "gradleak-enabled": "enabled",
    "gradleak-out": "out",
    "gradleak-attack": "attack",
    "gradleak-iterations": "iterations",
    "gradleak-threshold": "threshold",
    "gradleak-frequency": "frequency",
    "gradleak-start-round": "start_round",
    "gradleak-max-examples": "max_examples",
    "gradleak-metric": "metric",
    "gradleak-seed": "seed",
}


@dataclass(frozen=True)
class Knobs:
    """The audit's settings that a run may override: where, which attack, how hard, when, and
    the threshold (None: record only, never withhold)."""

    out: str = "gradleak-audit"
    attack: str = "inverting-gradients"
    iterations: int = 300
    threshold: float | None = None
    frequency: int = 1
    start_round: int = 1
    max_examples: int = 64
    metric: str = "ssim"
    seed: int = 0
    enabled: bool = True

    def with_run_config(self, run_config: Mapping[str, Any]) -> Knobs:
        """These knobs with the run's ``gradleak-*`` overrides (threshold ``"none"``: record
        only)."""
        changes: dict[str, Any] = {}
        for key, name in RUN_CONFIG_KNOBS.items():
            if key not in run_config:
                continue
            value = run_config[key]
            if name == "threshold":
                off = value is None or str(value).lower() in ("", "none", "off")
                value = None if off else float(value)
            elif name in ("iterations", "frequency", "start_round", "max_examples", "seed"):
                value = int(value)
            elif name == "enabled":
                value = value if isinstance(value, bool) else str(value).lower() == "true"
            else:
                value = str(value)
            changes[name] = value
        return replace(self, **changes) if changes else self

    def audits(self, round: int) -> bool:
        """Whether round ``round`` (Flower's, from 1) is audited."""
        return (
            self.enabled
            and round >= self.start_round
            and (round - self.start_round) % self.frequency == 0
        )


def _fact(fact: Fact, msg: Message, context: Context, config: Mapping[str, Any]) -> Any:
    if callable(fact):
        return fact(msg, context)
    if isinstance(fact, str):
        if fact in config:
            return config[fact]
        if fact in context.run_config:
            return context.run_config[fact]
        raise KeyError(f"training fact {fact!r} is neither in the round's config nor in run_config")
    return fact


def _only(records: Mapping[str, Any], key: str | None, what: str) -> Any:
    """The record named ``key``, or the only one of its type."""
    if key is not None:
        return records[key]
    if len(records) != 1:
        raise KeyError(f"the message holds {len(records)} {what}s: name the one to audit")
    return next(iter(records.values()))


def _round(msg: Message, config: Mapping[str, Any]) -> int:
    """Flower's server round of a train message (FedAvg sends it as ``server-round``)."""
    if "server-round" in config:
        return int(config["server-round"])
    group = msg.metadata.group_id
    return int(group) if str(group).isdigit() else 0


def _is_train(msg: Message) -> bool:
    return str(msg.metadata.message_type).split(".")[0] == MessageType.TRAIN


def _error_reply(msg: Message, reason: str) -> Message:
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


@dataclass
class _Auditors:
    """One ``UpdateAuditor`` per setting of the knobs (built in the process that audits)."""

    model: ModelSpec
    options: dict[str, Any]
    framework: str
    made: dict[Knobs, UpdateAuditor] = field(default_factory=dict)

    def get(self, knobs: Knobs) -> UpdateAuditor:
        if knobs not in self.made:
            options = dict(self.options)
            settings = {**options.pop("settings", {}), "iterations": knobs.iterations}
            self.made[knobs] = UpdateAuditor(
                self.model,
                out=Path(knobs.out),
                attack=knobs.attack,
                settings=settings,
                threshold=knobs.threshold,
                max_examples=knobs.max_examples,
                metric=knobs.metric,
                seed=knobs.seed,
                framework=self.framework,
                **options,
            )
        return self.made[knobs]


def _default_client(context: Context) -> str:
    """``node-<partition-id>`` in a simulation, else ``node-<node id>``."""
    pid = context.node_config.get("partition-id")
    return f"node-{pid if pid is not None else context.node_id}"


def leakage_mod(
    model: ModelSpec,
    *,
    data: Callable[[Context], Any],
    out: str | Path = "gradleak-audit",
    lr: Fact = "lr",
    epochs: Fact = "local-epochs",
    batch_size: Fact = "batch-size",
    momentum: Fact = 0.0,
    local_steps: Fact = None,
    mean: tuple[float, ...] | float | None = None,
    std: tuple[float, ...] | float | None = None,
    input_key: str | int = "img",
    label_key: str | int = "label",
    arrays_key: str | None = None,
    client: Callable[[Context], str] = _default_client,
    attack: str = "inverting-gradients",
    iterations: int = 300,
    threshold: float | None = None,
    frequency: int = 1,
    start_round: int = 1,
    max_examples: int = 64,
    metric: str = "ssim",
    seed: int = 0,
    **options: Any,
) -> Callable[[Message, Context, Callable[[Message, Context], Message]], Message]:
    """A Flower client mod that audits every outgoing training update of this client.

    Args:
        model: the app's model (its class, a factory, a class path or a model-spec dict).
        data: ``context -> the client's training data`` (a DataLoader of dicts or pairs, or a
            pair of tensors): the examples the update was trained on, for scoring only.
        out: the audit directory (one for the whole federation; ``gradleak report OUT``), made
            absolute where the mod is built.
        lr, epochs, batch_size, momentum, local_steps: how the client trains (a value, a key of
            the round's config or of run_config, or ``(msg, context) -> value``), read per message.
        mean, std: the normalisation of the client's input pipeline (quickstart: 0.5 and 0.5).
        input_key, label_key: the keys of a batch when the loader yields dicts.
        arrays_key: the ArrayRecord holding the model (default: the message's only one).
        client: the client's name in the rows (default ``node-<partition-id>``).
        attack, iterations, threshold, frequency, start_round, max_examples, metric, seed: the
            audit's knobs, each overridable per run (``RUN_CONFIG_KNOBS``). ``threshold``:
            withhold an update whose RDLV exceeds it (None: record only).
        options: further ``UpdateAuditor`` arguments (num_classes, also, prior, reduce,
            save_images, settings, model_args).
    """
    base = Knobs(
        out=_absolute(out),
        attack=attack,
        iterations=iterations,
        threshold=threshold,
        frequency=frequency,
        start_round=start_round,
        max_examples=max_examples,
        metric=metric,
        seed=seed,
    )
    auditors = _Auditors(model, {"mean": mean, "std": std, **options}, "flower")

    def mod(
        msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        if not _is_train(msg):
            return call_next(msg, context)
        try:
            knobs = base.with_run_config(context.run_config)
            records = msg.content.config_records
            config = dict(_only(records, None, "config record")) if len(records) else {}
            round = _round(msg, config)
            sent = None
            if knobs.audits(round):
                arrays = _only(msg.content.array_records, arrays_key, "array record")
                sent = dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True))
        except Exception as exc:  # noqa: BLE001 - a message the mod cannot read: fail closed
            reply = call_next(msg, context)
            if reply.has_error():
                return reply
            return _error_reply(msg, f"gradleak withheld the update: unreadable task ({exc})")
        reply = call_next(msg, context)
        if sent is None or reply.has_error():
            return reply
        # reading the client's data (a shuffling loader) and attacking draw random numbers
        with isolated_randomness():
            name, auditor = "unnamed", None
            try:
                name = client(context)
                auditor = auditors.get(knobs)
                new = _only(reply.content.array_records, arrays_key, "array record")
                examples, labels = collect(
                    data(context),
                    input_key=input_key,
                    label_key=label_key,
                    limit=knobs.max_examples,
                )
                training = Training(
                    lr=_fact(lr, msg, context, config),
                    epochs=int(_fact(epochs, msg, context, config) or 1),
                    batch_size=_as_int(_fact(batch_size, msg, context, config)),
                    momentum=float(_fact(momentum, msg, context, config) or 0.0),
                    local_steps=_as_int(_fact(local_steps, msg, context, config)),
                )
                result = auditor.audit(
                    global_state=sent,
                    update=dict(zip(new.keys(), new.to_numpy_ndarrays(), strict=True)),
                    examples=examples,
                    labels=labels,
                    training=training,
                    round=round,
                    client=name,
                    update_kind="weights",
                )
            except Exception as exc:  # noqa: BLE001 - recorded; never raised into Flower
                log.exception("gradleak's audit failed")
                if auditor is None:
                    return _error_reply(msg, f"gradleak withheld the update: no audit ({exc})")
                result = auditor.failure(round, name, exc, extra={"framework": "flower"})
        if result.error is not None:
            return _error_reply(
                msg, f"gradleak withheld the update: the audit failed ({result.error})"
            )
        if result.withhold:
            return _error_reply(
                msg,
                f"gradleak withheld the update: RDLV {result.rdlv:.4g} exceeds the threshold "
                f"{knobs.threshold}",
            )
        return reply

    return mod


def defense_mod(
    defense: Mapping[str, Any],
    model: ModelSpec,
    *,
    seed: int = 0,
    sample_rate: float = 1.0,
    arrays_key: str | None = None,
    client: Callable[[Context], int] | None = None,
) -> Callable[[Message, Context, Callable[[Message, Context], Message]], Message]:
    """A Flower client mod that applies a gradleak defence to every outgoing training update.

    The reply's model arrays become ``global + defence(reply - global)``; every other record of
    the reply is kept, and the defence's fields are added as the ConfigRecord
    ``gradleak-defense`` (a second MetricRecord would make FedAvg skip the round). The rounds
    this client has sent are counted in ``context.state`` (the DP accountant's steps). A reply
    the defence cannot process becomes an error reply (fails closed: an undefended update never
    leaves); other messages pass untouched.

    Args:
        defense: a ``defenses:`` entry of a gradleak config (checked here, where the app is built).
        model: the app's model (class, factory, class path or model-spec dict).
        seed: the noise's seed (with the round and the client).
        sample_rate: the fraction of clients the server draws per round (DP accounting).
        arrays_key: the ArrayRecord holding the model (default: the message's only one).
        client: ``context -> the client's number`` for the noise stream (default: the
            partition id in a simulation, else the node id).
    """
    defended = UpdateDefense(defense, model, seed=seed, sample_rate=sample_rate)

    def number(context: Context) -> int:
        if client is not None:
            return int(client(context))
        pid = context.node_config.get("partition-id")
        return int(pid if pid is not None else context.node_id)

    def mod(
        msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        if not _is_train(msg):
            return call_next(msg, context)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        try:
            records = msg.content.config_records
            config = dict(_only(records, None, "config record")) if len(records) else {}
            sent = _only(msg.content.array_records, arrays_key, "array record")
            names = list(reply.content.array_records)
            key = arrays_key or (names[0] if len(names) == 1 else None)
            new = _only(reply.content.array_records, key, "array record")
            state = context.state.config_records.get("gradleak-defense", ConfigRecord())
            count = int(state.get("participation", 0)) + 1
            out = defended.apply(
                dict(zip(sent.keys(), sent.to_numpy_ndarrays(), strict=True)),
                dict(zip(new.keys(), new.to_numpy_ndarrays(), strict=True)),
                round=_round(msg, config),
                client_id=number(context),
                participation=count,
            )
        except Exception as exc:  # noqa: BLE001 - never send an update the defence missed
            log.exception("gradleak's defence failed")
            return _error_reply(msg, f"gradleak withheld the update: the defence failed ({exc})")
        context.state["gradleak-defense"] = ConfigRecord({"participation": count})
        content = RecordDict(dict(reply.content.items()))
        content[key] = ArrayRecord(array_dict={k: Array(v) for k, v in out.weights.items()})
        numbers = {
            k: float(v)
            for k, v in out.fields.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        content["gradleak-defense"] = ConfigRecord(numbers)  # strategies want one MetricRecord
        return Message(content, reply_to=msg)

    return mod


def _absolute(out: str | Path) -> str:
    """The audit directory as an absolute path, fixed where the app is built (Flower may run the
    app's functions in worker processes with another working directory)."""
    return str(Path(out).expanduser().absolute())


def _as_int(value: Any) -> int | None:
    return None if value is None else int(value)


class LeakageAuditStrategy(Strategy):  # type: ignore[misc]
    """Any Strategy, with an honest-but-curious server attacking each training reply it receives.

    The wrapped strategy configures and aggregates as before, with the very same replies: the
    aggregate is unchanged. Each reply is attacked (full weights minus the global model sent),
    scored against ``truth(reply)`` (the client's examples, which only an evaluator has: a
    simulation, a red-team exercise) and recorded in ``out``; a failure is recorded, never raised.

    Args:
        strategy: the wrapped Strategy (e.g. ``FedAvg()``).
        model: the app's model (class, factory, class path or model-spec dict).
        truth: ``reply message -> the client's training data`` (as ``leakage_mod``'s ``data``);
            identify the client from the reply (its node id, its metrics).
        lr: the learning rate, a number or a key of the train config (default ``lr``).
        epochs, batch_size, momentum, local_steps: how clients train (the server knows its
            protocol).
        out, attack, iterations, frequency, start_round, max_examples, metric, seed: as for
            ``leakage_mod``; other keywords go to ``UpdateAuditor``.
    """

    def __init__(
        self,
        strategy: Strategy,
        model: ModelSpec,
        *,
        truth: Callable[[Message], Any],
        out: str | Path = "gradleak-audit",
        lr: float | str = "lr",
        epochs: int = 1,
        batch_size: int | None = None,
        momentum: float = 0.0,
        local_steps: int | None = None,
        mean: tuple[float, ...] | float | None = None,
        std: tuple[float, ...] | float | None = None,
        input_key: str | int = "img",
        label_key: str | int = "label",
        arrays_key: str | None = None,
        attack: str = "inverting-gradients",
        iterations: int = 300,
        frequency: int = 1,
        start_round: int = 1,
        max_examples: int = 64,
        metric: str = "ssim",
        seed: int = 0,
        **options: Any,
    ) -> None:
        self.strategy, self.truth = strategy, truth
        self.knobs = Knobs(
            out=_absolute(out),
            attack=attack,
            iterations=iterations,
            frequency=frequency,
            start_round=start_round,
            max_examples=max_examples,
            metric=metric,
            seed=seed,
        )
        self.auditors = _Auditors(model, {"mean": mean, "std": std, **options}, "flower-server")
        self.lr, self.epochs, self.batch_size = lr, epochs, batch_size
        self.momentum, self.local_steps = momentum, local_steps
        self.input_key, self.label_key, self.arrays_key = input_key, label_key, arrays_key
        self._sent: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
        self.results: list[AuditResult] = []
        self.auditors.get(self.knobs)  # a bad setting fails here, before any round

    def __getattr__(self, name: str) -> Any:
        # everything else of the wrapped strategy (its settings, its helpers)
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if self.knobs.audits(server_round):
            self._sent[server_round] = (
                dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True)),
                dict(config),
            )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sent = self._sent.pop(server_round, None)
        if sent is not None:
            for reply in replies:
                if not reply.has_error():
                    self.results.append(self._audit(server_round, reply, *sent))
        return self.strategy.aggregate_train(server_round, replies)

    def _audit(
        self, round: int, reply: Message, glob: dict[str, Any], config: dict[str, Any]
    ) -> AuditResult:
        with isolated_randomness():  # the truth loader and the attack draw random numbers
            name = f"node-{reply.metadata.src_node_id}"
            auditor = self.auditors.get(self.knobs)  # built in __init__'s process: checked there
            try:
                sent = _only(reply.content.array_records, self.arrays_key, "array record")
                examples, labels = collect(
                    self.truth(reply),
                    input_key=self.input_key,
                    label_key=self.label_key,
                    limit=self.knobs.max_examples,
                )
                lr = config[self.lr] if isinstance(self.lr, str) else self.lr
                training = Training(
                    lr=lr,
                    epochs=self.epochs,
                    batch_size=self.batch_size,
                    momentum=self.momentum,
                    local_steps=self.local_steps,
                )
                return auditor.audit(
                    global_state=glob,
                    update=dict(zip(sent.keys(), sent.to_numpy_ndarrays(), strict=True)),
                    examples=examples,
                    labels=labels,
                    training=training,
                    round=round,
                    client=name,
                )
            except Exception as exc:  # noqa: BLE001 - recorded; the server goes on
                log.exception("gradleak's server-side audit failed")
                return auditor.failure(
                    round, name, exc, extra={"framework": "flower-server"}, withhold=False
                )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


__all__ = ["Knobs", "LeakageAuditStrategy", "RUN_CONFIG_KNOBS", "defense_mod", "leakage_mod"]
