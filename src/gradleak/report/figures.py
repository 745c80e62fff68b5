"""Figures of a run, drawn with matplotlib (no display needed) and saved as PNG and SVG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save(fig: Any, out_dir: Path, stem: str) -> Path:
    """Write ``stem.png`` and ``stem.svg``; return the PNG path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{stem}.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    fig.savefig(out_dir / f"{stem}.svg", bbox_inches="tight")
    plt.close(fig)
    return png


def accuracy_per_round(rounds: list[dict[str, Any]], out_dir: Path) -> Path:
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
    return save(fig, out_dir, "accuracy")


def train_loss_per_client(results: list[dict[str, Any]], out_dir: Path) -> Path:
    """Each client's mean local training loss per round."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for cid in sorted({r["client"] for r in results}):
        rows = [r for r in results if r["client"] == cid]
        ax.plot([r["round"] for r in rows], [r["train_loss"] for r in rows], label=f"client {cid}")
    ax.set_xlabel("round")
    ax.set_ylabel("local training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    ax.set_title("Clients")
    return save(fig, out_dir, "train_loss")
