"""Figures of a run, drawn with matplotlib (no display needed) and saved as PNG and SVG.

Every figure keeps a readable size whatever the federation: past ``MAX_LINES`` clients, the
per-client lines become the median and the 10-90% band over the clients (a legend of 1,437
clients would be a figure 15,000 pixels tall).
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib
import numpy as np

from gradleak.rundir import SubDir

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Clients drawn one line each; more are drawn as a band.
MAX_LINES = 12


def save(fig: Any, out: SubDir, stem: str) -> bytes:
    """Write ``stem.png`` and ``stem.svg`` under ``out``; return the PNG's bytes."""
    files = {}
    for fmt in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=120, bbox_inches="tight")
        files[fmt] = buf.getvalue()
        out.write_bytes(f"{stem}.{fmt}", files[fmt])
    plt.close(fig)
    return files["png"]


def _per_client(ax: Any, rows: list[dict[str, Any]], field: str, label: Any) -> None:
    """One line per client of ``field`` over rounds, or, for more than ``MAX_LINES`` clients, the
    median and the 10-90% band over the clients at each round."""
    clients = sorted({r["client"] for r in rows})
    if len(clients) <= MAX_LINES:
        for cid in clients:
            mine = [r for r in rows if r["client"] == cid]
            ax.plot(
                [r["round"] for r in mine],
                [r[field] for r in mine],
                marker="o",
                markersize=3,
                label=label(cid, mine),
            )
        return
    rounds = sorted({r["round"] for r in rows})
    values = [
        np.array([r[field] for r in rows if r["round"] == t], dtype=np.float64) for t in rounds
    ]
    q = np.array(
        [
            np.nanpercentile(v, [10, 50, 90]) if np.isfinite(v).any() else [np.nan] * 3
            for v in values
        ]
    )
    ax.fill_between(rounds, q[:, 0], q[:, 2], alpha=0.3, label=f"10-90% of {len(clients)} clients")
    ax.plot(rounds, q[:, 1], marker="o", markersize=3, label="median")


def accuracy_per_round(rounds: list[dict[str, Any]], out: SubDir) -> bytes:
    """The global model's test accuracy (and loss) after each round."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [r["round"] for r in rounds]
    ax.plot(x, [r["test_accuracy"] for r in rounds], marker="o", color="tab:blue")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy", color="tab:blue")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(x, [r["test_loss"] for r in rounds], color="tab:gray", linestyle="--")
    ax2.set_ylabel("test loss", color="tab:gray")
    ax.set_title("Global model")
    return save(fig, out, "accuracy")


def train_loss_per_client(results: list[dict[str, Any]], out: SubDir) -> bytes:
    """Each client's mean local training loss per round."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    _per_client(ax, results, "train_loss", lambda cid, _: f"client {cid}")
    ax.set_xlabel("round")
    ax.set_ylabel("local training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    ax.set_title("Clients")
    return save(fig, out, "train_loss")


def rdlv_per_round(audited: list[dict[str, Any]], out: SubDir) -> bytes:
    """RDLV per round, one line per audited client; withheld updates marked with a cross."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    audited = [r for r in audited if r.get("rdlv") is not None]
    _per_client(
        ax,
        audited,
        "rdlv",
        lambda cid, rows: f"client {cid} (n={rows[0]['num_samples']}, bs={rows[0]['batch_size']})",
    )
    gated = [r for r in audited if r["withheld"]]
    if gated:
        ax.scatter(
            [r["round"] for r in gated], [r["rdlv"] for r in gated], marker="x", s=80, color="black"
        )
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("RDLV")
    ax.grid(alpha=0.3)
    if audited:
        ax.legend(fontsize="small")
    ax.set_title("Leakage per audited client (x: update withheld)")
    return save(fig, out, "rdlv")


def privacy_utility(points: list[dict[str, Any]], key: str, out: SubDir) -> bytes:
    """RDLV (worst round) against defence strength per client, final test accuracy on a second
    axis."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    xs = [p["values"][key] for p in points]
    rows = [
        {"client": int(c), "round": x, "rdlv": p["rdlv"][c]}
        for p, x in zip(points, xs, strict=True)
        for c in p["rdlv"]
    ]
    order = {x: i for i, x in enumerate(xs)}
    rows.sort(key=lambda r: order[r["round"]])
    _per_client(ax, rows, "rdlv", lambda cid, _: f"client {cid}")
    ax.axhline(0, color="gray", linewidth=0.8)
    positive = [x for x in xs if x > 0]
    if positive and min(xs) >= 0 and max(xs) / min(positive) > 20:  # e.g. sigma0 in 0, 0.5, ..., 50
        ax.set_xscale("symlog", linthresh=min(positive))
    ax.set_xlabel(key)
    ax.set_ylabel("RDLV (worst audited round)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(
        xs,
        [p["accuracy"] for p in points],
        color="black",
        linestyle="--",
        marker="s",
        label="accuracy",
    )
    ax2.set_ylabel("final test accuracy")
    ax2.set_ylim(0, 1)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize="small", loc="upper right")
    ax.set_title("Privacy / utility")
    return save(fig, out, "privacy_utility")


def pareto(points: list[dict[str, Any]], level: float, floor: float | None, out: SubDir) -> bytes:
    """Worst leakage against final accuracy, one colour per family (the run without defence in
    black); the Pareto front joined, the recommended point ringed, the leakage level and the
    accuracy floor of the budget as lines. ``points`` are pareto.json's."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    shown = [
        p for p in points if p.get("worst_leakage") is not None and p.get("accuracy") is not None
    ]
    families = list(dict.fromkeys(p["family"] for p in shown if p["family"] != "none"))
    colours = plt.get_cmap("tab10")
    for i, family in enumerate(families):
        mine = [p for p in shown if p["family"] == family]
        ax.scatter(
            [p["worst_leakage"] for p in mine],
            [p["accuracy"] for p in mine],
            color=colours(i % 10),
            label=family,
            s=30,
            zorder=3,
        )
    base = [p for p in shown if p["family"] == "none"]
    if base:
        ax.scatter(
            [p["worst_leakage"] for p in base],
            [p["accuracy"] for p in base],
            color="black",
            marker="s",
            label="no defence",
            zorder=3,
        )
    front = sorted((p for p in shown if p.get("pareto")), key=lambda p: p["worst_leakage"])
    if len(front) > 1:
        ax.plot(
            [p["worst_leakage"] for p in front],
            [p["accuracy"] for p in front],
            color="gray",
            linewidth=1,
            zorder=2,
            label="Pareto front",
        )
    chosen = [p for p in shown if p.get("recommended")]
    if chosen:
        ax.scatter(
            [p["worst_leakage"] for p in chosen],
            [p["accuracy"] for p in chosen],
            s=220,
            facecolors="none",
            edgecolors="red",
            linewidths=2,
            label="recommended",
            zorder=4,
        )
    ax.axvline(level, color="tab:red", linestyle=":", linewidth=1, label=f"level {level:g}")
    if floor is not None:
        ax.axhline(floor, color="tab:gray", linestyle="--", linewidth=1, label="accuracy budget")
    ax.set_xlabel("worst RDLV (over audited clients, rounds and attacks)")
    ax.set_ylabel("final test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    ax.set_title("Leakage against accuracy, per defence setting")
    return save(fig, out, "pareto")
