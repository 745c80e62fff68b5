"""The exact batch attacks against the true batch: SPEAR recovers every image exactly (and
certifies it) or declares failure with no images; the Cocktail Party Attack unmixes a batch; the
audit runs every configured attack that applies and records the worst; iLRG's label counts match
the true batch or it declines; the certified per-image labels match the true batch or decline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradleak.attacks.base import ServerView
from gradleak.attacks.exact.labels import ilrg_counts, instance_labels, recover_labels
from gradleak.attacks.registry import attack_factory
from gradleak.data.partition import ClientData
from gradleak.fl import Classification, LocalTraining, train_client
from gradleak.images.sources import TilesSource
from gradleak.metrics import score
from gradleak.models import build_model


@pytest.fixture(scope="module")
def tiles():
    """16 x 16 tiles of the bundled photographs, halved first, flat ones left out."""
    return TilesSource(image_size=16, scale=0.5, min_std=0.03, max_per_photo=40).load(seed=0)


def _view(tiles, batch: int, hidden: list[int], seed: int = 0, epochs: int = 1, model: str = "mlp"):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(tiles.train), generator=g)[:batch]
    client = ClientData(1, tiles.train.subset(idx), batch)
    torch.manual_seed(seed)
    kwargs = {"hidden": hidden} if model == "mlp" else {}
    net = build_model(model, spec=tiles.spec, num_classes=tiles.num_classes, kwargs=kwargs)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    settings = LocalTraining(epochs=epochs, lr=0.1)
    update, _ = train_client(
        net,
        state,
        client,
        round=1,
        settings=settings,
        spec=tiles.spec,
        task=Classification(),
        seed=seed,
    )
    view = ServerView.of(net, state, update, spec=tiles.spec, num_classes=tiles.num_classes)
    return client, view


@pytest.mark.parametrize("batch", [1, 4, 8])
def test_spear_recovers_every_image_exactly_and_certifies_it(tiles, batch) -> None:
    client, view = _view(tiles, batch, [300])
    attack = attack_factory("spear")()
    assert attack.applies(view) is None
    rec = attack.run(view)
    assert rec.feasible and rec.confidence == 1.0 and "certified" in rec.reason
    s = score(rec.examples, client.data.examples, tiles.spec, rec.labels, client.data.targets)
    assert float(s.psnr.min()) > 50  # every image exact in pixel space
    assert s.label_accuracy == 1.0


def test_spear_declares_failure_instead_of_returning_wrong_images(tiles) -> None:
    """Two copies of one image: the gradient's rank is one short, so no batch comes back."""
    client, view = _view(tiles, 3, [300])
    twin = ClientData(1, client.data.subset([0, 0, 1]), 3)
    net, state = view.model, view.global_state
    update, _ = train_client(
        net,
        state,
        twin,
        round=1,
        settings=LocalTraining(lr=0.1),
        spec=tiles.spec,
        task=Classification(),
        seed=0,
    )
    rec = attack_factory("spear")().run(
        ServerView.of(net, state, update, spec=tiles.spec, num_classes=tiles.num_classes)
    )
    assert not rec.feasible and rec.examples is None and "0 of 3 directions" in rec.reason


def test_cocktail_party_unmixes_a_batch() -> None:
    """32 x 32 tiles (ICA needs the pixels of a larger image to tell the sources apart)."""
    tiles = TilesSource(image_size=32, scale=0.5, min_std=0.02, max_per_photo=20).load(seed=0)
    client, view = _view(tiles, 16, [256])
    rec = attack_factory("cpa")().run(view)
    s = score(rec.examples, client.data.examples, tiles.spec)
    assert float(s.ssim.mean()) > 0.7
    # the images, not the prior: far above what the mean colour scores
    flat = tiles.spec.prior("none", tiles.test).expand(16, -1, -1, -1)
    assert (
        float(s.ssim.mean())
        > float(score(flat, client.data.examples, tiles.spec).ssim.mean()) + 0.3
    )


def test_exact_attacks_say_where_they_do_not_apply(tiles) -> None:
    _, conv = _view(tiles, 2, [], model="lenet")
    assert "is not a linear layer on the 768 pixels" in attack_factory("spear")().applies(conv)
    _, steps = _view(tiles, 4, [64], epochs=2)
    assert "one local step; this one took 2" in attack_factory("cpa")().applies(steps)
    _, narrow = _view(tiles, 8, [4])
    assert "8 images exceed the first layer's 4 neurons" in attack_factory("spear")().applies(
        narrow
    )


