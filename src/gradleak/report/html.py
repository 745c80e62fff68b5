"""A self-contained HTML report of a run: figures embedded, opens offline."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import yaml

from gradleak.errors import GradleakError
from gradleak.experiments.store import RunStore
from gradleak.report import figures


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
    rounds, results = store.rounds.read(), store.results.read()
    config = store.read_config()
    out = run_dir / "report"
    figs = []
    if rounds:
        figs.append(_img(figures.accuracy_per_round(rounds, out), "test accuracy per round"))
    if results:
        figs.append(_img(figures.train_loss_per_client(results, out), "training loss per client"))
    final = f"{rounds[-1]['test_accuracy']:.4f} after round {rounds[-1]['round']}" if rounds else "none yet"
    name = html.escape(str(config.get("name", run_dir.name)))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gradleak report: {name}</title>
<style>{STYLE}</style></head><body>
<h1>gradleak report: {name}</h1>
<p>Run directory: <code>{html.escape(str(run_dir))}</code>. Final test accuracy: {final}.</p>
<h2>Training</h2>
{''.join(figs)}
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
