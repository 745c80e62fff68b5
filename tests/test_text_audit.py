"""Text through the product, unchanged: a federation of language models audited by DAGER (rows,
saved sentences, the report, escaped), a defence that stops it, and ``gradleak attack --model DIR``
on an update computed here with transformers alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from gradleak.cli import app

torch.set_num_threads(1)
runner = CliRunner()
HOSTILE = '<script>alert("x")</script>'


def _notes(tmp_path: Path) -> Path:
    """The user's own notes (JSON lines), each opening with hostile markup."""
    from gradleak.text.corpus import faker_records

    records = faker_records(60, seed=3)
    lines = [{"text": f"{HOSTILE} {r.text}", "pii": list(r.personal)} for r in records]
    path = tmp_path / "notes.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    return path


def _config(tmp_path: Path, **changes) -> Path:
    config = {
        "name": "text-audit",
        "seed": 0,
        "data": {
            "source": "text-files",
            "path": str(_notes(tmp_path)),
            "personal_field": "pii",
            "seq_len": 24,
            "vocab_size": 800,
            "test_fraction": 0.2,
        },
        "partition": {
            "scheme": "explicit",
            "clients": [
                {"size": 2, "batch_size": 2},
                {"size": 1, "batch_size": 1},
                {"size": 30, "batch_size": 10},
            ],
        },
        "model": {"name": "gpt2", "kwargs": {"d_model": 64, "heads": 2}},
        "training": {"rounds": 1, "lr": 0.1},
        "audit": {"clients": "all", "preset": "dager", "attack": {}, "prior": "unigram"},
        **changes,
    }
    config["audit"]["metric"] = "rouge1"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _rows(run: Path) -> dict[int, dict]:
    lines = (run / "results.jsonl").read_text().splitlines()
    return {r["client"]: r for r in map(json.loads, lines)}


def test_a_language_model_federation_is_audited_saved_and_reported_escaped(tmp_path) -> None:
    run = tmp_path / "run"
    result = runner.invoke(app, ["run", str(_config(tmp_path)), "--out", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    rows = _rows(run)
    for cid in (1, 2):  # one batch of 2 sentences, one of 1: recovered exactly
        r = rows[cid]
        assert r["exact"] == 1.0 and r["rouge1"] == 1.0 and r["personal"] == 1.0, r
        assert r["confidence"] > 0.9 and r["rdlv"] > 0
    big = rows[3]  # 30 sentences x 23 tokens against a width of 64: refused, no text
    assert big["rdlv"] == 0.0 and big["audit_note"].startswith("dager infeasible: ")  # the prior
    assert "too many for this layer's width" in big["audit_note"]
    saved = np.load(run / "audit/round_0001/client_1.npz")
    assert saved["originals"].shape == saved["reconstructions"].shape == (2, 24)
    assert np.array_equal(saved["originals"], saved["reconstructions"])
    page = (run / "audit/round_0001/client_1.html").read_text()
    report = (run / "report/index.html").read_text()
    for html in (page, report):
        assert "<script>" not in html and "&lt;script&gt;" in html and "<mark><u>" in html
    assert "<th>exact</th>" in report and "<th>personal</th>" in report
    assert all("<script>" not in p.read_text() for p in run.glob("audit/*/client_*.html"))


def test_a_noise_defence_stops_the_exact_attack_and_says_why(tmp_path) -> None:
    defences = [{"name": "gaussian", "sigma": 1e-3}]
    path = _config(tmp_path, defenses=defences)
    run = tmp_path / "run"
    result = runner.invoke(app, ["run", str(path), "--out", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    for r in _rows(run).values():
        assert r["rdlv"] == 0.0 and r["audit_note"].startswith("dager infeasible: "), r
        assert r["confidence"] < 0.5 or "rank" in r["audit_note"]


@pytest.fixture(params=[2])
def saved_text_update(request, tmp_path, text_data):
    """A GPT-2 directory (save_pretrained), its tokenizer, and one client's update of one SGD step
    on ``request.param`` notes, computed with transformers' own loss; plus the truth."""
    from gradleak.text.models import gpt2

    n = request.param
    torch.manual_seed(0)
    model = gpt2(text_data.spec.vocab_size, 16, "causal-lm", d_model=64, heads=2)
    model.save_pretrained(tmp_path / "model")
    text_data.spec.vocab.tokenizer.save(str(tmp_path / "model" / "tokenizer.json"))
    ids = text_data.train.examples[:n]
    loss = model.forward(input_ids=ids, labels=ids).loss
    names = [n for n, _ in model.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(loss, list(model.parameters()))))
    grads["lm_head.weight"] = grads["transformer.wte.weight"]  # tied: one tensor, two names
    lr = 0.1
    update = {k: (-lr * grads[k]).contiguous() for k in model.state_dict()}
    save_file(update, str(tmp_path / "update.safetensors"))
    meta = {"modality": "text", "num_sequences": n, "seq_len": 16, "lr": lr, "local_steps": 1}
    meta["tokenizer"] = str(tmp_path / "model")
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    np.savez(tmp_path / "truth.npz", sequences=ids.numpy())
    return tmp_path, ids


def _attack(d: Path, *extra: str) -> list[str]:
    args = ["attack", "--model", str(d / "model"), "--update", str(d / "update.safetensors")]
    return [*args, "--meta", str(d / "meta.json"), "--preset", "dager", "--quiet", *extra]


def test_attack_a_saved_language_model_update_from_a_model_directory(saved_text_update) -> None:
    d, ids = saved_text_update
    result = runner.invoke(
        app, _attack(d, "--out", str(d / "out"), "--truth", str(d / "truth.npz"))
    )
    assert result.exit_code == 0, result.output
    assert "recovered (" in result.output and "EXACT 1," in result.output
    rec = json.loads((d / "out" / "reconstruction.json").read_text())
    assert rec["feasible"] is True and rec["confidence"] > 0.99
    assert sorted(rec["sequences"]) == sorted(ids.tolist())
    assert all(isinstance(t, str) and t for t in rec["texts"])
    metrics = json.loads((d / "out" / "metrics.json").read_text())
    assert metrics["exact"] == 1.0 and metrics["rougeL"] == 1.0
    assert "<mark><u>" in (d / "out" / "reconstruction.html").read_text()


@pytest.mark.parametrize("saved_text_update", [8], indirect=True)
def test_an_update_past_the_rank_limit_is_infeasible_with_no_text(saved_text_update) -> None:
    d, _ = saved_text_update  # 8 x 15 tokens with a gradient, for a width of 64
    result = runner.invoke(app, _attack(d, "--out", str(d / "out")))
    assert result.exit_code == 0, result.output
    rec = json.loads((d / "out" / "reconstruction.json").read_text())
    assert rec["feasible"] is False and rec["sequences"] == [] and rec["texts"] == []
    assert "rank" in rec["reason"]
