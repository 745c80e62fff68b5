"""The user's files and the report are safe from gradleak and from hostile run directories.

Generated cases, each asserting what must never happen: a traceback, a hang, a file gradleak did
not write deleted or changed, a write through a symbolic link, a script from data in a report.
Classes: directories that are not gradleak's (every writing command), names that become paths,
links and special files inside a run, hostile JSON and npz files inside a run, damaged state read
back by a resume, unsupported tensor dtypes, the user's plugin code failing, concurrent sweeps,
and figures of many clients.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import shutil
import signal
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from gradleak.cli import app

runner = CliRunner()

SMALL: dict[str, Any] = {
    "name": "safety",
    "device": "cpu",
    "data": {"source": "digits", "image_size": 8},
    "partition": {
        "scheme": "explicit",
        "clients": [{"size": 4, "batch_size": 2}, {"size": 6, "batch_size": 3}],
    },
    "model": {"name": "mlp", "kwargs": {"hidden": [8]}},
    "training": {"rounds": 2, "lr": 0.1},
    "engine": {"threads": 1},
    "audit": {"clients": [1], "attack": {"iterations": 5}, "metric": "psnr"},
}


class Hang(BaseException):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Hang


def _invoke(args: list[str], seconds: int = 60) -> Any:
    """The CLI in this process, as a user would call it, with a time limit (a hang fails)."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        result = runner.invoke(app, args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not isinstance(result.exception, Hang), ("hang", args)
    assert "Traceback" not in result.output, result.output
    if result.exit_code not in (0, 2):
        raise AssertionError((result.exit_code, result.output, result.exception))
    return result


def _one_line(result: Any, logged: bool = False) -> str:
    """The one error line of a refused command (``logged``: after the run's log lines)."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    if logged:
        lines = [line for line in lines if not line.startswith((" ", "["))]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
        result.output
    )
    return lines[0]


def _snapshot(root: Path) -> dict[str, str]:
    """Every regular file under ``root`` (links not followed) with a hash of its content."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _config(tmp: Path, **changes: Any) -> Path:
    path = tmp / f"c{len(list(tmp.glob('c*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({**SMALL, **changes}))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished, audited two-round run."""
    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "run"
    assert _invoke(["run", str(_config(tmp)), "--out", str(out), "-q"]).exit_code == 0
    return out


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, symlinks=True)
    return to


# -- directories that are not gradleak's ---------------------------------------------------------

FOREIGN_LAYOUTS: list[dict[str, str]] = [
    {"notes.txt": "mine"},
    {"x.tmp": "mine", "a/b.tmp": "mine too"},
    {"pending/round_0001/client_1.safetensors": "not an update", "pending/a.txt": "mine"},
    {"checkpoints/global_0001.safetensors": "mine", "results.jsonl": "{}\n"},
    {"config.yaml": "name: old\n", "rounds.jsonl": ""},  # a run of an older version, or someone's
    {"sweep.json": "{}", "report/index.html": "<p>mine</p>"},
    {".gradleak": '{"gradleak": "attack", "format": 1}\n', "attack.json": "{}"},  # another kind
]


def _foreign(tmp: Path, layout: dict[str, str]) -> Path:
    d = tmp / "theirs"
    for rel, text in layout.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    return d


