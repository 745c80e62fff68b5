"""DAGER (gradleak.attacks.exact.dager) against independent computations and the true batch: the
span's algebra, the adapters' states against transformers' own forward pass, decoder and encoder
recovery of Faker notes, and every refusal (saturated layers, LoRA below the token count, noise,
dropout, non-finite or missing gradients)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradleak.attacks.exact.dager import recover
from gradleak.attacks.exact.dager.calibrate import confidence_from_ratio, widest_gap
from gradleak.attacks.exact.dager.span import Span, default_rank_margin, input_space_gradient

torch.set_num_threads(1)


def _model(family: str, d: int, *, layers: int = 2, heads: int = 4, vocab: int = 2000, **kw):
    from gradleak.text import models

    torch.manual_seed(0)
    if family == "bert":
        return models.bert(vocab, 64, "classification", 2, d_model=d, layers=layers, heads=heads)
    make = models.gpt2 if family == "gpt2" else models.llama
    return make(vocab, 64, "causal-lm", d_model=d, layers=layers, heads=heads, **kw)


def client_update(model, ids, *, labels=None, steps=1, lr=1e-2, noise=0.0):
    """The client, computed here with transformers' own loss (``forward`` skips gradleak's logits
    hook): (global state, gradient) after one step, or the pseudo-gradient -(end - start) / lr
    of several full-batch SGD steps; ``noise``: Gaussian noise on the update."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = {n: p.detach().clone() for n, p in params.items()}
    model.eval()
    for _ in range(steps):
        loss = model.forward(input_ids=ids, labels=ids if labels is None else labels).loss
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        if steps == 1:
            update = {n: g.detach().clone() for n, g in zip(params, grads)}
            break
        with torch.no_grad():
            for p, g in zip(params.values(), grads):
                p -= lr * g
    else:
        update = {n: (start[n] - p.detach()) / lr for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(start[n])
    gen = torch.Generator().manual_seed(0)
    update = {n: g + noise * torch.randn(g.shape, generator=gen) for n, g in update.items()}
    return state, update


def recovered(result, ids: torch.Tensor) -> float:
    got = {tuple(s) for s in result.sequences}
    return sum(tuple(row) in got for row in ids.tolist()) / len(ids)


def _inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# --- the span and its calibration -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_span_of_a_layer_contains_its_inputs_in_the_right_orientation(kind) -> None:
    from transformers.pytorch_utils import Conv1D

    d, n = 64, 20
    x = _inputs(n, d)
    layer = nn.Linear(d, d) if kind == "linear" else Conv1D(d, d)
    layer(x).pow(2).sum().backward()
    in_out = kind == "conv1d"
    right = Span.from_gradients([input_space_gradient(layer.weight.grad, weight_is_in_out=in_out)])
    wrong = Span.from_gradients(
        [input_space_gradient(layer.weight.grad, weight_is_in_out=not in_out)]
    )
    assert right.rank == n
    assert right.distances(x).max() < 1e-6
    assert right.distances(_inputs(200, d, seed=1)).min() > 0.3
    assert wrong.distances(x).min() > 1e-2


def test_distances_equal_an_explicit_projection_whatever_the_chunking() -> None:
    d, n = 48, 10
    basis_in = _inputs(n, d)
    span = Span.from_gradients([basis_in])
    cand = _inputs(1000, d, seed=2).double()
    q, _ = torch.linalg.qr(basis_in.double().T)
    unit = cand / cand.norm(dim=1, keepdim=True)
    expected = (unit - unit @ q @ q.T).norm(dim=1)
    for chunk in (7, 128, 5000):
        got = span.distances(cand, chunk_size=chunk)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_tolerance_drops_tiny_singular_values_and_truncation_keeps_leading_ones() -> None:
    d = 32
    u = torch.linalg.qr(_inputs(d, d).double())[0]
    s = torch.tensor([1.0] * 10 + [1e-9] * 5 + [0.0] * (d - 15), dtype=torch.float64)
    span = Span.from_gradients([(u * s) @ u.T], rel_tol=1e-6)
    assert span.rank == span.numerical_rank == 10
    assert span.truncated(4).rank == 4
    assert span.distances(u[:, :10].T).max() < 1e-8
    assert Span.from_gradients([torch.full((8, 8), float("nan"))]).rank == 0
    assert Span.from_gradients([torch.zeros(8, 8)]).rank == 0


def test_margin_and_the_widest_gap() -> None:
    assert (default_rank_margin(768), default_rank_margin(64), default_rank_margin(16)) == (
        20,
        8,
        4,
    )
    true = torch.tensor([1e-7, 3e-7, 2e-6])
    cut = widest_gap(torch.cat([torch.linspace(0.05, 0.9, 100), true]), max_accept=10)
    assert cut.n_accepted == 3 and 2e-6 < cut.threshold < 0.05
    assert cut.ratio == pytest.approx(0.05 / 2e-6)
    assert confidence_from_ratio(cut.ratio) > 0.99 and confidence_from_ratio(1.0) == 0.0


# --- the adapters compute what transformers computes -------------------------------------------


def _perturb_norms(model) -> None:
    """Untrained norms (gain 1, bias 0) would hide errors in how gain and bias are applied."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or "norm" in name or "LayerNorm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_states_equal_transformers_forward(family) -> None:
    from gradleak.attacks.exact.dager.arch import architecture_for
    from gradleak.attacks.exact.dager.decoder import sequence_states

    model = _model(family, 64)
    _perturb_norms(model)
    ids = torch.randint(7, 2000, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.forward(input_ids=ids, output_hidden_states=True).hidden_states[1][0]
        blocks = model.transformer.h if family == "gpt2" else model.model.layers
        norm = blocks[1].ln_1 if family == "gpt2" else blocks[1].input_layernorm
        expected = norm(hidden)
    states = sequence_states(architecture_for(model, model.state_dict()), ids.tolist(), 9)
    torch.testing.assert_close(states["layer2"], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_fast_layer1_scan_equals_the_direct_computation(family) -> None:
    from gradleak.attacks.exact.dager.api import stage_span
    from gradleak.attacks.exact.dager.arch import architecture_for
    from gradleak.attacks.exact.dager.layer1 import _AffineScan

    model = _model(family, 64)
    _perturb_norms(model)
    ids = torch.randint(7, 2000, (2, 6), generator=torch.Generator().manual_seed(1))
    gs, grad = client_update(model, ids, labels=torch.tensor([0, 1]) if family == "bert" else None)
    arch = architecture_for(model, gs)
    span = stage_span(arch, "layer1", grad, rel_tol=1e-6)
    scan = _AffineScan(arch.layer1_affine(), span, chunk_size=512)
    for p in (0, 4):
        direct = span.distances(arch.layer1_inputs(torch.arange(2000), p)[1])
        fast = scan.screen(p)
        far = direct > scan.refine_below
        torch.testing.assert_close(fast[far], direct[far], rtol=1e-4, atol=0)
        assert (fast[~far] < scan.refine_below).all()


# --- recovery of the true batch, and refusals --------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_batch_is_recovered_exactly(family, notes) -> None:
    ids = notes(4, 14, bos=family == "llama")
    model = _model(family, 128)
    gs, grad = client_update(model, ids)
    result = recover(model, gs, grad, num_sequences=4, seq_len=14, kind="decoder", end_token=0)
    assert result.feasible, result.reason
    assert recovered(result, ids) == 1.0 and len(result.sequences) == 4
    assert result.confidence > 0.99
    assert all(s[-1] == 0 and len(s) == 14 for s in result.sequences)  # the end token appended


def test_saturated_layer_is_refused_without_text(notes) -> None:
    ids = notes(16, 9)  # 16 x 8 tokens with a gradient against d = 128 (margin 16)
    model = _model("gpt2", 128)
    gs, grad = client_update(model, ids)
    result = recover(model, gs, grad, num_sequences=16, seq_len=9, kind="decoder", end_token=0)
    assert not result.feasible and result.sequences == []
    assert "rank" in result.reason and "128" in result.reason


@pytest.mark.parametrize("lr", [1e-2, 1e-1])
def test_several_full_batch_steps_are_recovered(notes, lr) -> None:
    ids = notes(4, 16, start=20)
    model = _model("gpt2", 128)
    gs, grad = client_update(model, ids, steps=3, lr=lr)
    result = recover(model, gs, grad, num_sequences=4, seq_len=16, kind="decoder", end_token=0)
    assert result.feasible, result.reason
    assert recovered(result, ids) == 1.0
    assert max(r.max_accepted for r in result.layers) > 1e-4  # thresholds adapted


@pytest.mark.parametrize("rank, feasible", [(64, True), (16, False)])
def test_lora_update_is_recovered_only_above_the_rank_limit(notes, rank, feasible) -> None:
    ids = notes(2, 16, start=60)  # 2 x 15 tokens with a gradient
    model = _model("gpt2", 128, lora_rank=rank)
    gs, grad = client_update(model, ids)
    assert all("lora_" in k for k in grad)
    result = recover(model, gs, grad, num_sequences=2, seq_len=16, kind="decoder", end_token=0)
    assert result.feasible is feasible, result.reason
    if feasible:
        assert recovered(result, ids) == 1.0 and result.layers[0].dim == rank
    else:
        assert result.sequences == [] and f"{rank} - " in result.reason


@pytest.mark.parametrize("noise", [1e-4, 1e-2])
def test_noised_update_is_refused_with_low_confidence(notes, noise) -> None:
    ids = notes(4, 16)
    model = _model("gpt2", 128)
    gs, grad = client_update(model, ids, noise=noise)
    result = recover(model, gs, grad, num_sequences=4, seq_len=16, kind="decoder", end_token=0)
    assert not result.feasible and result.sequences == [] and result.confidence < 0.5


def test_dropout_and_non_finite_or_missing_gradients_are_refused_not_raised(notes) -> None:
    ids = notes(2, 10)
    model = _model("gpt2", 64, heads=2, dropout=0.1)
    gs = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    loss = model.forward(input_ids=ids, labels=ids).loss
    names = [n for n, _ in model.named_parameters()]
    grad = dict(zip(names, torch.autograd.grad(loss, list(model.parameters()))))
    nan = {k: torch.full_like(v, math.nan) for k, v in grad.items()}
    missing = {k: v for k, v in grad.items() if "c_attn" not in k}
    for g in (grad, nan, missing):
        result = recover(model, gs, g, num_sequences=2, seq_len=10, kind="decoder", end_token=0)
        assert not result.feasible and result.sequences == []


@pytest.mark.parametrize("n, seq_len", [(1, 16), (2, 12), (4, 10)])
def test_encoder_batch_is_recovered_exactly(notes, n, seq_len) -> None:
    ids = notes(n, seq_len, start=10, task="classification")
    model = _model("bert", 128)
    gs, grad = client_update(model, ids, labels=torch.arange(n) % 2)
    result = recover(model, gs, grad, num_sequences=n, seq_len=seq_len, kind="encoder")
    assert result.feasible, result.reason
    assert recovered(result, ids) == 1.0
    assert [r.stage for r in result.layers] == (["layer1"] if n == 1 else ["layer1", "ffn"])


def test_encoder_with_one_block_is_refused_and_noise_never_crashes(notes) -> None:
    ids = notes(2, 12, task="classification")
    model = _model("bert", 128)
    gs, grad = client_update(model, ids, labels=torch.tensor([0, 1]), noise=1e-2)
    result = recover(model, gs, grad, num_sequences=2, seq_len=12, kind="encoder")
    assert not result.feasible or result.confidence < 0.5
    one = _model("bert", 64, layers=1, heads=2)
    gs, grad = client_update(one, ids[:1], labels=torch.tensor([1]))
    with pytest.raises(ValueError, match="two blocks"):
        recover(one, gs, grad, num_sequences=1, seq_len=12, kind="encoder")


def test_the_rounding_of_a_float32_delta_is_predicted_and_discounted(text_data, notes) -> None:
    """A server receives float32 deltas: -delta / lr differs from the gradient by the weights'
    rounding, which float32_noise predicts; the dager attack discounts it (a LLaMA update of one
    SGD step at lr 0.01 is recovered exactly) and is refused without it."""
    from gradleak.attacks.base import ServerView
    from gradleak.attacks.exact.dager.api import float32_noise
    from gradleak.attacks.registry import attack_factory
    from gradleak.data.dataset import Dataset
    from gradleak.data.partition import ClientData
    from gradleak.fl.client import LocalTraining, train_client
    from gradleak.text.spec import TextSpec
    from gradleak.text.tasks import CausalLM

    ids = notes(4, 14, bos=True)
    model = _model("llama", 128)
    state, grad = client_update(model, ids)
    spec = TextSpec(text_data.spec.vocab, 14)
    client = ClientData(1, Dataset(ids, torch.zeros(4, dtype=torch.long)), 4)
    settings = LocalTraining(lr=0.01)
    update, _ = train_client(
        model, state, client, round=1, settings=settings, spec=spec, task=CausalLM(), seed=0
    )
    model.load_state_dict(state)
    sigma = float32_noise(state, update.delta, lr=0.01, steps=1)
    name = "model.layers.0.self_attn.q_proj.weight"
    error = (-update.delta[name] / 0.01 - grad[name]).double().std().item()
    assert sigma[name] / 3 < error < sigma[name] * 3
    view = ServerView.of(model, state, update, spec=spec, num_classes=2)
    rec = attack_factory("dager")().run(view)
    assert rec.feasible
    assert sorted(rec.examples.tolist()) == sorted(ids.tolist())
    assert "every recovered token is among the" in rec.reason  # the embedding's witness agrees
    assert not attack_factory("dager")(float_noise=False).run(view).feasible
