"""The text modality's parts against independent computations: the tokenizer, the sources, the
metrics (ROUGE against rouge-score itself), the prior, the causal-LM task (against transformers'
own loss), the models, the renderer (escaped), and the laziness of the optional packages."""

from __future__ import annotations

import collections
import json
import math
import subprocess
import sys

import pytest
import torch

from gradleak.errors import ConfigError, DataError
from gradleak.metrics import score

torch.set_num_threads(1)


# --- tokenizer and sources ----------------------------------------------------------------------


def test_trained_tokenizer_round_trips_text_and_loads_back_from_a_directory(
    text_data, tmp_path
) -> None:
    from gradleak.text.vocabulary import Vocabulary

    vocab = text_data.spec.vocab
    text = "Call Ann back on (555) 123-4567 before noon."
    assert vocab.decode(vocab.encode(text)) == text
    assert (vocab.end, vocab.pad, vocab.bos, vocab.cls, vocab.sep) == (0, 1, 2, 3, 4)
    vocab.tokenizer.save(str(tmp_path / "tokenizer.json"))
    again = Vocabulary.load(tmp_path)
    assert again.size == vocab.size and again.encode(text) == vocab.encode(text)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "[SEP]"}))
    assert Vocabulary.load(tmp_path).end == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no tokenizer"):
        Vocabulary.load(tmp_path / "empty")


def test_faker_source_is_seeded_ends_every_note_and_knows_its_personal_strings(text_data) -> None:
    from gradleak.text.sources import FakerTextSource

    again = FakerTextSource(size=400, seq_len=16, vocab_size=2000, canaries=4).load(0)
    assert torch.equal(again.train.examples, text_data.train.examples)
    other = FakerTextSource(size=400, seq_len=16, vocab_size=2000, canaries=4).load(1)
    assert not torch.equal(other.train.examples[:10], text_data.train.examples[:10])
    x = text_data.train.examples
    assert x.dtype == torch.long and x.shape[1] == 16 and bool((x[:, -1] == 0).all())
    assert len(text_data.classes) == 6 and text_data.task == "causal-lm"
    texts = text_data.spec.text(x)
    canaries = [t for t in texts if t.startswith("The vault code of")]
    assert len(canaries) == 4
    for t in canaries:  # the canary's name is a known personal string of its note
        assert text_data.spec.known[t][0] in t
    with_strings = sum(bool(text_data.spec.personal_strings(t)) for t in texts)
    assert with_strings / len(texts) > 0.95


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".txt"])
def test_the_users_text_files_are_read_in_every_format(tmp_path, suffix) -> None:
    from gradleak.text.sources import TextFilesSource

    rows = [
        {
            "text": f"Account {100000 + i}: wire the refund to the customer today and send a"
            " note to the branch office about it, thanks a lot.",
            "label": "refund" if i % 2 else "other",
            "pii": [str(100000 + i)],
        }
        for i in range(20)
    ]
    path = tmp_path / f"notes{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif suffix == ".csv":
        lines = ["text,label,pii"] + [f'"{r["text"]}",{r["label"]},{r["pii"][0]}' for r in rows]
        path.write_text("\n".join(lines))
    else:
        path.write_text("\n\n".join(r["text"] for r in rows))
    labelled = suffix != ".txt"
    source = TextFilesSource(
        path=path,
        seq_len=16,
        vocab_size=400,
        label_field="label" if labelled else None,
        personal_field="pii" if labelled else None,
        task="classification" if labelled else "causal-lm",
    )
    data = source.load(0)
    assert len(data.train) + len(data.test) == 20
    assert data.classes == (("other", "refund") if labelled else ("text",))
    if labelled:
        assert bool((data.train.examples[:, 0] == data.spec.vocab.cls).all())
        text = data.spec.text(data.train.examples[:1])[0]
        assert data.spec.known[text]  # the account number of the personal_field


