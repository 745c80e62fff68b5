"""Data sources, formats and partitions."""

from __future__ import annotations

import json
import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from gradleak.data.dataset import Dataset, stratified_split
from gradleak.data.partition import DirichletPartition, ExplicitPartition, IIDPartition
from gradleak.errors import ConfigError, DataError
from gradleak.images import formats
from gradleak.images.sources import (
    Cifar10Source,
    DigitsSource,
    FacesSource,
    ImageFolderSource,
    SplitListSource,
    TilesSource,
)
from gradleak.seeding import derive_seed


def test_digits_are_sklearns_digits_split_by_class() -> None:
    from sklearn.datasets import load_digits

    b = DigitsSource(image_size=8).load(seed=0)
    assert b.spec.shape == (1, 8, 8) and b.num_classes == 10
    assert len(b.train) + len(b.test) == 1797
    # At native size the images are exactly sklearn's pixels / 16.
    sk = load_digits()
    all_imgs = torch.cat([b.train.examples, b.test.examples]).flatten(1).numpy()
    assert np.allclose(np.sort(all_imgs.sum(1)), np.sort(sk.data.sum(1) / 16.0), atol=1e-4)
    # Every class keeps ~20% of its images for testing.
    for c in range(10):
        n_c = int((sk.target == c).sum())
        assert int((b.test.targets == c).sum()) == round(0.2 * n_c)


def test_digits_upsampled_stay_in_unit_range() -> None:
    b = DigitsSource(image_size=32).load(seed=0)
    assert b.spec.shape == (1, 32, 32)
    assert float(b.train.examples.min()) >= 0.0 and float(b.train.examples.max()) <= 1.0


def test_faces_are_the_lfw_subset_with_binary_labels() -> None:
    from skimage.data import lfw_subset

    b = FacesSource(image_size=25, test_fraction=0.25).load(seed=3)
    assert b.classes == ("non-face", "face") and b.spec.shape == (1, 25, 25)
    assert len(b.train) == 150 and len(b.test) == 50
    assert int(b.test.targets.sum()) == 25  # stratified: half of the held-out images are faces
    faces = torch.from_numpy(lfw_subset()[:100].astype(np.float32))
    face_train = b.train.examples[b.train.targets == 1][:, 0]
    # Each training face is one of the first 100 LFW images.
    d = (face_train[:, None] - faces[None]).abs().flatten(2).amax(2).amin(1)
    assert float(d.max()) < 1e-6


def test_tiles_are_cut_from_the_photographs() -> None:
    from skimage import data

    b = TilesSource(image_size=32, photos=["astronaut", "coffee"], max_per_photo=None).load(seed=0)
    assert b.classes == ("astronaut", "coffee") and b.spec.shape == (3, 32, 32)
    assert len(b.train) + len(b.test) == 16 * 16 + 12 * 18  # 512x512 and 400x600 photos
    astro = torch.from_numpy(data.astronaut().astype(np.float32) / 255).permute(2, 0, 1)
    tile = b.train.examples[b.train.targets == 0][0]
    # The tile occurs in the photograph at a multiple of 32.
    hits = [
        (y, x)
        for y in range(0, 512, 32)
        for x in range(0, 512, 32)
        if torch.equal(astro[:, y : y + 32, x : x + 32], tile)
    ]
    assert len(hits) == 1


def test_tiles_cap_and_unknown_photo() -> None:
    b = TilesSource(image_size=16, photos=["chelsea", "rocket"], max_per_photo=50).load(seed=0)
    assert len(b.train) + len(b.test) == 100
    with pytest.raises(DataError, match="unknown photograph 'nope'"):
        TilesSource(photos=["chelsea", "nope"]).load(seed=0)


def test_image_folder(image_folder) -> None:
    b = ImageFolderSource(root=image_folder, image_size=16, test_fraction=0.5).load(seed=0)
    assert b.classes == ("cat", "dog") and b.spec.shape == (3, 16, 16)
    assert len(b.train) == 5 and len(b.test) == 5
    g = ImageFolderSource(root=image_folder, image_size=20, channels=1).load(seed=0)
    assert g.spec.shape == (1, 20, 20)
    # Grayscale conversion is PIL's luma of the file.
    ref = (
        np.asarray(Image.open(image_folder / "cat" / "0.png").convert("L"), dtype=np.float32) / 255
    )
    pool = torch.cat([g.train.examples, g.test.examples])[:, 0].numpy()
    assert np.abs(pool - ref).reshape(len(pool), -1).max(1).min() < 1e-6


