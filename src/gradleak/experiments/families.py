"""The defence families ``gradleak recommend`` searches: one table entry per family.

A family is a defence (its name in the config's ``defenses:`` list), the key that sets its
strength and the space searched for it, weakest end first:

- ``Range(weak, strong, log)``: a number between two ends, bisected in log space (scales, which
  matter by their order of magnitude) or linearly (fractions such as a sparsity);
- ``Choices(values)``: an ordered list, weakest first (quantisation: fp16, then int8);
- ``Switch()``: on or off (the off state is the baseline run, which has no defence).

``fixed`` holds the section's other keys; ``from_baseline`` derives keys from the rows of the
undefended run (dp-gaussian's ``clip``); ``base`` holds sections stacked before the searched one
at every strength (a combined family: the batch-norm statistics kept local, and noise searched on
the rest). Adding a family is adding one entry to ``FAMILIES``; a family whose defences are not
registered ``defenses:`` entries is skipped with a note.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Range:
    """A continuous strength from ``weak`` to ``strong`` (either may be the larger)."""

    weak: float
    strong: float
    log: bool = True

    def __post_init__(self) -> None:
        if self.weak == self.strong or not all(map(math.isfinite, (self.weak, self.strong))):
            raise ValueError(
                f"a range needs two distinct finite ends, not {self.weak}, {self.strong}"
            )
        if self.log and min(self.weak, self.strong) <= 0:
            raise ValueError(f"a log range needs positive ends, not {self.weak}, {self.strong}")

    def describe(self) -> str:
        scale = "log" if self.log else "linear"
        return f"{self.weak:g} (weakest) to {self.strong:g} (strongest), {scale}"


@dataclass(frozen=True)
class Choices:
    """Ordered settings, weakest first."""

    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        if not self.values or len(set(map(repr, self.values))) != len(self.values):
            raise ValueError(f"choices must be distinct and not empty, not {self.values}")

    def describe(self) -> str:
        return ", ".join(map(str, self.values)) + " (weakest first)"


@dataclass(frozen=True)
class Switch:
    """On (off is the baseline, which runs without any defence)."""

    def describe(self) -> str:
        return "on"


Space = Range | Choices | Switch


def _median_update_norm(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``clip``: the median L2 norm of the undefended run's updates (3 significant digits), so
    that about half of them are clipped; 1.0 when the rows hold no finite positive norm."""
    norms = [
        r["update_norm"]
        for r in rows
        if isinstance(r.get("update_norm"), int | float)
        and math.isfinite(r["update_norm"])
        and r["update_norm"] > 0
    ]
    if not norms:
        return {"clip": 1.0}
    return {"clip": float(f"{statistics.median(norms):.3g}")}


