"""A self-contained HTML report of a run or a sweep: figures embedded, opens offline.

Whatever reaches the page from the run directory (names, rows, summaries, the config) is escaped;
the page runs no script (its Content-Security-Policy allows none, so even markup that slipped
through could not run any), and a damaged optional file is left out by name.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from gradleak.data.sources import SOURCES
from gradleak.errors import DataError, GradleakError
from gradleak.experiments.store import RunStore
from gradleak.modality import RENDERERS, InputSpec, Renderer, load_modalities
from gradleak.report import figures
from gradleak.report.recommend import recommend
from gradleak.rundir import OwnedDir, SubDir, safe_component
from gradleak.safeio import load_npz, parse_json

# No script, no frames, no requests: images only from the page itself (data: URLs).
CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
    "form-action 'none'"
)


def esc(v: Any) -> str:
    """Any value as HTML text: floats to 4 significant digits, everything escaped."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v), quote=True)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}"></figure>'


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>No rows.</p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}
figure{display:inline-block;margin:0 1em 1em 0}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}
.side{display:flex;gap:2em;flex-wrap:wrap}
"""


def _page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>{esc(title)}</title>
<style>{STYLE}</style></head><body>
{body}
</body></html>
"""


def _owned(root: Path, kind: str) -> OwnedDir:
    """``root`` as gradleak's directory of ``kind`` (its report is written into it)."""
    if not root.exists():
        raise DataError(f"{root} does not exist")
    return OwnedDir(root, kind).join()


def build_run_report(run_dir: Path) -> Path:
    """Write ``run_dir/report/index.html`` (and its PNG/SVG figures); return the page's path."""
    store = RunStore(_owned(run_dir, "run"))
    if not store.exists():
        raise DataError(f"{run_dir} is not a run directory (no config.yaml)")
    rounds, results = store.read_rows()
    config = store.read_config()
    out = store.dir.sub("report")
    figs = []
    if rounds:
        figs.append(_img(figures.accuracy_per_round(rounds, out), "test accuracy per round"))
    if results:
        figs.append(_img(figures.train_loss_per_client(results, out), "training loss per client"))
    final = (
        f"{rounds[-1]['test_accuracy']:.4f} after round {rounds[-1]['round']}"
        if rounds
        else "none yet"
    )
    name = str(config.get("name") or run_dir.name)
    body = f"""<h1>gradleak report: {esc(name)}</h1>
<p>Run directory: <code>{esc(run_dir)}</code>. Final test accuracy: {esc(final)}.</p>
<h2>Training</h2>
{"".join(figs)}
{_audit_section(store, config, results, out)}
{_disaggregation_section(store, config, out)}
<h2>Rounds</h2>
{_table(rounds)}
<h2>Clients per round</h2>
{_table(results)}
<h2>Config</h2>
<pre>{esc(yaml.safe_dump(config, sort_keys=False))}</pre>"""
    out.write_text("index.html", _page(f"gradleak report: {name}", body))
    return out.path("index.html")


def build_audit_report(audit_dir: Path) -> Path:
    """Write ``audit_dir/report/index.html`` for an audit directory of a Flower or NVFlare app
    (``integrations.auditdir``: rows, images and a description; no experiment config)."""
    from gradleak.integrations.auditdir import AuditDir

    audit = AuditDir.open(audit_dir)
    meta, rows = audit.read_meta(), audit.read_rows()
    out = audit.dir.sub("report")
    load_modalities()
    kind = meta.get("modality", "image")
    renderer = RENDERERS.get(kind) if kind in RENDERERS else None
    renderer = None if renderer is not None and renderer.bind is not None else renderer
    failed = [r for r in rows if r.get("audit_error")]
    withheld = sum(1 for r in rows if r.get("withheld"))
    audited = [r for r in rows if r.get("audited")]
    worst = _worst(audited)
    summary = (
        f"{len(rows)} update(s) from {len({r['client'] for r in rows})} client(s), "
        f"{len(audited)} attacked, {withheld} withheld, {len(failed)} audit failure(s)"
        + (f"; highest RDLV {worst:.4g}" if math.isfinite(worst) else "")
    )
    described = {k: v for k, v in meta.items() if k != "format"}
    body = f"""<h1>gradleak audit report</h1>
<p>Audit directory: <code>{esc(audit_dir)}</code>. {esc(summary)}.</p>
{audit_section(audit.dir, renderer, meta.get("metric"), rows, out)}
{"<h2>Audit failures (updates withheld)</h2>" + _table(failed) if failed else ""}
<h2>All rows</h2>
{_table(rows)}
<h2>Audit settings</h2>
<pre>{esc(yaml.safe_dump(described, sort_keys=False))}</pre>"""
    out.write_text("index.html", _page("gradleak audit report", body))
    return out.path("index.html")


