"""The framework-free auditor of a user's own app: its model forms, one audited update written to
an audit directory, the verdict, failures recorded (never raised), and the report of the
directory without any gradleak config."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from gradleak.errors import ConfigError
from gradleak.integrations.auditdir import AuditDir, client_name
from gradleak.integrations.auditor import Training, UpdateAuditor, collect
from gradleak.integrations.models import model_factory


class SmallNet(nn.Module):
    """A user's CNN, not in gradleak's zoo (shaped like quickstart-pytorch's, smaller)."""

    def __init__(self, width: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc = nn.Linear(width * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(F.relu(self.conv(x))).view(-1, self.fc.in_features))


def _trained(momentum: float = 0.9, lr: float = 0.1, n: int = 2) -> tuple:
    """(global weights, the client's new weights, its model inputs, labels), one SGD step."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = SmallNet()
    glob = {k: v.clone() for k, v in net.state_dict().items()}
    x = (torch.rand(n, 3, 8, 8, generator=g) - 0.5) / 0.5
    y = torch.arange(n) % 5
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.step()
    return glob, net.state_dict(), x, y


def _auditor(tmp_path, **kwargs) -> UpdateAuditor:
    args = dict(out=tmp_path / "audit", mean=0.5, std=0.5, settings={"iterations": 20})
    return UpdateAuditor(SmallNet, **{**args, **kwargs})


def test_the_user_model_is_built_from_every_form_a_framework_gives() -> None:
    for spec, args in [
        (SmallNet, {"width": 2}),
        (f"{__name__}.SmallNet", {"width": 2}),
        ({"path": f"{__name__}.SmallNet", "args": {"width": 2}}, None),
        ({"class_path": f"{__name__}.SmallNet", "args": {"width": 2}}, None),
    ]:
        model = model_factory(spec, args)()
        assert isinstance(model, SmallNet) and model.conv.out_channels == 2
    instance = SmallNet()
    copy = model_factory(instance)()
    assert copy is not instance and torch.equal(copy.fc.weight, instance.fc.weight)
    with pytest.raises(ConfigError, match="has no callable"):
        model_factory(f"{__name__}.Missing")
    with pytest.raises(ConfigError, match="unknown model-spec keys"):
        model_factory({"path": f"{__name__}.SmallNet", "name": "x"})
    with pytest.raises(ConfigError, match="not a torch module"):
        model_factory(lambda: 3)()


def test_an_update_is_audited_recorded_and_the_callers_randomness_untouched(tmp_path) -> None:
    glob, new, x, y = _trained()
    auditor = _auditor(tmp_path, threshold=-10.0)
    states = (torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    result = auditor.audit(
        global_state={k: v.numpy() for k, v in glob.items()},  # numpy, as the frameworks send
        update=new,
        examples=x,
        labels=y,
        training=Training(lr=0.1, momentum=0.9, batch_size=32),
        round=3,
        client="hospital a/1",
    )
    assert torch.equal(states[0], torch.random.get_rng_state())
    assert np.array_equal(states[1], np.random.get_state()[1]) and states[2] == random.getstate()
    row = result.row
    assert (row["round"], row["client"], row["num_samples"], row["batch_size"]) == (
        3,
        "hospital_a_1",
        2,
        2,
    )
    assert row["audited"] and row["attack"] == "inverting-gradients" and row["momentum"] == 0.9
    assert isinstance(row["rdlv"], float) and result.withhold and row["withheld"]
    assert row["threshold"] == -10.0
    delta = sum(float((new[k] - glob[k]).double().pow(2).sum()) for k in glob) ** 0.5
    assert row["update_norm"] == pytest.approx(delta)
    audit = AuditDir.open(tmp_path / "audit")
    assert audit.read_rows() == [row]
    assert audit.read_meta()["attack"] == "inverting-gradients"
    assert audit.dir.exists("audit/round_0003/client_hospital_a_1.npz")

    # the same update sent as a difference gives the same row (same seed: same attack)
    diff = {k: new[k] - glob[k] for k in glob}
    again = _auditor(tmp_path / "b", threshold=None).audit(
        global_state=glob,
        update=diff,
        examples=x,
        labels=y,
        training=Training(lr=0.1, momentum=0.9, batch_size=32),
        round=3,
        client="hospital a/1",
        update_kind="diff",
    )
    assert again.row["rdlv"] == pytest.approx(row["rdlv"], abs=1e-5) and not again.withhold


def test_failures_are_recorded_and_withhold(tmp_path) -> None:
    glob, new, x, y = _trained()
    auditor = _auditor(tmp_path, threshold=1.0)
    bad = dict(new)
    bad.pop("fc.bias")
    result = auditor.safe_audit(
        global_state=glob,
        update=bad,
        examples=x,
        labels=y,
        training=Training(lr=0.1),
        round=0,
        client="site-1",
    )
    assert result.withhold and "fc.bias" in result.error
    (row,) = AuditDir.open(tmp_path / "audit").read_rows()
    assert row["withheld"] and not row["audited"] and "fc.bias" in row["audit_error"]
    # data that is not normalised as declared is refused by name
    with pytest.raises(ConfigError, match="mean, std|mean/std"):
        auditor.audit(
            global_state=glob,
            update=new,
            examples=x * 10,
            labels=y,
            training=Training(lr=0.1),
            round=0,
            client="site-1",
        )
    with pytest.raises(ConfigError, match="lr"):
        Training(lr=0)
    with pytest.raises(ConfigError, match="not whole epochs"):
        Training(lr=0.1, batch_size=2, local_steps=3).meta(num_samples=4, round=1)


def test_more_examples_than_the_limit_are_recorded_not_attacked(tmp_path) -> None:
    glob, new, x, y = _trained(n=4)
    result = _auditor(tmp_path, max_examples=3, threshold=0.0).audit(
        global_state=glob,
        update=new,
        examples=x,
        labels=y,
        training=Training(lr=0.1),
        round=1,
        client="c",
    )
    assert (
        not result.row["audited"]
        and not result.withhold
        and "max_examples" in result.row["audit_note"]
    )


def test_collect_reads_quickstart_loaders_pairs_and_tensors() -> None:
    x, y = torch.zeros(5, 3, 2, 2), torch.arange(5)
    loader = torch.utils.data.DataLoader(
        [{"img": x[i], "label": y[i]} for i in range(5)], batch_size=2
    )
    for data, keys in [(loader, ("img", "label")), ((x, y), (0, 1)), (list(zip(x, y)), (0, 1))]:
        got_x, got_y = collect(data, input_key=keys[0], label_key=keys[1])
        assert torch.equal(got_x, x) and torch.equal(got_y, y)
    assert len(collect(loader, input_key="img", label_key="label", limit=2)[0]) == 4
    assert client_name("..a b") == "a_b" and client_name("") == "client"


def test_report_of_an_audit_directory_needs_no_config(tmp_path) -> None:
    from gradleak.cli import app

    glob, new, x, y = _trained()
    auditor = _auditor(tmp_path)
    for rnd, client in [(1, "site-1"), (1, "site-2"), (2, "site-1")]:
        auditor.audit(
            global_state=glob,
            update=new,
            examples=x,
            labels=y,
            training=Training(lr=0.1, momentum=0.9),
            round=rnd,
            client=client,
        )
    result = CliRunner().invoke(app, ["report", str(tmp_path / "audit")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "audit" / "report" / "index.html").read_text()
    assert "3 update(s) from 2 client(s), 3 attacked, 0 withheld" in page
    assert page.count("original, prior and reconstruction of client") == 2
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["metric"] == "ssim"


def test_a_model_that_raises_or_exits_is_one_error_naming_it() -> None:
    """The user's class failing (or calling sys.exit) while the audit builds it: a ConfigError
    naming the model, which the mod and the filters record instead of crashing the app."""
    import sys

    from gradleak.integrations.models import model_factory

    class Broken(nn.Module):
        def __init__(self, how: str) -> None:
            super().__init__()
            if how == "exit":
                sys.exit(3)
            raise RuntimeError("my init broke")

    with pytest.raises(ConfigError, match="raised RuntimeError: my init broke"):
        model_factory(Broken, {"how": "raise"})()
    with pytest.raises(ConfigError, match=r"called sys.exit\(3\)"):
        model_factory(Broken, {"how": "exit"})()
