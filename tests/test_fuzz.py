"""Generated bad inputs: every case ends in exit status 2 with one line, or in a correct success;
never a traceback, a hang or a silent wrong result.

The cases are drawn with a fixed seed (the same cases on every run): config values replaced at
every key of a small valid experiment, CIFAR-10 batches damaged byte by byte and in structure,
and split lists with hostile entries.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from gradleak.cli import app
from gradleak.errors import GradleakError
from gradleak.experiments.config import validate_config
from gradleak.images import formats

runner = CliRunner()

BASE: dict[str, Any] = {
    "name": "fuzz",
    "device": "cpu",
    "data": {"source": "digits", "image_size": 8},
    "partition": {
        "scheme": "explicit",
        "clients": [{"size": 4, "batch_size": 2}, {"size": 6, "batch_size": 3}],
    },
    "model": {"name": "mlp", "kwargs": {"hidden": [8]}},
    "training": {"rounds": 1, "lr": 0.1},
    "defenses": [{"name": "gaussian", "sigma": 0.001}],
    "audit": {
        "clients": [1],
        "preset": "inverting-gradients",
        "attack": {"iterations": 3},
        "metric": "psnr",
        "save_images": False,
    },
}

# Values a clumsy or hostile user puts anywhere. Magnitudes that are valid but mean real work
# (a billion rounds) are not bad input and are left out; 2**63 is (it fits no int64).
HOSTILE: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    2**63,
    -(2**63),
    float("nan"),
    float("inf"),
    float("-inf"),
    "",
    "x" * 300,
    "../../etc/passwd",
    "/dev/zero",
    "[red]x[/]",
    "ü\u202e",
    [],
    {},
    [1, 2],
    {"a": 1},
    [[[]]],
]


class Hang(BaseException):
    """A case that ran past its time (BaseException: no handler of the CLI swallows it)."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise Hang