def test_bad_text_files_are_one_clear_error(tmp_path) -> None:
    from gradleak.text.sources import TextFilesSource

    path = tmp_path / "notes.jsonl"
    path.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="record 1 has no text in 'text'"):
        TextFilesSource(path=path).load(0)
    path.write_text('{"text": "x"}\n[1]\n')
    with pytest.raises(DataError, match="line 2: not a JSON object"):
        TextFilesSource(path=path).load(0)
    path.write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match="needs data.label_field"):
        TextFilesSource(path=path, task="classification").load(0)
    path.write_text("\n".join(json.dumps({"text": "short"}) for _ in range(5)))
    with pytest.raises(DataError, match="lower data.seq_len"):
        TextFilesSource(path=path, seq_len=40, vocab_size=300).load(0)


# --- metrics, cost, prior ----------------------------------------------------------------------


def test_metrics_against_independent_computations(text_data) -> None:
    from rouge_score import rouge_scorer

    spec = text_data.spec
    truth = text_data.train.examples[:6]
    recon = truth.clone()
    recon[1, 3:9] = truth[2, 3:9]  # a partly wrong sentence
    recon[4] = truth[5]  # a wrong sentence
    s = score(recon, truth, spec, assignment=torch.arange(6).numpy())
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for i, (r, t) in enumerate(zip(spec.text(recon), spec.text(truth))):
        ref = scorer.score(t, r)
        for k in ("rouge1", "rouge2", "rougeL"):
            assert s.values[k][i].item() == pytest.approx(ref[k].fmeasure)
        a, b = set(recon[i].tolist()) - {0, 1}, set(truth[i].tolist()) - {0, 1}
        assert s.values["token_precision"][i].item() == pytest.approx(len(a & b) / len(a))
        assert s.values["token_recall"][i].item() == pytest.approx(len(a & b) / len(b))
        assert s.values["exact"][i].item() == float(recon[i].tolist() == truth[i].tolist())
    assert s.values["personal"][0].item() == 1.0
    assert s.values["personal"][4].item() < 1.0


def test_personal_share_counts_verbatim_strings_and_skips_sentences_without_any() -> None:
    from gradleak.metrics.matching import ReconstructionScore
    from gradleak.text.metrics import personal_share

    class Texts:  # token id -> text, standing in for a tokenizer
        def decode_batch(self, rows):
            return [TEXTS[r[0]] for r in rows]

    TEXTS = {
        1: "mail ann@example.org or call 555-123-4567",
        2: "nothing here",
        3: "mail ann@example.org or call 555-000-0000",
        4: "x",
    }
    out = personal_share(Texts(), {})(torch.tensor([[3], [4]]), torch.tensor([[1], [2]]))
    assert out[0].item() == 0.5 and math.isnan(out[1].item())
    summary = ReconstructionScore(None, {"personal": out}, None).summary()
    assert summary["personal"] == 0.5  # the sentence without personal strings is left out


def test_cost_pairs_and_the_priors_are_the_public_texts_most_frequent_tokens(text_data) -> None:
    spec = text_data.spec
    truth = text_data.train.examples[:5]
    cost = spec.cost(truth.flip(0), truth)
    assert cost.shape == (5, 5) and bool((cost.flip(0).diagonal() == 0).all())
    assert bool((cost.flip(0) + torch.eye(5) > 0).all())  # distinct notes differ somewhere
    prior = spec.prior("positional", text_data.test)
    test = text_data.test.examples.tolist()
    for p in range(16):
        counts = collections.Counter(row[p] for row in test)
        assert counts[prior[0, p].item()] == max(counts.values())
    bag = spec.prior("unigram", text_data.test)[0].tolist()
    counts = collections.Counter(t for row in test for t in row if t not in (0, 1))
    top = sorted(counts.values(), reverse=True)[:15]  # ties in any order
    assert bag[-1] == 0 and [counts[t] for t in bag[:-1]] == top and len(set(bag)) == 16
    with pytest.raises(ConfigError, match="audit.prior: 'mean-image' is not a prior of text"):
        spec.prior("mean-image", text_data.test)


# --- task and models ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2(text_data):
    from gradleak.models import build_model
    from gradleak.text.tasks import CausalLM

    torch.manual_seed(0)
    return build_model(
        "gpt2", spec=text_data.spec, num_classes=6, kwargs={"d_model": 64}, task=CausalLM()
    )