# Columns of the audited-row table, in this order: the image metrics (also the disaggregation
# table's), then whatever else the audit and the defences recorded (another modality's metrics, the
# attack's confidence, a defence's epsilon), then the tail.
AUDIT_COLUMNS = (
    "round",
    "client",
    "num_samples",
    "batch_size",
    "attack",
    "rdlv",
    "ssim",
    "psnr",
    "mse",
    "label_accuracy",
    "label_strategy",
    "withheld",
    "defenses",
    "attack_seconds",
)
AUDIT_TAIL = ("confidence", *AUDIT_COLUMNS[8:], "audit_note")
# Fields of a result row the "Clients per round" table already shows, left out of the audit's.
TRAINING_FIELDS = ("lr", "epochs", "steps", "train_loss", "update_norm", "audited", "attack")


def _audit_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The audit table's columns: AUDIT_COLUMNS where the rows have them (the head always), every
    other recorded field before the tail."""
    seen = list(dict.fromkeys(k for r in rows for k in r))
    head = [c for c in AUDIT_COLUMNS[:8] if c in AUDIT_COLUMNS[:5] or c in seen]
    skip = {*AUDIT_COLUMNS, *AUDIT_TAIL, *TRAINING_FIELDS}
    return [*head, *(k for k in seen if k not in skip), *AUDIT_TAIL]


# At most this many rounds per client in the image grids (evenly spaced, last included).
GRID_ROUNDS = 8
# Image grids for at most this many audited clients (those with the highest RDLV).
GRID_CLIENTS = 12


def _worst(rows: list[dict[str, Any]]) -> float:
    values = [
        r["rdlv"]
        for r in rows
        if isinstance(r.get("rdlv"), int | float) and not math.isnan(r["rdlv"])
    ]
    return max(values) if values else -math.inf


def _renderer(config: dict[str, Any]) -> Renderer | None:
    """The renderer of the run's data kind (found through its data source), or None."""
    load_modalities()
    data = config.get("data")
    source = data.get("source") if isinstance(data, dict) else None
    if source not in SOURCES:
        return None
    kind = SOURCES.get(source).kind
    if kind not in RENDERERS:
        return None
    renderer = RENDERERS.get(kind)
    if renderer.bind is None:
        return renderer
    spec = _data_spec(config)
    return renderer if spec is None else renderer.for_spec(spec)


def _data_spec(config: dict[str, Any]) -> InputSpec | None:
    """The input spec of the run's data, rebuilt from its config (a renderer that needs it: text's
    tokenizer), or None when the data cannot be loaded any more (the renderer then shows what it
    can without it)."""
    try:
        source = SOURCES.get(config["data"]["source"]).model_validate(config["data"])
        seed = config.get("seed", 0)
        return source.load(seed if isinstance(seed, int) else 0).spec
    except (GradleakError, ValidationError, OSError, ValueError, KeyError, TypeError):
        return None


def _examples_row(r: dict[str, Any], arrays: dict[str, np.ndarray], metric: Any) -> tuple[str, Any]:
    """One round of one client: its first original, the prior and its reconstruction, captioned
    with the RDLV and the audit's metric."""
    import torch

    found = ", ".join(
        f"{m} {r[m]:.3g}"
        for m in ("rdlv", metric)
        if isinstance(m, str) and isinstance(r.get(m), int | float)
    )
    caption = f"round {r['round']}: original, prior, reconstruction" + (
        f" ({found})" if found else ""
    )
    return caption, torch.from_numpy(np.stack([arrays[k][0] for k in AUDIT_EXAMPLES]))


def _examples_section(
    owner: OwnedDir,
    renderer: Renderer | None,
    rows: list[dict[str, Any]],
    prefix: str,
    alt: str,
    metric: Any,
) -> list[str]:
    """The renderer's view of the saved examples of ``rows`` (one client), damaged files named."""
    if renderer is None:
        return []
    parts, kept = [], []
    for r in rows:
        rel = f"{prefix}/round_{r['round']:04d}/client_{r['client']}.npz"
        if not owner.exists(rel):
            continue
        arrays = _audit_examples(owner, rel, _example_bytes(r.get("num_samples")), renderer)
        if arrays is None:
            parts.append(
                f"<p>Left out: <code>{esc(owner.path(rel))}</code> is damaged (not the "
                "originals, prior and reconstructions of an audit).</p>"
            )
        else:
            kept.append(_examples_row(r, arrays, metric))
    if kept:
        parts.append(renderer.html(kept, alt))
    return parts