def _leaves(tree: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path of a resolved config (dict keys and list indices), inner nodes included."""
    if path:
        yield path
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _leaves(v, (*path, i))


def _replace(tree: Any, path: tuple[Any, ...], value: Any) -> Any:
    tree = json.loads(json.dumps(tree))
    node = tree
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return tree


def _config_cases(n: int) -> list[tuple[str, Any]]:
    """``n`` (key path, value) pairs over the keys of BASE as given and as resolved (defaults)."""
    given = list(_leaves(BASE))
    resolved = list(_leaves(validate_config(BASE).model_dump(mode="json")))
    paths = sorted({*given, *resolved}, key=str)
    rng = random.Random(15)
    return [(".".join(map(str, p)), rng.choice(HOSTILE)) for p in rng.sample(paths * 3, n)]


def _one_line_error(output: str) -> bool:
    lines = [line for line in output.splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("error: ")


def _finite(rows: list[dict[str, Any]]) -> bool:
    return all(
        not (isinstance(v, float) and not math.isfinite(v)) for r in rows for v in r.values()
    )


CONFIG_CASES = _config_cases(90)


@pytest.mark.parametrize(
    ("key", "value"), CONFIG_CASES, ids=[f"{k}={str(v)[:20]!r}" for k, v in CONFIG_CASES]
)
def test_a_bad_config_value_is_one_line_or_a_correct_run(
    tmp_path: Path, key: str, value: Any
) -> None:
    path = tuple(int(p) if p.isdigit() else p for p in key.split("."))
    try:
        raw = _replace(BASE, path, value)
    except (KeyError, IndexError, TypeError):  # a default-only key: set it on the given tree
        raw = json.loads(json.dumps(BASE))
        node = raw
        for p in path[:-1]:
            node = node.setdefault(p, {}) if isinstance(node, dict) else node[p]
        node[path[-1]] = value
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw, allow_unicode=True))
    out = tmp_path / "run"
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(60)
    try:
        result = runner.invoke(app, ["run", str(config), "--out", str(out), "-q"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not isinstance(result.exception, Hang), "hang"
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert _one_line_error(result.output), result.output
        return
    assert result.exit_code == 0 and result.exception is None, (
        result.exit_code,
        result.output,
        result.exception,
    )
    # a success must be a correct run: every round recorded, every number finite, the report written
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert (
        len(rounds) == resolved["training"]["rounds"] and rows and _finite(rows) and _finite(rounds)
    )
    # and the value was taken as given, not coerced into another (true read as client 1)
    node = resolved
    for p in path:
        node = node[p]
    if isinstance(value, dict):  # a section: its keys as given, the rest filled with defaults
        assert isinstance(node, dict) and all(node.get(k) == v for k, v in value.items()), (
            node,
            value,
        )
    else:
        assert node == value and type(node) is type(value), (node, value)
    assert (out / "report/index.html").exists()


# -- CIFAR-10 batches ------------------------------------------------------------------------------


def _batch(n: int, rng: np.random.Generator) -> dict[bytes, Any]:
    return {
        b"batch_label": b"x",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
    }


def _structural(rng: np.random.Generator) -> list[Any]:
    """Batches whose pickle is sound but whose contents are not a CIFAR batch."""
    good = _batch(3, rng)
    return [
        [1, 2, 3],
        "data",
        None,
        {},
        {b"data": good[b"data"]},
        {b"labels": [1, 2, 3]},
        {**good, b"labels": [1, 2]},
        {**good, b"labels": [1, 2, 10]},
        {**good, b"labels": [-1, 0, 1]},
        {**good, b"labels": ["a", "b", "c"]},
        {**good, b"labels": [1.5, 2.0, 3.0]},
        {**good, b"labels": [[1], [2], [3]]},
        {**good, b"labels": [2**70, 0, 1]},
        {**good, b"data": good[b"data"].astype(np.float32)},
        {**good, b"data": good[b"data"][:, :100]},
        {**good, b"data": [[1, 2], [3]]},
        {**good, b"data": "pixels"},
        {**good, b"data": np.zeros((0, 3072), np.uint8), b"labels": []},
        {(1, 2): 3, **good},
        {b"\xff\xfe": 1, **good},
    ]


def _damaged(rng: np.random.Generator, count: int) -> list[bytes]:
    """Pickles of good batches, cut short or with bytes changed."""
    raw = pickle.dumps(_batch(3, rng), protocol=2)
    out = []
    for i in range(count):
        b = bytearray(raw)
        if i % 3 == 0:
            b = b[: int(rng.integers(0, len(b)))]
        else:
            for _ in range(int(rng.integers(1, 6))):
                b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        out.append(bytes(b))
    return out


def test_damaged_cifar_batches_are_a_clear_error_or_a_valid_batch(tmp_path: Path) -> None:
    rng = np.random.default_rng(15)
    payloads = [pickle.dumps(s, protocol=2) for s in _structural(rng)] + _damaged(rng, 400)
    counts = {"clear": 0, "valid": 0}
    for i, payload in enumerate(payloads):
        path = tmp_path / f"batch_{i}"
        path.write_bytes(payload)
        try:
            data, labels = formats._read_cifar_batch(path)
        except GradleakError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
            counts["clear"] += 1
            continue
        # read: then it is a batch (a damaged byte inside the pixels leaves a valid one)
        assert (
            data.dtype == np.uint8
            and data.shape[1:] == (3, 32, 32)
            and len(data) == len(labels) > 0
        )
        assert labels.dtype == np.int64 and labels.min() >= 0 and labels.max() <= 9
        counts["valid"] += 1
    assert counts["clear"] >= len(_structural(rng))  # every structural case is refused


# -- split lists -----------------------------------------------------------------------------------


def _split_entries() -> list[Any]:
    return [
        {"image": "a.png", "label": 1},
        {"image": "a.png", "label": [1]},
        {"image": "a.png", "label": [0, 1]},
        {"image": "a.png", "label": 1.0},
        {"image": "a.png", "label": [1.0]},
        {"image": "a.png", "label": -1},
        {"image": "a.png", "label": 10**9},
        {"image": "a.png", "label": "1"},
        {"image": "a.png", "label": True},
        {"image": "a.png", "label": None},
        {"image": "a.png"},
        {"label": 1},
        {"image": 5, "label": 1},
        {"image": ["a.png"], "label": 1},
        {"image": "../outside.png", "label": 1},
        {"image": "/etc/hostname", "label": 1},
        {"image": "missing.png", "label": 1},
        {"image": "", "label": 1},
        {"image": "a.png", "label": [0, 2]},
        {"image": "a.png", "label": [[1]]},
        "a.png",
        7,
        None,
        [],
    ]


@pytest.mark.parametrize("entry", _split_entries(), ids=lambda e: json.dumps(e)[:40])
def test_a_hostile_split_list_entry_is_a_clear_error_or_read_right(
    tmp_path: Path, entry: Any
) -> None:
    from PIL import Image

    root = tmp_path / "root"
    root.mkdir()
    Image.fromarray(np.full((4, 4), 200, np.uint8)).save(root / "a.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "outside.png")
    split = tmp_path / "split.json"
    split.write_text(
        json.dumps({"training": [entry, {"image": "a.png", "label": 0}], "validation": []})
    )
    try:
        lists = formats.read_split_list(split, root)
    except GradleakError as exc:
        assert "\n" not in str(exc)
        return
    paths, labels = lists["training"]
    # read: then every path is inside the root and every label the class the entry names
    assert all(p.resolve().is_relative_to(root.resolve()) for p in paths)
    expected = {1: 1, (1,): 1, (0, 1): 1}
    label = entry["label"]
    key = tuple(label) if isinstance(label, list) else label
    assert type(label) is not bool and labels[0] == expected[key] and labels[1] == 0


# -- damaged run directories -----------------------------------------------------------------------

JSON_LINES = ["{", "[]", '"x"', "1", "null", "{}", "NaN", "\x00\xff"]
ROW_VALUES = [None, "x", [], {}, -1, 10**30, float("nan"), True]


def _damages(run: Path) -> list[tuple[str, Any]]:
    """(name, damage(dir)) for a finished run's files: deleted, emptied, cut short, bytes changed,
    made a directory; rows replaced, given wrong values, missing a field, repeated; configs
    replaced; whole directories removed; a sweep.json damaged the same ways."""
    rng = random.Random(15)
    files = sorted(
        str(p.relative_to(run))
        for p in run.rglob("*")
        if p.is_file() and p.stat().st_size and not p.relative_to(run).parts[0] == "report"
    )
    files.append("../sweep.json")
    out: list[tuple[str, Any]] = []

    def cut(d: Path, f: str, keep: float) -> None:
        data = (d / f).read_bytes()
        (d / f).write_bytes(data[: int(len(data) * keep)])

    def flip(d: Path, f: str, seed: float) -> None:
        r, data = random.Random(seed), bytearray((d / f).read_bytes())
        for _ in range(r.randint(1, 5)):
            data[r.randrange(len(data))] = r.randrange(256)
        (d / f).write_bytes(bytes(data))

    def line(d: Path, f: str, text: str, at: float) -> None:
        lines = (d / f).read_text().splitlines()
        lines[int(at * len(lines))] = text
        (d / f).write_text("\n".join(lines) + "\n", errors="surrogateescape")

    def value(d: Path, f: str, v: Any, at: float, key: float, drop: bool = False) -> None:
        lines = (d / f).read_text().splitlines()
        row = json.loads(lines[int(at * len(lines))])
        k = sorted(row)[int(key * len(row))]
        if drop:
            del row[k]
        else:
            row[k] = v
        lines[int(at * len(lines))] = json.dumps(row)
        (d / f).write_text("\n".join(lines) + "\n")

    def directory(d: Path, f: str) -> None:
        (d / f).unlink()
        (d / f).mkdir()

    for f in files:
        out += [
            (f"delete {f}", lambda d, f=f: (d / f).unlink()),
            (f"empty {f}", lambda d, f=f: (d / f).write_bytes(b"")),
            (f"directory {f}", lambda d, f=f: directory(d, f)),
        ]
        for k in range(2):
            out += [
                (f"cut{k} {f}", lambda d, f=f, s=rng.random(): cut(d, f, s)),
                (f"flip{k} {f}", lambda d, f=f, s=rng.random(): flip(d, f, s)),
            ]
        if f.endswith(".jsonl"):
            out += [
                (f"line {t!r} {f}", lambda d, f=f, t=t, a=rng.random(): line(d, f, t, a))
                for t in JSON_LINES
            ]
            out += [
                (
                    f"value {v!r} {f}",
                    lambda d, f=f, v=v, a=rng.random(), k=rng.random(): value(d, f, v, a, k),
                )
                for v in ROW_VALUES
            ]
            out += [
                (
                    f"drop a field {f}",
                    lambda d, f=f, a=rng.random(), k=rng.random(): value(d, f, None, a, k, True),
                ),
                (f"repeat {f}", lambda d, f=f: (d / f).write_text((d / f).read_text() * 2)),
            ]
    for text in [
        "[",
        "a: [",
        "{}",
        "name: 5",
        "- 1",
        "x: !!python/object/apply:os.system ['true']",
        "a: &a [*a]",
    ]:
        out.append((f"config {text!r}", lambda d, t=text: (d / "config.yaml").write_text(t)))
    for sweep in [
        "{}",
        "[]",
        '{"keys": ["training.lr"], "points": [{"values": {"training.lr": 0.1}, "run_dir": '
        '"../.."}]}',
        '{"keys": ["x"], "points": [{"values": {"y": 1}, "run_dir": "x=1"}]}',
    ]:
        out.append(
            (f"sweep.json {sweep}", lambda d, t=sweep: (d.parent / "sweep.json").write_text(t))
        )
    out += [
        (f"no {name}", lambda d, n=name: shutil.rmtree(d / n)) for name in ("checkpoints", "audit")
    ]
    out.append(("report is a file", lambda d: (d / "report").write_text("x")))
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-round run with an audit every round (saved images), inside a 2-point sweep."""
    from gradleak.experiments.sweep import _dir_name

    root = tmp_path_factory.mktemp("finished")
    config = root / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                **BASE,
                "training": {"rounds": 2, "lr": 0.1},
                "audit": {**BASE["audit"], "save_images": True, "frequency": 1},
            }
        )
    )
    run = root / "sweep" / _dir_name({"training.lr": 0.1})
    result = runner.invoke(app, ["run", str(config), "--out", str(run), "-q"])
    assert result.exit_code == 0, result.output
    shutil.rmtree(run / "report")
    shutil.copytree(run, root / "sweep" / _dir_name({"training.lr": 0.2}))
    points = [
        {"values": {"training.lr": v}, "run_dir": _dir_name({"training.lr": v})} for v in (0.1, 0.2)
    ]
    (root / "sweep" / "sweep.json").write_text(
        json.dumps({"config": str(config), "fixed": [], "keys": ["training.lr"], "points": points})
    )
    return run


