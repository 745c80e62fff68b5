"""Sweeps: planning, resuming (finished points skipped), and the sweep report."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest
import yaml

from gradleak.errors import ConfigError
from gradleak.experiments.store import RunStore
from gradleak.experiments.sweep import plan, run_sweep, split_values
from gradleak.report.html import build_sweep_report, sweep_summary

CONFIG = {
    "name": "tiny", "device": "cpu",
    "data": {"source": "digits", "image_size": 8},
    "partition": {"scheme": "explicit", "clients": [{"size": 1, "batch_size": 1}, {"size": 40, "batch_size": 8}]},
    "model": {"name": "mlp", "kwargs": {"hidden": [32]}},
    "training": {"rounds": 2, "lr": 0.1},
    "defenses": [{"name": "gaussian", "sigma": 0.0}],
    "audit": {"clients": [1], "attack": {"iterations": 100, "init": "prior"}, "metric": "psnr"},
}  # fmt: skip


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def test_values_and_grids(config, tmp_path) -> None:
    assert split_values("a.b=0,0.5,[1,2]") == ("a.b", [0, 0.5, [1, 2]])
    fixed, points = plan(config, ["training.lr=0.1,0.2", "defenses.0.sigma=0,1", "training.rounds=1"], tmp_path)
    assert fixed == ["training.rounds=1"]
    assert [p.values for p in points] == [
        {"training.lr": 0.1, "defenses.0.sigma": 0}, {"training.lr": 0.1, "defenses.0.sigma": 1},
        {"training.lr": 0.2, "defenses.0.sigma": 0}, {"training.lr": 0.2, "defenses.0.sigma": 1},
    ]  # fmt: skip
    assert len({p.run_dir for p in points}) == 4
    with pytest.raises(ConfigError, match="nothing to sweep"):
        plan(config, ["training.lr=0.1"], tmp_path)


def test_a_bad_point_fails_before_any_run(config, tmp_path) -> None:
    with pytest.raises(ConfigError, match="training.lr: Input should be greater than 0"):
        run_sweep(config, ["training.lr=0.1,-1"], tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


def test_sweep_resumes_and_skips_finished_points(config, tmp_path) -> None:
    out = tmp_path / "sweep"
    executed = []

    def stop_after_first(run) -> None:  # noqa: ANN001
        if executed:
            raise KeyboardInterrupt
        executed.append(run.run_dir.name)
        run.execute()

    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, ["defenses.0.sigma=0,10"], out, execute=stop_after_first)
    first = out / executed[0]
    before = (first / "results.jsonl").read_bytes()
    again = []
    run_sweep(config, ["defenses.0.sigma=0,10"], out, execute=lambda r: (again.append(r.run_dir.name), r.execute()))
    assert again == ["defenses.0.sigma=10"]  # the finished point is skipped
    assert (first / "results.jsonl").read_bytes() == before
    assert all(len(RunStore(out / d).rounds.read()) == 2 for d in ("defenses.0.sigma=0", "defenses.0.sigma=10"))

    summary = sweep_summary(out, level=0.0)
    by_sigma = {p["values"]["defenses.0.sigma"]: p for p in summary["points"]}
    assert by_sigma[0]["rdlv"]["1"] > 0.3  # the one-image client leaks without noise
    assert by_sigma[10]["rdlv"]["1"] <= 0.0  # and not behind heavy noise
    assert summary["smallest_safe"]["value"] == 10
    assert summary["smallest_safe"]["accuracy_cost"] == pytest.approx(by_sigma[0]["accuracy"] - by_sigma[10]["accuracy"])

    page = build_sweep_report(out)

    class Page(HTMLParser):
        images: list = []

        def handle_starttag(self, tag, attrs) -> None:  # noqa: ANN001
            if tag == "img":
                self.images.append(dict(attrs)["alt"])

    parser = Page()
    parser.feed(page.read_text())
    assert parser.images == ["privacy utility"]
    assert "The smallest defenses.0.sigma that brings every audited client" in page.read_text()
    assert json.loads((out / "report/summary.json").read_text())["smallest_safe"]["value"] == 10
