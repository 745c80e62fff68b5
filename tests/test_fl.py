"""Client training, aggregation and the update format, against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradleak.data.dataset import Dataset
from gradleak.data.partition import ClientData
from gradleak.fl import ClientUpdate, FedAvg, LocalTraining, UpdateMeta, train_client
from gradleak.fl.server import evaluate
from gradleak.fl.simulator import Simulator
from gradleak.fl.tasks import Classification
from gradleak.images import ImageSpec
from gradleak.images.data import normalize
from gradleak.models import build_model

MEAN, STD = (0.5,), (0.25,)
SPEC = ImageSpec((1, 8, 8), MEAN, STD)


def _client(n: int = 12, bs: int = 12, cid: int = 1, seed: int = 0) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    data = Dataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))
    return ClientData(cid, data, bs)


def _model(name: str = "mlp"):
    torch.manual_seed(0)
    return build_model(name, spec=ImageSpec.square(1, 8), num_classes=3)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_one_full_batch_step_is_minus_lr_times_the_gradient() -> None:
    model, client = _model(), _client()
    state = _state(model)
    update, loss = train_client(
        model,
        state,
        client,
        round=1,
        settings=LocalTraining(lr=0.1),
        spec=SPEC,
        task=Classification(),
        seed=0,
    )
    # Independent: the gradient of the mean cross-entropy at the global weights.
    ref = _model()
    ref.load_state_dict(state)
    x = (client.data.examples - 0.5) / 0.25
    ce = F.cross_entropy(ref(x), client.data.targets)
    grads = torch.autograd.grad(ce, list(ref.parameters()))
    for (name, _), g in zip(ref.named_parameters(), grads, strict=True):
        torch.testing.assert_close(update.delta[name], -0.1 * g, rtol=1e-4, atol=1e-6)
    assert loss == pytest.approx(float(ce.detach()), rel=1e-5)
    assert update.meta == UpdateMeta(
        client_id=1,
        round=1,
        num_samples=12,
        lr=0.1,
        epochs=1,
        steps=1,
        batch_size=12,
        momentum=0.0,
        bn_mode="train",
    )


def test_several_epochs_and_steps_follow_sgd() -> None:
    model, client = _model(), _client(n=10, bs=4)
    state = _state(model)
    settings = LocalTraining(epochs=2, lr=0.05)
    update, _ = train_client(
        model, state, client, round=3, settings=settings, spec=SPEC, task=Classification(), seed=7
    )
    assert update.meta.steps == 2 * math.ceil(10 / 4)
    # Independent replay: plain SGD over the same batches (drawn from the same derived seed).
    from gradleak.seeding import torch_generator

    ref = _model()
    ref.load_state_dict(state)
    params = dict(ref.named_parameters())
    x, y = normalize(client.data.examples, MEAN, STD), client.data.targets
    gen = torch_generator(7, "client", 3, 1)
    for _ in range(2):
        perm = torch.randperm(10, generator=gen)
        for s in range(0, 10, 4):
            idx = perm[s : s + 4]
            grads = torch.autograd.grad(F.cross_entropy(ref(x[idx]), y[idx]), list(params.values()))
            with torch.no_grad():
                for p, g in zip(params.values(), grads, strict=True):
                    p -= 0.05 * g
    for name, p in params.items():
        torch.testing.assert_close(
            update.delta[name], p.detach() - state[name], rtol=1e-4, atol=1e-6
        )


def test_update_includes_batch_norm_buffers() -> None:
    model, client = _model("convnet"), _client(n=8, bs=4)
    state = _state(model)
    update, _ = train_client(
        model,
        state,
        client,
        round=1,
        settings=LocalTraining(),
        spec=SPEC,
        task=Classification(),
        seed=0,
    )
    assert set(update.delta) == set(state)
    assert "features.1.running_mean" in update.buffers
    assert "features.1.weight" not in update.buffers
    assert int(update.delta["features.1.num_batches_tracked"]) == 2  # two steps
    assert float(update.delta["features.1.running_var"].abs().sum()) > 0


def test_client_training_is_deterministic() -> None:
    model, client = _model("convnet"), _client(n=9, bs=2)
    state = _state(model)
    kw = dict(
        round=2, settings=LocalTraining(momentum=0.9), spec=SPEC, task=Classification(), seed=3
    )
    a, _ = train_client(model, state, client, **kw)
    b, _ = train_client(model, state, client, **kw)
    assert all(torch.equal(a.delta[k], b.delta[k]) for k in a.delta)


def test_fedavg_is_the_sample_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    g = {"w": rng.normal(size=(3, 2)).astype(np.float32), "n": np.array(5)}
    deltas = [
        {"w": rng.normal(size=(3, 2)).astype(np.float32), "n": np.array(s)} for s in (2, 3, 4)
    ]
    counts = [1, 8, 3]
    updates = [
        ClientUpdate(
            {k: torch.from_numpy(v) for k, v in d.items()},
            UpdateMeta(i, 1, n, 0.1, 1, 1, 1),
            frozenset({"n"}),
        )
        for i, (d, n) in enumerate(zip(deltas, counts, strict=True))
    ]
    new = FedAvg().aggregate({k: torch.from_numpy(v) for k, v in g.items()}, updates)
    expected_w = g["w"].astype(np.float64) + sum(
        n * d["w"].astype(np.float64) for n, d in zip(counts, deltas, strict=True)
    ) / sum(counts)
    np.testing.assert_allclose(new["w"].numpy(), expected_w, rtol=1e-6)
    assert new["w"].dtype == torch.float32
    assert int(new["n"]) == 5 + round((1 * 2 + 8 * 3 + 3 * 4) / 12)  # integer buffers: rounded


def test_fedavg_without_updates_keeps_the_model() -> None:
    g = {"w": torch.ones(2)}
    new = FedAvg().aggregate(g, [])
    assert torch.equal(new["w"], g["w"]) and new["w"] is not g["w"]


def test_update_round_trips_through_safetensors(tmp_path) -> None:
    model, client = _model("convnet"), _client(n=4, bs=2)
    update, _ = train_client(
        model,
        _state(model),
        client,
        round=1,
        settings=LocalTraining(),
        spec=SPEC,
        task=Classification(),
        seed=0,
    )
    back = ClientUpdate.from_bytes(update.to_bytes(), "u.safetensors")
    assert back.meta == update.meta and back.buffers == update.buffers
    assert all(torch.equal(back.delta[k], update.delta[k]) for k in update.delta)


def test_evaluate_counts_correct_predictions() -> None:
    model = _model()
    data = _client(n=20).data
    acc, loss = evaluate(model, _state(model), data, SPEC, Classification())
    with torch.no_grad():
        logits = model(normalize(data.examples, MEAN, STD))
    assert acc == float((logits.argmax(1) == data.targets).float().mean())
    assert loss == pytest.approx(float(F.cross_entropy(logits, data.targets)), rel=1e-5)


def test_participation_fraction_is_seeded() -> None:
    clients = [_client(n=4, bs=2, cid=i) for i in range(1, 11)]
    sim = Simulator(
        model=_model(),
        clients=clients,
        test=clients[0].data,
        spec=SPEC,
        task=Classification(),
        strategy=FedAvg(),
        training=LocalTraining(),
        seed=1,
        clients_per_round=0.3,
    )
    picks = [[c.client_id for c in sim.participants(r)] for r in range(1, 6)]
    assert all(len(p) == 3 for p in picks)
    assert len({tuple(p) for p in picks}) > 1  # changes between rounds
    assert picks == [[c.client_id for c in sim.participants(r)] for r in range(1, 6)]


def test_recalibrated_statistics_are_those_of_the_public_examples() -> None:
    """The first batch-norm layer's recomputed running mean and variance are the per-channel mean
    and unbiased variance of the first convolution's output on the public examples; the weights
    and the counters are the state's."""
    from gradleak.fl.server import recalibrate_batch_norm

    model = _model("convnet")
    state = _state(model)
    state["features.1.running_mean"] = torch.full_like(state["features.1.running_mean"], 5.0)
    public = _client(n=40, seed=3).data
    new = recalibrate_batch_norm(model, state, public, SPEC)
    conv = model.features[0]
    conv.weight.data.copy_(state["features.0.weight"])
    with torch.no_grad():
        out = conv((public.examples - 0.5) / 0.25).double()
    assert torch.allclose(new["features.1.running_mean"].double(), out.mean((0, 2, 3)), atol=1e-5)
    expected_var = out.transpose(0, 1).reshape(out.shape[1], -1).var(1, unbiased=True)
    assert torch.allclose(new["features.1.running_var"].double(), expected_var, rtol=1e-4)
    for k in state:
        if not k.endswith(("running_mean", "running_var")):
            assert torch.equal(new[k], state[k]), k
    assert not torch.equal(new["features.4.running_var"], state["features.4.running_var"])
    mlp = _model()
    assert recalibrate_batch_norm(mlp, _state(mlp), public, SPEC).keys() == _state(mlp).keys()
