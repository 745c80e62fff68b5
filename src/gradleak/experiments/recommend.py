"""``gradleak recommend``: search every defence family for the weakest strength that holds.

    gradleak recommend CONFIG --out DIR [--set training.rounds=2] [--jobs 2]

The config is run once without any defence (the baseline: the accuracy reference, and the leakage
to stop), then with one family's ``defenses:`` section at each strength its search asks for
(``experiments.search``). Each point replaces the config's own ``defenses:`` list by that one
section, so every point measures one defence alone; everything else (``--set`` overrides
included) is the config's.

A point *meets the level* when every audited client's worst RDLV (the maximum over the audited
rounds and over every attack of the row, ``rdlv_by_attack`` included, so adaptive attacks count)
is at most ``recommendation.level``; it *holds* when it also keeps the final test accuracy within
``recommendation.accuracy_budget`` of the baseline's. The recommendation is the holding point with
the smallest accuracy drop (ties: the weaker setting, then the family listed first). When no point
holds, the nearest is reported with ``holds: false`` and the reason: among points that meet the
level (all over the budget), the one with the smallest drop; when none meets it, the one with the
lowest worst leakage among the defended points within the budget (among all defended points when
none is within it).

Each point is a run directory inside DIR (a gradleak ``recommend`` directory): a finished run is
read back, an interrupted one continues, and the search is deterministic, so running the same
command again continues where it stopped. ``DIR/recommendation.json`` holds the answer,
``DIR/pareto.json`` every evaluated point.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gradleak.errors import ConfigError, DataError, GradleakError
from gradleak.experiments.config import (
    ExperimentConfig,
    first_difference,
    load_config,
    parse_override,
)
from gradleak.experiments.families import FAMILIES, Choices, Family, Range, Switch, select
from gradleak.experiments.runner import Run
from gradleak.experiments.search import Trail, done_future, explore, search
from gradleak.experiments.store import RunStore
from gradleak.rundir import OwnedDir, safe_component

log = logging.getLogger("gradleak")

BASELINE = "baseline"  # the run directory (and family) of the undefended run


# -- what a run measured ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Measured:
    """What the recommendation reads of one finished run (picklable: a worker returns it)."""

    rounds: int
    accuracy: float  # final test accuracy (NaN: no round finished, or diverged)
    leakage: dict[str, dict[str, Any]]  # client -> {rdlv, attack, round}; rdlv None: never scored
    epsilon: float | None  # the largest dp_epsilon of any row (None: no DP)
    rero_bound: float | None  # the largest dp_rero_bound of any row (None: not reported)
    seconds: float = 0.0  # wall-clock seconds this evaluation took (0: read back)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)


def _largest(results: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in results if _number(r.get(key))]
    return max(values) if values else None


def measure(rounds: list[dict[str, Any]], results: list[dict[str, Any]]) -> Measured:
    """Final accuracy, each audited client's worst RDLV over rounds and attacks (with the attack
    and round that reached it), and the DP figures of a run's rows."""
    leakage: dict[str, dict[str, Any]] = {}
    for r in results:
        if not r.get("audited"):
            continue
        found = leakage.setdefault(str(r["client"]), {"rdlv": None, "attack": None, "round": None})
        by_attack = r.get("rdlv_by_attack")
        candidates = [(r.get("rdlv"), r.get("attack"))]
        if isinstance(by_attack, dict):
            candidates += [(v, k) for k, v in by_attack.items()]
        for value, attack in candidates:
            if _number(value) and (found["rdlv"] is None or value > found["rdlv"]):
                found.update(rdlv=float(value), attack=attack, round=r["round"])
    accuracy = rounds[-1]["test_accuracy"] if rounds else math.nan
    return Measured(
        rounds=len(rounds),
        accuracy=float(accuracy),
        leakage=dict(sorted(leakage.items(), key=lambda kv: int(kv[0]))),
        epsilon=_largest(results, "dp_epsilon"),
        rero_bound=_largest(results, "dp_rero_bound"),
    )