def test_report_on_a_damaged_run_is_one_line_or_a_correct_report(
    finished_run: Path, tmp_path: Path
) -> None:
    """Generated damages of every file of a finished run (a seeded sample of them in CI;
    GRADLEAK_FUZZ_ALL=1 tries all): ``gradleak report`` on the run (or its sweep, for sweep.json)
    exits 2 with one line, or writes the report; an unreadable audit image is named as left out."""
    from gradleak.modality import RENDERERS
    from gradleak.report.html import _audit_examples, _example_bytes
    from gradleak.rundir import OwnedDir

    cases = _damages(finished_run)
    if not os.environ.get("GRADLEAK_FUZZ_ALL"):
        cases = random.Random(15).sample(cases, 40)
    counts = {"clear": 0, "report": 0}
    for i, (name, damage) in enumerate(cases):
        sweep = tmp_path / f"s{i}"
        shutil.copytree(finished_run.parent, sweep)
        run = sweep / finished_run.name
        damage(run)
        target = sweep if "sweep.json" in name else run
        result = runner.invoke(app, ["report", str(target)])
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            name,
            result.exception,
        )
        if result.exit_code == 2:
            assert _one_line_error(result.output), (name, result.output)
            counts["clear"] += 1
            continue
        assert result.exit_code == 0, (name, result.output)
        page = (target / "report" / "index.html").read_text()
        assert "gradleak" in page, name
        if name.split()[-1].endswith(".npz") and (run / name.split()[-1]).is_file():
            shown = _audit_examples(
                OwnedDir(run, "run"), name.split()[-1], _example_bytes(64), RENDERERS.get("image")
            )
            assert "Left out" in page or shown is not None, name
        counts["report"] += 1
    print(f"{len(cases)} damaged runs: {counts}")
    assert counts["clear"] > 0 and counts["report"] > 0, counts