@dataclass(frozen=True)
class Family:
    """One defence family: the section it adds to ``defenses:`` and how its strength is searched."""

    name: str  # the family's name (also what recommendation.families names)
    defense: str  # the defence's name in defenses:
    key: str | None  # the key that sets the strength (None: a switch)
    space: Space
    fixed: Mapping[str, Any] = field(default_factory=dict)  # the section's other keys
    # keys derived from the undefended run's result rows (the user's recommendation.fixed wins);
    # called with no rows to check the family's section before the baseline has run
    from_baseline: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None
    about: str = ""
    # sections that come before the searched one in defenses:, unchanged at every strength
    base: tuple[Mapping[str, Any], ...] = ()

    def section(self, value: Any, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The ``defenses:`` entry at strength ``value``."""
        out: dict[str, Any] = {"name": self.defense, **self.fixed, **(extra or {})}
        if self.key is not None:
            out[self.key] = value
        return out

    def defenses(self, value: Any, extra: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """The whole ``defenses:`` list at strength ``value``: the base sections, then the
        searched one."""
        return [*(dict(b) for b in self.base), self.section(value, extra)]

    def with_space(self, space: Space) -> Family:
        from dataclasses import replace

        return replace(self, space=space)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "adaptive-gaussian",
            "adaptive-gaussian",
            "sigma0",
            Range(0.01, 100.0),
            about="noise scaled to the update's 95th percentile",
        ),
        Family(
            "gaussian",
            "gaussian",
            "sigma",
            Range(1e-5, 1.0),
            about="noise of a fixed standard deviation",
        ),
        Family(
            "laplace",
            "laplace",
            "scale",
            Range(1e-5, 1.0),
            about="Laplace noise of a fixed scale",
        ),
        Family(
            "dp-gaussian",
            "dp-gaussian",
            "noise_multiplier",
            Range(0.001, 10.0),
            from_baseline=_median_update_norm,
            about="clipping and calibrated noise with (epsilon, delta) accounting",
        ),
        Family(
            "prune",
            "prune",
            "sparsity",
            Range(0.0, 0.99, log=False),
            about="magnitude pruning",
        ),
        Family(
            "quantize",
            "quantize",
            "format",
            Choices(("fp16", "int8")),
            about="quantisation",
        ),
        Family(
            "group-gaussian",
            "group-gaussian",
            "sigma0",
            Range(0.01, 100.0),
            about="noise with a scale per parameter group",
        ),
        Family(
            "bn-stats-local",
            "bn-stats-local",
            None,
            Switch(),
            about="batch-norm running statistics kept on the client",
        ),
        Family(
            "bn-stats-local+adaptive-gaussian",
            "adaptive-gaussian",
            "sigma0",
            Range(0.01, 100.0),
            base=({"name": "bn-stats-local"},),
            about="batch-norm statistics kept on the client, and noise on the parameters "
            "scaled to the update's 95th percentile",
        ),
    )
}


def registered_defenses() -> list[str]:
    """The names the config's ``defenses:`` list accepts."""
    from gradleak.experiments.config import ExperimentConfig, model_variants

    return [
        m.model_fields["name"].default
        for m in model_variants(ExperimentConfig.model_fields["defenses"].annotation)
    ]


def select(
    names: list[str] | None, ranges: Mapping[str, list[Any]] | None = None
) -> tuple[list[Family], dict[str, str]]:
    """(families to search, in table order; {skipped family: why}). ``names`` None: every family.
    ``ranges`` replaces a family's space: ``[weak, strong]`` for a range, the ordered values for
    choices."""
    from gradleak.errors import ConfigError

    wanted = list(FAMILIES) if names is None else names
    for n in wanted:
        if n not in FAMILIES:
            raise ConfigError(
                "recommendation.families", f"unknown family {n!r} (known: {', '.join(FAMILIES)})"
            )
    for n in ranges or {}:
        if n not in FAMILIES:
            raise ConfigError(
                "recommendation.ranges", f"unknown family {n!r} (known: {', '.join(FAMILIES)})"
            )
    known = set(registered_defenses())
    chosen, skipped = [], {}
    for name in FAMILIES:
        if name not in wanted:
            continue
        family = FAMILIES[name]
        missing = [d for d in (*(b["name"] for b in family.base), family.defense) if d not in known]
        if missing:
            skipped[name] = f"the defence {missing[0]!r} is not available in this version"
            continue
        if ranges and name in ranges:
            family = family.with_space(_space(family, ranges[name]))
        chosen.append(family)
    return chosen, skipped


def _space(family: Family, given: Any) -> Space:
    """A family's space as ``recommendation.ranges`` gives it."""
    from gradleak.errors import ConfigError

    key = f"recommendation.ranges.{family.name}"
    if isinstance(family.space, Switch):
        raise ConfigError(key, "a switch has no range")
    if not isinstance(given, list) or not given:
        raise ConfigError(key, f"expected a list, not {given!r}")
    try:
        if isinstance(family.space, Choices):
            return Choices(tuple(given))
        if len(given) != 2 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in given
        ):
            raise ValueError(f"expected [weakest, strongest] numbers, not {given!r}")
        return Range(float(given[0]), float(given[1]), family.space.log)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None