def _audit_section(
    store: RunStore, config: dict[str, Any], results: list[dict[str, Any]], out: SubDir
) -> str:
    return audit_section(store.dir, _renderer(config), _audit_metric(config), results, out)


def audit_section(
    owner: OwnedDir,
    renderer: Renderer | None,
    metric: Any,
    results: list[dict[str, Any]],
    out: SubDir,
) -> str:
    """The audit's figure, each client's examples (those of ``owner/audit/``) and its table."""
    audited = [r for r in results if r.get("audited")]
    if not audited:
        return ""
    parts = ["<h2>Leakage audit</h2>", _img(figures.rdlv_per_round(audited, out), "RDLV per round")]
    by_client = {
        c: [r for r in audited if r["client"] == c and r.get("rdlv") is not None]
        for c in sorted({r["client"] for r in audited})
    }
    shown = sorted(
        (c for c in by_client if by_client[c]), key=lambda c: _worst(by_client[c]), reverse=True
    )
    if len(shown) > GRID_CLIENTS:
        parts.append(
            f"<p>Examples of the {GRID_CLIENTS} clients with the highest RDLV, of {len(shown)} "
            "audited.</p>"
        )
    for cid in sorted(shown[:GRID_CLIENTS]):
        rows = by_client[cid]
        pick = sorted(
            {round(i * (len(rows) - 1) / max(1, GRID_ROUNDS - 1)) for i in range(GRID_ROUNDS)}
        )
        picked = [rows[i] for i in pick if i < len(rows)]
        parts += _examples_section(
            owner,
            renderer,
            picked,
            "audit",
            f"original, prior and reconstruction of client {cid}",
            metric,
        )
    table = [{k: r.get(k, "") for k in _audit_columns(audited)} for r in audited]
    parts += ["<h3>Audited updates</h3>", _table(table)]
    return "\n".join(parts)


def _audit_metric(config: dict[str, Any]) -> Any:
    audit = config.get("audit")
    return audit.get("metric") if isinstance(audit, dict) else None


AUDIT_EXAMPLES = ("originals", "priors", "reconstructions")
# The most an audit's file may hold per example and array (a 2,048-pixel colour image in float64).
EXAMPLE_BYTES = 2048 * 2048 * 3 * 8


def _example_bytes(count: Any) -> int:
    """The most an audit's file of ``count`` examples can hold, plus room for its own structure."""
    count = count if isinstance(count, int) and 0 < count <= 1 << 20 else 1
    return len(AUDIT_EXAMPLES) * count * EXAMPLE_BYTES + (1 << 20)


def _audit_examples(
    owner: OwnedDir, rel: str, limit: int, renderer: Renderer
) -> dict[str, np.ndarray] | None:
    """An audit's saved examples (originals, priors, reconstructions: the same shape each, a batch
    the renderer can show), or None when the file is damaged or holds something else; never
    unpickles, never reads more than ``limit`` bytes."""
    try:
        arrays = load_npz(
            owner.read_bytes(rel, kind="tensors", limit=limit), owner.path(rel), limit=limit
        )
    except DataError:
        return None
    if any(k not in arrays for k in AUDIT_EXAMPLES):
        return None
    found = {k: arrays[k] for k in AUDIT_EXAMPLES}
    if len({a.shape for a in found.values()}) != 1 or not all(
        renderer.accepts(a) for a in found.values()
    ):
        return None
    return found


