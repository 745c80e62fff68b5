"""A self-contained HTML report of a run: figures embedded, opens offline."""

from __future__ import annotations

import base64
import html
import json
import zipfile
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from gradleak.errors import GradleakError
from gradleak.experiments.store import RunStore
from gradleak.report import figures
from gradleak.report.recommend import recommend


def _img(png: Path, alt: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>No rows.</p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}
figure{display:inline-block;margin:0 1em 1em 0}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}
"""


def build_run_report(run_dir: Path) -> Path:
    """Write ``run_dir/report/index.html`` (and its PNG/SVG figures); return the page's path."""
    store = RunStore(run_dir)
    if not store.exists():
        raise GradleakError(f"{run_dir} is not a run directory (no config.yaml)")
    rounds, results = store.read_rows()
    config = store.read_config()
    out = run_dir / "report"
    figs = []
    if rounds:
        figs.append(_img(figures.accuracy_per_round(rounds, out), "test accuracy per round"))
    if results:
        figs.append(_img(figures.train_loss_per_client(results, out), "training loss per client"))
    final = f"{rounds[-1]['test_accuracy']:.4f} after round {rounds[-1]['round']}" if rounds else "none yet"
    name = html.escape(str(config.get("name") or run_dir.name))
    audit = _audit_section(run_dir, results, out) + _disaggregation_section(run_dir, out)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gradleak report: {name}</title>
<style>{STYLE}</style></head><body>
<h1>gradleak report: {name}</h1>
<p>Run directory: <code>{html.escape(str(run_dir))}</code>. Final test accuracy: {final}.</p>
<h2>Training</h2>
{''.join(figs)}
{audit}
<h2>Rounds</h2>
{_table(rounds)}
<h2>Clients per round</h2>
{_table(results)}
<h2>Config</h2>
<pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>
</body></html>
"""
    path = out / "index.html"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path


# Columns of the audited-row table, in this order.
AUDIT_COLUMNS = ("round", "client", "num_samples", "batch_size", "rdlv", "ssim", "psnr", "mse",
                 "label_accuracy", "label_strategy", "withheld", "defenses", "attack_seconds")  # fmt: skip
# At most this many rounds per client in the image grids (evenly spaced, last included).
GRID_ROUNDS = 8


def _audit_section(run_dir: Path, results: list[dict[str, Any]], out: Path) -> str:
    audited = [r for r in results if r.get("audited")]
    if not audited:
        return ""
    parts = ["<h2>Leakage audit</h2>", _img(figures.rdlv_per_round(audited, out), "RDLV per round")]
    for cid in sorted({r["client"] for r in audited}):
        rows = [r for r in audited if r["client"] == cid and r.get("rdlv") is not None]
        if not rows:
            continue
        pick = sorted({round(i * (len(rows) - 1) / max(1, GRID_ROUNDS - 1)) for i in range(GRID_ROUNDS)})
        rows = [rows[i] for i in pick if i < len(rows)]
        files = [run_dir / "audit" / f"round_{r['round']:04d}" / f"client_{cid}.npz" for r in rows]
        loaded = [(r, f, _audit_images(f)) for r, f in zip(rows, files, strict=True) if f.exists()]
        for _, f, images in loaded:
            if images is None:
                parts.append(f"<p>Left out: <code>{html.escape(str(f))}</code> is damaged (not the originals, "
                             "start and reconstructions of an audit).</p>")  # fmt: skip
        kept = [(r, images) for r, _, images in loaded if images is not None]
        if kept:
            grid = figures.audit_grid(cid, [r for r, _ in kept], [i for _, i in kept], out)
            parts.append(_img(grid, f"original, start and reconstruction of client {cid}"))
    table = [{k: r.get(k, "") for k in AUDIT_COLUMNS} for r in audited]
    parts += ["<h3>Audited updates</h3>", _table(table)]
    return "\n".join(parts)


AUDIT_IMAGES = ("originals", "priors", "reconstructions")


def _audit_images(path: Path) -> dict[str, np.ndarray] | None:
    """An audit's saved images (N x C x H x W, C 1 or 3, the same shape each), or None when the file
    is damaged or holds something else; never unpickles."""
    try:
        with np.load(path, allow_pickle=False) as f:
            images = {k: f[k] for k in AUDIT_IMAGES}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
        return None
    shapes = {a.shape for a in images.values()}
    a = images["originals"]
    if len(shapes) != 1 or a.ndim != 4 or len(a) == 0 or a.shape[1] not in (1, 3) or \
            not all(np.issubdtype(v.dtype, np.floating) for v in images.values()):  # fmt: skip
        return None
    return images


def _disaggregation_section(run_dir: Path, out: Path) -> str:
    """The secure-sum chain: participation recovered from the round sums, then the inversion of
    chosen clients' recovered updates (``RUN/disaggregation/summary.json``)."""
    path = run_dir / "disaggregation" / "summary.json"
    if not path.exists():
        return ""
    s = json.loads(path.read_text())
    verdict = ("recovered <b>exactly</b>" if s["participation_exact"]
               else f"<b>not</b> recovered exactly ({s['wrong_entries']} wrong entries)")  # fmt: skip
    parts = [
        "<h2>Secure aggregation: gradient disaggregation</h2>",
        f"<p>The server saw only the sum of each of {s['rounds']} rounds ({s['dimensions']} values) and, "
        f"per window of {s['window']} rounds, how often each of the {s['clients']} clients took part. "
        f"From these, the participation matrix was {verdict} ({s['clients_exact']} of {s['clients']} "
        f"clients exact) in {s['seconds']:.1f} s, and each client's update by least squares.</p>",
    ]
    if "per_client" in s:  # the attack's own verdict, which it reaches without the truth
        parts.append(f"<p>The attack declared {s['certain_clients']} of {s['clients']} columns certain "
                     f"({len(s['chunks'])} chunk(s) of rounds). Per client:</p>")
        cols = ("client", "exact", "certain", "separation", "gap_ratio", "rounds_taken_part", "methods", "reason")
        parts.append(_table([{k: r.get(k, "") for k in cols} for r in s["per_client"]]))
    inverted = [r for r in s["inverted"] if "rdlv" in r]
    if inverted:
        parts.append("<p>Each inverted client's recovered update, attacked as if there had been no "
                     "secure aggregation (global model of the middle round it took part in):</p>")
        for r in inverted:
            f = run_dir / "disaggregation" / f"round_{r['round']:04d}" / f"client_{r['client']}.npz"
            if f.exists() and (images := _audit_images(f)) is not None:
                grid = figures.audit_grid(r["client"], [r], [images], out, stem="disaggregated")
                parts.append(_img(grid, f"client {r['client']} from its disaggregated update"))
        cols = ("client", "round", "rounds_taken_part", *AUDIT_COLUMNS[4:9], "attack_seconds")
        parts.append(_table([{k: r.get(k, "") for k in cols} for r in inverted]))
    return "\n".join(parts)