def test_the_audit_runs_every_configured_attack_and_records_the_worst(tmp_path) -> None:
    from gradleak.experiments import RunStore, run_experiment
    from gradleak.experiments.config import validate_config

    config = validate_config(
        {
            "name": "exact",
            "device": "cpu",
            "data": {
                "source": "tiles",
                "image_size": 16,
                "scale": 0.5,
                "min_std": 0.03,
                "max_per_photo": 40,
            },
            "partition": {
                "scheme": "explicit",
                "clients": [{"size": 6, "batch_size": 6}, {"size": 20, "batch_size": 5}],
            },
            "model": {"name": "mlp", "kwargs": {"hidden": [300]}},
            "training": {"rounds": 1, "lr": 0.1},
            "audit": {"clients": [1, 2], "attack": {"iterations": 20}, "also": ["spear", "cpa"]},
        }
    )
    run_experiment(config, tmp_path)
    rows = {r["client"]: r for r in RunStore(tmp_path).results.read()}
    one = rows[1]  # one step of a batch of 6: SPEAR recovers it exactly, the worst leak
    assert (
        one["attack"] == "spear"
        and one["psnr"] > 50
        and one["rdlv"] == max(v for v in one["rdlv_by_attack"].values() if v is not None)
    )
    assert set(one["rdlv_by_attack"]) == {"inverting-gradients", "spear", "cpa"}
    four = rows[2]  # four local steps: the exact attacks do not apply, the optimisation does
    assert four["rdlv_by_attack"]["spear"] is None and four["attack"] == "inverting-gradients"


# -- label counts (iLRG) --------------------------------------------------------------------------


def _classifier_gradient(classes: int, labels: torch.Tensor, width: int, seed: int):
    """An untrained 32 -> width -> ReLU -> classes network's classifier gradient on random inputs
    with the given labels, and its weights."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, classes))
    F.cross_entropy(net(torch.randn(len(labels), 32)), labels).backward()
    head = net[-1]
    return head.weight.grad, head.bias.grad, head.weight.detach(), head.bias.detach()


@pytest.mark.parametrize(
    ("classes", "batch", "drawn_from"), [(10, 4, 3), (100, 32, 12), (1000, 256, 1000)]
)
def test_ilrg_counts_match_the_true_batch(classes, batch, drawn_from) -> None:
    g = torch.Generator().manual_seed(batch)
    labels = torch.randint(0, drawn_from, (batch,), generator=g)  # repeats when drawn_from is small
    r = ilrg_counts(*_classifier_gradient(classes, labels, 64, seed=batch), batch)
    assert r.counts == torch.bincount(labels, minlength=classes).tolist(), r.reason


def test_ilrg_declines_a_batch_larger_than_its_width_and_classes_allow() -> None:
    """256 images of 10 classes through a 64-wide embedding: each class's gradient rows mix ~25
    images of its own with ~230 of others, the assumption fails and iLRG says so."""
    labels = torch.randint(0, 10, (256,), generator=torch.Generator().manual_seed(0))
    for seed in range(3):
        r = ilrg_counts(*_classifier_gradient(10, labels, 64, seed), 256)
        assert r.counts is None and "not integral" in r.reason
        assert torch.isfinite(r.estimate).all()  # it did solve, and refused to round


def test_ilrg_answers_on_untrained_batches_are_right_or_declined() -> None:
    """On untrained networks every accepted answer is the truth (on trained ones a confidently
    misclassified image can pass the check: benchmarks/exact.py labels counts those)."""
    accepted = declined = 0
    for classes, batch in ((10, 4), (10, 8), (10, 16), (100, 32), (100, 256)):
        for seed in range(4):
            g = torch.Generator().manual_seed(seed)
            labels = torch.randint(0, classes, (batch,), generator=g)
            r = ilrg_counts(*_classifier_gradient(classes, labels, 64, seed), batch)
            if r.counts is None:
                declined += 1
            else:
                accepted += 1
                assert r.counts == torch.bincount(labels, minlength=classes).tolist()
    assert accepted >= 8 and declined >= 8  # the sweep exercises both answers


def test_ilrg_declines_when_a_confident_image_vanishes_from_its_class() -> None:
    """A trained model's batch [3, 9, 6, 6] (the softmax rows of a digits MLP): the 3 is classified
    at 0.985, so class 3's gradient rows are dominated by the 9 and the system rounds cleanly to
    two 9s and no 3. Class 3's weight-gradient row is negative where the 3's embedding is, which
    no class without images can show: iLRG declines."""
    probs = torch.tensor(
        [
            [0.0, 0.001, 0.01, 0.985, 0.0, 0.0, 0.0, 0.0, 0.001, 0.004],
            [0.002, 0.0, 0.0, 0.04, 0.0, 0.0, 0.0, 0.0, 0.003, 0.955],
            [0.001, 0.022, 0.001, 0.0, 0.009, 0.001, 0.944, 0.0, 0.022, 0.0],
            [0.004, 0.001, 0.002, 0.0, 0.002, 0.002, 0.987, 0.0, 0.003, 0.0],
        ],
        dtype=torch.float64,
    )
    probs = (probs + 1e-4) / (probs + 1e-4).sum(1, keepdim=True)
    labels, n, width = torch.tensor([3, 9, 6, 6]), 4, 8
    emb = torch.zeros(n, n * width, dtype=torch.float64)  # non-negative, disjoint supports
    weight = torch.zeros(10, n * width, dtype=torch.float64)
    for i in range(n):
        emb[i, i * width : (i + 1) * width] = 1.0
        weight[:, i * width : (i + 1) * width] = (probs[i].log() / width)[:, None]
    bias = torch.zeros(10, dtype=torch.float64)
    assert torch.allclose(torch.softmax(emb @ weight.T + bias, -1), probs)
    err = (probs - F.one_hot(labels, 10).double()) / n
    r = ilrg_counts(err.T @ emb, err.sum(0), weight, bias, n)
    assert r.counts is None and "[3]" in r.reason and "negative" in r.reason
    rounded = r.estimate.round()
    truth = torch.bincount(labels, minlength=10).double()
    assert float((r.estimate - rounded).abs().max()) < 0.1 and int(rounded.sum()) == n
    assert not torch.equal(rounded, truth)  # integral and wrong: only the row check catches it


def _two_layer_gradients(labels: torch.Tensor, width: int, inputs: int, seed: int, epochs: int = 0):
    """The float32 gradients of an ``inputs -> width -> ReLU -> 10`` network on random inputs with
    the given labels, after ``epochs`` of SGD on a teacher's labels (0: untrained), as
    instance_labels takes them: the hidden layer's weights, bias and gradients, then the head's."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, 10))
    if epochs:
        xs = torch.randn(512, inputs)
        ys = (xs @ torch.randn(inputs, 10)).argmax(1)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(epochs):
            for i in range(0, 512, 32):
                opt.zero_grad()
                F.cross_entropy(net(xs[i : i + 32]), ys[i : i + 32]).backward()
                opt.step()
        net.zero_grad()
    F.cross_entropy(net(torch.randn(len(labels), inputs)), labels).backward()
    return [t for m in (net[0], net[2]) for p in (m.weight, m.bias) for t in (p.detach(), p.grad)]


