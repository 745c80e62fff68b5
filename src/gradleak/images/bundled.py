"""Real data that ships inside installed packages (never downloaded).

- ``digits``: scikit-learn's 1,797 handwritten digits, 8 x 8, ten classes.
- ``faces``: scikit-image's LFW subset, 200 grayscale 25 x 25 images; the first 100 are faces,
  the last 100 are not (a binary task, like COVID/normal chest X-rays).
- ``tiles``: RGB tiles cut from scikit-image's colour photographs, labelled by photograph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gradleak.errors import DataError

# Colour photographs that scikit-image installs with itself (no fetcher involved).
PHOTOS: dict[str, str] = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "hubble": "hubble_deep_field.jpg",
    "ihc": "ihc.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
    "motorcycle": "motorcycle_left.png",
}


def load_digits() -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Images 1 x 8 x 8 in [0, 1] and labels 0-9."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    return images, torch.from_numpy(d.target.astype(np.int64)), tuple(str(i) for i in range(10))


def load_faces() -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Images 1 x 25 x 25 in [0, 1]; label 1 for the 100 faces, 0 for the 100 non-faces."""
    from skimage.data import lfw_subset

    x = lfw_subset().astype(np.float32)
    labels = np.r_[np.ones(100, dtype=np.int64), np.zeros(100, dtype=np.int64)]
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(labels), ("non-face", "face")


def _photo_path(name: str) -> Path:
    import skimage.data

    if name not in PHOTOS:
        raise DataError(f"unknown photograph {name!r} (bundled: {', '.join(PHOTOS)})")
    path = Path(skimage.data.data_dir) / PHOTOS[name]
    if not path.is_file():
        raise DataError(f"scikit-image's photograph {name!r} is not installed at {path}")
    return path


def load_tiles(
    photos: list[str],
    size: int,
    stride: int,
    max_per_photo: int | None,
    seed: int,
    scale: float = 1.0,
    min_std: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Square ``size`` tiles every ``stride`` pixels of the photographs resized by ``scale`` (1: the
    native resolution), leaving out tiles whose pixels vary less than ``min_std`` (flat sky).

    When a photograph yields more than ``max_per_photo`` tiles, a seeded random subset is kept,
    which keeps the classes roughly balanced.
    """
    from skimage.io import imread
    from skimage.transform import rescale

    from gradleak.seeding import numpy_rng

    all_tiles, all_labels = [], []
    for label, name in enumerate(photos):
        img = imread(_photo_path(name))[..., :3].astype(np.float32) / 255.0
        if scale != 1.0:
            img = rescale(img, scale, channel_axis=-1, anti_aliasing=scale < 1).astype(np.float32)
        h, w = img.shape[:2]
        ys = range(0, h - size + 1, stride)
        xs = range(0, w - size + 1, stride)
        tiles = np.stack([img[y : y + size, x : x + size] for y in ys for x in xs])
        tiles = tiles[tiles.std(axis=(1, 2, 3)) >= min_std]
        if not len(tiles):
            raise DataError(
                f"photograph {name!r} has no {size} x {size} tile varying by {min_std} or more"
            )
        if max_per_photo is not None and len(tiles) > max_per_photo:
            keep = numpy_rng(seed, "tiles", name).choice(len(tiles), max_per_photo, replace=False)
            tiles = tiles[np.sort(keep)]
        all_tiles.append(tiles)
        all_labels.append(np.full(len(tiles), label, dtype=np.int64))
    images = torch.from_numpy(np.concatenate(all_tiles)).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(np.concatenate(all_labels)), tuple(photos)
