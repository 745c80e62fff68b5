"""The token set read off the input embedding's gradient (``attacks.exact.tokens``) against the
true batch: exact on an untied table after one or several steps, refused where it cannot be read
(tied GPT-2 table, frozen LoRA embeddings, noise), and the ``token-set`` attack in a federation's
audit, scored by each sentence's token recall."""

from __future__ import annotations

import pytest
import torch
import yaml

from gradleak.attacks.exact.tokens import embedding_tokens
from gradleak.cli import app
from test_dager import _model, client_update
from test_text_audit import _config, _rows, runner

torch.set_num_threads(1)


@pytest.mark.parametrize("steps", [1, 3])
def test_the_moved_rows_are_the_batch_tokens_exactly(notes, steps) -> None:
    ids = notes(4, 12, bos=True)
    model = _model("llama", 64, layers=1)
    _, grad = client_update(model, ids, steps=steps)
    found = embedding_tokens(model, grad, max_tokens=ids.numel())
    assert found.feasible, found.reason
    # every token that feeds a prediction, nothing else (a causal LM's last position, here the end
    # token, reaches no loss)
    assert set(found.tokens) == {int(t) for t in ids[:, :-1].flatten()}
    assert list(found.weights) == sorted(found.weights, reverse=True)


def test_a_tied_frozen_or_noised_table_is_refused_with_the_reason(notes) -> None:
    ids = notes(2, 10)
    gpt2 = _model("gpt2", 64, layers=1)
    _, grad = client_update(gpt2, ids)
    tied = embedding_tokens(gpt2, grad, max_tokens=ids.numel())
    assert not tied.feasible and "tied" in tied.reason and tied.tokens == ()

    lora = _model("llama", 64, layers=1, lora_rank=4)
    _, grad = client_update(lora, ids)
    frozen = embedding_tokens(lora, grad, max_tokens=ids.numel())
    assert not frozen.feasible and "frozen" in frozen.reason

    llama = _model("llama", 64, layers=1)
    _, grad = client_update(llama, ids, noise=1e-6)
    noised = embedding_tokens(llama, grad, max_tokens=ids.numel())
    assert not noised.feasible and "more than the batch's 20 tokens" in noised.reason


def test_the_token_set_attack_audits_a_federation_by_token_recall(tmp_path) -> None:
    model = {"name": "llama", "kwargs": {"d_model": 64, "heads": 2, "layers": 1}}
    audit = {"clients": "all", "preset": "token-set", "attack": {}, "prior": "unigram"}
    path = _config(tmp_path, model=model, audit=audit)
    config = yaml.safe_load(path.read_text())
    config["audit"]["metric"] = "token_recall"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    result = runner.invoke(app, ["run", str(path), "--out", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    for r in _rows(run).values():
        # every sentence's words are in the set the server read; exact match impossible
        assert r["attack"] == "token-set" and r["token_recall"] == 1.0, r
        assert r["exact"] == 0.0 and r["rdlv"] > 0, r
        assert r["confidence"] == 1.0
