"""Config validation: every bad input stops with one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gradleak.errors import ConfigError
from gradleak.experiments.config import load_config
from gradleak.experiments.reference import config_reference
from gradleak.experiments.runner import build_scenario

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "data": {"source": "digits", "image_size": 8},
    "partition": {"scheme": "explicit", "clients": [{"size": 4, "batch_size": 2}]},
}


def _write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "partition.clients.0.batch_size=0",
            "partition.clients.0.batch_size: Input should be greater than 0 (got 0)",
        ),
        ("training.rounds=-1", "training.rounds: Input should be greater than 0 (got -1)"),
        ("training.rounds=two", "training.rounds: Input should be a valid integer"),
        ("training.roundz=3", "training.roundz: unknown key"),
        ("colour=red", "colour: unknown key"),
        ("data.source=mnist", "data.source: 'mnist' is not one of digits, faces, tiles"),
        (
            "partition={clients: 3}",
            "partition.scheme: required key is missing (one of explicit, iid, dirichlet)",
        ),
        (
            "training.clients_per_round=1.5",
            "training.clients_per_round: Input should be less than or equal to 1",
        ),
        (
            "aggregation.strategy=median",
            "aggregation.strategy: Value error, unknown strategy 'median'",
        ),
        ("data.root=/nonexistent", "data.root: unknown key"),
        (
            "partition.clients.5.size=3",
            "partition.clients.5.size: '5' is not an index of a list of 1",
        ),
        ("nokey", "--set: expected key=value, got 'nokey'"),
        ("training.lr=.inf", "training.lr: Input should be a finite number"),
        (
            "defenses=[{name: gaussian, sigma: .nan}]",
            "defenses.0.sigma: Input should be a finite number",
        ),
        (
            "audit={clients: [1], threshold: .nan}",
            "audit.threshold: Input should be a finite number",
        ),
        ("engine.workers=0", "engine.workers: Input should be greater than 0"),
        (
            "training.rounds=true",
            "training.rounds: Input should be a valid integer, unable to parse string as an "
            "integer (got 'true')",
        ),
        ("partition.clients.0.lr=false", "partition.clients.0.lr: Input should be a valid number"),
        (
            "audit={clients: [7]}",
            "audit.clients: client 7 is not one of the run's clients (1 to 1)",
        ),
        ("audit={clients: []}", "audit.clients: is empty"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, message) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, BASE), [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_data_root_names_the_key(tmp_path) -> None:
    cfg = {**BASE, "data": {"source": "image-folder", "root": str(tmp_path / "nowhere")}}
    with pytest.raises(ConfigError, match=r"^data\.root: Path does not point to a directory"):
        load_config(_write(tmp_path, cfg))


def test_missing_required_section(tmp_path) -> None:
    with pytest.raises(ConfigError, match="^partition: required key is missing$"):
        load_config(_write(tmp_path, {"data": BASE["data"]}))


def test_unreadable_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def test_more_images_than_the_source_has(tmp_path) -> None:
    cfg = {
        **BASE,
        "partition": {"scheme": "explicit", "clients": [{"size": 2000, "batch_size": 8}]},
    }
    config = load_config(_write(tmp_path, cfg))
    with pytest.raises(
        ConfigError, match="partition.clients: the clients ask for 2000 training images"
    ):
        build_scenario(config)


def test_overrides_are_read_as_yaml(tmp_path) -> None:
    config = load_config(
        _write(tmp_path, BASE),
        ["training.rounds=3", "model.kwargs={width: 4}", "partition.clients.0.lr=0.5"],
    )
    assert config.training.rounds == 3
    assert config.model.kwargs == {"width": 4}
    assert config.partition.clients[0].lr == 0.5


def test_relative_data_paths_resolve_from_the_working_directory(
    tmp_path, monkeypatch, image_folder
) -> None:
    monkeypatch.chdir(image_folder.parent)
    cfg = {**BASE, "data": {"source": "image-folder", "root": image_folder.name}}
    assert load_config(_write(tmp_path, cfg)).data.root == image_folder


@pytest.mark.parametrize("name", ["demo", "paper-9-clients", "text-9-clients", "text-sigma-sweep"])
def test_shipped_configs_are_valid(name) -> None:
    config = load_config(ROOT / "configs" / f"{name}.yaml")
    assert config.name == name


@pytest.mark.parametrize("name", ["paper-9-clients", "text-9-clients"])
def test_paper_config_has_the_papers_table(name) -> None:
    config = load_config(ROOT / f"configs/{name}.yaml")
    table = [(c.batch_size, c.size) for c in config.partition.clients]
    assert table == [
        (4, 8),
        (4, 32),
        (4, 128),
        (4, 512),
        (8, 8),
        (8, 32),
        (8, 128),
        (8, 512),
        (1, 1),
    ]
    assert config.training.local_epochs == 1
    assert config.training.lr == (0.01 if name == "paper-9-clients" else 0.1)  # see the text config


def test_config_reference_is_up_to_date() -> None:
    committed = (ROOT / "docs/config.md").read_text()
    assert committed == config_reference(), "run: gradleak config-reference --out docs/config.md"
    for key in ("training.rounds", "partition.clients", "data.split_file", "partition.alpha"):
        assert f"`{key}`" in committed


def test_hostile_config_files_end_in_one_line(tmp_path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(
        'a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
        "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    )
    with pytest.raises(ConfigError, match=r"not valid YAML: aliases \(\*a\) are not allowed"):
        load_config(bomb)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(latin)
    for i in range(20):  # a chain of 20 base: files
        (tmp_path / f"c{i}.yaml").write_text(
            f"base: c{i + 1}.yaml\n" if i < 19 else yaml.safe_dump(BASE)
        )
    with pytest.raises(ConfigError, match="more than 16 nested base: files"):
        load_config(tmp_path / "c0.yaml")
    with pytest.raises(ConfigError, match="aliases"):
        load_config(_write(tmp_path, BASE), ["name=&x [*x]"])
