"""User data in standard on-disk formats.

- an image folder: ``root/<class name>/<image files>``;
- CIFAR-10 python batches: ``data_batch_1`` ... ``data_batch_5`` and ``test_batch``, read with a
  restricted unpickler that refuses anything but plain containers and numpy arrays;
- the COVID-19 Radiography Database with MONAI-style JSON split lists
  (``{"training": [{"image": "COVID/images/COVID-1.png", "label": [1]}, ...], "testing": [...]}``),
  each path relative to the data root.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gradleak.errors import DataError
from gradleak.resources import check_images_fit
from gradleak.safeio import read_json

log = logging.getLogger("gradleak")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


# Single-channel modes deeper than 8 bits, and the value of full intensity in each: 16-bit
# integers (X-ray PNGs are often 16-bit; PIL's convert("L") would clip them at 255) and 32-bit
# floats, which must already lie in [0, 1].
DEEP_MODES = {
    "I;16": 65535.0,
    "I;16B": 65535.0,
    "I;16L": 65535.0,
    "I;16N": 65535.0,
    "I": 65535.0,
    "F": 1.0,
}


def read_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image file as float32 C x size x size in [0, 1], scaled by its bit depth."""
    if path.exists() and not path.is_file():
        raise DataError(f"image {path} is not a regular file")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.mode in DEEP_MODES:
                    return _read_deep(im, path, size, channels)
                im = im.convert("L" if channels == 1 else "RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (OSError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _read_deep(im: Image.Image, path: Path, size: int, channels: int) -> np.ndarray:
    """A 16-bit or float single-channel image, divided by its full intensity (gray copied to
    every channel when three are asked for)."""
    full = DEEP_MODES[im.mode]
    values = np.asarray(im, dtype=np.float64)
    if values.size and (not np.isfinite(values).all() or values.min() < 0 or values.max() > full):
        raise DataError(
            f"image {path}: {im.mode} values {values.min():g} to {values.max():g} are outside "
            f"0 to {full:g}"
        )
    gray = Image.fromarray((values / full).astype(np.float32), mode="F")
    if gray.size != (size, size):
        gray = gray.resize((size, size), Image.Resampling.BILINEAR)
    g = np.clip(np.asarray(gray, dtype=np.float32), 0.0, 1.0)[None]
    return g if channels == 1 else np.repeat(g, 3, axis=0)


def _stack(paths: list[Path], size: int, channels: int) -> torch.Tensor:
    if not paths:
        return torch.zeros(0, channels, size, size)
    check_images_fit(len(paths), channels, size)
    return torch.from_numpy(np.stack([read_image(p, size, channels) for p in paths]))


def _regular(path: Path) -> bool:
    """Whether ``path`` is a regular file; anything else (a FIFO, a device) is skipped with a
    warning, since opening it can block forever."""
    if path.is_file():
        return True
    if path.exists() and not path.is_dir():
        log.warning("skipping %s: not a regular file", path)
    return False


OPT_IN = "set data.allow_outside_root: true to read it"


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, with '..' and symbolic links resolved, lies under ``root``."""
    return path.resolve().is_relative_to(root.resolve())


def load_image_folder(
    root: Path, size: int, channels: int, allow_outside_root: bool = False
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """One sub-folder per class, classes in sorted order. A file that links outside ``root`` is
    refused unless ``allow_outside_root``."""
    if not root.is_dir():
        raise DataError(f"data root {root} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"data root {root} has no class sub-folders (expected root/<class>/<image>)"
        )
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(
            p
            for p in (root / name).rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and _regular(p)
        )
        for p in files:
            if not allow_outside_root and not _inside(p, root):
                raise DataError(
                    f"image {p} leads outside the data root {root} (a symbolic link): {OPT_IN}"
                )
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"no image files under {root}")
    return _stack(paths, size, channels), torch.tensor(labels, dtype=torch.int64), tuple(classes)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only builtin containers and numpy arrays: a crafted file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # protocol-2 pickles carry array bytes as latin-1 text
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a plain array")


CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 3 x 32 x 32 uint8, labels N int64 in 0..9) of one python batch, or a DataError
    naming the file and what is wrong."""
    if not path.is_file():
        raise DataError(f"CIFAR-10 batch not found: {path}")

    def bad(why: object) -> DataError:
        return DataError(f"{path} is not a CIFAR-10 python batch: {why}")

    try:
        with path.open("rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - a damaged pickle fails in many ways; none is ours
        raise bad(f"{type(exc).__name__}: {exc}") from None
    if not isinstance(d, dict):
        raise bad(f"holds a {type(d).__name__}, not a dict")
    d = {k.decode(errors="replace") if isinstance(k, bytes) else k: v for k, v in d.items()}
    raw_labels = d.get("labels", d.get("fine_labels"))
    if "data" not in d or raw_labels is None:
        raise bad("no 'data' and 'labels' entries")
    try:
        data = np.asarray(d["data"])
        labels = np.asarray(raw_labels)
    except Exception as exc:  # noqa: BLE001 - ragged or exotic contents
        raise bad(f"{type(exc).__name__}: {exc}") from None
    if data.dtype != np.uint8 or data.size % (3 * 32 * 32) or data.size == 0:
        raise bad(f"'data' is {data.dtype} of {data.size} values, not uint8 rows of 3 x 32 x 32")
    data = data.reshape(-1, 3, 32, 32)
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise bad(
            f"'labels' must be {len(data)} integers, one per image (got {labels.dtype}, shape "
            f"{labels.shape})"
        )
    if labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES):
        raise bad(f"labels must be class indices 0 to {len(CIFAR10_CLASSES) - 1}")
    return data, labels.astype(np.int64)


def load_cifar10(
    root: Path,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], tuple[str, ...]]:
    """(train, test, classes) from ``root`` holding the python batches (or their parent folder)."""
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    if not root.is_dir():
        raise DataError(f"data root {root} is not a directory")
    train_files = sorted(root.glob("data_batch_*"))
    if not train_files:
        raise DataError(f"no data_batch_* files in {root}")
    parts = [_read_cifar_batch(p) for p in train_files]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _read_cifar_batch(root / "test_batch")

    def to_t(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(x.astype(np.float32) / 255.0), torch.from_numpy(y)

    return to_t(x_tr, y_tr), to_t(x_te, y_te), CIFAR10_CLASSES


# Class indices above this are refused: a typo there would size every per-class array.
MAX_CLASSES = 10_000


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _label_of(raw: Any, where: str) -> int:
    """A MONAI-style label: an int, ``[k]`` (class index) or a one-hot list of 0/1 integers."""
    k = None
    if _is_int(raw):
        k = raw
    elif isinstance(raw, list) and len(raw) == 1 and _is_int(raw[0]):
        k = raw[0]
    elif (
        isinstance(raw, list)
        and raw
        and all(_is_int(v) and v in (0, 1) for v in raw)
        and sum(raw) == 1
    ):
        k = raw.index(1)
    if k is None:
        raise DataError(
            f"{where}: cannot read label {raw!r} (use an integer k, [k] or a one-hot list of 0/1 "
            "integers)"
        )
    if not 0 <= k < MAX_CLASSES:
        raise DataError(f"{where}: label {k} is not a class index from 0 to {MAX_CLASSES - 1}")
    return k


def _image_path(raw: Any, root: Path, where: str, allow_outside_root: bool = False) -> Path:
    """A split list's image path, relative to the data root; unless ``allow_outside_root``, it must
    be relative and stay inside the root once resolved (no '..' or symbolic link out of it)."""
    if not isinstance(raw, str) or not raw:
        raise DataError(f"{where}: image must be a path string, got {raw!r}")
    path = root / raw
    if not allow_outside_root and (Path(raw).is_absolute() or not _inside(path, root)):
        raise DataError(f"{where}: image {raw!r} is outside the data root {root}: {OPT_IN}")
    return path


def read_split_list(
    split_file: Path, root: Path, allow_outside_root: bool = False
) -> dict[str, tuple[list[Path], list[int]]]:
    """The JSON split lists as ``{split: (paths, labels)}``, paths resolved under ``root``."""
    if not split_file.is_file():
        raise DataError(f"split file not found: {split_file}")
    spec = read_json(split_file)
    if not isinstance(spec, dict):
        raise DataError(f"{split_file}: expected an object with 'training' and 'testing' lists")
    out = {}
    for split, items in spec.items():
        if not isinstance(items, list):
            continue
        paths, labels = [], []
        for i, item in enumerate(items):
            where = f"{split_file.name}: {split}[{i}]"
            if not isinstance(item, dict) or "image" not in item or "label" not in item:
                raise DataError(f"{where}: expected {{'image': path, 'label': [k]}}")
            paths.append(_image_path(item["image"], root, where, allow_outside_root))
            labels.append(_label_of(item["label"], where))
        out[split] = (paths, labels)
    return out


def load_split_list(
    split_file: Path,
    root: Path,
    size: int,
    channels: int,
    test_split: str,
    allow_outside_root: bool = False,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, test) from the ``training`` list and the ``test_split`` list."""
    if not root.is_dir():
        raise DataError(f"data root {root} is not a directory")
    splits = read_split_list(split_file, root, allow_outside_root)
    for name in ("training", test_split):
        if name not in splits or not splits[name][0]:
            raise DataError(
                f"{split_file}: no '{name}' list (found: {', '.join(splits) or 'none'})"
            )
    (p_tr, y_tr), (p_te, y_te) = splits["training"], splits[test_split]
    return (
        (_stack(p_tr, size, channels), torch.tensor(y_tr, dtype=torch.int64)),
        (_stack(p_te, size, channels), torch.tensor(y_te, dtype=torch.int64)),
    )