# -- sizes the schema allows but the machine cannot hold -------------------------------------------


# Expected sizes computed here: all 1,797 digits as float32 at 1024 x 1024, three copies while
# resized and split; an MLP 64 -> 10^9 -> 10 (weights and biases), eight float32 copies.
_IMAGES = 3 * 1797 * 1024 * 1024 * 4
_WEIGHTS = 64 * 10**9 + 10**9 + 10**9 * 10 + 10


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "data.image_size",
            1024,
            f"error: data.image_size: 1797 images of 1 x 1024 x 1024 need about "
            f"{_IMAGES / 2**30:.1f} GiB, more than 80% of the 8.0 GiB of memory available: use a "
            "smaller image_size",
        ),
        (
            "model.kwargs",
            {"hidden": [10**9]},
            f"error: model.kwargs: 8 copies of mlp's {_WEIGHTS:,} weights need "
            f"about {8 * 4 * _WEIGHTS / 2**30:.1f} GiB, more than 80% of the 8.0 GiB of "
            "memory available: choose a smaller model",
        ),
    ],
)
def test_a_size_the_machine_cannot_hold_is_refused_before_allocating(
    tmp_path, monkeypatch, key, value, message
) -> None:
    import tracemalloc

    import gradleak.resources as resources

    monkeypatch.setattr(resources, "available_bytes", lambda: 8 * 2**30)
    raw = _replace(BASE, tuple(key.split(".")), value)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    tracemalloc.start()
    try:
        result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "run"), "-q"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.exit_code == 2 and _one_line_error(result.output), result.output
    assert result.output.strip() == message
    assert peak < 2**30  # refused before the allocation, not after it failed
    assert not (tmp_path / "run").exists()


