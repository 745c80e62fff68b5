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


@pytest.fixture
def saved_update(tmp_path: Path) -> list[str]:
    """``gradleak attack`` arguments for a saved LeNet global model, one client's update (one SGD
    step on two 16 x 16 images) and its metadata."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from gradleak.images import ImageSpec
    from gradleak.models.registry import build_model

    torch.manual_seed(0)
    model = build_model("lenet", spec=ImageSpec.square(1, 16), num_classes=10)
    grads = torch.autograd.grad(
        F.cross_entropy(model(torch.rand(2, 1, 16, 16)), torch.tensor([3, 7])),
        list(model.parameters()),
    )
    save_file(
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        str(tmp_path / "global.safetensors"),
    )
    save_file(
        {k: -0.1 * g for (k, _), g in zip(model.named_parameters(), grads, strict=True)},
        str(tmp_path / "update.safetensors"),
    )
    meta = {
        "num_images": 2,
        "image_shape": [1, 16, 16],
        "num_classes": 10,
        "lr": 0.1,
        "local_steps": 1,
        "batch_size": 2,
        "mean": [0.5],
        "std": [0.25],
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return [
        "--model",
        "lenet",
        "--global",
        str(tmp_path / "global.safetensors"),
        "--update",
        str(tmp_path / "update.safetensors"),
        "--meta",
        str(tmp_path / "meta.json"),
    ]


# Text: a small Faker corpus, its offline tokenizer, and batches of its notes (imported lazily, so
# that image tests never load transformers).
TEXT_VOCAB = 2000


@pytest.fixture(scope="session")
def text_data():
    """The bundled Faker source, small: 400 notes of 16 tokens, a 2,000-token BPE, 4 canaries."""
    from gradleak.text.sources import FakerTextSource

    return FakerTextSource(size=400, seq_len=16, vocab_size=TEXT_VOCAB, canaries=4).load(0)


@pytest.fixture(scope="session")
def notes(text_data):
    """notes(n, seq_len, start=0, task="causal-lm", bos=False) -> n x seq_len token ids of Faker
    notes (end token appended; [CLS] ... [SEP] for classification), with the data's tokenizer."""
    from gradleak.text.corpus import faker_records
    from gradleak.text.sources import encode

    records = faker_records(300, seed=1, sentences=4)
    vocab = text_data.spec.vocab

    def make(n: int, seq_len: int, *, start: int = 0, task: str = "causal-lm", bos: bool = False):
        texts = [r.text for r in records[start : start + n]]
        ids, kept = encode(vocab, texts, seq_len=seq_len, task=task, bos=bos)
        assert len(kept) == n
        return ids

    return make