def _instance(labels: torch.Tensor, width: int, inputs: int, seed: int, epochs: int = 0):
    w, gw, b, gb, hw, ghw, hb, ghb = _two_layer_gradients(labels, width, inputs, seed, epochs)
    return instance_labels(w, b, gw, gb, hw, hb, ghw, ghb, len(labels))


@pytest.mark.parametrize(("batch", "drawn_from", "epochs"), [(8, 3, 0), (16, 10, 0), (16, 10, 5)])
def test_instance_labels_match_the_true_batch(batch, drawn_from, epochs) -> None:
    """Per-image labels from a 32 -> 384 -> 10 network, untrained and trained (5 epochs on a
    teacher's labels), batches with repeats: every seed certified and equal to the true labels."""
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, drawn_from, (batch,), generator=g)
        r = _instance(labels, 384, 32, seed, epochs)
        assert r.labels == sorted(labels.tolist()), r.reason


def test_instance_labels_are_exact_where_ilrg_declines() -> None:
    """16 images of 10 classes: each class's gradient rows mix its own images with many others,
    iLRG declines; the per-image solver recovers every label."""
    labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(4))
    w, gw, b, gb, hw, ghw, hb, ghb = _two_layer_gradients(labels, 384, 32, seed=4)
    assert ilrg_counts(ghw, ghb, hw, hb, 16).counts is None
    r = instance_labels(w, b, gw, gb, hw, hb, ghw, ghb, 16)
    assert r.labels == sorted(labels.tolist()), r.reason


def test_instance_labels_decline_where_the_layer_cannot_carry_the_batch() -> None:
    """Geometry checks, before any solving: a batch of 16 needs more than 16 * 17 / 2 + 16 * 9 =
    280 live neurons (a 256-wide layer has fewer), and a batch of 12 through 8 inputs exceeds the
    layer's rank."""
    labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(0))
    r = _instance(labels, 256, 32, seed=0)
    assert r.labels is None and "needs more than 280 live neurons" in r.reason
    r = _instance(labels[:12], 256, 8, seed=0)
    assert r.labels is None and "exceeds the rank" in r.reason


def test_recover_labels_takes_certified_instance_labels_from_a_client_update(tiles) -> None:
    """A client's FedSGD update on an mlp (768 -> 256 -> ReLU -> classifier), 12 tiles with
    repeated classes: the labels are the true batch's, from the per-image solver."""
    client, view = _view(tiles, 12, [256], seed=3)
    labels, strategy = recover_labels(view, torch.zeros(2, *tiles.spec.shape))
    assert len(set(client.data.targets.tolist())) < 12  # the batch repeats classes
    assert strategy == "instances"
    assert labels.tolist() == sorted(client.data.targets.tolist())


def test_recover_labels_falls_back_when_ilrg_declines(tiles) -> None:
    client, view = _view(tiles, 64, [32], seed=1)  # 64 images, 8 classes, a 32-wide embedding
    w, b = view.classifier()
    pg = view.pseudo_gradient()
    r = ilrg_counts(pg[w], pg[b], view.global_state[w], view.global_state[b], 64)
    assert r.counts is None
    labels, strategy = recover_labels(view, torch.zeros(2, *tiles.spec.shape))
    assert strategy == "label-counts" and len(labels) == 64
