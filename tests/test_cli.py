"""The command line: the demo, errors as one line, help on every command, the report."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gradleak.cli import app

runner = CliRunner()


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.headings: list[str] = []
        self._in_h = False

    def handle_starttag(self, tag, attrs) -> None:  # noqa: ANN001
        if tag == "img":
            self.images.append(dict(attrs)["alt"])
            assert dict(attrs)["src"].startswith("data:image/png;base64,")
        self._in_h = tag in ("h1", "h2")

    def handle_data(self, data) -> None:  # noqa: ANN001
        if self._in_h:
            self.headings.append(data)
            self._in_h = False


def test_demo_trains_to_90_percent_audits_and_writes_a_report(tmp_path) -> None:
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert rounds[-1]["test_accuracy"] >= 0.90
    results = (out / "results.jsonl").read_text().splitlines()
    assert len(results) == len(rounds) * 5
    audited = [json.loads(r) for r in results if '"audited": true' in r]
    assert {(r["round"], r["client"]) for r in audited} == {
        (k, c) for k in (1, 3, 5, 7, 9) for c in (1, 2)
    }
    assert all(r["rdlv"] > 0 for r in audited if r["client"] == 1)  # the one-image client leaks
    page = _Page()
    page.feed((out / "report/index.html").read_text())
    assert page.images == [
        "test accuracy per round",
        "training loss per client",
        "RDLV per round",
        "original, prior and reconstruction of client 1",
        "original, prior and reconstruction of client 2",
    ]
    assert {"Training", "Leakage audit", "Rounds", "Clients per round", "Config"} <= set(
        page.headings
    )
    assert (out / "report/accuracy.svg").exists()
    # Running the demo again finds the finished run and only rebuilds the report.
    again = runner.invoke(app, ["demo", "--out", str(out), "-q"])
    assert again.exit_code == 0
    assert (out / "results.jsonl").read_text().splitlines() == results


def test_run_with_overrides_and_report(tmp_path) -> None:
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    args = [
        "run",
        str(root / "configs/demo.yaml"),
        "--out",
        str(out),
        "--set",
        "training.rounds=1",
        "--set",
        "model.name=mlp",
        "--set",
        "model.kwargs={}",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["name"] == "mlp"
    assert "round 1: test accuracy" in (out / "run.log").read_text()
    (out / "report/index.html").unlink()
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
    assert (out / "report/index.html").exists()


def test_a_run_is_reported_after_its_data_has_moved(tmp_path, image_folder) -> None:
    config = {
        "name": "moved",
        "device": "cpu",
        "data": {
            "source": "image-folder",
            "root": str(image_folder),
            "image_size": 8,
            "test_fraction": 0.2,
        },
        "partition": {
            "scheme": "explicit",
            "clients": [{"size": 2, "batch_size": 2}, {"size": 2, "batch_size": 1}],
        },
        "model": {"name": "mlp", "kwargs": {"hidden": [8]}},
        "training": {"rounds": 1},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert (
        runner.invoke(app, ["run", str(tmp_path / "c.yaml"), "--out", str(out), "-q"]).exit_code
        == 0
    )
    image_folder.rename(tmp_path / "elsewhere")  # the report needs the run directory only
    (out / "report/index.html").unlink()
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert str(image_folder) in (out / "report/index.html").read_text()  # the config as written


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "nowhere.yaml"], "error: config file not found: nowhere.yaml"),
        (
            ["run", "{demo}", "--set", "training.rounds=0"],
            "error: training.rounds: Input should be greater than 0",
        ),
        (
            [
                "run",
                "{demo}",
                "--set",
                "data.source=image-folder",
                "--set",
                "data.root=/no/such/dir",
            ],
            "error: data.root: Path does not point to a directory",
        ),
        (
            ["run", "{demo}", "--set", "partition.clients.2.size=5000"],
            "error: partition.clients: the clients ask for 5809 training images but the data "
            "source has 1438",
        ),
        (["report", "{tmp}"], "is not a gradleak run directory"),
    ],
)
def test_errors_are_one_line_with_status_2(tmp_path, args, message) -> None:
    root = Path(__file__).resolve().parents[1]
    args = [a.format(demo=root / "configs/demo.yaml", tmp=tmp_path) for a in args]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "o")] if args[0] == "run" else args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "o").exists()  # nothing was started


@pytest.mark.parametrize("command", ["run", "demo", "report", "config-reference", "models"])
def test_every_command_has_help(command) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_models_lists_the_zoo() -> None:
    assert runner.invoke(app, ["models"]).output.split() == [
        "bert",
        "convnet",
        "gpt2",
        "lenet",
        "llama",
        "mlp",
        "resnet18",
        "resnet20",
    ]


def test_error_text_is_never_read_as_markup(tmp_path) -> None:
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    result = runner.invoke(
        app,
        [
            "run",
            str(demo),
            "--out",
            str(tmp_path / "r"),
            "-q",
            "--set",
            "model.name=no_such_model[k]",
        ],
    )
    assert result.exit_code == 2
    assert "no_such_model[k]" in result.output, result.output


def test_a_full_disk_is_one_line(tmp_path, monkeypatch) -> None:
    import errno

    from gradleak.experiments.store import RunStore

    def full(self, r, state) -> None:  # noqa: ANN001
        raise OSError(errno.ENOSPC, "No space left on device", str(self.checkpoint_path(r)))

    monkeypatch.setattr(RunStore, "save_checkpoint", full)
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    result = runner.invoke(app, ["run", str(demo), "--out", str(tmp_path / "r"), "-q"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert (
        len(lines) == 1
        and "global_0000.safetensors: No space left on device (no space left" in lines[0]
    )