@pytest.mark.parametrize("layout", FOREIGN_LAYOUTS, ids=[",".join(x) for x in FOREIGN_LAYOUTS])
def test_every_writing_command_refuses_a_directory_that_is_not_its_own(
    tmp_path, saved_update, layout
) -> None:
    rng = np.random.default_rng(0)
    p = (rng.random((12, 3)) < 0.5).astype(float)
    np.savez(tmp_path / "sums.npz", sums=p @ rng.normal(size=(3, 20)))
    np.savetxt(tmp_path / "counts.csv", p.reshape(2, 6, 3).sum(1), delimiter=",", fmt="%d")
    d = _foreign(tmp_path, layout)
    config = _config(tmp_path)
    before = _snapshot(tmp_path)
    commands = [
        ["run", str(config), "--out", str(d), "-q"],
        ["run", str(config), "--out", str(d), "-q", "--resume"],
        ["sweep", str(config), "-s", "training.lr=0.1,0.2", "--out", str(d), "-q"],
        ["attack", *saved_update, "-s", "iterations=2", "--out", str(d), "-q"],
        [
            "disaggregate",
            "--sums",
            str(tmp_path / "sums.npz"),
            "--counts",
            str(tmp_path / "counts.csv"),
            "--window",
            "6",
            "--workers",
            "1",
            "--out",
            str(d),
            "-q",
        ],
        ["report", str(d)],
    ]
    for args in commands:
        if args[0] == "attack" and ".gradleak" in layout:
            continue  # an attack's own output: it may write there
        line = _one_line(_invoke(args))
        assert str(d) in line, line
    assert _snapshot(tmp_path) == before  # not one of the user's files deleted or changed


