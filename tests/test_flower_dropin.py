"""gradleak's audit in a user's own Flower app: the mod on hand-made messages (no simulation),
then a quickstart-pytorch-shaped app in Flower's simulation with the mod and with the strategy
wrapper, against the same app without them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from typer.testing import CliRunner  # noqa: E402

import quickstart_app as qs  # noqa: E402
from gradleak.integrations.auditdir import AuditDir  # noqa: E402
from gradleak.integrations.flower import Knobs, leakage_mod  # noqa: E402

TESTS = Path(__file__).resolve().parent


def _message(message_type: str, content: RecordDict, round: int = 1) -> Message:
    meta = Metadata(
        run_id=1,
        message_id=f"m{round}",
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id=str(round),
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(content, metadata=meta)


def _context(run_config: dict | None = None, partition: int = 0) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": partition, "num-partitions": 2},
        state=RecordDict(),
        run_config=run_config or {},
    )


def _train_message(round: int = 1) -> Message:
    torch.manual_seed(0)
    content = RecordDict(
        {
            "arrays": ArrayRecord(qs.Net().state_dict()),
            "config": ConfigRecord({"lr": 0.05, "server-round": round}),
        }
    )
    return _message("train", content, round)


def _data(context: Context) -> object:
    return qs.load_data(context.node_config["partition-id"], 2, 2)


def _mod(tmp_path: Path, **kwargs: object):
    args = dict(
        data=_data,
        out=tmp_path / "audit",
        epochs=1,
        batch_size=2,
        momentum=0.9,
        mean=0.5,
        std=0.5,
        iterations=10,
    )
    return leakage_mod(qs.Net, **{**args, **kwargs})


def test_the_mod_passes_other_messages_and_audits_train_replies(tmp_path) -> None:
    seen = []

    def call_next(msg: Message, context: Context) -> Message:
        seen.append(msg)
        if msg.metadata.message_type != "train":
            return Message(RecordDict({"m": MetricRecord({"x": 1.0})}), reply_to=msg)
        model = qs.Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        qs.train(model, _data(context), 1, 0.05, "cpu")
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"num-examples": 3}),
            }
        )
        return Message(content, reply_to=msg)

    def unseeded(context: Context) -> object:
        # quickstart's loader shuffles with torch's global generator
        loader = qs.load_data(context.node_config["partition-id"], 2, 2)
        return torch.utils.data.DataLoader(loader.dataset, batch_size=2, shuffle=True)

    mod = _mod(tmp_path, data=unseeded)
    query = _message("query", RecordDict())
    reply = mod(query, _context(), call_next)
    assert seen == [query] and not reply.has_error() and not (tmp_path / "audit").exists()

    msg = _train_message()
    torch.manual_seed(1)
    call_next(msg, _context())
    state = torch.random.get_rng_state()  # where the app alone leaves the random stream
    torch.manual_seed(1)
    reply = mod(msg, _context(), call_next)
    assert torch.equal(state, torch.random.get_rng_state())
    assert not reply.has_error() and "arrays" in reply.content  # passed as it was
    (row,) = AuditDir.open(tmp_path / "audit").read_rows()
    assert (row["round"], row["client"], row["num_samples"], row["batch_size"]) == (
        1,
        "node-0",
        3,
        2,
    )
    assert (row["steps"], row["momentum"], row["lr"], row["framework"]) == (2, 0.9, 0.05, "flower")

    # run_config overrides: a threshold below any RDLV withholds, as an error reply
    strict = {"gradleak-threshold": -100.0, "gradleak-out": str(tmp_path / "strict")}
    reply = mod(_train_message(2), _context(strict), call_next)
    assert reply.has_error() and "exceeds the threshold" in reply.error.reason
    (row,) = AuditDir.open(tmp_path / "strict").read_rows()
    assert row["withheld"] and row["round"] == 2

    # rounds outside the audit's frequency pass without an audit
    skip = {"gradleak-frequency": 2, "gradleak-out": str(tmp_path / "skip")}
    reply = mod(_train_message(2), _context(skip), call_next)
    assert not reply.has_error() and not (tmp_path / "skip").exists()


def test_a_failed_audit_is_an_error_reply_never_an_exception(tmp_path) -> None:
    def call_next(msg: Message, context: Context) -> Message:
        arrays = ArrayRecord({"other": torch.zeros(2)})  # not the model's tensors
        return Message(RecordDict({"arrays": arrays}), reply_to=msg)

    def no_data(context: Context) -> object:
        raise OSError("the partition is not mounted")

    for mod, why in [
        (_mod(tmp_path / "a"), "missing"),
        (_mod(tmp_path / "b", data=no_data), "not mounted"),
        (_mod(tmp_path / "c", lr="no-such-key"), "no-such-key"),
    ]:
        reply = mod(_train_message(), _context(), call_next)
        assert reply.has_error() and "audit failed" in reply.error.reason, reply.error.reason
        assert why in reply.error.reason


def test_knobs_from_run_config() -> None:
    k = Knobs().with_run_config(
        {"gradleak-threshold": 0.5, "gradleak-iterations": "7", "gradleak-enabled": "false"}
    )
    assert (k.threshold, k.iterations, k.enabled) == (0.5, 7, False)
    assert Knobs(threshold=1.0).with_run_config({"gradleak-threshold": "none"}).threshold is None
    k = Knobs(frequency=3, start_round=2)
    assert [r for r in range(1, 10) if k.audits(r)] == [2, 5, 8]


def test_importing_the_module_changes_no_flower_setting() -> None:
    code = (
        "import logging, os; before = dict(os.environ); import flwr; "
        "level = logging.getLogger('flwr').level; "
        "import gradleak.integrations.flower; "
        "assert dict(os.environ) == before, set(os.environ) ^ set(before); "
        "assert logging.getLogger('flwr').level == level; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def _simulate(client_app, server_app) -> None:
    from flwr.simulation import run_simulation

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=2,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )


@pytest.fixture(scope="module")
def plain_run() -> Iterator[dict]:
    """The app without gradleak: its final aggregate. Ray's workers import the app's module from
    this directory (the environment is restored afterwards)."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), saved) if p)
    out: dict = {}
    try:
        _simulate(qs.client_app(), qs.server_app(out))
        yield out
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def _same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.engines
def test_the_mod_in_a_simulated_quickstart_app(plain_run, tmp_path) -> None:
    audit = tmp_path / "audit"
    mod = _mod(tmp_path, out=audit, iterations=30)
    out: dict = {}
    _simulate(qs.client_app(mods=[mod]), qs.server_app(out))
    assert _same(out["arrays"], plain_run["arrays"])  # bitwise the same aggregate
    rows = AuditDir.open(audit).read_rows()
    assert [(r["round"], r["client"]) for r in rows] == [
        (1, "node-0"),
        (1, "node-1"),
        (2, "node-0"),
        (2, "node-1"),
    ]
    assert all(r["audited"] and isinstance(r["rdlv"], float) for r in rows)
    assert [r["num_samples"] for r in rows] == [3, 4, 3, 4]
    result = CliRunner().invoke(_cli(), ["report", str(audit)])
    assert result.exit_code == 0, result.output
    page = (audit / "report" / "index.html").read_text()
    assert "4 update(s) from 2 client(s), 4 attacked, 0 withheld" in page