# -- non-finite values in attack inputs and disaggregation sums ------------------------------------


def test_non_finite_attack_inputs_and_sums_are_one_line_naming_the_file(
    tmp_path: Path, saved_update: list[str]
) -> None:
    """NaN, +inf or -inf at a generated place of the global model, the update or the round sums:
    exit 2 with one line naming the file (and tensor), never a reconstruction or participation
    computed from them."""
    from safetensors.torch import load_file, save_file

    rng = random.Random(15)
    files = {
        "--global": Path(saved_update[saved_update.index("--global") + 1]),
        "--update": Path(saved_update[saved_update.index("--update") + 1]),
    }
    for i, (option, bad) in enumerate(
        (o, b) for o in files for b in (math.nan, math.inf, -math.inf)
    ):
        tensors = load_file(str(files[option]))
        name = rng.choice(sorted(tensors))
        tensors[name].view(-1)[rng.randrange(tensors[name].numel())] = bad
        damaged = tmp_path / f"bad{i}.safetensors"
        save_file(tensors, str(damaged))
        args = list(saved_update)
        args[args.index(option) + 1] = str(damaged)
        result = runner.invoke(
            app, ["attack", *args, "--out", str(tmp_path / f"a{i}"), "-q", "-s", "iterations=2"]
        )
        assert result.exit_code == 2 and _one_line_error(result.output), (
            option,
            bad,
            result.output,
        )
        assert f"{damaged}: {name} holds NaN or infinite values" in result.output.replace("\n", "")
        assert not (tmp_path / f"a{i}").exists()
    g = np.random.default_rng(15)
    p = (g.random((24, 6)) < 0.5).astype(float)
    np.savetxt(tmp_path / "counts.csv", p.reshape(4, 6, 6).sum(1), delimiter=",", fmt="%d")
    for i, bad in enumerate((math.nan, math.inf, -math.inf)):
        sums = p @ g.normal(size=(6, 20))
        sums[g.integers(24), g.integers(20)] = bad
        np.savez(tmp_path / f"sums{i}.npz", sums=sums)
        result = runner.invoke(
            app,
            [
                "disaggregate",
                "--sums",
                str(tmp_path / f"sums{i}.npz"),
                "--counts",
                str(tmp_path / "counts.csv"),
                "--window",
                "6",
                "--workers",
                "1",
                "-q",
                "--out",
                str(tmp_path / f"d{i}"),
            ],
        )
        assert result.exit_code == 2 and _one_line_error(result.output), result.output
        assert "NaN or infinite" in result.output and f"sums{i}.npz" in result.output.replace(
            "\n", ""
        )
        assert not (tmp_path / f"d{i}").exists()


# -- gradleak attack's metadata --------------------------------------------------------------------

META_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    2**31,
    10**12,
    0.5,
    math.nan,
    math.inf,
    "",
    "x",
    [],
    [0],
    [[1]],
    {},
]


