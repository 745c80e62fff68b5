"""The gradleak command line: ``gradleak --help`` lists the commands, each has its own
``--help``."""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, Optional

import numpy as np
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gradleak.errors import GradleakError

if TYPE_CHECKING:  # torch loads only with the commands that need it: `gradleak --help` starts fast
    from gradleak.data.partition import ClientData

app = typer.Typer(
    help="gradleak: measure how much private training data leaks from federated-learning updates.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
log = logging.getLogger("gradleak")


def shipped_config(name: str) -> Path:
    """A config that ships inside the package (``configs/NAME.yaml``)."""
    return Path(str(resources.files("gradleak") / "configs" / f"{name}.yaml"))


class ProgressDisplay:
    """Rich progress bars for rounds and for the clients of the current round."""

    def __init__(self, progress: Progress, rounds: int, first: int) -> None:
        self.progress = progress
        self.rounds = progress.add_task("rounds", total=rounds, completed=first - 1)
        self.clients = progress.add_task("clients", total=1)

    def round_started(self, round: int, clients: Sequence[ClientData]) -> None:
        self.progress.update(
            self.clients, total=len(clients), completed=0, description=f"round {round} clients"
        )

    def client_done(self, result) -> None:  # noqa: ANN001
        self.progress.advance(self.clients)

    def round_done(self, result, state) -> None:  # noqa: ANN001
        self.progress.update(self.clients, completed=len(result.clients))
        self.progress.advance(self.rounds)


def _progress(*extra: TextColumn) -> Progress:
    """The progress bar layout every long command uses."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        *extra,
        console=console,
    )


def _execute(run, quiet: bool) -> None:  # noqa: ANN001  (a gradleak.experiments.Run)
    """Run an experiment, with progress bars for its rounds and clients unless ``quiet``."""
    if quiet:
        run.execute()
        return
    with _progress() as progress:
        run.execute(ProgressDisplay(progress, run.config.training.rounds, run.first_round))


def _setup_logging(verbose: bool) -> None:
    if not any(isinstance(h, RichHandler) for h in log.handlers):
        log.addHandler(RichHandler(console=console, show_path=False, markup=False))
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False  # a library's root handler would print every line twice


def _fail(exc: Exception) -> None:
    from rich.markup import escape

    # The message is the user's text (keys, paths, values): never read as markup.
    console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _os_error(exc: OSError, where: Optional[Path], hint: str = "") -> GradleakError:
    """A full disk, a read-only or vanished directory, a directory where a file should be: one
    line naming the path, not a traceback."""
    full = " (no space left on the device)" if exc.errno == errno.ENOSPC else ""
    return GradleakError(f"{exc.filename or where}: {exc.strerror or exc}{full}{hint}")


def _interrupted(hint: str = "") -> NoReturn:
    """Ctrl-C: one line (with how to continue, where there is a way), exit status 130."""
    console.print(f"interrupted{hint}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(130)


def _run(
    config_path: Path, out: Optional[Path], overrides: list[str], resume: bool, quiet: bool
) -> Path:
    from gradleak.experiments import Run, load_config
    from gradleak.report.html import build_run_report

    run_dir = out
    try:
        config = load_config(config_path, overrides)
        run_dir = out or Path("runs") / config.name
        _execute(Run(config, run_dir, resume=resume), quiet)
        page = build_run_report(run_dir)
    except KeyboardInterrupt:  # anywhere: while starting, training or drawing the report
        hint = (
            ""
            if run_dir is None
            else (
                f"; continue with: gradleak run {config_path} --out {run_dir} --resume"
                + "".join(f" --set {o}" for o in overrides)
            )
        )
        _interrupted(hint)
    except OSError as exc:
        raise _os_error(
            exc, run_dir, "; the run can be continued with --resume once it is fixed"
        ) from None
    console.print(
        f"results: {run_dir / 'results.jsonl'}\nreport:  {page}", markup=False, highlight=False
    )
    return run_dir


OutOpt = Annotated[
    Optional[Path], typer.Option("--out", "-o", help="Run directory (default runs/NAME).")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set", "-s", help="Override a config key: --set training.rounds=2 (repeatable)."
    ),
]
AttackSetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Change a preset setting: --set iterations=500 (repeatable)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log every client.")]


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Experiment YAML file.")],
    out: OutOpt = None,
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run in --out.")
    ] = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run an experiment: train the federation, record every (round, client), write the report."""
    _setup_logging(verbose)
    try:
        _run(config, out, set_ or [], resume, quiet)
    except GradleakError as exc:
        _fail(exc)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/demo"),
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """The main job on bundled data: a small digits federation, its results and report.

    Re-running continues (or re-reports) the run in --out.
    """
    _setup_logging(False)
    try:
        _run(shipped_config("demo"), out, set_ or [], resume=True, quiet=quiet)
    except GradleakError as exc:
        _fail(exc)


@app.command()
def attack(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="Built-in model name, package.module:factory, or (text) a local transformers "
            "model directory.",
        ),
    ],
    update_path: Annotated[
        Path, typer.Option("--update", help="The client's update: local minus global weights.")
    ],
    meta_path: Annotated[
        Path,
        typer.Option(
            "--meta",
            help="JSON metadata: images: num_images, image_shape, num_classes, lr, ...; text: "
            'modality "text", num_sequences, seq_len, lr, ...',
        ),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Output directory (reconstructions are private data)."),
    ],
    global_path: Annotated[
        Optional[Path],
        typer.Option(
            "--global",
            help="Global model weights (.safetensors, .npz, .pt); default: the weights the model "
            "is built with (a model directory's own).",
        ),
    ] = None,
    preset_name: Annotated[
        str,
        typer.Option(
            "--preset",
            help="The attack: dlg, idlg, inverting-gradients, gradinversion, bn-statistics, or "
            "another registered one.",
        ),
    ] = "inverting-gradients",
    truth: Annotated[
        Optional[Path],
        typer.Option(
            "--truth",
            help="npz with the true examples ('images'; text: 'sequences') and optionally "
            "'labels', for metrics.",
        ),
    ] = None,
    prior: Annotated[
        Optional[Path],
        typer.Option(
            "--prior", help="Starting image for init=prior (an image file, or npz 'images')."
        ),
    ] = None,
    set_: AttackSetOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the starting images.")] = 0,
    device: Annotated[
        str, typer.Option(help="cpu, cuda, or auto (a GPU when there is one).")
    ] = "cpu",
    quiet: QuietOpt = False,
) -> None:
    """Reconstruct a client's examples (images, text) from a saved update, as an
    honest-but-curious server would."""
    from gradleak.attacks.offline import attack_saved_update, load_saved_update
    from gradleak.attacks.registry import attack_factory
    from gradleak.experiments.config import parse_override

    try:
        from gradleak.experiments.scenario import resolve_device

        attack = attack_factory(preset_name, key="--preset")(
            **dict(parse_override(o) for o in set_ or [])
        )
        saved = load_saved_update(
            model=model,
            global_path=global_path,
            update_path=update_path,
            meta_path=meta_path,
            out=out,
            truth_path=truth,
            prior_path=prior,
        )
        kwargs = dict(seed=seed, device=resolve_device(device))
        if quiet:
            summary = attack_saved_update(saved, attack, **kwargs)
        else:
            with _progress(TextColumn("loss {task.fields[loss]:.4g}")) as progress:
                total = getattr(getattr(attack, "settings", None), "iterations", None)
                task = progress.add_task(preset_name, total=total, loss=float("nan"))
                summary = attack_saved_update(
                    saved,
                    attack,
                    **kwargs,
                    progress=lambda i, loss: progress.update(task, completed=i, loss=loss),
                )
    except KeyboardInterrupt:
        _interrupted(f"; {out} may hold partial files")
    except OSError as exc:
        _fail(_os_error(exc, out))
    except GradleakError as exc:
        _fail(exc)
    if not summary["feasible"]:
        line = f"infeasible: {summary['reason']} ({summary['seconds']:.1f} s)"
    elif summary["labels"] is None:  # an attack that recovers examples only (text)
        confidence = summary["confidence"]
        line = f"recovered ({summary['seconds']:.1f} s" + (
            f", confidence {confidence:.3f})" if confidence is not None else ")"
        )
    else:
        line = (
            f"labels {summary['labels']} ({summary['label_strategy']}), {summary['seconds']:.1f} s"
        )
    if "metrics" in summary:
        m = {
            k: v
            for k, v in summary["metrics"].items()
            if k not in ("per_example", "label_accuracy")
        }
        line += "; " + ", ".join(f"{k.upper()} {v:.4g}" for k, v in m.items())
        if summary["metrics"]["label_accuracy"] is not None or summary["labels"] is not None:
            line += f", label accuracy {summary['metrics']['label_accuracy']}"
    console.print(line, highlight=False, soft_wrap=True, markup=False)
    console.print(f"written to {out}", highlight=False, soft_wrap=True, markup=False)


