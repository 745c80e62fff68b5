"""gradleak's RDLV filter in a user's own NVFlare job: NVFlare's argument names, defaults and
rounds, full weights and weight differences, any site name, failures recorded and withheld."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvflare")

from nvflare.apis.dxo import DXO, DataKind, from_shareable  # noqa: E402
from nvflare.apis.event_type import EventType  # noqa: E402
from nvflare.apis.fl_constant import FLContextKey, ReservedKey  # noqa: E402
from nvflare.apis.fl_context import FLContext  # noqa: E402
from nvflare.apis.shareable import Shareable  # noqa: E402
from nvflare.app_common.app_constant import AppConstants  # noqa: E402

from gradleak.integrations.auditdir import AuditDir  # noqa: E402
from gradleak.integrations.nvflare import (  # noqa: E402
    LeakageAuditor,
    RelativeDataLeakageValueFilter,
)
from site_model import SiteNet  # noqa: E402

# NVFlare's filter (research/quantifying-data-leakage, nvflare_gradinv/filters/rdlv_filter.py):
# its arguments in order, with their defaults.
NVFLARE_ARGS = [
    ("data_root", inspect.Parameter.empty),
    ("dataset_json", inspect.Parameter.empty),
    ("frequency", 1),
    ("start_round", 0),
    ("inverter_name", "grad_inverter"),
    ("sim_metric_name", "sim_metric"),
    ("prior_filename", None),
    ("image_key", "image"),
    ("rdlv_reduce", "max"),
    ("rdlv_threshold", 1.0),
    ("data_kinds", None),
    ("save_best_matches", False),
]


@pytest.fixture
def site_data(tmp_path) -> tuple[str, str]:
    """A site's data root and MONAI-style data list: 2 RGB 16 x 16 images."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    root.mkdir()
    items = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{i}.png")
        items.append({"image": f"{i}.png", "label": [i]})
    listing = tmp_path / "data.json"
    listing.write_text(json.dumps({"training": items, "validation": items[:1]}))
    return str(root), str(listing)


def _filter(site_data, tmp_path, **kwargs) -> RelativeDataLeakageValueFilter:
    # NVFlare's argument block of its example, class path swapped, plus the model keys
    block = {
        "data_root": site_data[0],
        "dataset_json": site_data[1],
        "frequency": 10,
        "start_round": 0,
        "model": {"path": "site_model.SiteNet", "args": {"width": 4}},
        "lr": 0.1,
        "image_size": 16,
        "iterations": 2,
        "audit_dir": str(tmp_path / "audit"),
    }
    return RelativeDataLeakageValueFilter(**{**block, **kwargs})


def _ctx(site: str, task: Shareable | None = None) -> FLContext:
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    if task is not None:
        ctx.set_prop(FLContextKey.TASK_DATA, task, private=True, sticky=False)
    return ctx


def _round_trip(f, site: str, round: int, kind: str = DataKind.WEIGHTS, steps: int = 1):
    """A task of ``round`` reaching ``site`` (the event), one SGD step, the result filtered."""
    torch.manual_seed(round)
    net = SiteNet()
    glob = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    task = DXO(DataKind.WEIGHTS, data=glob).to_shareable()
    task.set_header(AppConstants.CURRENT_ROUND, round)
    f.handle_event(EventType.BEFORE_TASK_EXECUTION, _ctx(site, task))
    x = torch.rand(2, 3, 16, 16)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(net(x), torch.tensor([0, 1])).backward()
    opt.step()
    new = {k: v.numpy() for k, v in net.state_dict().items()}
    data = new if kind == DataKind.WEIGHTS else {k: new[k] - glob[k] for k in new}
    result = DXO(kind, data=data, meta={"NUM_STEPS_CURRENT_ROUND": steps}).to_shareable()
    result.set_header(AppConstants.CURRENT_ROUND, round)  # as the Client API's reply carries it
    return from_shareable(f.process(result, _ctx(site)))


def test_the_arguments_are_nvflare_s(site_data, tmp_path) -> None:
    params = list(inspect.signature(RelativeDataLeakageValueFilter.__init__).parameters.values())
    assert [(p.name, p.default) for p in params[1:13]] == NVFLARE_ARGS
    f = _filter(site_data, tmp_path, prior_filename=None)
    for name, _ in NVFLARE_ARGS:  # every argument kept as an attribute (NVFlare's job API)
        assert hasattr(f, name)
    with pytest.raises(ValueError, match="data_root"):
        RelativeDataLeakageValueFilter("/no/such/dir", site_data[1], model="site_model.SiteNet")