def worst_leakage(m: Measured) -> float | None:
    """The largest worst RDLV over the audited clients (None: nothing audited, or some client was
    never scored)."""
    values = [c["rdlv"] for c in m.leakage.values()]
    if not values or any(v is None for v in values):
        return None
    return max(values)


def meets_level(m: Measured, level: float) -> bool:
    """Whether every audited client's worst RDLV is at most ``level`` (a client never scored, as
    under a diverged update, cannot be judged, so it does not meet it)."""
    worst = worst_leakage(m)
    return worst is not None and worst <= level


# -- points and the decision -----------------------------------------------------------------------
@dataclass
class Point:
    """One evaluated setting: a family at a strength, or the baseline."""

    family: str
    key: str | None
    strength: Any
    defense: dict[str, Any] | None  # the searched defenses: entry (None: the baseline)
    run_dir: str
    measured: Measured
    rank: tuple[int, float] = (0, 0.0)  # (family's position in the table, strength 0..1)
    meets_level: bool = False
    within_budget: bool = False
    pareto: bool = False
    base: tuple[dict[str, Any], ...] = ()  # the family's sections before the searched one

    @property
    def defenses(self) -> list[dict[str, Any]]:
        """The point's whole ``defenses:`` list (empty for the baseline)."""
        return [] if self.defense is None else [*self.base, self.defense]

    @property
    def holds(self) -> bool:
        return self.meets_level and self.within_budget

    def record(self, level: float, baseline_accuracy: float) -> dict[str, Any]:
        """The point as pareto.json and recommendation.json write it."""
        m = self.measured
        return {
            "family": self.family,
            "defense": self.defense,
            "defenses": self.defenses,
            "key": self.key,
            "strength": self.strength,
            "holds": self.holds,
            "meets_level": self.meets_level,
            "within_budget": self.within_budget,
            "leakage": m.leakage,
            "worst_leakage": worst_leakage(m),
            "level": level,
            "accuracy": _finite(m.accuracy),
            "accuracy_drop": _finite(baseline_accuracy - m.accuracy),
            "epsilon": _finite(m.epsilon),
            "rero_bound": _finite(m.rero_bound),
            "rounds": m.rounds,
            "run_dir": self.run_dir,
            "pareto": self.pareto,
        }


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def strength_rank(space: Range | Choices | Switch, value: Any) -> float:
    """Where ``value`` lies between the space's weakest (0) and strongest (1) setting."""
    if isinstance(space, Switch):
        return 1.0
    if isinstance(space, Choices):
        return space.values.index(value) / max(1, len(space.values) - 1)
    u = math.log if space.log else (lambda x: x)
    return (u(value) - u(space.weak)) / (u(space.strong) - u(space.weak))


@dataclass
class Decision:
    point: Point
    holds: bool
    sentence: str
    reason: str


def mark_pareto(points: list[Point]) -> None:
    """Mark the points no other point beats on both worst leakage (lower) and accuracy (higher)."""
    scored = [
        (p, worst_leakage(p.measured), p.measured.accuracy)
        for p in points
        if worst_leakage(p.measured) is not None and math.isfinite(p.measured.accuracy)
    ]
    for p, leak, acc in scored:
        p.pareto = not any(
            q is not p and ql <= leak and qa >= acc and (ql < leak or qa > acc)
            for q, ql, qa in scored
        )


def judge(points: list[Point], baseline: Point, level: float, budget: float) -> None:
    """Set each point's ``meets_level`` and ``within_budget``."""
    floor = baseline.measured.accuracy - budget - 1e-12
    for p in points:
        p.meets_level = meets_level(p.measured, level)
        acc = p.measured.accuracy
        p.within_budget = math.isfinite(acc) and acc >= floor


def _setting(p: Point) -> str:
    if p.defense is None:
        return "no defence"
    if p.key is None:
        return p.family
    return f"{p.family} with {p.key} = {p.strength}"