LevelOpt = Annotated[
    Optional[float],
    typer.Option(
        "--level",
        help="RDLV a defence must bring every audited client to (default: the config's "
        "recommendation.level, 0).",
    ),
]
BudgetOpt = Annotated[
    Optional[float],
    typer.Option(
        "--accuracy-budget",
        min=0,
        max=1,
        help="Accuracy a recommended defence may cost, as a fraction "
        "(default: the config's recommendation.accuracy_budget, 0.05).",
    ),
]


@app.command()
def sweep(
    config: Annotated[
        Path, typer.Argument(help="Experiment YAML file (its sweep: section adds axes).")
    ],
    set_: Annotated[
        Optional[list[str]],
        typer.Option(
            "--set", "-s", help="key=v1,v2,... sweeps a key; key=v fixes it (repeatable)."
        ),
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Sweep directory (default runs/NAME).")
    ] = None,
    level: LevelOpt = None,
    accuracy_budget: BudgetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run one experiment per value (a grid for several keys), resumably; then report the curve and
    the recommended strength (the smallest meeting the leakage level within the accuracy budget)."""
    from gradleak.experiments.sweep import run_sweep
    from gradleak.report.html import build_run_report, build_sweep_report, sweep_summary

    _setup_logging(False)

    def execute(run) -> None:  # noqa: ANN001
        log.info("sweep point %s", run.run_dir.name)
        _execute(run, quiet)
        build_run_report(run.run_dir)

    try:
        sweep_dir = run_sweep(config, set_ or [], out, execute=execute)
        page = build_sweep_report(sweep_dir, level, accuracy_budget)
        verdict = (
            sweep_summary(sweep_dir, level, accuracy_budget)
            .get("recommendation", {})
            .get("verdict")
        )
        if verdict:
            console.print(verdict, highlight=False, soft_wrap=True, markup=False)
        console.print(f"report: {page}", highlight=False, soft_wrap=True, markup=False)
    except KeyboardInterrupt:
        _interrupted("; run the same command again to continue the sweep")
    except OSError as exc:
        _fail(
            _os_error(
                exc, out, "; run the same command again to continue the sweep once it is fixed"
            )
        )
    except GradleakError as exc:
        _fail(exc)


@app.command()
def recommend(
    config: Annotated[
        Path,
        typer.Argument(help="Experiment YAML file (needs audit:; its defenses: are replaced)."),
    ],
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Recommendation directory (default runs/NAME-recommend)."),
    ] = None,
    set_: Annotated[
        Optional[list[str]],
        typer.Option(
            "--set",
            "-s",
            help="Fix a config key for every point, e.g. --set training.rounds=2 (repeatable).",
        ),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            "-j",
            min=1,
            help="Points run at once, each in its own process with cores / jobs torch threads.",
        ),
    ] = 1,
    family: Annotated[
        Optional[list[str]],
        typer.Option(
            "--family",
            "-f",
            help="Search only this family (repeatable; default: the config's "
            "recommendation.families, else all).",
        ),
    ] = None,
    max_points: Annotated[
        Optional[int],
        typer.Option(
            "--max-points",
            min=1,
            help="Most settings evaluated per family (default: recommendation.max_points, 8).",
        ),
    ] = None,
    level: LevelOpt = None,
    accuracy_budget: BudgetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Search every defence family for the weakest setting that brings every audited client's
    worst RDLV to the level within the accuracy budget; write recommendation.json, pareto.json and
    a report.

    One run without defence, then per family the strongest setting and, when it holds, a bisection
    for the weakest that does. Each point is a run directory inside --out: running the same
    command again continues where it stopped.
    """
    from gradleak.experiments.recommend import run_recommend
    from gradleak.report.html import build_recommend_report

    _setup_logging(False)
    try:
        where, rec = run_recommend(
            config,
            set_ or [],
            out,
            jobs=jobs,
            level=level,
            budget=accuracy_budget,
            families=family,
            max_points=max_points,
            execute=lambda run: _execute(run, quiet),
            on_point=lambda point, line: log.info("%s", line),
        )
        page = build_recommend_report(where)
        console.print(rec["sentence"], highlight=False, soft_wrap=True, markup=False)
        console.print(
            f"recommendation: {where / 'recommendation.json'}\nreport: {page}",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
    except KeyboardInterrupt:
        _interrupted("; run the same command again to continue the search")
    except OSError as exc:
        _fail(
            _os_error(
                exc, out, "; run the same command again to continue the search once it is fixed"
            )
        )
    except GradleakError as exc:
        _fail(exc)


@app.command()
def report(
    run_dir: Annotated[
        Path,
        typer.Argument(help="A run directory, a sweep, a recommendation or an audit directory."),
    ],
    level: LevelOpt = None,
    accuracy_budget: BudgetOpt = None,
) -> None:
    """Build (or rebuild) the HTML report of a run, a sweep, a recommendation or the audit of a
    Flower or NVFlare app."""
    from gradleak.report.html import (
        build_audit_report,
        build_recommend_report,
        build_run_report,
        build_sweep_report,
    )
    from gradleak.rundir import OwnedDir

    try:
        kind = OwnedDir(run_dir).manifest_kind() if run_dir.is_dir() else None
        if kind == "sweep":
            page = build_sweep_report(run_dir, level, accuracy_budget)
        elif kind == "recommend":
            if level is not None or accuracy_budget is not None:
                raise GradleakError(
                    "--level and --accuracy-budget steer the search: give them to gradleak "
                    "recommend (the same --out continues it)"
                )
            page = build_recommend_report(run_dir)
        elif kind == "audit":
            page = build_audit_report(run_dir)
        else:
            page = build_run_report(run_dir)
        console.print(f"report: {page}", highlight=False, soft_wrap=True, markup=False)
    except KeyboardInterrupt:
        _interrupted("; run the same command again to draw the report")
    except OSError as exc:
        _fail(_os_error(exc, run_dir))
    except GradleakError as exc:
        _fail(exc)


def _read_matrix(path: Path, name: str) -> np.ndarray:
    import io

    from gradleak.errors import DataError
    from gradleak.safeio import load_npz, read_file

    if path.suffix.lower() == ".npz":
        f = load_npz(read_file(path, kind="tensors"), path)
        if not f:
            raise DataError(f"{path} holds no arrays")
        return f[name] if name in f else next(iter(f.values()))
    try:
        return np.loadtxt(
            io.StringIO(read_file(path, kind="rows").decode()), delimiter=",", ndmin=2
        )
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a numeric CSV matrix: {exc}") from None


@app.command()
def disaggregate(
    sums: Annotated[Path, typer.Option("--sums", help="Round sums, T x d (npz 'sums' or CSV).")],
    counts: Annotated[
        Path,
        typer.Option(
            "--counts",
            help="Participation counts: a windows x clients matrix "
            "(with --window), or a table client,start,end,count (CSV with that header, or npz "
            "arrays).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    window: Annotated[
        Optional[int], typer.Option("--window", min=1, help="Rounds per window of a count matrix.")
    ] = None,
    chunk: Annotated[
        Optional[int],
        typer.Option(
            "--chunk",
            min=0,
            help="Rounds per chunk (default: chosen from "
            "the sums' spectrum; 0: all rounds at once).",
        ),
    ] = None,
    workers: Annotated[
        Optional[int],
        typer.Option(
            "--workers",
            min=1,
            help="Processes solving clients in parallel (default: the machine's cores).",
        ),
    ] = None,
    time_limit: Annotated[
        float, typer.Option(help="Seconds a solver may spend on one client's program.")
    ] = 60.0,
    solver: Annotated[
        str, typer.Option(help="MILP back-end: highs (default), scip or gurobi (when installed).")
    ] = "highs",
    separation: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="How much worse the best alternative "
            "column must fit, per round it changes, as a fraction of what a change costs on "
            "exact sums, for a column to be certain.",
        ),
    ] = 0.25,
    on_uncertain: Annotated[
        str, typer.Option(help="warn: report uncertain clients; fail: exit with an error.")
    ] = "warn",
    quiet: QuietOpt = False,
) -> None:
    """Recover who took part in which round, and each client's update, from secure-aggregation
    sums."""
    from gradleak.attacks.disaggregation import ColumnJournal, ParticipationLog
    from gradleak.attacks.disaggregation import disaggregate as run
    from gradleak.rundir import OwnedDir

    _setup_logging(False)
    owner = OwnedDir(out, "disaggregation")
    try:
        if on_uncertain not in ("warn", "fail"):
            raise GradleakError(f"--on-uncertain: {on_uncertain!r} is not one of warn, fail")
        owner.check_claimable()  # before any work: a foreign or unwritable --out fails now
        s = _read_matrix(sums, "sums")
        if not np.issubdtype(s.dtype, np.number) or not np.isfinite(s).all():
            raise GradleakError(
                f"{sums}: the sums hold NaN or infinite values (or are not numbers)"
            )
        plog = ParticipationLog.load(counts, rounds=s.shape[0], window=window)
        owner.claim()
        kwargs = dict(
            chunk=chunk,
            workers=workers,
            time_limit=time_limit,
            solver=solver,
            separation=separation,
            on_uncertain=on_uncertain,
            journal=ColumnJournal(owner),
        )
        if quiet:
            result = run(s, plog, **kwargs)
        else:
            with _progress() as progress:
                task = progress.add_task("columns", total=None)
                result = run(
                    s,
                    plog,
                    **kwargs,
                    progress=lambda i, n: progress.update(task, completed=i, total=n),
                )
        result.save(owner)
    except KeyboardInterrupt:
        _interrupted(
            f"; the columns solved so far are kept in {out}: run the same command again to continue"
        )
    except OSError as exc:
        _fail(_os_error(exc, out))
    except GradleakError as exc:
        _fail(exc)
    certain = int(result.certain.sum())
    n = result.participation.shape[1]
    console.print(
        f"recovered {n} clients over {result.participation.shape[0]} rounds in "
        f"{len(result.chunks)} "
        f"chunk(s) in {result.seconds:.1f} s; {certain} of {n} certain; written to {out}",
        highlight=False,
        soft_wrap=True,
        markup=False,
    )


@app.command("config-reference")
def config_reference_cmd(
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Write here instead of stdout.")
    ] = None,
) -> None:
    """Print the reference of every config key (the source of docs/config.md)."""
    from gradleak.experiments.reference import config_reference

    text = config_reference()
    if out:
        out.write_text(text)
    else:
        sys.stdout.write(text)


@app.command()
def models() -> None:
    """List the built-in models."""
    from gradleak.modality import load_modalities
    from gradleak.models import MODELS

    load_modalities()

    for name in MODELS.names():
        typer.echo(name)


def main() -> None:
    app()