def test_outputs_that_are_files_or_under_files_are_refused_before_any_work(
    tmp_path, saved_update
) -> None:
    (tmp_path / "f").write_text("mine")
    config = _config(tmp_path)
    for out in (tmp_path / "f", tmp_path / "f" / "below"):
        assert "is a file" in _one_line(
            _invoke(["attack", *saved_update, "-s", "iterations=100000", "--out", str(out)])
        )
        assert "is a file" in _one_line(_invoke(["run", str(config), "--out", str(out), "-q"]))
    assert (tmp_path / "f").read_text() == "mine"


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        ".",
        "..",
        "/tmp/abs",
        "a/b",
        "x" * 101,
        "a\x00b",
        "a\nb",
        ".hidden",
        "<script>",
        "",
        "ü",
    ],
)
def test_a_name_that_would_leave_runs_is_refused_naming_the_key(
    tmp_path, monkeypatch, name
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({**SMALL, "name": name}))
    line = _one_line(_invoke(["run", str(config), "-q"]))
    assert line.startswith("error: name: "), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_sweep_point_directories_are_plain_names_inside_the_sweep(tmp_path) -> None:
    from gradleak.experiments.sweep import _dir_name

    for v in ("../../x", "a/b", "y" * 300, ".hidden", "/abs", "\x00"):
        name = _dir_name({"model.kwargs.note": v})
        assert (
            "/" not in name
            and "\x00" not in name
            and not name.startswith(".")
            and 0 < len(name) <= 100
        )
    assert _dir_name({"k": "y" * 300}) != _dir_name({"k": "y" * 299})  # a long name keeps a hash
    out = tmp_path / "sweep"
    config = _config(tmp_path, training={"rounds": 1, "lr": 0.1}, audit=None)
    assert (
        _invoke(
            ["sweep", str(config), "-s", "training.lr=0.1,0.2", "--out", str(out), "-q"]
        ).exit_code
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c0.yaml", "sweep"]
    assert {p.name for p in out.iterdir()} == {
        ".gradleak",
        ".lock",
        "report",
        "sweep.json",
        "training.lr=0.1",
        "training.lr=0.2",
    }


# -- links and special files inside a run -------------------------------------------------------


def _link_cases(run: Path, outside: Path) -> list[tuple[str, Any]]:
    target = outside / "victim.txt"
    return [
        ("report/index.html -> outside", lambda: _symlink(run / "report/index.html", target)),
        ("report/ -> outside dir", lambda: _symlink(run / "report", outside)),
        ("report/rdlv.png -> outside", lambda: _symlink(run / "report/rdlv.png", target)),
        ("results.jsonl -> /dev/zero", lambda: _symlink(run / "results.jsonl", Path("/dev/zero"))),
        ("rounds.jsonl -> outside", lambda: _symlink(run / "rounds.jsonl", target)),
        ("config.yaml FIFO", lambda: _fifo(run / "config.yaml")),
        ("results.jsonl FIFO", lambda: _fifo(run / "results.jsonl")),
        ("checkpoint FIFO", lambda: _fifo(run / "checkpoints/global_0002.safetensors")),
        ("checkpoints/ -> outside", lambda: _symlink(run / "checkpoints", outside)),
        (
            "audit npz -> /dev/urandom",
            lambda: _symlink(run / "audit/round_0001/client_1.npz", Path("/dev/urandom")),
        ),
        ("manifest FIFO", lambda: _fifo(run / ".gradleak")),
        ("manifest -> outside", lambda: _symlink(run / ".gradleak", target)),
        ("run.log -> outside", lambda: _symlink(run / "run.log", target)),
        (".lock -> outside", lambda: _symlink(run / ".lock", target)),
        (
            "report/index.html hard link to outside",
            lambda: _hardlink(run / "report/index.html", target),
        ),
    ]


def _symlink(path: Path, target: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(target)


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _hardlink(path: Path, target: Path) -> None:
    path.unlink()
    os.link(target, path)


def test_links_and_special_files_in_a_run_are_never_followed_or_opened(finished, tmp_path) -> None:
    config = _config(tmp_path)
    outcomes = {}
    for i, (what, make) in enumerate(_link_cases(finished, tmp_path)):
        outside = tmp_path / f"outside{i}"
        outside.mkdir()
        (outside / "victim.txt").write_text("the user's")
        run = _copy(finished, tmp_path / f"run{i}")
        for name, fn in _link_cases(run, outside):
            if name == what:
                fn()
        before = _snapshot(outside)
        report = _invoke(["report", str(run)], seconds=30)
        resume = _invoke(["run", str(config), "--out", str(run), "-q", "--resume"], seconds=60)
        assert _snapshot(outside) == before, what  # nothing written through a link
        assert (outside / "victim.txt").read_text() == "the user's", what
        outcomes[what] = (report.exit_code, resume.exit_code)
        if report.exit_code == 2:
            _one_line(report)
        if resume.exit_code == 2:
            _one_line(resume, logged=True)
    # links gradleak would have written through are refused, not silently skipped
    assert outcomes["report/index.html -> outside"][0] == 2
    assert outcomes["manifest -> outside"] == (2, 2)
    assert outcomes["config.yaml FIFO"] == (2, 2)


# -- hostile JSON and npz inside a run ----------------------------------------------------------

PAYLOADS = [
    "<script>document.title='PWNED'</script>",
    '"><img src=x onerror=alert(1)>',
    "javascript:alert(1)",
    "</pre><script>alert(1)</script>",
    "<svg onload=alert(1)>",
]

# The page's whole vocabulary: any other tag or attribute came from data.
ALLOWED_TAGS = {
    "html",
    "head",
    "meta",
    "title",
    "style",
    "body",
    "h1",
    "h2",
    "h3",
    "p",
    "code",
    "figure",
    "img",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "pre",
    "b",
}
ALLOWED_ATTRS = {"lang", "charset", "http-equiv", "content", "alt", "src"}


class _Audit(HTMLParser):
    """Every tag and attribute of a page, and any sign of script."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in ALLOWED_TAGS:
            self.problems.append(f"tag <{tag}>")
        for k, v in attrs:
            if k not in ALLOWED_ATTRS or k.startswith("on"):
                self.problems.append(f"attribute {k} on <{tag}>")
            if k == "src" and not (v or "").startswith("data:image/png;base64,"):
                self.problems.append(f"src {v!r}")
            if v and "javascript:" in v.lower():
                self.problems.append(f"javascript URL in {k}")


def assert_no_script(page: str) -> None:
    audit = _Audit()
    audit.feed(page)
    assert not audit.problems, audit.problems[:5]
    assert "default-src 'none'" in page  # the page's own policy forbids script whatever it holds


def _inject(run: Path, payload: str) -> None:
    """The payload in every string a report shows: extra row fields and their names, a
    disaggregation summary, the data section of the config (checked as written)."""
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    for r in rows:
        r.update(
            {payload: payload, "defenses": payload, "label_strategy": payload, "attack": payload}
        )
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["root_note"] = payload
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "disaggregation").mkdir(exist_ok=True)
    summary = {
        "rounds": 2,
        "clients": 2,
        "window": 1,
        "dimensions": 3,
        "participation_exact": False,
        "wrong_entries": 1,
        "clients_exact": 1,
        "seconds": 1.0,
        "chunks": [[0, 2]],
        "certain_clients": 0,
        "per_client": [
            {
                "client": 1,
                "exact": True,
                "certain": False,
                "separation": None,
                "gap_ratio": 0.1,
                "rounds_taken_part": 1,
                "methods": [payload],
                "reason": payload,
                payload: payload,
            }
        ],
        "inverted": [{"client": 1, "note": payload}],
    }
    (run / "disaggregation/summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize("payload", PAYLOADS)
def test_no_script_from_data_reaches_a_report(finished, tmp_path, payload) -> None:
    run = _copy(finished, tmp_path / "run")
    _inject(run, payload)
    result = _invoke(["report", str(run)])
    assert result.exit_code == 0, result.output
    page = (run / "report/index.html").read_text()
    assert_no_script(page)
    assert "Secure aggregation: gradient disaggregation" in page  # the summary was shown, escaped
    assert html.escape(payload, quote=True) in page
    if "<" in payload:
        assert payload not in page


def test_damaged_disaggregation_summaries_are_left_out_by_name(finished, tmp_path) -> None:
    for i, text in enumerate(
        ["[" * 100000, '{"rounds": "<script>"}', "null", '{"rounds": 1e999}', "\xff\xfe"]
    ):
        run = _copy(finished, tmp_path / f"run{i}")
        (run / "disaggregation").mkdir()
        (run / "disaggregation/summary.json").write_bytes(text.encode("latin-1"))
        assert _invoke(["report", str(run)]).exit_code == 0
        page = (run / "report/index.html").read_text()
        assert_no_script(page)
        assert "Left out:" in page and "summary.json</code> is damaged" in page


def _npz_with_header(path: Path, header_bytes: int) -> None:
    import zipfile

    header = (
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 8, 8), "
        + " " * header_bytes
        + "}\n"
    )
    data = b"\x93NUMPY\x02\x00" + len(header).to_bytes(4, "little") + header.encode() + bytes(256)
    with zipfile.ZipFile(path, "w") as z:
        for key in ("originals", "priors", "reconstructions"):
            z.writestr(f"{key}.npy", data)


def _zip_bomb(path: Path) -> None:
    import zipfile

    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (100000, 1, 64, 64), }\n"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for key in ("originals", "priors", "reconstructions"):
            with z.open(f"{key}.npy", "w", force_zip64=True) as f:
                f.write(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())
                for _ in range(64):
                    f.write(bytes(1 << 20))  # compresses to almost nothing


@pytest.mark.parametrize(
    "damage",
    [
        "huge npy header",
        "zip bomb",
        "object array",
        "deep rows",
        "deep manifest",
        "huge row file",
        "huge integer",
    ],
)
def test_hostile_files_in_a_run_are_one_line_or_left_out(finished, tmp_path, damage) -> None:
    run = _copy(finished, tmp_path / "run")
    npz = run / "audit/round_0001/client_1.npz"
    if damage == "huge npy header":
        _npz_with_header(npz, 5_000_000)
    elif damage == "zip bomb":
        _zip_bomb(npz)
    elif damage == "object array":
        np.savez(
            npz,
            originals=np.array([{"a": 1}], dtype=object),
            priors=np.zeros(1),
            reconstructions=np.zeros(1),
        )
    elif damage == "deep rows":
        with (run / "results.jsonl").open("a") as f:
            f.write("[" * 200000 + "]" * 200000 + "\n")
    elif damage == "deep manifest":
        with (run / ".gradleak").open("a") as f:
            f.write('{"+": ' + "[" * 200000 + "\n")
    elif damage == "huge row file":
        with (run / "results.jsonl").open("a") as f:
            f.truncate(2 << 30)  # sparse: 2 GiB of zeros past the row-file limit
    elif damage == "huge integer":  # more digits than Python converts to an int
        with (run / "results.jsonl").open("a") as f:
            f.write('{"round": 1' + "0" * 100000 + "}\n")
    result = _invoke(["report", str(run)])
    if result.exit_code == 0:
        page = (run / "report/index.html").read_text()
        assert "Left out:" in page and "client_1.npz" in page, damage
    else:
        _one_line(result)


# -- what a resume reads back -------------------------------------------------------------------


def _damage_tensors(path: Path, how: str) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    first = next(iter(state))
    if how == "nan":
        state[first] = state[first].clone().fill_(float("nan"))
    elif how == "float64":
        state[first] = state[first].double()
    elif how == "int32":
        state[first] = state[first].to(torch.int32)
    elif how == "shape":
        state[first] = state[first].flatten()[:1].clone()
    elif how == "extra":
        state["extra.weight"] = torch.zeros(2)
    elif how == "missing":
        del state[first]
    elif how == "exponent bit":  # a flipped exponent bit: finite, and 2^64 times too large
        state[first] = state[first].clone()
        state[first].view(-1)[0] *= 2.0**64
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-7])
    elif how == "flipped header":
        data = bytearray(path.read_bytes())
        data[20] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        save_file(state, str(path))


@pytest.mark.parametrize(
    "how",
    [
        "nan",
        "float64",
        "int32",
        "shape",
        "extra",
        "missing",
        "truncated",
        "flipped header",
        "exponent bit",
    ],
)
def test_resume_checks_every_tensor_it_reads_back(finished, tmp_path, how) -> None:
    run = _copy(finished, tmp_path / "run")
    path = run / "checkpoints/global_0002.safetensors"
    _damage_tensors(path, how)
    result = _invoke(["run", str(_config(tmp_path)), "--out", str(run), "-q", "--resume"])
    line = _one_line(result)
    assert "global_0002.safetensors" in line, line
    assert len((run / "rounds.jsonl").read_text().splitlines()) == 2  # nothing trained on it


def test_resume_from_the_start_checks_the_initial_model(finished, tmp_path) -> None:
    """Killed before round 1 finished: the initial checkpoint is rebuilt from the config and
    compared, so a flipped bit in it is refused by name, not trained on."""
    run = _copy(finished, tmp_path / "run")
    for name in ("results.jsonl", "rounds.jsonl", "timings.jsonl"):
        (run / name).write_text("")
    _damage_tensors(run / "checkpoints/global_0000.safetensors", "exponent bit")
    result = _invoke(["run", str(_config(tmp_path)), "--out", str(run), "-q", "--resume"])
    assert "global_0000.safetensors" in _one_line(result)
    assert (run / "rounds.jsonl").read_text() == ""


def test_a_damaged_pending_update_is_named_on_resume(tmp_path) -> None:
    """Interrupted after round 2's first client: its saved update, damaged, is refused by name."""
    from gradleak import rundir

    config = _config(tmp_path, training={"rounds": 2, "lr": 0.1})
    out = tmp_path / "run"
    seen = []

    def stop(op: str, rel: str) -> None:
        seen.append(rel)
        if (op, rel) == ("create", "checkpoints/global_0002.safetensors.tmp"):
            raise KeyboardInterrupt

    rundir.on_change = stop
    try:
        runner.invoke(app, ["run", str(config), "--out", str(out), "-q"])
    finally:
        rundir.on_change = None
    pending = out / "pending/round_0002/client_1.safetensors"
    assert pending.exists()
    for how in ("nan", "inf", "float64", "shape"):
        cut = _copy(out, tmp_path / f"cut_{how}")
        target = cut / "pending/round_0002/client_1.safetensors"
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(target), "pt") as f:
            header = f.metadata()
        state = load_file(str(target))
        key = next(k for k in state if k.endswith("weight"))
        state[key] = {
            "nan": lambda t: t.clone().fill_(float("nan")),
            "inf": lambda t: t.clone().fill_(float("inf")),  # its norm inf, not its row's
            "float64": lambda t: t.double(),
            "shape": lambda t: t[:1].clone(),
        }[how](state[key])
        save_file(state, str(target), metadata=header)
        line = _one_line(_invoke(["run", str(config), "--out", str(cut), "-q", "--resume"]))
        assert "client_1.safetensors" in line, line


# -- tensors a user brings ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "bool", "int32", "complex64", "uint16"])
def test_an_update_of_an_unsupported_dtype_is_one_line_naming_the_tensor(
    tmp_path, saved_update, dtype
) -> None:
    from safetensors.torch import load_file

    args = list(saved_update)
    path = Path(args[args.index("--update") + 1])
    state = load_file(str(path))
    name = "fc.weight" if "fc.weight" in state else next(iter(state))
    state[name] = state[name].to(getattr(torch, dtype))
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    args[args.index("--update") + 1] = str(bad)
    line = _one_line(_invoke(["attack", *args, "-s", "iterations=2", "--out", str(tmp_path / "o")]))
    assert name in line and "dtype" in line or "is " + dtype in line, line
    assert (
        not (tmp_path / "o").exists()
        or not any((tmp_path / "o").iterdir())
        or sorted(p.name for p in (tmp_path / "o").iterdir()) == [".gradleak"]
    )


# -- the user's plugin code ---------------------------------------------------------------------

PLUGIN = """
import sys
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, fail):
        super().__init__()
        self.fail = fail
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        if self.fail == "forward-raises":
            raise ValueError("my forward broke")
        if self.fail == "forward-exits":
            sys.exit(0)
        if self.fail == "forward-later" and self.training:
            raise RuntimeError("broke in training")
        return self.fc(x.flatten(1))

def make(fail="none"):
    if fail == "factory-raises":
        raise RuntimeError("my factory broke")
    if fail == "factory-exits":
        sys.exit(0)
    if fail == "factory-exits-3":
        sys.exit(3)
    return Net(fail)
"""


@pytest.mark.parametrize(
    "fail",
    [
        "factory-raises",
        "factory-exits",
        "factory-exits-3",
        "forward-raises",
        "forward-exits",
        "forward-later",
        "import-raises",
        "import-exits",
    ],
)
def test_a_plugin_s_exception_or_exit_is_one_line_naming_it(tmp_path, fail) -> None:
    module = "userplugin_" + fail.replace("-", "_")
    code = PLUGIN
    if fail == "import-raises":
        code = (
            "raise ImportError('no') if False else None\nraise KeyError('broken at import')\n"
            + code
        )
    if fail == "import-exits":
        code = "import sys\nsys.exit(0)\n" + code
    (tmp_path / f"{module}.py").write_text(code)
    config = _config(
        tmp_path, model={"name": f"{module}:make", "kwargs": {"fail": fail}}, audit=None
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradleak",
            "run",
            str(config),
            "--out",
            str(tmp_path / "out"),
            "-q",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = proc.stdout + proc.stderr
    lines = [
        line for line in output.splitlines() if line.strip() and not line.startswith((" ", "["))
    ]  # not log lines
    assert proc.returncode == 2, output
    assert "Traceback" not in output and len(lines) == 1 and lines[0].startswith("error: "), output
    assert module in lines[0], lines[0]


def test_a_factory_that_is_an_exit_is_one_line(tmp_path) -> None:
    """``builtins:exit`` as the model: the exit it raises (from no plugin module of the user's)
    is reported under model.name, not taken for the command's own end with status 0."""
    config = _config(tmp_path, model={"name": "builtins:exit"}, audit=None)
    line = _one_line(_invoke(["run", str(config), "--out", str(tmp_path / "out"), "-q"]))
    assert "model.name" in line and "builtins:exit" in line, line


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 256000000000 bytes. Error code 12"
        ),
    ],
)
def test_an_allocation_that_fails_is_one_line(monkeypatch, capsys, error) -> None:
    """Python's MemoryError or torch's allocator failing anywhere in a command (a saved update's
    metadata asking for 10^9 images): one line, status 2, no traceback."""
    import gradleak.cli
    from gradleak import entry

    def fail() -> None:
        raise error

    monkeypatch.setattr(gradleak.cli, "main", fail)
    with pytest.raises(SystemExit) as exited:
        entry.main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("error: out of memory"), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_other_errors_are_not_taken_for_memory(monkeypatch) -> None:
    import gradleak.cli
    from gradleak import entry

    def fail() -> None:
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(gradleak.cli, "main", fail)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        entry.main()