class _Record(BaseModel):
    """What the report reads of a file it did not just compute: strict types, extra keys ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class _Evidence(_Record):
    client: int
    exact: bool
    certain: bool
    separation: float | None = None
    gap_ratio: float
    rounds_taken_part: int
    methods: list[str]
    reason: str = ""


class _Inverted(_Record):
    client: int
    round: int | None = None
    rounds_taken_part: int | None = None
    rdlv: float | None = None
    ssim: float | None = None
    psnr: float | None = None
    mse: float | None = None
    label_accuracy: float | None = None
    attack_seconds: float | None = None
    note: str | None = None


class _DisaggregationSummary(_Record):
    rounds: int
    clients: int
    window: int
    dimensions: int
    participation_exact: bool
    wrong_entries: int
    clients_exact: int
    seconds: float
    chunks: list[list[int]]
    certain_clients: int
    per_client: list[_Evidence]
    inverted: list[_Inverted]


def _disaggregation_section(store: RunStore, config: dict[str, Any], out: SubDir) -> str:
    """The secure-sum chain: participation recovered from the round sums, then the inversion of
    chosen clients' recovered updates (``RUN/disaggregation/summary.json``)."""
    rel = "disaggregation/summary.json"
    if not store.dir.exists(rel):
        return ""
    path = store.dir.path(rel)
    try:
        s = _DisaggregationSummary.model_validate(
            parse_json(store.dir.read_bytes(rel, kind="json"), path)
        )
    except (DataError, ValidationError) as exc:
        problem = (
            str(exc).splitlines()[0]
            if isinstance(exc, DataError)
            else "not a disaggregation summary"
        )
        return (
            "<h2>Secure aggregation: gradient disaggregation</h2><p>Left out: "
            f"<code>{esc(path)}</code> "
            f"is damaged ({esc(problem)}).</p>"
        )
    verdict = (
        "recovered <b>exactly</b>"
        if s.participation_exact
        else f"<b>not</b> recovered exactly ({esc(s.wrong_entries)} wrong entries)"
    )
    parts = [
        "<h2>Secure aggregation: gradient disaggregation</h2>",
        f"<p>The server saw only the sum of each of {esc(s.rounds)} rounds ({esc(s.dimensions)} "
        "values) and, "
        f"per window of {esc(s.window)} rounds, how often each of the {esc(s.clients)} clients "
        "took part. "
        f"From these, the participation matrix was {verdict} ({esc(s.clients_exact)} of "
        f"{esc(s.clients)} "
        f"clients exact) in {s.seconds:.1f} s, and each client's update by least squares.</p>",
        f"<p>The attack declared {esc(s.certain_clients)} of {esc(s.clients)} columns certain "
        f"({len(s.chunks)} chunk(s) of rounds). Per client:</p>",
        _table([e.model_dump() for e in s.per_client]),
    ]
    inverted = [r for r in s.inverted if r.rdlv is not None and r.round is not None]
    if inverted:
        parts.append(
            "<p>Each inverted client's recovered update, attacked as if there had been no "
            "secure aggregation (global model of the middle round it took part in):</p>"
        )
        renderer = _renderer(config)
        for r in inverted:
            parts += _examples_section(
                store.dir,
                renderer,
                [{**r.model_dump(), "num_samples": None}],
                "disaggregation",
                f"client {r.client} from its disaggregated update",
                _audit_metric(config),
            )
        cols = ("client", "round", "rounds_taken_part", *AUDIT_COLUMNS[5:10], "attack_seconds")
        parts.append(_table([{k: r.model_dump().get(k, "") for k in cols} for r in inverted]))
    return "\n".join(parts)


