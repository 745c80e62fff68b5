"""``gradleak recommend``: the search per family, the decision, the outputs, resuming, the
report."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gradleak import rundir
from gradleak.cli import app
from gradleak.errors import ConfigError
from gradleak.experiments.config import load_config
from gradleak.experiments.families import FAMILIES, Choices, Family, Range, Switch, select
from gradleak.experiments.recommend import Recommender, make_plan, measure, run_recommend
from gradleak.experiments.search import done_future, explore, search
from gradleak.experiments.store import RunStore
from gradleak.report.html import build_recommend_report

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
    "engine": {"threads": 1},
    "defenses": [{"name": "prune", "sparsity": 0.5}],
    "audit": {"clients": [1], "attack": {"iterations": 100, "init": "prior"}, "metric": "psnr"},
    "recommendation": {"level": 0.0, "accuracy_budget": 0.2, "max_points": 3},
}


def _config(tmp_path: Path, **changes) -> Path:
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, **changes}))
    return path


def _drive(space, holds, **kwargs) -> tuple[list, object]:
    """Run one search with a synchronous fake evaluator; (evaluated strengths, result)."""
    trail = explore({"f": search(space, **kwargs)}, lambda _, v: done_future(holds(v)), bool)["f"]
    return [v for v, _ in trail.evaluated], trail.weakest


# -- the search ------------------------------------------------------------------------------------
def test_bisection_finds_the_boundary_of_a_monotone_evaluator() -> None:
    boundary, tol = 3.7, 0.05
    values, weakest = _drive(
        Range(0.01, 100.0), lambda s: s >= boundary, tolerance=tol, max_points=50, digits=None
    )
    assert values[0] == 100.0  # the strongest first
    # after it, each point halves the bracket (in log space) until it is tol of the range wide
    assert len(values) == 1 + math.ceil(math.log2(1 / tol))
    failing = max(v for v in values if v < boundary)
    assert weakest >= boundary and weakest == min(v for v in values if v >= boundary)
    assert math.log(weakest / failing) <= tol * math.log(100 / 0.01) + 1e-12
    assert failing < boundary <= weakest  # the boundary lies in the final bracket

    # a linear range (a sparsity), and a space whose strong end is the smaller value
    values, weakest = _drive(
        Range(0.0, 0.99, log=False), lambda s: s >= 0.5, tolerance=tol, max_points=50, digits=None
    )
    assert 0.5 <= weakest <= 0.5 + tol * 0.99 and max(v for v in values if v < 0.5) < 0.5
    values, weakest = _drive(
        Range(10.0, 0.1), lambda s: s <= 2.0, tolerance=tol, max_points=50, digits=None
    )
    assert values[0] == 0.1 and 2.0 >= weakest >= 2.0 * (100**-tol)

    # rounded strengths (the default: 3 significant digits), and the cap on points
    values, weakest = _drive(Range(0.01, 100.0), lambda s: s >= boundary, max_points=4)
    assert len(values) == 4 and weakest >= boundary
    assert all(float(f"{v:.3g}") == v for v in values)


def test_choices_and_switches_are_searched_exactly() -> None:
    letters = ("a", "b", "c", "d", "e")
    values, weakest = _drive(Choices(letters), lambda s: s >= "c")
    assert weakest == "c" and values == ["e", "b", "c"]  # strongest, then bisection of indices
    assert _drive(Choices(("fp16", "int8")), lambda s: s == "int8") == (["int8", "fp16"], "int8")
    # the strongest does not hold: the family cannot hold, one point
    assert _drive(Choices(letters), lambda s: False) == (["e"], None)
    assert _drive(Range(0.01, 100.0), lambda s: False) == ([100.0], None)
    assert _drive(Switch(), lambda s: True) == ([True], True)
    assert _drive(Switch(), lambda s: False) == ([True], None)


def test_families_searched_side_by_side_see_their_own_outcomes_in_order() -> None:
    """Evaluations finishing in any order (threads) give each family the trail it gets alone."""
    bounds = {"a": 3.7, "b": 0.2, "c": 50.0}

    def alone(name: str) -> list:
        return _drive(Range(0.01, 100.0), lambda s: s >= bounds[name])[0]

    with ThreadPoolExecutor(3) as pool:
        trails = explore(
            {n: search(Range(0.01, 100.0)) for n in bounds},
            lambda n, v: pool.submit(lambda: v >= bounds[n]),
            bool,
        )
    assert {n: [v for v, _ in t.evaluated] for n, t in trails.items()} == {
        n: alone(n) for n in bounds
    }


# -- what a run measured, and the decision ---------------------------------------------------------
def _row(round, client, rdlv, attack="inverting-gradients", **extra) -> dict:
    return {
        "round": round,
        "client": client,
        "audited": True,
        "rdlv": rdlv,
        "attack": attack,
        **extra,
    }


def test_the_worst_leakage_is_taken_over_rounds_and_every_attack() -> None:
    rows = [
        _row(1, 1, 0.2, rdlv_by_attack={"inverting-gradients": 0.2, "spear": None}),
        _row(2, 1, 0.1, rdlv_by_attack={"inverting-gradients": 0.1, "bn-statistics-adaptive": 0.7}),
        _row(1, 2, -0.3),
        _row(2, 2, None, audit_note="not finite"),
        {"round": 1, "client": 3, "audited": False, "rdlv": None},
        {"round": 2, "client": 3, "audited": False, "dp_epsilon": 3.5, "dp_rero_bound": 0.2},
    ]
    m = measure([{"test_accuracy": 0.5}, {"test_accuracy": 0.75}], rows)
    assert m.accuracy == 0.75 and m.epsilon == 3.5 and m.rero_bound == 0.2
    assert m.leakage == {
        "1": {"rdlv": 0.7, "attack": "bn-statistics-adaptive", "round": 2},
        "2": {"rdlv": -0.3, "attack": "inverting-gradients", "round": 1},
    }


class FakeRecommender(Recommender):
    """A recommender whose points are measured by a function of (family, strength), not run."""

    def __init__(self, plan, out, leak, accuracy) -> None:  # noqa: ANN001
        super().__init__(plan, out)
        self.leak, self.accuracy, self.asked, self.lists = leak, accuracy, [], []

    def _evaluate(self, name, defenses):  # noqa: ANN001, ANN202
        # a family's name is its defences' names joined by '+' (the searched one last)
        family = "+".join(d["name"] for d in defenses) or None
        section = defenses[-1] if defenses else None
        key = FAMILIES[family].key if family else None
        value = section.get(key, True) if family and key else (True if family else None)
        self.asked.append((family, value))
        self.lists.append(defenses)
        by_attack = self.leak(family, value)
        worst = max(by_attack, key=by_attack.get)
        row = _row(1, 1, by_attack[worst], attack=worst, rdlv_by_attack=by_attack)
        return done_future(measure([{"test_accuracy": self.accuracy(family, value)}], [row]))

    def _baseline_rows(self):  # noqa: ANN202
        return [{"update_norm": 2.0}]


def _fake(tmp_path, leak, accuracy, families=("gaussian", "quantize"), **settings) -> dict:
    """Recommend with faked points; ``settings`` change the config's recommendation: section."""
    config = _config(tmp_path, recommendation={**CONFIG["recommendation"], **settings})
    plan, _ = make_plan(config, [], families=list(families))
    rec = FakeRecommender(plan, tmp_path / "out", leak, accuracy)
    result = rec.run()
    assert result == json.loads((tmp_path / "out/recommendation.json").read_text())
    return result