def test_causal_lm_loss_and_evaluation_equal_transformers_own(gpt2, text_data) -> None:
    from gradleak.text.tasks import CausalLM

    x = text_data.test.examples
    own = gpt2.forward(input_ids=x[:8], labels=x[:8]).loss  # forward: no gradleak hook
    assert CausalLM().loss(gpt2, x[:8], torch.zeros(8)).item() == pytest.approx(own.item(), 1e-5)
    acc, loss = CausalLM().evaluate(gpt2, text_data.test, text_data.spec)
    logits = gpt2.forward(input_ids=x).logits[:, :-1]
    assert acc == pytest.approx(float((logits.argmax(-1) == x[:, 1:]).float().mean()))
    assert loss == pytest.approx(gpt2.forward(input_ids=x, labels=x).loss.item(), rel=1e-4)


def test_models_are_built_probed_and_refused_by_task(text_data, tmp_path) -> None:
    from gradleak.fl.tasks import Classification
    from gradleak.models import build_model
    from gradleak.text.models import load_directory
    from gradleak.text.tasks import CausalLM

    spec = text_data.spec
    llama = build_model("llama", spec=spec, num_classes=6, kwargs={"d_model": 64}, task=CausalLM())
    assert llama(spec.blank(2)).shape == (2, 16, spec.vocab_size)
    with pytest.raises(ConfigError, match="not 2 x 6 class scores"):
        build_model("gpt2", spec=spec, num_classes=6, kwargs={"d_model": 64})
    with pytest.raises(ConfigError, match="data.task: bert serves classification here"):
        build_model("bert", spec=spec, num_classes=6, kwargs={"d_model": 64}, task=CausalLM())
    from gradleak.text.spec import TextSpec

    cls_spec = TextSpec(spec.vocab, 16, "classification")
    bert = build_model(
        "bert", spec=cls_spec, num_classes=6, kwargs={"d_model": 64}, task=Classification()
    )
    assert bert(cls_spec.blank(3)).shape == (3, 6)
    bert.save_pretrained(tmp_path / "bert")
    again = load_directory(tmp_path / "bert", task="classification")
    x = text_data.train.examples[:2]
    torch.testing.assert_close(again(x), bert.eval()(x))
    kwargs = {"d_model": 64, "lora_rank": 8}
    lora = build_model("gpt2", spec=spec, num_classes=6, kwargs=kwargs, task=CausalLM())
    trained = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)


# --- the renderer and the optional packages -----------------------------------------------------


def test_renderer_escapes_text_and_highlights_recovered_personal_strings(text_data) -> None:
    from gradleak.modality import RENDERERS
    from gradleak.text.spec import TextSpec

    vocab = text_data.spec.vocab
    hostile = '<script>alert("x")</script> mail eve@example.org & "quotes"'
    ids = torch.tensor([vocab.encode(hostile)])
    other = torch.full_like(ids, vocab.pad)
    words = vocab.encode("<b>nothing</b> mail bob@example.org")[: ids.shape[1]]
    other[0, : len(words)] = torch.tensor(words)
    spec = TextSpec(vocab, ids.shape[1], known={hostile: ("eve@example.org",)})
    renderer = RENDERERS.get("text").for_spec(spec)
    page = renderer.file([("original", ids), ("reconstruction", ids)]).decode()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<mark><u>eve@example.org</u></mark>" in page
    html = renderer.html([("round 1", torch.cat([ids, other, other]))], "alt <x>")
    assert "<b>" not in html and "alt &lt;x&gt;" in html
    assert "<u>eve@example.org</u>" in html and "<mark><u>eve" not in html  # not recovered
    assert renderer.accepts(ids.numpy()) and not renderer.accepts(ids.float().numpy())
    unbound = RENDERERS.get("text").html([("r", ids)], "a")
    assert str(ids[0, 0].item()) in unbound  # token ids, without the tokenizer


def test_text_packages_load_lazily_and_a_missing_one_names_the_pip_command(monkeypatch) -> None:
    code = (
        "import sys; from gradleak.modality import load_modalities; load_modalities(); "
        "import gradleak.cli, gradleak.experiments.config; "
        "print(sorted(m for m in ('transformers', 'tokenizers', 'peft', 'faker', 'rouge_score') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    import importlib.util

    from gradleak.text import extra

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "faker" else real(n, *a)
    )
    with pytest.raises(
        ConfigError, match=r"faker.*pip install -c constraints.txt 'gradleak\[text\]'"
    ):
        extra.require("faker")