def sweep_summary(
    sweep_dir: Path, level: float | None = None, budget: float | None = None
) -> dict[str, Any]:
    """Per point: final accuracy and each audited client's worst RDLV; and, for a single numeric
    swept key, the recommended value (``report.recommend``). ``level`` and ``budget`` default to
    the sweep config's ``recommendation:`` section."""
    from gradleak.experiments.sweep import read_sweep

    owner = OwnedDir(sweep_dir, "sweep")
    spec = read_sweep(owner)
    points, settings = [], {}
    for p in spec["points"]:
        present = owner.is_dir(p["run_dir"])
        if owner.exists(p["run_dir"]) and not present:
            raise DataError(
                f"{owner.path(p['run_dir'])} is not a directory (a link or a file); the sweep "
                "directory is damaged"
            )
        store = RunStore(sweep_dir / p["run_dir"])
        done = present and store.exists()
        rounds, results = store.read_rows() if done else ([], [])
        audited = [r for r in results if r.get("audited")]
        if done and not settings:
            settings = store.read_config().get("recommendation") or {}
        worst: dict[str, float] = {}
        for r in audited:
            if r.get("rdlv") is not None:  # None: the update was not finite, nothing was attacked
                worst[str(r["client"])] = max(worst.get(str(r["client"]), -np.inf), r["rdlv"])
        points.append(
            {
                "values": p["values"],
                "run_dir": p["run_dir"],
                "rounds": len(rounds),
                "accuracy": rounds[-1]["test_accuracy"] if rounds else float("nan"),
                "rdlv": worst,
            }
        )
    level = settings.get("level", 0.0) if level is None else level
    budget = settings.get("accuracy_budget", 0.05) if budget is None else budget
    out: dict[str, Any] = {
        "keys": spec["keys"],
        "level": level,
        "accuracy_budget": budget,
        "points": points,
    }
    if len(spec["keys"]) == 1 and all(_number(p["values"][spec["keys"][0]]) for p in points):
        key = spec["keys"][0]
        rec = recommend(points, key, level=level, budget=budget)
        out["recommendation"] = {
            **asdict(rec),
            "accuracy_cost": rec.accuracy_cost,
            "verdict": rec.verdict(),
        }
        out["points"] = sorted(points, key=lambda p: p["values"][key])
    return out


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def build_sweep_report(
    sweep_dir: Path, level: float | None = None, budget: float | None = None
) -> Path:
    """Write ``sweep_dir/report/index.html`` with the privacy/utility curve and summary table."""
    owner = _owned(sweep_dir, "sweep")
    summary = sweep_summary(sweep_dir, level, budget)
    out = owner.sub("report")
    parts = []
    rec = summary.get("recommendation")
    if rec:
        parts.append(
            _img(
                figures.privacy_utility(summary["points"], summary["keys"][0], out),
                "privacy utility",
            )
        )
    verdict = (
        esc(rec["verdict"])
        if rec
        else "No recommendation: it needs a single swept key with numeric values."
    )
    rows = [
        {
            **p["values"],
            "rounds": p["rounds"],
            "accuracy": p["accuracy"],
            **{f"rdlv client {c}": v for c, v in p["rdlv"].items()},
            "run": p["run_dir"],
        }
        for p in summary["points"]
    ]
    title = f"gradleak sweep: {sweep_dir.name}"
    body = f"""<h1>{esc(title)}</h1>
<h2>Privacy / utility</h2>
{"".join(parts)}
<p>{verdict}</p>
<h2>Points</h2>
{_table(rows)}
<p>Each run has its own report: <code>RUN/report/index.html</code>.</p>"""
    out.write_text("summary.json", json.dumps(summary, indent=2, default=str))
    out.write_text("index.html", _page(title, body))
    return out.path("index.html")


class _Leak(_Record):
    rdlv: float | None = None
    attack: str | None = None
    round: int | None = None


class _Setting(_Record):
    """One evaluated setting of ``gradleak recommend`` (pareto.json's points)."""

    family: str
    defense: dict[str, Any] | None
    defenses: list[dict[str, Any]] | None = None  # the whole list (older files: [defense])
    key: str | None = None
    strength: str | float | bool | None = None
    holds: bool
    meets_level: bool
    within_budget: bool
    leakage: dict[str, _Leak]
    worst_leakage: float | None
    level: float
    accuracy: float | None
    accuracy_drop: float | None
    epsilon: float | None = None
    rero_bound: float | None = None
    run_dir: str
    pareto: bool
    recommended: bool = False


class _Recommendation(_Setting):
    accuracy_budget: float
    baseline_accuracy: float | None
    baseline_run_dir: str
    evaluated: int
    sentence: str
    reason: str
    skipped: dict[str, str] = {}


class _Pareto(_Record):
    points: list[_Setting]


def _read_record(owner: OwnedDir, rel: str, model: type[_Record]) -> Any:
    """A JSON file of ``owner`` read into ``model``; missing or damaged: one ``DataError``."""
    path = owner.path(rel)
    if not owner.exists(rel):
        raise DataError(
            f"{path} not found: the search has not finished; run gradleak recommend again with "
            "the same --out to continue it"
        )
    try:
        return model.model_validate(parse_json(owner.read_bytes(rel, kind="json"), path))
    except ValidationError as exc:
        raise DataError(
            f"{path} is damaged ({_first_problem(exc)}): run gradleak recommend again to rewrite it"
        ) from None


def _first_problem(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(map(str, err['loc'])) or 'top level'}: {err['msg']}"


def _point_run(owner: OwnedDir, name: str) -> RunStore | None:
    """The run directory ``name`` of a recommendation (one plain name, a real directory), or
    None."""
    try:
        safe_component(name, "run_dir")
    except GradleakError:
        return None
    if not owner.is_dir(name):
        return None
    store = RunStore(owner.root / name)
    return store if store.exists() else None