def _leak_text(p: Point) -> str:
    """Where the point's worst leakage is: its value, client, attack and round."""
    worst = worst_leakage(p.measured)
    if worst is None:
        return "not every audited client could be scored"
    client, c = max(p.measured.leakage.items(), key=lambda kv: (kv[1]["rdlv"], -int(kv[0])))
    return (
        f"the highest RDLV, {worst:.4g}, is client {client}'s under {c['attack']} in round "
        f"{c['round']}"
    )


def _cost_text(p: Point, baseline: Point) -> str:
    drop = 100 * (baseline.measured.accuracy - p.measured.accuracy)
    side = "below" if drop >= 0 else "above"
    return (
        f"a final test accuracy of {p.measured.accuracy:.4f}, {abs(drop):.1f} points {side} the "
        f"undefended {baseline.measured.accuracy:.4f}"
    )


def decide(points: list[Point], baseline: Point, level: float, budget: float) -> Decision:
    """The recommendation among judged points (the baseline among them), or the nearest point and
    why nothing holds."""
    target = f"every audited client's worst RDLV to {level:g} or below"
    if baseline.holds:
        return Decision(
            baseline,
            True,
            f"No defence needed: without one, every audited client's worst RDLV is already at "
            f"most {level:g} ({_leak_text(baseline)}).",
            "the run without defence already meets the leakage level",
        )
    defended = [p for p in points if p is not baseline]

    def by_cost(p: Point) -> tuple[float, float, int]:
        acc = p.measured.accuracy
        return (-acc if math.isfinite(acc) else math.inf, p.rank[1], p.rank[0])

    holding = sorted((p for p in defended if p.holds), key=by_cost)
    if holding:
        p = holding[0]
        eps = p.measured.epsilon
        dp = f", epsilon {eps:.4g}" if eps is not None and math.isfinite(eps) else ""
        return Decision(
            p,
            True,
            f"Recommended: {_setting(p)}. It brings {target} ({_leak_text(p)}) at "
            f"{_cost_text(p, baseline)}{dp}.",
            f"of the {len(holding)} evaluated settings that bring {target} and lose at most "
            f"{100 * budget:g} points of accuracy, it loses the least",
        )
    private = sorted((p for p in defended if p.meets_level), key=by_cost)
    if private:
        p = private[0]
        reason = (
            f"every evaluated setting that brings {target} loses more than {100 * budget:g} "
            f"points of accuracy; the one that loses least is {_setting(p)}, at "
            f"{_cost_text(p, baseline)}"
        )
    else:
        pool = [p for p in defended if p.within_budget] or defended or [baseline]

        def by_leak(p: Point) -> tuple[float, float, float, int]:
            worst = worst_leakage(p.measured)
            return (math.inf if worst is None else worst, *by_cost(p))

        p = min(pool, key=by_leak)
        searched = sorted({q.family for q in defended})
        within = "within the accuracy budget" if p.within_budget else "of all"
        reason = (
            f"no evaluated setting brings {target}"
            + (f", not even the strongest of {', '.join(searched)}" if searched else "")
            + f"; the least leaky {within} is {_setting(p)} ({_leak_text(p)})"
        )
    return Decision(p, False, f"No recommendation: {reason}.", reason)


# -- running the points ----------------------------------------------------------------------------
def point_dir(family: Family, value: Any, extra: dict[str, Any]) -> str:
    """The run directory of a family at a strength (derived keys, such as dp-gaussian's clip, add
    a digest: a change of them is another point, not a clash)."""
    text = family.name if family.key is None else f"{family.name}_{family.key}={value}"
    if isinstance(family.space, Switch):
        text = f"{family.name}_on"
    if extra:
        digest = hashlib.sha256(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:8]
        text += f"_{digest}"
    return safe_component(text.replace("/", "_"), "recommendation")


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _run_point(config_path: Path, overrides: list[str], run_dir: Path, threads: int) -> Measured:
    """A worker process: run (or continue) one point with ``threads`` torch threads; return what it
    measured."""
    import torch

    torch.set_num_threads(threads)
    logging.getLogger("gradleak").propagate = False  # the run's lines go to its run.log
    start = time.perf_counter()
    try:
        Run(load_config(config_path, overrides), run_dir, resume=True).execute()
        m = measure(*RunStore(run_dir).read_rows())
    except GradleakError as exc:  # as the base class: a ConfigError's (key, problem) do not pickle
        raise GradleakError(str(exc)) from None
    return replace(m, seconds=time.perf_counter() - start)


