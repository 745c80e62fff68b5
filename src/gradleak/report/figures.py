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


def rdlv_per_round(audited: list[dict[str, Any]], out_dir: Path) -> Path:
    """RDLV per round, one line per audited client; withheld updates marked with a cross."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    audited = [r for r in audited if r.get("rdlv") is not None]
    for cid in sorted({r["client"] for r in audited}):
        rows = [r for r in audited if r["client"] == cid]
        (line,) = ax.plot([r["round"] for r in rows], [r["rdlv"] for r in rows], marker="o",
                          label=f"client {cid} (n={rows[0]['num_samples']}, bs={rows[0]['batch_size']})")  # fmt: skip
        gated = [r for r in rows if r["withheld"]]
        if gated:
            ax.scatter([r["round"] for r in gated], [r["rdlv"] for r in gated], marker="x", s=80,
                       color=line.get_color())  # fmt: skip
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("RDLV")
    ax.grid(alpha=0.3)
    if audited:
        ax.legend(fontsize="small")
    ax.set_title("Leakage per audited client (x: update withheld)")
    return save(fig, out_dir, "rdlv")


def audit_grid(cid: int, rows: list[dict[str, Any]], images: list[dict[str, Any]], out_dir: Path,
               stem: str = "audit") -> Path:  # fmt: skip
    """Original | start | best reconstruction for one client's audited rounds (first image);
    written as ``STEM_client_CID``."""
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(4.2, 1.5 * n + 0.4), squeeze=False)
    for i, (row, img) in enumerate(zip(rows, images, strict=True)):
        for j, key in enumerate(("originals", "priors", "reconstructions")):
            a = img[key][0]
            ax = axes[i][j]
            ax.imshow(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(("original", "start", "reconstruction")[j], fontsize=8)
        axes[i][0].set_ylabel(f"round {row['round']}", fontsize=8)
        ssim, psnr = row.get("ssim"), row.get("psnr")
        if ssim is not None and psnr is not None:
            axes[i][2].set_xlabel(f"SSIM {ssim:.2f}, PSNR {psnr:.1f}", fontsize=7)
    fig.suptitle(f"client {cid}", fontsize=9)
    return save(fig, out_dir, f"{stem}_client_{cid}")


def privacy_utility(points: list[dict[str, Any]], key: str, out_dir: Path) -> Path:
    """RDLV (worst round) against defence strength per client, final test accuracy on a second axis."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    xs = [p["values"][key] for p in points]
    clients = sorted({c for p in points for c in p["rdlv"]}, key=int)
    for c in clients:
        ax.plot(xs, [p["rdlv"].get(c, float("nan")) for p in points], marker="o", label=f"client {c}")
    ax.axhline(0, color="gray", linewidth=0.8)
    positive = [x for x in xs if x > 0]
    if positive and min(xs) >= 0 and max(xs) / min(positive) > 20:  # e.g. sigma0 in 0, 0.5, ..., 50
        ax.set_xscale("symlog", linthresh=min(positive))
    ax.set_xlabel(key)
    ax.set_ylabel("RDLV (worst audited round)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(xs, [p["accuracy"] for p in points], color="black", linestyle="--", marker="s", label="accuracy")
    ax2.set_ylabel("final test accuracy")
    ax2.set_ylim(0, 1)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize="small", loc="upper right")
    ax.set_title("Privacy / utility")
    return save(fig, out_dir, "privacy_utility")