def test_an_adaptive_attack_that_leaks_more_moves_the_recommendation(tmp_path) -> None:
    def leak(adaptive: bool):  # noqa: ANN202
        def f(family, value):  # noqa: ANN001, ANN202
            if family is None:
                return {"inverting-gradients": 1.0}
            if family == "quantize":
                return {"inverting-gradients": 0.5}
            out = {"inverting-gradients": 0.2 - value}  # holds from sigma 0.2
            if adaptive:
                out["inverting-gradients-adaptive"] = 0.6 - value  # holds from sigma 0.6
            return out

        return f

    def accuracy(family, value):  # noqa: ANN001, ANN202
        return 0.9 - (0.1 * value if family == "gaussian" else 0.0)

    settings = dict(max_points=12, tolerance=0.01)
    plain = _fake(tmp_path / "a", leak(False), accuracy, **settings)
    adaptive = _fake(tmp_path / "b", leak(True), accuracy, **settings)
    assert plain["holds"] and adaptive["holds"]
    factor = math.exp(0.01 * math.log(1 / 1e-5))  # the bracket's width over gaussian's range
    assert 0.2 <= plain["strength"] <= 0.2 * factor
    assert 0.6 <= adaptive["strength"] <= 0.6 * factor  # the adaptive attack decides
    worst = adaptive["leakage"]["1"]
    assert worst["attack"] == "inverting-gradients-adaptive"
    assert worst["rdlv"] == pytest.approx(0.6 - adaptive["strength"])