def sweep_summary(sweep_dir: Path, level: float | None = None, budget: float | None = None) -> dict[str, Any]:
    """Per point: final accuracy and each audited client's worst RDLV; and, for a single numeric
    swept key, the recommended value (``report.recommend``). ``level`` and ``budget`` default to
    the sweep config's ``recommendation:`` section."""
    from gradleak.experiments.sweep import read_sweep

    spec = read_sweep(sweep_dir)
    points, settings = [], {}
    for p in spec["points"]:
        store = RunStore(sweep_dir / p["run_dir"])
        rounds, results = store.read_rows() if store.exists() else ([], [])
        audited = [r for r in results if r.get("audited")]
        if store.exists() and not settings:
            settings = store.read_config().get("recommendation") or {}
        worst: dict[str, float] = {}
        for r in audited:
            if r.get("rdlv") is not None:  # None: the update was not finite, nothing was attacked
                worst[str(r["client"])] = max(worst.get(str(r["client"]), -np.inf), r["rdlv"])
        points.append({"values": p["values"], "run_dir": p["run_dir"], "rounds": len(rounds),
                       "accuracy": rounds[-1]["test_accuracy"] if rounds else float("nan"),
                       "rdlv": worst})  # fmt: skip
    level = settings.get("level", 0.0) if level is None else level
    budget = settings.get("accuracy_budget", 0.05) if budget is None else budget
    out: dict[str, Any] = {"keys": spec["keys"], "level": level, "accuracy_budget": budget, "points": points}
    if len(spec["keys"]) == 1 and all(isinstance(p["values"][spec["keys"][0]], int | float) for p in points):
        key = spec["keys"][0]
        rec = recommend(points, key, level=level, budget=budget)
        out["recommendation"] = {**asdict(rec), "accuracy_cost": rec.accuracy_cost, "verdict": rec.verdict()}
        out["points"] = sorted(points, key=lambda p: p["values"][key])
    return out


def build_sweep_report(sweep_dir: Path, level: float | None = None, budget: float | None = None) -> Path:
    """Write ``sweep_dir/report/index.html`` with the privacy/utility curve and summary table."""
    summary = sweep_summary(sweep_dir, level, budget)
    out = sweep_dir / "report"
    parts = []
    if len(summary["keys"]) == 1 and "points" in summary:
        key = summary["keys"][0]
        if all(isinstance(p["values"][key], int | float) for p in summary["points"]):
            parts.append(_img(figures.privacy_utility(summary["points"], key, out), "privacy utility"))
    rec = summary.get("recommendation")
    verdict = (html.escape(rec["verdict"]) if rec else
               "No recommendation: it needs a single swept key with numeric values.")  # fmt: skip
    rows = [{**{k: v for k, v in p["values"].items()}, "rounds": p["rounds"], "accuracy": p["accuracy"],
             **{f"rdlv client {c}": v for c, v in p["rdlv"].items()}, "run": p["run_dir"]}
            for p in summary["points"]]  # fmt: skip
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gradleak sweep: {html.escape(sweep_dir.name)}</title>
<style>{STYLE}</style></head><body>
<h1>gradleak sweep: {html.escape(sweep_dir.name)}</h1>
<h2>Privacy / utility</h2>
{''.join(parts)}
<p>{verdict}</p>
<h2>Points</h2>
{_table(rows)}
<p>Each run has its own report: <code>RUN/report/index.html</code>.</p>
</body></html>
"""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    path = out / "index.html"
    path.write_text(page)
    return path