@pytest.mark.engines
def test_withheld_updates_never_reach_the_aggregate(plain_run, tmp_path) -> None:
    """A threshold below any RDLV: every update leaves as an error reply and FedAvg aggregates
    nothing (the strategy's result holds no model)."""
    mod = _mod(tmp_path, out=tmp_path / "audit", threshold=-1e9, iterations=5)
    out: dict = {}
    _simulate(qs.client_app(mods=[mod]), qs.server_app(out))
    assert out["arrays"] == {} and plain_run["arrays"]
    rows = AuditDir.open(tmp_path / "audit").read_rows()
    assert len(rows) == 4 and all(r["withheld"] for r in rows)


@pytest.mark.engines
def test_the_strategy_wrapper_in_a_simulated_quickstart_app(plain_run, tmp_path) -> None:
    from gradleak.integrations.flower import LeakageAuditStrategy

    audit = tmp_path / "audit"
    by_size = {len(qs.images(p)[0]): p for p in range(2)}

    def truth(reply: Message) -> object:
        # an evaluator's knowledge: which partition sent this reply (by its example count)
        return qs.load_data(by_size[int(reply.content["metrics"]["num-examples"])], 2, 2)

    def wrap(strategy):
        return LeakageAuditStrategy(
            strategy,
            qs.Net,
            truth=truth,
            out=audit,
            batch_size=2,
            momentum=0.9,
            mean=0.5,
            std=0.5,
            iterations=30,
        )

    out: dict = {}
    _simulate(qs.client_app(), qs.server_app(out, wrap))
    assert _same(out["arrays"], plain_run["arrays"])
    rows = AuditDir.open(audit).read_rows()
    assert [r["round"] for r in rows] == [1, 1, 2, 2] and len({r["client"] for r in rows}) == 2
    assert all(r["audited"] and isinstance(r["rdlv"], float) for r in rows)
    assert sorted(r["num_samples"] for r in rows) == [3, 3, 4, 4]
    result = CliRunner().invoke(_cli(), ["report", str(audit)])
    assert result.exit_code == 0, result.output
    assert json.loads((audit / "audit.json").read_text())["framework"] == "flower-server"