@pytest.mark.parametrize(
    ("frequency", "start_round", "expected"),
    [(1, 0, list(range(11))), (10, 0, [0, 10]), (3, 2, [3, 6, 9])],
)
def test_audited_rounds_follow_nvflare_s_predicate(
    site_data, tmp_path, frequency, start_round, expected
) -> None:
    f = _filter(site_data, tmp_path, frequency=frequency, start_round=start_round)
    for r in range(11):
        _round_trip(f, "hospital-a", r)
    rows = AuditDir.open(tmp_path / "audit").read_rows()
    assert [r["round"] for r in rows] == expected
    assert {r["client"] for r in rows} == {"hospital-a"}


def test_weights_and_weight_differences_are_audited_and_gated(site_data, tmp_path) -> None:
    f = _filter(site_data, tmp_path, frequency=1, rdlv_threshold=1e9)
    out = _round_trip(f, "hospital-a", 0, DataKind.WEIGHTS)
    assert out.data  # below the threshold: passed
    out = _round_trip(f, "hospital-b", 0, DataKind.WEIGHT_DIFF, steps=1)
    assert out.data
    rows = AuditDir.open(tmp_path / "audit").read_rows()
    assert [(r["client"], r["update_kind"], r["audited"]) for r in rows] == [
        ("hospital-a", "weights", True),
        ("hospital-b", "diff", True),
    ]
    assert all(isinstance(r["rdlv"], float) and r["steps"] == 1 for r in rows)
    strict = _filter(site_data, tmp_path / "s", frequency=1, rdlv_threshold=-1e9)
    out = _round_trip(strict, "hospital-a", 0)
    assert out.data == {}  # withheld, as NVFlare's filter withholds
    (row,) = AuditDir.open(tmp_path / "s" / "audit").read_rows()
    assert row["withheld"]


def test_a_failure_is_recorded_and_withholds_never_raises(site_data, tmp_path) -> None:
    f = _filter(site_data, tmp_path, frequency=1)
    # a weight difference with no task seen by this filter (and no gradleak metadata at all)
    diff = DXO(DataKind.WEIGHT_DIFF, data={"w": np.ones(3, dtype=np.float32)})
    result = diff.to_shareable()
    result.set_header(AppConstants.CURRENT_ROUND, 4)
    out = from_shareable(f.process(result, _ctx("site-7")))
    assert out.data == {}
    (row,) = AuditDir.open(tmp_path / "audit").read_rows()
    assert row["withheld"] and "was not seen" in row["audit_error"] and row["round"] == 4
    # no round anywhere: withheld and recorded as such
    out = from_shareable(f.process(diff.to_shareable(), _ctx("site-7")))
    assert out.data == {}
    assert AuditDir.open(tmp_path / "audit").read_rows()[0]["round_unknown"] is True


def test_nvflare_s_own_example_block_builds(site_data, tmp_path) -> None:
    """config_fed_client_inv.json's block, with only the path swapped (plus the model keys)."""
    Image.fromarray(np.full((16, 16), 128, dtype=np.uint8)).save(tmp_path / "prior_1.jpg")
    args = {
        "data_root": site_data[0],
        "dataset_json": site_data[1],
        "prior_filename": str(tmp_path / "prior_1.jpg"),
        "frequency": 10,
        "start_round": 0,
    }
    f = RelativeDataLeakageValueFilter(
        **args, model="site_model.SiteNet", image_size=16, audit_dir=str(tmp_path / "a")
    )
    assert (f.frequency, f.start_round, f.rdlv_threshold, f.rdlv_reduce) == (10, 0, 1.0, "max")
    prior = f._prior(_ctx("site-1"))
    assert tuple(prior.shape) == (1, 3, 16, 16) and torch.allclose(prior, torch.tensor(128 / 255))
    assert Path(site_data[1]).is_file()


def _server_ctx(site: str, task: Shareable | None = None) -> FLContext:
    ctx = _ctx("server", task)
    ctx.set_peer_context(_ctx(site))
    return ctx


def test_the_server_auditor_records_and_changes_nothing(site_data, tmp_path) -> None:
    truth = {"hospital-a": {"data_root": site_data[0], "dataset_json": site_data[1]}}
    auditor = LeakageAuditor(
        truth,
        model="site_model.SiteNet",
        lr=0.1,
        image_size=16,
        iterations=2,
        audit_dir=str(tmp_path / "server"),
    )
    for site in ("hospital-a", "site-9"):
        torch.manual_seed(0)
        glob = {k: v.numpy().copy() for k, v in SiteNet().state_dict().items()}
        task = DXO(DataKind.WEIGHTS, data=glob).to_shareable()
        task.set_header(AppConstants.CURRENT_ROUND, 2)
        auditor.handle_event(EventType.AFTER_TASK_DATA_FILTER, _server_ctx(site, task))
        new = {k: v + 0.01 for k, v in glob.items()}
        result = DXO(DataKind.WEIGHTS, data=new).to_shareable()
        result.set_header(AppConstants.CURRENT_ROUND, 2)
        out = from_shareable(auditor.process(result, _server_ctx(site)))
        assert all(np.array_equal(out.data[k], new[k]) for k in new)  # unchanged
    ok, failed = AuditDir.open(tmp_path / "server").read_rows()
    assert (ok["client"], ok["audited"], ok["withheld"]) == ("hospital-a", True, False)
    assert ok["framework"] == "nvflare-server" and isinstance(ok["rdlv"], float)
    assert (failed["client"], failed["withheld"]) == ("site-9", False)
    assert "no data of site" in failed["audit_error"]


