"""Sweeps: one experiment per combination of values, each in its own run directory, resumable.

    gradleak sweep CONFIG --set defenses.0.sigma0=0,5,10 [--set training.lr=0.01,0.1]

Values are comma-separated (read as YAML, so ``[1,2],[3]`` is two lists); several keys make a grid.
The config's own ``sweep:`` section adds axes too. A finished run is skipped, an interrupted one
continues where it stopped. ``sweep.json`` lists the points and their run directories.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gradleak.errors import ConfigError, DataError
from gradleak.experiments.config import load_config, parse_yaml, read_yaml
from gradleak.experiments.runner import Run
from gradleak.experiments.store import RunStore
from gradleak.rundir import OwnedDir
from gradleak.safeio import parse_json


@dataclass(frozen=True)
class SweepPoint:
    values: dict[str, Any]
    run_dir: Path

    def overrides(self) -> list[str]:
        return [f"{k}={json.dumps(v)}" for k, v in self.values.items()]


def split_values(text: str) -> tuple[str, list[Any]]:
    """``key=v1,v2,...`` -> (key, [v1, v2, ...])."""
    key, sep, values = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", f"expected key=value[,value...], got {text!r}")
    try:
        parsed = parse_yaml(f"[{values}]")
    except yaml.YAMLError as exc:
        raise ConfigError(key.strip(), f"cannot read values {values!r}: {exc}") from None
    return key.strip(), parsed


# Run directory names longer than this end in a hash instead (file systems refuse names over 255).
MAX_NAME = 100


def _dir_name(values: dict[str, Any]) -> str:
    """The run directory of a point: its values as one safe path component."""
    text = "__".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in values.items())
    name = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", text).lstrip(".") or "base"
    if len(name) > MAX_NAME:
        name = f"{name[: MAX_NAME - 17]}_{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    return name


def plan(config_path: Path, sets: list[str], out: Path) -> tuple[list[str], list[SweepPoint]]:
    """(fixed overrides, points). Single values in ``sets`` are fixed overrides; lists are axes."""
    axes: dict[str, list[Any]] = dict(read_yaml(config_path).get("sweep") or {})
    fixed = []
    for text in sets:
        key, values = split_values(text)
        if len(values) == 1:
            fixed.append(f"{key}={json.dumps(values[0])}")
        else:
            axes[key] = values
    if not axes:
        raise ConfigError(
            "--set", "nothing to sweep: give a key with several values, e.g. --set a.b=1,2"
        )
    keys = list(axes)
    points = [
        SweepPoint(
            dict(zip(keys, combo, strict=True)),
            out / _dir_name(dict(zip(keys, combo, strict=True))),
        )
        for combo in itertools.product(*(axes[k] for k in keys))
    ]
    seen: dict[Path, dict[str, Any]] = {}
    for p in points:  # e.g. "a/b" and "a_b", or a value given twice, would share one run
        if p.run_dir in seen:
            raise ConfigError(
                keys[0] if len(keys) == 1 else "sweep",
                f"values {seen[p.run_dir]} and {p.values} "
                f"would share the run directory {p.run_dir.name}: give distinct values",
            )
        seen[p.run_dir] = p.values
    return fixed, points


def run_sweep(
    config_path: Path,
    sets: list[str],
    out: Path | None = None,
    *,
    execute: Callable[[Run], Any] | None = None,
) -> Path:
    """Run every point (skipping finished ones); return the sweep directory.

    Every point's config is built and checked before the first run starts.
    """
    base = load_config(config_path)
    out = out or Path("runs") / base.name
    owner = OwnedDir(out, "sweep")
    owner.check_claimable()
    fixed, points = plan(config_path, sets, out)
    runs = []
    for p in points:
        config = load_config(config_path, [*fixed, *p.overrides(), "sweep={}"])
        runs.append(Run(config, p.run_dir, resume=True))
    owner.claim()
    with owner.locked("gradleak sweep"):  # two sweeps on one directory: the second is refused
        for p in points:
            owner.make_dir(p.run_dir.name)
        owner.write_text(
            "sweep.json",
            json.dumps(
                {
                    "config": str(config_path),
                    "fixed": fixed,
                    "keys": list(points[0].values),
                    "points": [{"values": p.values, "run_dir": p.run_dir.name} for p in points],
                },
                indent=2,
            ),
        )
        for run in runs:
            if RunStore(run.run_dir).exists() and run.first_round > run.config.training.rounds:
                continue
            (execute or (lambda r: r.execute()))(run)
    return out


def read_sweep(owner: OwnedDir) -> dict[str, Any]:
    """``sweep.json``: the swept keys and, per point, its values and run directory (a name inside
    the sweep directory); a damaged file is one ``DataError``."""
    path = owner.path("sweep.json")
    try:
        spec = parse_json(owner.read_bytes("sweep.json", kind="json"), path)
    except DataError as exc:
        if "not found" in str(exc):
            raise
        spec = None
    keys = spec.get("keys") if isinstance(spec, dict) else None
    points = spec.get("points") if isinstance(spec, dict) else None
    good = (
        isinstance(keys, list)
        and keys
        and all(isinstance(k, str) for k in keys)
        and isinstance(points, list)
        and points
        and all(
            isinstance(p, dict)
            and isinstance(p.get("values"), dict)
            and set(p["values"]) == set(keys)
            and isinstance(p.get("run_dir"), str)
            and _dir_name(p["values"]) == p["run_dir"]
            for p in points
        )
    )
    if not good:
        raise DataError(
            f"{path}: not a sweep's list of points (keys, and per point its values and run "
            "directory); the sweep directory is damaged: run the sweep again to rewrite it"
        )
    return spec