def _worst_examples(store: RunStore | None, setting: _Setting, client: str, alt: str) -> str:
    """The saved reconstruction of ``client`` in the round of its worst RDLV at ``setting``."""
    leak = setting.leakage.get(client)
    if store is None or leak is None or leak.round is None:
        return "<p>No reconstruction.</p>"
    try:
        config = store.read_config()
        rows = [
            r
            for r in store.read_rows()[1]
            if r["round"] == leak.round and str(r["client"]) == client
        ]
    except DataError as exc:
        return f"<p>Left out: {esc(str(exc).splitlines()[0])}.</p>"
    parts = _examples_section(
        store.dir, _renderer(config), rows, "audit", alt, _audit_metric(config)
    )
    return "".join(parts) or "<p>No saved reconstruction.</p>"


def build_recommend_report(out_dir: Path) -> Path:
    """Write ``out_dir/report/index.html`` for a ``gradleak recommend`` directory: the
    recommendation in one sentence with the section to paste, the leakage/accuracy plot of every
    evaluated setting, the reconstructions with and without the recommended defence, and the
    table of settings."""
    owner = _owned(out_dir, "recommend")
    rec = _read_record(owner, "recommendation.json", _Recommendation)
    points = _read_record(owner, "pareto.json", _Pareto).points
    out = owner.sub("report")
    budget_floor = (
        None if rec.baseline_accuracy is None else rec.baseline_accuracy - rec.accuracy_budget
    )
    plot = _img(
        figures.pareto([p.model_dump() for p in points], rec.level, budget_floor, out),
        "worst leakage against accuracy",
    )
    if rec.defense is not None:
        label = "The section to add" if rec.holds else "The nearest setting (it does not hold)"
        section = (
            f"<h2>{label}</h2>\n<pre>"
            f"{esc(yaml.safe_dump({'defenses': rec.defenses or [rec.defense]}, sort_keys=False))}"
            "</pre>"
        )
    else:
        section = ""
    why = "" if rec.holds else f"<p>Why: {esc(rec.reason)}.</p>"
    base_store = _point_run(owner, rec.baseline_run_dir)
    chosen_store = _point_run(owner, rec.run_dir) if rec.defense is not None else None
    baseline = next((p for p in points if p.family == "none"), None)
    shown = sorted(rec.leakage, key=lambda c: int(c) if c.isdigit() else 0)[:GRID_CLIENTS]
    pairs = []
    if baseline is not None and chosen_store is not None:
        what = "recommended" if rec.holds else "nearest"
        for c in shown:
            pairs.append(
                f"<h3>Client {esc(c)}</h3><div class='side'><div><h4>Without defence</h4>"
                f"{_worst_examples(base_store, baseline, c, f'client {c} without defence')}</div>"
                f"<div><h4>With the {what} setting</h4>"
                f"{_worst_examples(chosen_store, rec, c, f'client {c} with the {what} setting')}"
                "</div></div>"
            )
    table = [
        {
            "family": p.family,
            "setting": "" if p.key is None else f"{p.key} = {p.strength}",
            "worst RDLV": "" if p.worst_leakage is None else p.worst_leakage,
            "accuracy": "" if p.accuracy is None else p.accuracy,
            "accuracy drop": "" if p.accuracy_drop is None else p.accuracy_drop,
            "meets level": p.meets_level,
            "within budget": p.within_budget,
            "Pareto": p.pareto,
            "epsilon": "" if p.epsilon is None else p.epsilon,
            "rero bound": "" if p.rero_bound is None else p.rero_bound,
            "run": p.run_dir,
        }
        for p in points
    ]
    skipped = "".join(f"<li>{esc(k)}: {esc(v)}</li>" for k, v in rec.skipped.items())
    title = f"gradleak recommendation: {out_dir.name}"
    body = f"""<h1>{esc(title)}</h1>
<p><b>{esc(rec.sentence)}</b></p>
{why}
{section}
<h2>Leakage against accuracy</h2>
{plot}
<p>{esc(rec.evaluated)} settings evaluated; a setting holds when every audited client's worst RDLV
(over rounds and attacks) is at most {esc(rec.level)} and its accuracy is within
{esc(100 * rec.accuracy_budget)} points of the run without defence.</p>
{"<h2>Reconstructions</h2>" + "".join(pairs) if pairs else ""}
<h2>Evaluated settings</h2>
{_table(table)}
{f"<p>Families not searched:</p><ul>{skipped}</ul>" if skipped else ""}
<p>Each setting's run has its own report: <code>gradleak report DIR/RUN</code>.</p>"""
    out.write_text("index.html", _page(title, body))
    return out.path("index.html")