@dataclass
class Plan:
    """What ``recommend`` was asked: the config, the fixed overrides and the decision's settings."""

    config_path: Path
    fixed: list[str]
    level: float
    budget: float
    families: list[Family]
    skipped: dict[str, str]
    fixed_keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    tolerance: float = 0.02
    max_points: int = 8

    def overrides(self, defenses: list[dict[str, Any]]) -> list[str]:
        """The overrides of one point: the fixed ones and its defenses: list (the recommend and
        sweep settings reset, so that changing how the search runs keeps its finished points)."""
        return [
            *self.fixed,
            f"defenses={json.dumps(defenses)}",
            "recommendation={}",
            "sweep={}",
        ]


def make_plan(
    config_path: Path,
    sets: list[str],
    *,
    level: float | None = None,
    budget: float | None = None,
    families: list[str] | None = None,
    max_points: int | None = None,
) -> tuple[Plan, ExperimentConfig]:
    """The plan and the baseline's config; every check before anything is written."""
    fixed = []
    for text in sets:
        key, _ = parse_override(text)
        if key == "defenses" or key.startswith("defenses."):
            raise ConfigError(
                key,
                "recommend chooses the defences: each point's defenses: is one family's section",
            )
        fixed.append(f"{key}={text.partition('=')[2]}")
    base = load_config(config_path, [*fixed, "defenses=[]"])
    if base.audit is None:
        raise ConfigError(
            "audit",
            "recommend needs the leakage audit: add an audit: section (the clients to attack and "
            "the attack), the leakage each defence must stop",
        )
    if base.audit.clients == []:
        raise ConfigError("audit.clients", "recommend needs audited clients: name some, or all")
    settings = base.recommendation
    chosen, skipped = select(
        families if families is not None else settings.families, settings.ranges
    )
    unknown = [n for n in settings.fixed if n not in FAMILIES]
    if unknown:
        raise ConfigError(
            "recommendation.fixed", f"unknown family {unknown[0]!r} (known: {', '.join(FAMILIES)})"
        )
    plan = Plan(
        config_path=config_path,
        fixed=fixed,
        level=settings.level if level is None else level,
        budget=settings.accuracy_budget if budget is None else budget,
        families=chosen,
        skipped=skipped,
        fixed_keys={k: dict(v) for k, v in settings.fixed.items()},
        tolerance=settings.tolerance,
        max_points=settings.max_points if max_points is None else max_points,
    )
    for family in chosen:  # each family's ends must make valid configs (a bad range fails now)
        space = family.space
        ends = (
            [True]
            if isinstance(space, Switch)
            else list(space.values)
            if isinstance(space, Choices)
            else [space.weak, space.strong]
        )
        extra = family.from_baseline([]) if family.from_baseline else {}
        extra.update(plan.fixed_keys.get(family.name, {}))
        for value in ends:
            load_config(config_path, plan.overrides(family.defenses(value, extra)))
    return plan, base


