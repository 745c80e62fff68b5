"""Image grids as PNG files (rows of images with a caption per row)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def save_grid(rows: list[tuple[str, torch.Tensor]], path: Path, scale: int = 4) -> Path:
    """Write rows of N x C x H x W images in [0, 1] side by side, each row captioned."""
    cells = max(len(imgs) for _, imgs in rows)
    _, c, h, w = rows[0][1].shape
    hs, ws, pad, cap = h * scale, w * scale, 4, 14
    canvas = Image.new("RGB", (cells * (ws + pad) + pad, len(rows) * (hs + pad + cap) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (caption, imgs) in enumerate(rows):
        y = pad + r * (hs + pad + cap)
        draw.text((pad, y), caption, fill="black")
        for i, img in enumerate(imgs):
            arr = (img.detach().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(arr[..., 0] if c == 1 else arr).convert("RGB")
            canvas.paste(tile.resize((ws, hs), Image.Resampling.NEAREST), (pad + i * (ws + pad), y + cap))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