@pytest.mark.engines
def test_a_hello_pt_shaped_job_in_nvflare_s_simulator(tmp_path, monkeypatch) -> None:
    """FedAvgRecipe with the site's own network and a Client API script, gradleak's filter added
    per site with its own data list, in SimEnv: one row per site and round, the report."""
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.recipe import SimEnv
    from nvflare.recipe.utils import set_per_site_config
    from typer.testing import CliRunner

    from gradleak.cli import app

    tests = Path(__file__).resolve().parent
    monkeypatch.setenv("PYTHONPATH", str(tests))
    monkeypatch.syspath_prepend(str(tests))
    rng = np.random.default_rng(1)
    sites = ["hospital-a", "hospital-b"]
    for i, site in enumerate(sites):
        d = tmp_path / "data" / site
        d.mkdir(parents=True)
        items = []
        for j in range(2 + i):
            img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(img).save(d / f"{j}.png")
            items.append({"image": f"{j}.png", "label": [j % 3]})
        (d / "data.json").write_text(json.dumps({"training": items}))
    recipe = FedAvgRecipe(
        name="hello-pt",
        min_clients=2,
        num_rounds=2,
        model=SiteNet(),
        train_script=str(tests / "hello_pt_client.py"),
        train_args=f"--data_dir {tmp_path / 'data'}",
    )
    set_per_site_config(
        recipe, {s: {"train_args": f"--data_dir {tmp_path / 'data'}"} for s in sites}
    )
    audit = tmp_path / "audit"
    for site in sites:
        d = tmp_path / "data" / site
        block = {"data_root": str(d), "dataset_json": str(d / "data.json"), "frequency": 1}
        gradleak = {
            "model": "site_model.SiteNet",
            "lr": 0.05,
            "momentum": 0.9,
            "batch_size": 2,
            "image_size": 16,
            "mean": 0.5,
            "std": 0.5,
            "iterations": 20,
            "rdlv_threshold": 1e9,
            "save_best_matches": True,
            "audit_dir": str(audit),
        }
        recipe.add_client_output_filter(
            RelativeDataLeakageValueFilter(**block, **gradleak), tasks=["train"], clients=[site]
        )
    data = {s: tmp_path / "data" / s for s in sites}
    truth = {
        s: {"data_root": str(d), "dataset_json": str(d / "data.json")} for s, d in data.items()
    }
    server_audit = tmp_path / "server-audit"
    recipe.add_server_input_filter(
        LeakageAuditor(
            truth,
            model="site_model.SiteNet",
            lr=0.05,
            momentum=0.9,
            batch_size=2,
            image_size=16,
            mean=0.5,
            std=0.5,
            iterations=20,
            audit_dir=str(server_audit),
        ),
        tasks=["train"],
    )
    workspace = tmp_path / "ws"
    local = workspace / "hello-pt" / "local"
    local.mkdir(parents=True)
    allow = [*DEFAULT_CLASS_ALLOW_LIST, "gradleak.integrations.nvflare", "site_model"]
    (local / "resources.json").write_text(
        json.dumps({"format_version": 2, "class_allow_list": allow})
    )
    recipe.execute(SimEnv(clients=sites, num_threads=2, workspace_root=str(workspace)))
    rows = AuditDir.open(audit).read_rows()
    assert [(r["round"], r["client"]) for r in rows] == [
        (0, "hospital-a"),
        (0, "hospital-b"),
        (1, "hospital-a"),
        (1, "hospital-b"),
    ], rows
    assert all(r["audited"] and isinstance(r["rdlv"], float) for r in rows)
    assert [r["num_samples"] for r in rows] == [2, 3, 2, 3]
    assert [r["steps"] for r in rows] == [1, 2, 1, 2]  # from NUM_STEPS_CURRENT_ROUND
    result = CliRunner().invoke(app, ["report", str(audit)])
    assert result.exit_code == 0, result.output
    # the server attacked what it received: the same updates, the same rows
    server_rows = AuditDir.open(server_audit).read_rows()
    assert [(r["round"], r["client"], r["withheld"]) for r in server_rows] == [
        (0, "hospital-a", False),
        (0, "hospital-b", False),
        (1, "hospital-a", False),
        (1, "hospital-b", False),
    ], server_rows
    for site_row, server_row in zip(rows, server_rows, strict=True):
        assert server_row["update_norm"] == pytest.approx(site_row["update_norm"], rel=1e-6)
        assert server_row["rdlv"] == pytest.approx(site_row["rdlv"], abs=1e-4)