def test_hostile_update_metadata_is_one_line_or_a_correct_attack(
    tmp_path: Path, saved_update: list[str]
) -> None:
    """Every key of the attack's --meta file (and a few it does not know) given generated hostile
    values: exit 2 with one line, or an attack that ran on the metadata as given."""
    meta_path = Path(saved_update[saved_update.index("--meta") + 1])
    good = json.loads(meta_path.read_text())
    rng = random.Random(15)
    keys = [*good, "labels", "epochs", "momentum", "batch_norm", "unknown"]
    cases = [(k, rng.choice(META_VALUES)) for k in keys for _ in range(3)]
    cases += [
        ("image_shape", [1, 10**6, 10**6]),
        ("num_images", 10**9),
        ("std", [0.0]),
        ("labels", [3, 12]),
        ("image_shape", [3, 16, 16]),
        ("num_classes", 10**9),
    ]
    outcome = {"clear": 0, "ran": 0}
    for i, (key, value) in enumerate(cases):
        meta = {**good, key: value}
        (tmp_path / f"m{i}.json").write_text(json.dumps(meta))
        args = list(saved_update)
        args[args.index("--meta") + 1] = str(tmp_path / f"m{i}.json")
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(60)
        try:
            result = runner.invoke(
                app, ["attack", *args, "--out", str(tmp_path / f"a{i}"), "-q", "-s", "iterations=2"]
            )
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        case = (key, value, result.output[-600:], result.exception)
        assert not isinstance(result.exception, Hang), case
        if result.exit_code == 2:
            assert _one_line_error(result.output), case
            outcome["clear"] += 1
            continue
        assert result.exit_code == 0 and result.exception is None, case
        summary = json.loads((tmp_path / f"a{i}" / "attack.json").read_text())
        assert len(summary["labels"]) == meta["num_images"], case
        outcome["ran"] += 1
    print(f"{len(cases)} metadata cases: {outcome}")


# -- gradleak disaggregate's inputs ----------------------------------------------------------------


def test_hostile_participation_counts_are_one_line_or_a_correct_recovery(tmp_path: Path) -> None:
    """A count matrix (6 clients, 4 windows of 6 rounds) with a generated entry or shape made
    hostile: exit 2 with one line, or a recovery whose participation matrix matches the counts."""
    g = np.random.default_rng(15)
    p = (g.random((24, 6)) < 0.5).astype(float)
    np.savez(tmp_path / "sums.npz", sums=p @ g.normal(size=(6, 20)))
    good = p.reshape(4, 6, 6).sum(1)
    rng = random.Random(15)
    cases: list[Any] = []
    for bad in (-1, 7, 0.5, 10**12, math.nan, math.inf):
        m = good.copy()
        m[rng.randrange(4), rng.randrange(6)] = bad
        cases.append(m)
    cases += [
        good[:3],
        good[:, :5],
        good.T,
        good[:1, :1],
        np.zeros((0, 6)),
        good * 0,
        np.minimum(good * 2, 6),
    ]
    for text in ["", "a,b", "1,2\n3", "\x00\xff"]:
        cases.append(text)
    for i, case in enumerate(cases):
        path = tmp_path / f"c{i}.csv"
        if isinstance(case, str):
            path.write_bytes(case.encode("utf-8", "surrogateescape"))
        else:
            np.savetxt(path, case, delimiter=",")
        out = tmp_path / f"d{i}"
        result = runner.invoke(
            app,
            [
                "disaggregate",
                "--sums",
                str(tmp_path / "sums.npz"),
                "--counts",
                str(path),
                "--window",
                "6",
                "--workers",
                "1",
                "-q",
                "--out",
                str(out),
            ],
        )
        label = (
            i,
            case if isinstance(case, str) else case.tolist(),
            result.output[-500:],
            result.exception,
        )
        if result.exit_code == 2:  # the log's progress lines may come first; the error is one line
            lines = [line for line in result.output.splitlines() if line.strip()]
            assert (
                lines[-1].startswith("error: ") and sum(x.startswith("error") for x in lines) == 1
            ), label
            assert "Traceback" not in result.output, label
            continue
        assert result.exit_code == 0 and result.exception is None, label
        # a success: a participation matrix that keeps to the counts it was given (where they
        # cannot explain the sums, the attack declares its columns uncertain, as it did here)
        found = np.loadtxt(out / "participation.csv", delimiter=",", ndmin=2)
        assert np.array_equal(found.reshape(4, 6, -1).sum(1), np.asarray(case)), label
        report = json.loads((out / "disaggregation.json").read_text())
        if not np.array_equal(case, good):
            assert report["certain_clients"] < report["clients"], label
