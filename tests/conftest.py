"""Small data fixtures in each supported on-disk format, generated on the fly."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """root/cat/*.png and root/dog/*.png: 6 and 4 RGB 20 x 20 images."""
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for cls, n in (("cat", 6), ("dog", 4)):
        for i in range(n):
            _write_png(root / cls / f"{i}.png", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    return root


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    """Two python training batches of 5 images and a test batch of 4, as CIFAR-10 pickles them."""
    rng = np.random.default_rng(1)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name, n in (("data_batch_1", 5), ("data_batch_2", 5), ("test_batch", 4)):
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"{i}.png".encode() for i in range(n)],
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    return tmp_path


@pytest.fixture
def split_list(tmp_path: Path) -> tuple[Path, Path]:
    """A COVID-19 Radiography-style tree with MONAI-style JSON split lists: (root, split file)."""
    rng = np.random.default_rng(2)
    root = tmp_path / "COVID-19_Radiography_Dataset"
    spec: dict[str, list] = {"training": [], "validation": [], "testing": []}
    counts = {"training": 8, "validation": 2, "testing": 4}
    for split, n in counts.items():
        for i in range(n):
            cls, label = ("COVID", 1) if i % 2 else ("Normal", 0)
            rel = f"{cls}/images/{cls}-{split}-{i}.png"
            _write_png(root / rel, rng.integers(0, 256, (30, 30), dtype=np.uint8))
            spec[split].append({"image": rel, "label": [label]})
    split_file = tmp_path / "splits.json"
    split_file.write_text(json.dumps(spec))
    return root, split_file