def test_image_folder_without_classes(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolderSource(root=tmp_path / "empty").load(seed=0)


def test_cifar10_batches(cifar_dir) -> None:
    b = Cifar10Source(root=cifar_dir).load(seed=0)
    assert len(b.train) == 10 and len(b.test) == 4 and b.spec.shape == (3, 32, 32)
    raw = pickle.loads((cifar_dir / "cifar-10-batches-py/test_batch").read_bytes())
    expected = torch.from_numpy(raw[b"data"].reshape(-1, 3, 32, 32).astype(np.float32) / 255)
    assert torch.equal(b.test.examples, expected)
    assert b.test.targets.tolist() == raw[b"labels"]


def test_cifar10_refuses_pickled_code(cifar_dir) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = cifar_dir / "cifar-10-batches-py/data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}, protocol=2))
    with pytest.raises(DataError, match=r"refusing to load (__builtin__|builtins)\.print"):
        Cifar10Source(root=cifar_dir).load(seed=0)


def test_split_list(split_list) -> None:
    root, split_file = split_list
    b = SplitListSource(
        root=root, split_file=split_file, image_size=16, class_names=["normal", "covid"]
    ).load(seed=0)
    assert len(b.train) == 8 and len(b.test) == 4 and b.spec.shape == (1, 16, 16)
    assert b.train.targets.tolist() == [0, 1] * 4
    v = SplitListSource(root=root, split_file=split_file, test_split="validation").load(seed=0)
    assert len(v.test) == 2


@pytest.mark.parametrize(("raw", "expected"), [(1, 1), ([2], 2), ([0, 0, 1], 2), ([1, 0], 0)])
def test_split_list_label_forms(raw, expected) -> None:
    assert formats._label_of(raw, "x") == expected


def test_split_list_errors(split_list, tmp_path) -> None:
    root, split_file = split_list
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "training": [{"image": "missing.png", "label": [0]}],
                "testing": [{"image": "missing.png", "label": [0]}],
            }
        )
    )
    with pytest.raises(DataError, match="image file not found: .*missing.png"):
        SplitListSource(root=root, split_file=bad).load(seed=0)
    bad.write_text(json.dumps({"training": [{"image": "a.png", "label": [1, 1]}]}))
    with pytest.raises(DataError, match=r"training\[0\]: cannot read label \[1, 1\]"):
        SplitListSource(root=root, split_file=bad).load(seed=0)
    with pytest.raises(DataError, match="no 'holdout' list"):
        SplitListSource(root=root, split_file=split_file, test_split="holdout").load(seed=0)


def _pool(n: int = 100, classes: int = 4) -> Dataset:
    return Dataset(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n) % classes)


def _ids(client) -> set[int]:
    return set(client.data.examples.flatten().long().tolist())


def test_explicit_partition_sizes_disjoint_and_seeded() -> None:
    p = ExplicitPartition(
        clients=[
            {"size": 8, "batch_size": 4},
            {"size": 1, "batch_size": 1},
            {"size": 30, "batch_size": 8, "lr": 0.1},
        ]
    )
    clients = p.split(_pool(), seed=5)
    assert [len(c.data) for c in clients] == [8, 1, 30]
    assert [c.batch_size for c in clients] == [4, 1, 8] and clients[2].lr == 0.1
    assert [c.client_id for c in clients] == [1, 2, 3]
    sets = [_ids(c) for c in clients]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert [_ids(c) for c in p.split(_pool(), seed=5)] == sets
    assert [_ids(c) for c in p.split(_pool(), seed=6)] != sets


def test_explicit_partition_too_large() -> None:
    p = ExplicitPartition(clients=[{"size": 80, "batch_size": 4}, {"size": 30, "batch_size": 4}])
    with pytest.raises(
        ConfigError, match="ask for 110 training images but the data source has 100"
    ):
        p.check(100)
    with pytest.raises(ConfigError, match=r"partition.clients.0.batch_size: batch size 9"):
        ExplicitPartition(clients=[{"size": 8, "batch_size": 9}]).check(100)


def test_explicit_partition_classes_draw_from_those_classes_only() -> None:
    p = ExplicitPartition(
        clients=[
            {"size": 5, "batch_size": 5, "classes": [2]},
            {"size": 10, "batch_size": 2, "classes": [0, 3]},
            {"size": 20, "batch_size": 4},
        ]
    )
    clients = p.split(_pool(), seed=1)
    assert set(clients[0].data.targets.tolist()) == {2}
    assert set(clients[1].data.targets.tolist()) <= {0, 3}
    assert [len(c.data) for c in clients] == [5, 10, 20]
    sets = [_ids(c) for c in clients]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    # without classes the split is the plain seeded one it always was
    plain = ExplicitPartition(clients=[{"size": 8, "batch_size": 4}, {"size": 3, "batch_size": 1}])
    order = np.random.default_rng(derive_seed(1, "partition")).permutation(100)
    assert _ids(plain.split(_pool(), seed=1)[1]) == set(order[8:11].tolist())
    with pytest.raises(
        ConfigError, match=r"partition.clients.0.size: 30 images asked for, but only 25"
    ):
        ExplicitPartition(clients=[{"size": 30, "batch_size": 1, "classes": [1]}]).split(
            _pool(), seed=0
        )


def test_iid_partition_covers_pool() -> None:
    clients = IIDPartition(clients=3, batch_size=4).split(_pool(), seed=0)
    assert sorted(len(c.data) for c in clients) == [33, 33, 34]
    assert set().union(*map(_ids, clients)) == set(range(100))
    with pytest.raises(ConfigError, match="101 clients but only 100"):
        IIDPartition(clients=101).check(100)


