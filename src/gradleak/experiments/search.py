"""The search for each family's weakest strength that holds, and the schedule that runs several
families' searches at once.

``search`` is a generator: it yields the strength to evaluate next and is sent whether it held.
It evaluates the strongest setting first; when that does not hold, the family cannot hold and the
search ends. Otherwise it bisects between the weak end (not evaluated: the weakest setting is
assumed to leak like the baseline) and the weakest setting known to hold:

- a ``Range`` until the bracket is at most ``tolerance`` of the whole range wide (measured in log
  space for a log range), so at most ``1 + ceil(log2(1 / tolerance))`` points;
- ``Choices`` until the bracket holds two neighbours (exact);
- a ``Switch`` is one point.

Every search also stops after ``max_points`` points. Strengths of a range are rounded to
``digits`` significant digits, so that the recommended section reads as written by hand. The
search assumes that leakage falls as the strength grows; where it does not, the result is still a
setting that was measured to hold, and possibly not the weakest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from gradleak.experiments.families import Choices, Range, Space, Switch

T = TypeVar("T")

Search = Generator[Any, bool, Any]


def _rounded(x: float, digits: int | None) -> float:
    return x if digits is None else float(f"{x:.{digits}g}")


def search(
    space: Space, *, tolerance: float = 0.05, max_points: int = 6, digits: int | None = 3
) -> Search:
    """Yield strengths to evaluate (each is sent back whether it held); return the weakest that
    held, or None when the strongest did not."""
    if max_points < 1:
        raise ValueError("max_points must be at least 1")
    if isinstance(space, Switch):
        return True if (yield True) else None
    if isinstance(space, Choices):
        values = space.values
        if not (yield values[-1]):
            return None
        good, bad, count = len(values) - 1, -1, 1  # bad = -1: weaker than the weakest (baseline)
        while good - bad > 1 and count < max_points:
            mid = (good + bad) // 2
            count += 1
            if (yield values[mid]):
                good = mid
            else:
                bad = mid
        return values[good]
    assert isinstance(space, Range)
    u, inv = (math.log, math.exp) if space.log else ((lambda x: x), (lambda x: x))
    width = tolerance * abs(u(space.strong) - u(space.weak))
    if not (yield space.strong):
        return None
    good, bad, count = space.strong, space.weak, 1
    while count < max_points and abs(u(good) - u(bad)) > width:
        mid = _rounded(inv((u(good) + u(bad)) / 2), digits)
        if mid in (good, bad):  # the rounding leaves nothing between them
            break
        count += 1
        if (yield mid):
            good = mid
        else:
            bad = mid
    return good


@dataclass
class Trail(Generic[T]):
    """What one family's search evaluated, in order, and its result."""

    evaluated: list[tuple[Any, T]] = field(default_factory=list)
    weakest: Any = None  # the weakest strength that held (None: none held)
    done: bool = False


def explore(
    searches: dict[str, Search],
    evaluate: Callable[[str, Any], Future[T]],
    holds: Callable[[T], bool],
    *,
    seen: Callable[[str, Any, T], None] | None = None,
) -> dict[str, Trail[T]]:
    """Run every family's search to its end, the families side by side.

    ``evaluate(family, strength)`` starts one evaluation and returns its future (already done when
    it ran in this process or was read back); ``holds`` judges its outcome. Each search sees its
    own outcomes in its own order, so the result does not depend on which evaluation finishes
    first. ``seen(family, strength, outcome)`` hears of each outcome as it is judged. An evaluation
    that fails cancels the waiting ones and raises.
    """
    trails: dict[str, Trail[T]] = {name: Trail() for name in searches}
    pending: dict[Future[T], tuple[str, Any]] = {}

    def start(name: str, step: Callable[[], Any]) -> None:
        try:
            value = step()
        except StopIteration as stop:
            trails[name].weakest, trails[name].done = stop.value, True
            return
        pending[evaluate(name, value)] = (name, value)

    try:
        for name, gen in searches.items():
            start(name, gen.__next__)
        while pending:
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in _in_order(finished, pending, list(searches)):
                name, value = pending.pop(fut)
                outcome = fut.result()
                trails[name].evaluated.append((value, outcome))
                if seen is not None:
                    seen(name, value, outcome)
                start(name, lambda g=searches[name], o=outcome: g.send(holds(o)))
    finally:
        for fut in pending:
            fut.cancel()
    return trails


def _in_order(
    finished: Iterable[Future[T]], pending: dict[Future[T], tuple[str, Any]], order: list[str]
) -> list[Future[T]]:
    """Finished futures in the families' order (a deterministic order of log lines)."""
    return sorted(finished, key=lambda f: order.index(pending[f][0]))


def done_future(value: T) -> Future[T]:
    """A future that already holds ``value`` (an evaluation run here, or read back)."""
    fut: Future[T] = Future()
    fut.set_result(value)
    return fut
