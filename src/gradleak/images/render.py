"""The image modality's one renderer: rows of images with a caption each, as a PNG grid (beside an
audit's images, and embedded in reports)."""

from __future__ import annotations

import base64
import html
import io

import numpy as np
import torch
from PIL import Image, ImageDraw

from gradleak.modality import RENDERERS, Renderer, Rows

# At most this many images per row: a batch of 1,024 would otherwise be a PNG 135,000 pixels wide.
MAX_CELLS = 16
# A cell's longer side at most (larger images are shrunk to it): a 3,000-pixel image would
# otherwise make a 180-megapixel grid.
MAX_CELL_PIXELS = 256


def grid_png(rows: list[tuple[str, torch.Tensor]], scale: int = 4) -> bytes:
    """Rows of N x C x H x W images in [0, 1] side by side (the first ``MAX_CELLS`` of each),
    each row captioned, as a PNG file's bytes; each image magnified ``scale`` times, or shrunk
    to ``MAX_CELL_PIXELS`` on its longer side."""
    total = max(len(imgs) for _, imgs in rows)
    cells = min(total, MAX_CELLS)
    _, c, h, w = rows[0][1].shape
    fit = min(scale, MAX_CELL_PIXELS / max(h, w))
    hs, ws, pad, cap = max(1, round(h * fit)), max(1, round(w * fit)), 4, 14
    resample = Image.Resampling.NEAREST if fit >= 1 else Image.Resampling.BOX
    canvas = Image.new(
        "RGB", (cells * (ws + pad) + pad, len(rows) * (hs + pad + cap) + pad), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for r, (caption, imgs) in enumerate(rows):
        y = pad + r * (hs + pad + cap)
        shown = f" ({cells} of {len(imgs)})" if len(imgs) > cells else ""
        draw.text((pad, y), caption + shown, fill="black")
        for i, img in enumerate(imgs[:cells]):
            arr = (img.detach().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(arr[..., 0] if c == 1 else arr).convert("RGB")
            canvas.paste(tile.resize((ws, hs), resample), (pad + i * (ws + pad), y + cap))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def grid_html(rows: Rows, alt: str) -> str:
    """The grid embedded in a report page (a data: URL, the only kind of image the page allows)."""
    data = base64.b64encode(grid_png(list(rows))).decode()
    alt = html.escape(alt, quote=True)
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"></figure>'


def shows(array: np.ndarray) -> bool:
    """A batch of images this renderer can show: N x C x H x W floats, C 1 or 3."""
    return (
        array.ndim == 4
        and len(array) > 0
        and array.shape[1] in (1, 3)
        and np.issubdtype(array.dtype, np.floating)
    )


RENDERERS.register("image")(Renderer("png", lambda rows: grid_png(list(rows)), grid_html, shows))