def test_dirichlet_partition_skews_labels() -> None:
    pool = _pool(400, 4)
    skewed = DirichletPartition(clients=4, alpha=0.1).split(pool, seed=0)
    even = DirichletPartition(clients=4, alpha=1000.0).split(pool, seed=0)
    assert set().union(*map(_ids, skewed)) == set(range(400))

    def max_share(clients) -> float:
        return float(
            np.mean([np.bincount(c.data.targets, minlength=4).max() / len(c.data) for c in clients])
        )

    assert max_share(skewed) > 0.5 and max_share(even) < 0.35
    again = DirichletPartition(clients=4, alpha=0.1).split(pool, seed=0)
    assert [_ids(c) for c in again] == [_ids(c) for c in skewed]


def test_stratified_split_is_seeded() -> None:
    labels = np.repeat(np.arange(3), 10)
    a = stratified_split(labels, 0.3, seed=1)
    b = stratified_split(labels, 0.3, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert np.bincount(labels[a[1]]).tolist() == [3, 3, 3]


def test_16_bit_and_float_images_are_scaled_by_their_depth_not_clipped(tmp_path) -> None:
    read_image = formats.read_image
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "xray.png")  # a 16-bit grayscale PNG
    got = read_image(tmp_path / "xray.png", 8, 1)
    assert np.allclose(got[0], ramp / 65535.0, atol=1e-6)  # clipping at 255 made most pixels 1.0
    rgb = read_image(tmp_path / "xray.png", 8, 3)
    assert rgb.shape == (3, 8, 8) and np.array_equal(rgb[0], rgb[2])
    Image.fromarray(np.full((8, 8), 0.25, dtype=np.float32), mode="F").save(tmp_path / "f.tif")
    assert np.allclose(read_image(tmp_path / "f.tif", 8, 1), 0.25)
    Image.fromarray(np.full((8, 8), 7.0, dtype=np.float32), mode="F").save(tmp_path / "big.tif")
    with pytest.raises(DataError, match=r"big.tif: F values 7 to 7 are outside 0 to 1"):
        read_image(tmp_path / "big.tif", 8, 1)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([1.0], "cannot read label [1.0]"),
        (True, "cannot read label True"),
        (-1, "label -1 is not a class index"),
        (10**9, "label 1000000000 is not a class index"),
        ([0.5, 0.5], "cannot read label"),
    ],
)
def test_split_list_labels_that_would_be_misread_are_refused(raw, message) -> None:
    with pytest.raises(DataError, match=re.escape(message)):
        formats._label_of(raw, "x")


def test_split_list_images_stay_inside_the_data_root(split_list, tmp_path) -> None:
    root, _ = split_list
    outside = tmp_path / "secret.png"
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(outside)
    (root / "link.png").symlink_to(outside)
    bad = tmp_path / "bad.json"
    for image in ("../secret.png", str(outside), "link.png", 7):
        bad.write_text(json.dumps({"training": [{"image": image, "label": 0}], "testing": []}))
        with pytest.raises(
            DataError,
            match="outside the data root .*data.allow_outside_root: true|must be a path string",
        ):
            formats.read_split_list(bad, root)
        if image != 7:  # the user's opt-in reads the file it names
            paths, _ = formats.read_split_list(bad, root, allow_outside_root=True)["training"]
            assert paths[0].resolve() == outside.resolve()


def test_an_image_folder_link_out_of_the_root_is_refused_unless_allowed(
    image_folder, tmp_path
) -> None:
    outside = tmp_path / "secret.png"
    Image.fromarray(np.full((8, 8, 3), 255, dtype=np.uint8)).save(outside)
    (image_folder / "cat" / "zz_link.png").symlink_to(outside)
    with pytest.raises(
        DataError, match=r"zz_link.png leads outside the data root .*allow_outside_root: true"
    ):
        formats.load_image_folder(image_folder, 8, 3)
    images, labels, _ = formats.load_image_folder(image_folder, 8, 3, allow_outside_root=True)
    assert len(images) == 11 and any(bool((im == 1).all()) for im in images)


def test_non_regular_files_are_skipped_in_folders_and_refused_in_lists(
    image_folder, tmp_path
) -> None:
    os.mkfifo(image_folder / "cat" / "pipe.png")  # opening it would block forever
    images, labels, _ = formats.load_image_folder(image_folder, 8, 3)
    assert len(images) == 10
    with pytest.raises(DataError, match="not a regular file"):
        formats.read_image(image_folder / "cat" / "pipe.png", 8, 1)


def test_decompression_bombs_are_a_clear_error(tmp_path, monkeypatch) -> None:
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(
        Image, "MAX_IMAGE_PIXELS", 1000
    )  # 1,600 pixels: over the limit, under twice it
    with pytest.raises(DataError, match="cannot read image .*big.png"):
        formats.read_image(tmp_path / "big.png", 8, 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # over twice the limit: Pillow's own error
    with pytest.raises(DataError, match="cannot read image .*big.png"):
        formats.read_image(tmp_path / "big.png", 8, 1)