def test_a_combined_family_stacks_its_base_before_the_searched_defence(tmp_path) -> None:
    # bn-stats-local alone leaks a little; with noise on the parameters it holds from sigma0 0.5.
    def leak(family, value):  # noqa: ANN001, ANN202
        found = {None: 2.0, "bn-stats-local": 0.05}
        return {"ig": found[family] if family in found else 0.5 - value}

    config = _config(tmp_path, recommendation={**CONFIG["recommendation"], "max_points": 10})
    plan, _ = make_plan(config, [], families=["bn-stats-local", "bn-stats-local+adaptive-gaussian"])
    fake = FakeRecommender(plan, tmp_path / "out", leak, lambda f, v: 0.9)
    rec = fake.run()
    assert rec["holds"] and rec["family"] == "bn-stats-local+adaptive-gaussian"
    assert 0.5 <= rec["strength"] <= 0.6
    assert rec["defense"] == {"name": "adaptive-gaussian", "sigma0": rec["strength"]}
    assert rec["defenses"] == [{"name": "bn-stats-local"}, rec["defense"]]
    combined = [d for d in fake.lists if len(d) == 2]
    assert combined and all(d[0] == {"name": "bn-stats-local"} for d in combined)
    # every list is a valid config: the base section and the searched one, in that order
    used = load_config(config, plan.overrides(rec["defenses"])).defenses
    assert [d.name for d in used] == ["bn-stats-local", "adaptive-gaussian"]
    page = build_recommend_report(tmp_path / "out").read_text()
    assert "name: bn-stats-local" in page and "name: adaptive-gaussian" in page


def test_the_recommendation_has_the_smallest_accuracy_drop_among_points_that_hold(
    tmp_path,
) -> None:
    # quantize int8 holds at no cost; gaussian holds too, at a cost
    def leak(family, value):  # noqa: ANN001, ANN202
        if family == "quantize":
            return {"inverting-gradients": -0.1 if value == "int8" else 0.3}
        return {"inverting-gradients": 1.0 if family is None else 0.2 - value}

    def accuracy(family, value):  # noqa: ANN001, ANN202
        return 0.9 - value if family == "gaussian" else {None: 0.9, "quantize": 0.89}[family]

    rec = _fake(tmp_path, leak, accuracy)
    assert rec["family"] == "quantize" and rec["defense"] == {"name": "quantize", "format": "int8"}
    assert rec["holds"] and rec["accuracy_drop"] == pytest.approx(0.01)
    assert rec["evaluated"] == 1 + 3 + 2  # baseline, gaussian's 3 points, quantize's 2
    pareto = json.loads((tmp_path / "out/pareto.json").read_text())
    keys = set(
        "family defense defenses key strength holds meets_level within_budget leakage "
        "worst_leakage level "
        "accuracy accuracy_drop epsilon rero_bound rounds run_dir pareto recommended".split()
    )
    assert all(set(p) == keys for p in pareto["points"])
    assert set(rec) >= keys - {"recommended"} | {"evaluated", "sentence", "reason"}
    assert [p["recommended"] for p in pareto["points"]].count(True) == 1
    # the front: no other point has both less leakage and more accuracy
    pts = pareto["points"]
    for p in pts:
        beaten = any(
            q["worst_leakage"] <= p["worst_leakage"]
            and q["accuracy"] >= p["accuracy"]
            and (q["worst_leakage"], q["accuracy"]) != (p["worst_leakage"], p["accuracy"])
            for q in pts
        )
        assert p["pareto"] == (not beaten)