class Recommender:
    """Runs a plan's points in ``out`` (in this process, or ``jobs`` worker processes)."""

    def __init__(
        self,
        plan: Plan,
        out: Path,
        *,
        jobs: int = 1,
        execute: Callable[[Run], Any] | None = None,
        on_point: Callable[[Point, str], None] | None = None,
    ) -> None:
        self.plan, self.out, self.jobs = plan, out, jobs
        self.owner = OwnedDir(out, "recommend")
        self.execute = execute or (lambda run: run.execute())
        self.on_point = on_point
        self.pool: Executor | None = None
        if jobs > cores():
            log.info("--jobs %d capped at the %d cores", jobs, cores())
            self.jobs = jobs = cores()
        self.threads = max(1, cores() // jobs)

    def _evaluate(self, name: str, defenses: list[dict[str, Any]]) -> Future[Measured]:
        """Start one point: read back a finished run, else run (or continue) it."""
        path = self.out / name
        overrides = self.plan.overrides(defenses)
        config = load_config(self.plan.config_path, overrides)
        store = RunStore(path)
        if self.owner.is_dir(name) and store.exists():
            diff = first_difference(store.read_config(), config.resolved())
            if diff:
                raise ConfigError(
                    diff,
                    f"differs from the config of the point already in {path}: run the same "
                    "command (config and --set) again, or choose another --out",
                )
            if len(store.rounds.read()) >= config.training.rounds:
                return done_future(measure(*store.read_rows()))
        elif self.owner.exists(name) and not self.owner.is_dir(name):
            raise DataError(f"{path} is not a directory (a link or a file): move it away")
        self.owner.make_dir(name)
        if self.pool is not None:
            return self.pool.submit(
                _run_point, self.plan.config_path, overrides, path, self.threads
            )
        start = time.perf_counter()
        self.execute(Run(config, path, resume=True))
        m = measure(*store.read_rows())
        return done_future(replace(m, seconds=time.perf_counter() - start))

    def run(self) -> dict[str, Any]:
        """Evaluate the baseline and every family's search, write ``recommendation.json`` and
        ``pareto.json``; return the recommendation."""
        self.owner.check_claimable()
        self.owner.claim()
        with self.owner.locked("gradleak recommend"):
            self._write_plan()
            if self.jobs > 1:
                # Workers ignore Ctrl-C: this process hears it and ends them (a run killed at any
                # moment continues on the next call), so that no worker prints a traceback.
                with ProcessPoolExecutor(
                    self.jobs,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=signal.signal,
                    initargs=(signal.SIGINT, signal.SIG_IGN),
                ) as pool:
                    self.pool = pool
                    try:
                        baseline, points = self._search()
                    except BaseException:
                        for child in multiprocessing.active_children():
                            child.terminate()
                        raise
                    finally:
                        self.pool = None
            else:
                baseline, points = self._search()
            recommendation, pareto = summarise(baseline, points, self.plan)
            self.owner.write_text("pareto.json", json.dumps(pareto, indent=2, allow_nan=False))
            self.owner.write_text(
                "recommendation.json", json.dumps(recommendation, indent=2, allow_nan=False)
            )
        return recommendation

    def _write_plan(self) -> None:
        p = self.plan
        self.owner.write_text(
            "recommend.json",
            json.dumps(
                {
                    "config": str(p.config_path),
                    "fixed": p.fixed,
                    "level": p.level,
                    "accuracy_budget": p.budget,
                    "families": {
                        f.name: {
                            "defense": f.defense,
                            "base": [dict(b) for b in f.base],
                            "key": f.key,
                            "space": f.space.describe(),
                            "fixed": {**f.fixed, **p.fixed_keys.get(f.name, {})},
                        }
                        for f in p.families
                    },
                    "skipped": p.skipped,
                    "tolerance": p.tolerance,
                    "max_points": p.max_points,
                },
                indent=2,
            ),
        )

    def _search(self) -> tuple[Point, list[Point]]:
        plan = self.plan
        measured = self._evaluate(BASELINE, []).result()
        baseline = Point("none", None, None, None, BASELINE, measured, (-1, 0.0))
        self._seen(baseline)
        if meets_level(measured, plan.level) or not plan.families:
            return baseline, []
        rows = self._baseline_rows()
        extras, searches = {}, {}
        for f in plan.families:
            extra = f.from_baseline(rows) if f.from_baseline else {}
            extras[f.name] = {**extra, **plan.fixed_keys.get(f.name, {})}
            searches[f.name] = search(f.space, tolerance=plan.tolerance, max_points=plan.max_points)
        families = {f.name: f for f in plan.families}
        order = list(families)

        def point(name: str, value: Any, m: Measured) -> Point:
            f = families[name]
            return Point(
                name,
                f.key,
                value if f.key is not None else None,
                f.section(value, extras[name]),
                point_dir(f, value, extras[name]),
                m,
                (order.index(name), strength_rank(f.space, value)),
                base=tuple(dict(b) for b in f.base),
            )

        def evaluate(name: str, value: Any) -> Future[Measured]:
            f = families[name]
            return self._evaluate(
                point_dir(f, value, extras[name]), f.defenses(value, extras[name])
            )

        trails: dict[str, Trail[Measured]] = explore(
            searches,
            evaluate,
            lambda m: meets_level(m, plan.level),
            seen=lambda name, value, m: self._seen(point(name, value, m)),
        )
        points = [point(n, v, m) for n in order for v, m in trails[n].evaluated]
        points.sort(key=lambda p: p.rank)
        return baseline, points

    def _baseline_rows(self) -> list[dict[str, Any]]:
        """The result rows of the run without defence (what ``Family.from_baseline`` reads)."""
        return RunStore(self.out / BASELINE).read_rows()[1]

    def _seen(self, p: Point) -> None:
        if self.on_point is not None:
            self.on_point(p, describe(p, self.plan.level))


# -- the outputs -----------------------------------------------------------------------------------
def summarise(
    baseline: Point, points: list[Point], plan: Plan
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(recommendation.json, pareto.json) of the evaluated points."""
    everything = [baseline, *points]
    judge(everything, baseline, plan.level, plan.budget)
    mark_pareto(everything)
    decision = decide(everything, baseline, plan.level, plan.budget)
    base_acc = baseline.measured.accuracy
    chosen = decision.point
    recommendation = {
        **chosen.record(plan.level, base_acc),
        "holds": decision.holds,
        "accuracy_budget": plan.budget,
        "baseline_accuracy": _finite(base_acc),
        "baseline_leakage": baseline.measured.leakage,
        "baseline_run_dir": baseline.run_dir,
        "evaluated": len(everything),
        "sentence": decision.sentence,
        "reason": decision.reason,
        "families": [f.name for f in plan.families],
        "skipped": plan.skipped,
        "config": str(plan.config_path),
        "fixed": plan.fixed,
    }
    pareto = {
        "level": plan.level,
        "accuracy_budget": plan.budget,
        "baseline_accuracy": _finite(base_acc),
        "points": [
            {**p.record(plan.level, base_acc), "recommended": p is chosen and decision.holds}
            for p in everything
        ],
    }
    return recommendation, pareto


def run_recommend(
    config_path: Path,
    sets: list[str],
    out: Path | None = None,
    *,
    jobs: int = 1,
    level: float | None = None,
    budget: float | None = None,
    families: list[str] | None = None,
    max_points: int | None = None,
    execute: Callable[[Run], Any] | None = None,
    on_point: Callable[[Point, str], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Search, decide, and write ``recommendation.json`` and ``pareto.json`` into ``out`` (default
    ``runs/NAME-recommend``); return ``out`` and the recommendation. ``execute`` runs a point in
    this process (jobs 1); ``on_point(point, line)`` hears of each evaluated point."""
    if jobs < 1:
        raise ConfigError("--jobs", f"must be at least 1, not {jobs}")
    plan, base = make_plan(
        config_path, sets, level=level, budget=budget, families=families, max_points=max_points
    )
    out = out or Path("runs") / f"{base.name}-recommend"
    if base.defenses:
        log.info(
            "the config's own defences (%s) are replaced by each family's section",
            base.defense_summary(),
        )
    for name, why in plan.skipped.items():
        log.info("family %s skipped: %s", name, why)
    return out, Recommender(plan, out, jobs=jobs, execute=execute, on_point=on_point).run()


def describe(p: Point, level: float) -> str:
    """One log line for an evaluated point."""
    m = p.measured
    verdict = "meets the level" if meets_level(m, level) else "leaks"
    took = f" in {m.seconds:.1f} s" if m.seconds else " (read back)"
    return f"{_setting(p)}: {verdict} ({_leak_text(p)}); accuracy {m.accuracy:.4f}{took}"