# -- concurrency and size -----------------------------------------------------------------------


def test_a_second_sweep_on_one_directory_is_refused(tmp_path) -> None:
    from gradleak.rundir import OwnedDir

    out = tmp_path / "sweep"
    config = _config(tmp_path, training={"rounds": 1, "lr": 0.1}, audit=None)
    owner = OwnedDir(out, "sweep").claim()
    with owner.locked("gradleak sweep"):  # as a sweep running in another process holds it
        line = _one_line(
            _invoke(["sweep", str(config), "-s", "training.lr=0.1,0.2", "--out", str(out), "-q"])
        )
    assert "in use by another gradleak sweep" in line
    assert not (out / "sweep.json").exists()
    assert (
        _invoke(
            ["sweep", str(config), "-s", "training.lr=0.1,0.2", "--out", str(out), "-q"]
        ).exit_code
        == 0
    )


def test_figures_of_many_clients_keep_a_readable_size(tmp_path) -> None:
    from PIL import Image

    config = _config(
        tmp_path,
        partition={"scheme": "iid", "clients": 300, "batch_size": 4},
        training={"rounds": 2, "lr": 0.1},
        audit={"clients": "all", "attack": {"iterations": 1}, "save_images": False},
    )
    out = tmp_path / "run"
    assert _invoke(["run", str(config), "--out", str(out), "-q"], seconds=600).exit_code == 0
    for png in (out / "report").glob("*.png"):
        with Image.open(png) as im:
            assert max(im.size) <= 2000, (png.name, im.size)