def test_when_nothing_holds_the_nearest_point_and_the_reason_are_given(tmp_path) -> None:
    # Nothing meets the level: gaussian's strongest leaks least but costs 80 points, so the
    # nearest is the least leaky point within the budget (int8).
    def leak(family, value):  # noqa: ANN001, ANN202
        found = {None: 1.0, "quantize": 0.8 if value == "int8" else 0.9, "gaussian": 0.2}
        return {"inverting-gradients": found[family]}

    def accuracy(family, value):  # noqa: ANN001, ANN202
        return 0.1 if family == "gaussian" else 0.9

    rec = _fake(tmp_path / "a", leak, accuracy)
    assert rec["holds"] is False and rec["sentence"].startswith("No recommendation: ")
    assert rec["reason"] == (
        "no evaluated setting brings every audited client's worst RDLV to 0 or below, not even "
        "the strongest of gaussian, quantize; the least leaky within the accuracy budget is "
        "quantize with format = int8 (the highest RDLV, 0.8, is client 1's under "
        "inverting-gradients in round 1)"
    )
    assert rec["defense"] == {"name": "quantize", "format": "int8"} and rec["evaluated"] == 3

    # Settings meet the level, but each costs more than the budget: the nearest is the one that
    # costs least (ties: the weakest).
    def leak2(family, value):  # noqa: ANN001, ANN202
        if family == "gaussian":
            return {"inverting-gradients": 0.2 - value}
        return {"inverting-gradients": 1.0}

    def accuracy2(family, value):  # noqa: ANN001, ANN202
        return 0.9 - (0.3 + value if family == "gaussian" else 0.0)

    rec = _fake(tmp_path / "b", leak2, accuracy2)
    assert rec["holds"] is False and rec["meets_level"] and not rec["within_budget"]
    assert "loses more than 20 points of accuracy" in rec["reason"]
    pareto = json.loads((tmp_path / "b/out/pareto.json").read_text())["points"]
    assert rec["strength"] == min(p["strength"] for p in pareto if p["meets_level"])
    assert not any(p["recommended"] for p in pareto)


def test_no_defence_needed_when_the_baseline_holds(tmp_path) -> None:
    plan, _ = make_plan(_config(tmp_path), [])
    rec = FakeRecommender(plan, tmp_path / "out", lambda f, v: {"ig": -0.5}, lambda f, v: 0.9)
    result = rec.run()
    assert rec.asked == [(None, None)]  # no family was searched
    assert result["holds"] and result["family"] == "none" and result["defense"] is None
    assert result["sentence"].startswith("No defence needed")


