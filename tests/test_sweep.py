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
from gradleak.report.recommend import recommend

CONFIG = {
    "name": "tiny",
    "device": "cpu",
    "data": {"source": "digits", "image_size": 8},
    "partition": {
        "scheme": "explicit",
        "clients": [{"size": 1, "batch_size": 1}, {"size": 40, "batch_size": 8}],
    },
    "model": {"name": "mlp", "kwargs": {"hidden": [32]}},
    "training": {"rounds": 2, "lr": 0.1},
    "defenses": [{"name": "gaussian", "sigma": 0.0}],
    "audit": {"clients": [1], "attack": {"iterations": 100, "init": "prior"}, "metric": "psnr"},
}


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def test_values_and_grids(config, tmp_path) -> None:
    assert split_values("a.b=0,0.5,[1,2]") == ("a.b", [0, 0.5, [1, 2]])
    fixed, points = plan(
        config, ["training.lr=0.1,0.2", "defenses.0.sigma=0,1", "training.rounds=1"], tmp_path
    )
    assert fixed == ["training.rounds=1"]
    assert [p.values for p in points] == [
        {"training.lr": 0.1, "defenses.0.sigma": 0},
        {"training.lr": 0.1, "defenses.0.sigma": 1},
        {"training.lr": 0.2, "defenses.0.sigma": 0},
        {"training.lr": 0.2, "defenses.0.sigma": 1},
    ]
    assert len({p.run_dir for p in points}) == 4
    with pytest.raises(ConfigError, match="nothing to sweep"):
        plan(config, ["training.lr=0.1"], tmp_path)
    with pytest.raises(ConfigError, match="would share the run directory training.lr=0.1"):
        plan(config, ["training.lr=0.1,0.2,0.1"], tmp_path)
    with pytest.raises(ConfigError, match=r"model.name: values .* would share the run directory"):
        plan(config, ["model.name=a/b,a_b"], tmp_path)


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
    run_sweep(
        config,
        ["defenses.0.sigma=0,10"],
        out,
        execute=lambda r: (again.append(r.run_dir.name), r.execute()),
    )
    assert again == ["defenses.0.sigma=10"]  # the finished point is skipped
    assert (first / "results.jsonl").read_bytes() == before
    assert all(
        len(RunStore(out / d).rounds.read()) == 2
        for d in ("defenses.0.sigma=0", "defenses.0.sigma=10")
    )

    summary = sweep_summary(out, level=0.0, budget=1.0)
    by_sigma = {p["values"]["defenses.0.sigma"]: p for p in summary["points"]}
    assert by_sigma[0]["rdlv"]["1"] > 0.3  # the one-image client leaks without noise
    assert by_sigma[10]["rdlv"]["1"] <= 0.0  # and not behind heavy noise
    rec = summary["recommendation"]
    assert rec["value"] == 10 and rec["baseline_value"] == 0
    assert rec["accuracy_cost"] == pytest.approx(by_sigma[0]["accuracy"] - by_sigma[10]["accuracy"])
    # The budget comes from the config's recommendation section unless given.
    assert sweep_summary(out)["accuracy_budget"] == 0.05

    page = build_sweep_report(out, budget=1.0)

    class Page(HTMLParser):
        images: list = []

        def handle_starttag(self, tag, attrs) -> None:  # noqa: ANN001
            if tag == "img":
                self.images.append(dict(attrs)["alt"])

    parser = Page()
    parser.feed(page.read_text())
    assert parser.images == ["privacy utility"]
    assert "Recommended: defenses.0.sigma = 10, the smallest value" in page.read_text()
    assert json.loads((out / "report/summary.json").read_text())["recommendation"]["value"] == 10


def _point(value, accuracy, **rdlv):
    return {"values": {"sigma0": value}, "accuracy": accuracy, "rdlv": rdlv}


def test_the_recommendation_meets_the_leakage_level_within_the_accuracy_budget() -> None:
    points = [
        _point(0, 0.98, c9=2.9, c1=1.4),
        _point(1, 0.975, c9=0.5, c1=0.2),
        _point(3, 0.95, c9=-0.1, c1=-0.2),
        _point(5, 0.10, c9=-0.3, c1=-0.2),
        _point(4, 0.84, c9=-0.2, c1=-0.1),
    ]
    rec = recommend(points, "sigma0", level=0.0, budget=0.05)
    assert (rec.value, rec.accuracy, rec.baseline_value) == (3, 0.95, 0)
    assert rec.accuracy_cost == pytest.approx(0.03)
    assert rec.verdict().startswith("Recommended: sigma0 = 3, the smallest value")
    # A tighter budget: the private points all cost too much; say so, and name the first private
    # one.
    tight = recommend(points, "sigma0", level=0.0, budget=0.02)
    assert tight.value is None and tight.smallest_private == {"value": 3, "accuracy": 0.95}
    assert tight.verdict().startswith("No recommendation: no swept value has both")
    # A diverged point (accuracy 0.10, or not finite) is never recommended for its low leakage.
    diverged = [
        _point(0, 0.98, c9=2.0),
        _point(5, 0.10, c9=-0.3),
        _point(10, float("nan"), c9=-0.5),
    ]
    assert recommend(diverged, "sigma0", level=0.0, budget=0.05).value is None
    # No point meets the leakage level at all.
    leaky = recommend(
        [_point(0, 0.98, c9=2.0), _point(1, 0.97, c9=0.4)], "sigma0", level=0.0, budget=0.05
    )
    assert leaky.value is None and leaky.smallest_private is None
    assert leaky.verdict() == (
        "No recommendation: no swept value reaches every audited client's RDLV at 0 "
        "or below in every audited round."
    )