def test_huge_images_in_a_run_are_shown_small(finished, tmp_path) -> None:
    """Audit images of 3,000 x 3,000 pixels (a run directory's npz replaced) are shrunk in the
    report's grid, not drawn as a 180-megapixel canvas."""
    import base64
    import io
    import re

    from PIL import Image

    run = _copy(finished, tmp_path / "run")
    big = np.full((1, 1, 3000, 3000), 0.5, dtype=np.float32)
    np.savez(run / "audit/round_0001/client_1.npz", originals=big, priors=big, reconstructions=big)
    assert _invoke(["report", str(run)]).exit_code == 0
    page = (run / "report/index.html").read_text()
    sizes = []
    for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page):
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            sizes.append(im.size)
    assert sizes and max(max(s) for s in sizes) <= 1000, sizes  # not 12,008 (3,000 x 4)


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="no headless browser installed (the parser test holds)"
)
def test_a_hostile_report_runs_no_script_in_a_real_browser(finished, tmp_path) -> None:
    """The report of a run whose files carry script payloads, opened in headless Chromium: had any
    script run, it would have renamed the page or added an element; neither happened."""
    run = _copy(finished, tmp_path / "run")
    payload = (
        "<script>document.title='PWNED'</script><img src=x onerror=\"document.title='PWNED'\">"
        "<svg onload=\"document.body.setAttribute('data-pwned','1')\">"
    )
    _inject(run, payload)
    assert _invoke(["report", str(run)]).exit_code == 0
    page = run / "report/index.html"
    dom = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=3000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "<title>gradleak report: safety</title>" in dom, dom[:300]
    assert "PWNED</title>" not in dom and "data-pwned" not in dom.split("<body", 1)[1][:200]
    assert "&lt;script&gt;document.title" in dom  # the payload is there, as text