def _cli():
    from gradleak.cli import app

    return app


def _trained_reply(msg: Message, context: Context) -> Message:
    """The quickstart client's reply to a train message (its own training, its own records)."""
    model = qs.Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    qs.train(model, _data(context), 1, 0.05, "cpu")
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": 3})}
    )
    return Message(content, reply_to=msg)


def _delta(msg: Message, reply: Message) -> dict[str, torch.Tensor]:
    sent = msg.content["arrays"].to_torch_state_dict()
    got = reply.content["arrays"].to_torch_state_dict()
    return {k: got[k].double() - sent[k].double() for k in sent}


def _norm(delta: dict[str, torch.Tensor]) -> float:
    return float(sum(v.pow(2).sum() for v in delta.values()) ** 0.5)


def test_the_defense_mod_applies_a_gradleak_defence_to_train_replies(tmp_path) -> None:
    from gradleak.defenses.dp import epsilon
    from gradleak.errors import ConfigError
    from gradleak.integrations.flower import defense_mod

    msg = _train_message()
    plain = _delta(msg, _trained_reply(msg, _context()))
    assert _norm(plain) > 0.05

    # clipping alone: the update sent is the client's, scaled to norm 0.05
    clip = defense_mod({"name": "dp-gaussian", "clip": 0.05, "noise_multiplier": 0.0}, qs.Net)
    reply = clip(msg, _context(), _trained_reply)
    sent = _delta(msg, reply)
    assert _norm(sent) == pytest.approx(0.05, rel=1e-4)
    cosine = sum((sent[k] * plain[k]).sum() for k in plain) / (_norm(sent) * _norm(plain))
    assert float(cosine) == pytest.approx(1.0, abs=1e-5)
    assert reply.content["metrics"]["num-examples"] == 3  # the app's other records kept

    # noise: the accountant's epsilon travels with the reply and grows with participation
    dp = defense_mod({"name": "dp-gaussian", "clip": 0.05, "noise_multiplier": 1.0}, qs.Net)
    context = _context()
    first = dp(msg, context, _trained_reply)
    second = dp(_train_message(2), context, _trained_reply)
    eps = [r.content["gradleak-defense"]["dp_epsilon"] for r in (first, second)]
    assert eps == pytest.approx([epsilon(1.0, 1.0, 1, 1e-5), epsilon(1.0, 1.0, 2, 1e-5)])
    assert _norm(_delta(msg, first)) > 0.05 * 10  # noise of std 0.05 on 62,006 weights

    query = _message("query", RecordDict())
    assert dp(query, _context(), lambda m, c: m) is query  # other messages pass untouched
    with pytest.raises(ConfigError, match="clip"):
        defense_mod({"name": "dp-gaussian", "noise_multiplier": 1.0}, qs.Net)

    def foreign(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"arrays": ArrayRecord({"x": torch.zeros(2)})}), reply_to=msg)

    failed = dp(msg, _context(), foreign)  # fails closed: nothing undefended leaves
    assert failed.has_error() and "the defence failed" in failed.error.reason


@pytest.mark.engines
def test_the_audit_sees_the_defended_update_when_the_mods_stack(tmp_path) -> None:
    from gradleak.integrations.flower import defense_mod

    audit = tmp_path / "audit"
    clip = defense_mod({"name": "dp-gaussian", "clip": 0.05, "noise_multiplier": 0.0}, qs.Net)
    out: dict = {}
    _simulate(
        qs.client_app(mods=[_mod(tmp_path, out=audit, iterations=5), clip]), qs.server_app(out)
    )
    rows = AuditDir.open(audit).read_rows()
    assert len(rows) == 4 and all(r["audited"] for r in rows)
    assert all(r["update_norm"] == pytest.approx(0.05, rel=1e-4) for r in rows)