def test_a_family_whose_defence_is_not_registered_is_skipped(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(FAMILIES, "future", Family("future", "no-such-defence", "x", Range(1, 2)))
    chosen, skipped = select(["gaussian", "future"])
    assert [f.name for f in chosen] == ["gaussian"]
    assert skipped == {"future": "the defence 'no-such-defence' is not available in this version"}
    rec = _fake(tmp_path, lambda f, v: {"ig": 1.0}, lambda f, v: 0.9, families=("future",))
    assert rec["skipped"] == skipped and rec["evaluated"] == 1 and not rec["holds"]


def test_bad_input_is_one_clear_error_before_anything_is_written(tmp_path) -> None:
    no_audit = _config(tmp_path / "no-audit", audit=None)
    with pytest.raises(ConfigError, match="audit: recommend needs the leakage audit"):
        run_recommend(no_audit, [], tmp_path / "out")
    config = _config(tmp_path)
    with pytest.raises(ConfigError, match="defenses.0.sigma: recommend chooses the defences"):
        run_recommend(config, ["defenses.0.sigma=1"], tmp_path / "out")
    with pytest.raises(ConfigError, match="unknown family 'nope'"):
        run_recommend(config, [], tmp_path / "out", families=["nope"])
    with pytest.raises(ConfigError, match="recommendation.ranges.gaussian"):
        run_recommend(_config(tmp_path / "a", recommendation={"ranges": {"gaussian": [0, 1]}}), [])
    with pytest.raises(ConfigError, match="defenses.0.sparsity"):  # a range beyond the defence's
        run_recommend(_config(tmp_path / "b", recommendation={"ranges": {"prune": [0, 1.5]}}), [])
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["recommend", str(no_audit), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "recommend needs the leakage audit" in result.output
    assert not (tmp_path / "o").exists()


# -- end to end ------------------------------------------------------------------------------------
class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:  # noqa: ANN001
        if tag == "img":
            self.images.append(dict(attrs)["alt"])


def test_end_to_end_on_a_tiny_federation_resumes_without_repeating_a_finished_point(
    tmp_path,
) -> None:
    config = _config(tmp_path)
    families = ["gaussian", "quantize"]
    # uninterrupted
    out = tmp_path / "fresh"
    ran: list[str] = []
    where, rec = run_recommend(
        config,
        [],
        out,
        families=families,
        execute=lambda r: (ran.append(r.run_dir.name), r.execute()),
    )
    assert where == out and rec["evaluated"] == len(ran) == 1 + 3 + 1  # int8 leaks: one point
    pareto = json.loads((out / "pareto.json").read_text())["points"]
    assert [p["run_dir"] for p in pareto] == [
        "baseline",
        *sorted((d for d in ran if d.startswith("gaussian")), key=lambda d: float(d.split("=")[1])),
        "quantize_format=int8",
    ]
    # the leakage read from an independent pass over each run's rows
    for p in pareto:
        rows = [
            json.loads(x) for x in (out / p["run_dir"] / "results.jsonl").read_text().splitlines()
        ]
        audited = [r for r in rows if r.get("audited")]
        assert p["worst_leakage"] == max(r["rdlv"] for r in audited)
        used = yaml.safe_load((out / p["run_dir"] / "config.yaml").read_text())["defenses"]
        assert len(used) == len(p["defenses"])  # the config's own prune is replaced
        assert all(u | d == u for u, d in zip(used, p["defenses"], strict=True))
        assert p["defenses"] == ([p["defense"]] if p["defense"] else [])
    assert rec["holds"] and rec["family"] == "gaussian"
    assert rec["sentence"].startswith(f"Recommended: gaussian with sigma = {rec['strength']}.")
    assert rec["accuracy_drop"] == pytest.approx(rec["baseline_accuracy"] - rec["accuracy"])

    page = build_recommend_report(out)
    parser = _Images()
    parser.feed(page.read_text())
    assert parser.images == [
        "worst leakage against accuracy",
        "client 1 without defence",
        "client 1 with the recommended setting",
    ]
    assert f"sigma: {rec['strength']}" in page.read_text()

    # interrupted in the third point's second round, then run again
    out = tmp_path / "resumed"
    first: list[str] = []

    def interrupt_third(run) -> None:  # noqa: ANN001
        first.append(run.run_dir.name)
        if len(first) == 3:

            def stop(op: str, rel: str) -> None:
                if op == "append" and rel == "rounds.jsonl" and run.store.rounds.read():
                    raise KeyboardInterrupt

            rundir.on_change = stop
        try:
            run.execute()
        finally:
            rundir.on_change = None

    with pytest.raises(KeyboardInterrupt):
        run_recommend(config, [], out, families=families, execute=interrupt_third)
    finished = {d: (out / d / "results.jsonl").read_bytes() for d in first[:2]}
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 2 and "the search has not finished" in result.output
    second: list[tuple[str, int]] = []
    run_recommend(
        config,
        [],
        out,
        families=families,
        execute=lambda r: (second.append((r.run_dir.name, r.first_round)), r.execute()),
    )
    assert not {d for d, _ in second} & set(finished)  # nothing finished runs again
    assert second[0] == (first[2], 2)  # the interrupted point continues from its second round
    assert all(first_round == 1 for _, first_round in second[1:])
    assert all((out / d / "results.jsonl").read_bytes() == b for d, b in finished.items())
    for name in ("pareto.json", "recommendation.json"):  # the same as without the interruption
        assert (out / name).read_text() == (tmp_path / "fresh" / name).read_text()
    # a third run reads everything back
    third: list[str] = []
    run_recommend(config, [], out, families=families, execute=lambda r: third.append(r))
    assert third == []


def test_the_report_escapes_what_it_reads_and_follows_no_path_out(tmp_path) -> None:
    plan, _ = make_plan(_config(tmp_path), [], families=["quantize"])
    out = tmp_path / "out"
    FakeRecommender(
        plan, out, lambda f, v: {"ig": 1.0 if f is None else -1.0}, lambda f, v: 0.9
    ).run()
    rec = json.loads((out / "recommendation.json").read_text())
    rec["sentence"] = "<script>alert(1)</script>"
    rec["run_dir"] = "../../elsewhere"
    rec["defense"] = {"name": "<b>x</b>"}
    (out / "recommendation.json").write_text(json.dumps(rec))
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    text = (out / "report/index.html").read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text and "<b>x" not in text
    rec["holds"] = "yes"
    (out / "recommendation.json").write_text(json.dumps(rec))
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 2 and "recommendation.json is damaged (holds" in result.output
    result = CliRunner().invoke(app, ["report", str(out), "--level", "0.1"])
    assert result.exit_code == 2 and "give them to gradleak recommend" in result.output


def test_recommend_has_help() -> None:
    result = CliRunner().invoke(app, ["recommend", "--help"])
    assert result.exit_code == 0 and "--jobs" in result.output and "--family" in result.output


def test_points_run_in_worker_processes_with_jobs(tmp_path) -> None:
    out = tmp_path / "out"
    config = _config(tmp_path)
    # engine.threads is 1: results are bitwise the same at equal thread counts
    _, rec = run_recommend(config, [], out, families=["quantize"], jobs=2, max_points=1)
    assert RunStore(out / "quantize_format=int8").exists()
    one = tmp_path / "one"
    _, alone = run_recommend(config, [], one, families=["quantize"], max_points=1)
    # the same points, leakage and accuracy as one after the other in this process
    assert rec == alone and rec["evaluated"] == 2
