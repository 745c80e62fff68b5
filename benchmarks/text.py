"""Exact recovery of text (the dager attack) and its optimisation baseline (tag): time and memory
per batch size and width, and the recovery targets; JSON output.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/text.py CASE [CASE ...]     (or: all)

Cases:
  targets     the targets: GPT-2-style 2 blocks, vocabulary 8,000: d = 512 with 16 notes
              of 16 tokens, d = 768 with 16 x 32, GPT-2-small geometry (vocabulary 50,257, d = 768)
              with 4 x 32; saturated layers (d = 256, 16 x 16; d = 512, 64 x 16); 3 local steps
              (lr 0.01 and 0.1); LoRA rank 128 and 32 at 4 x 16; Gaussian noise 1e-3 on the update;
              LLaMA-style d = 512, 8 x 16; BERT-style classifiers d = 256 (4 x 10, 4 x 14, 1 x 30)
  scaling     seconds and peak memory per batch size (1, 4, 16, 64) and width (256, 512, 768), 16
              tokens, vocabulary 8,000
  baseline    tag (200 Adam steps) against dager on the same updates, d = 256, 1 x 16 and 4 x 16
  llama4096   LLaMA geometry (width 4,096, 32 heads, 8 key/value heads, MLP 11,008; 2 blocks,
              vocabulary 8,000) with 8 notes of 16 tokens, on the CPU (batch x length up to
              2,000 needs a GPU)
  tokens      the token set from the input embedding's gradient (attack token-set): LLaMA-style
              d = 512 (untied table) with 16 x 16 and 4 x 32 at lr 0.01 and 1e-4 (the float32
              delta's rounding), 3 local steps; GPT-2 (tied table) and noise 1e-3: infeasible
  minibatches one round of 8 notes in mini-batches of 8, 4, 2 and 1 (one SGD step each) at lr 0.1,
              0.01 and 0.001, d = 256: which mini-batches the exact attack still recovers
The BERT targets send the float32 gradient itself (FedSGD, "a gradient with lr 1 and one step",
dager with float_noise off); bert_d256_4x10_delta sends the float32 delta of one step at lr 1.
Every case is otherwise the product's own path: Faker notes (the faker-text source's generator) and
an 8,000-token BPE trained offline on 40,000 of their sentences (cached under results/), the model
from gradleak.text.models, the client's update from gradleak's local training (a float32 delta, as
a server receives it), and the attack from ATTACKS on a ServerView, scored with the text metrics.
Each attack runs in a fresh process (one thread) so that its peak resident memory is its own (model
skeleton, global weights, update and attack). The GPT-2-small geometry case embeds 50,257 tokens
but its notes use the 8,000 the tokenizer has.
Results go to benchmarks/results/text_CASE.json and stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from cases import OUT, run_cases

os.environ.setdefault("OMP_NUM_THREADS", "1")


@dataclass(frozen=True)
class Case:
    """One update and its attack. ``seq_len`` counts every token fed to the model."""

    name: str
    family: str  # gpt2 | llama | bert
    d: int
    batch: int
    seq_len: int
    vocab: int = 8000
    epochs: int = 1  # local epochs over the batch (several steps when > 1)
    batch_size: int | None = None  # mini-batch (None: the whole batch in one step)
    lr: float = 0.01
    noise: float = 0.0
    lora_rank: int | None = None
    model_kwargs: tuple = ()  # further model arguments, as (key, value) pairs
    send: str = "delta"  # what the client sends: its float32 delta, or (FedSGD) its gradient
    attack: str = "dager"
    settings: tuple = ()  # the attack's settings, as (key, value) pairs
    expect: str = ""

    @property
    def task(self) -> str:
        return "classification" if self.family == "bert" else "causal-lm"


TARGETS = [
    Case("gpt2_d512_16x16", "gpt2", 512, 16, 17, expect="exact, every personal string, <= 10 s"),
    Case("gpt2_d768_16x32", "gpt2", 768, 16, 33, expect="exact, <= 45 s"),
    Case("gpt2small_geometry_4x32", "gpt2", 768, 4, 33, vocab=50257, expect="<= 20 s, <= 2 GB"),
    Case("saturated_d256_16x16", "gpt2", 256, 16, 17, expect="infeasible, no text"),
    Case("saturated_d512_64x16", "gpt2", 512, 64, 17, expect="infeasible, no text"),
    Case("fedavg3_lr0.01_d512_8x16", "gpt2", 512, 8, 17, epochs=3, lr=0.01, expect="exact"),
    Case("fedavg3_lr0.1_d512_8x16", "gpt2", 512, 8, 17, epochs=3, lr=0.1, expect="exact"),
    Case("lora_r128_d512_4x16", "gpt2", 512, 4, 17, lora_rank=128, expect="exact (128 > 4 x 16)"),
    Case("lora_r32_d512_4x16", "gpt2", 512, 4, 17, lora_rank=32, expect="infeasible (32 < 4 x 16)"),
    Case("noised_1e-3_d512_8x16", "gpt2", 512, 8, 17, noise=1e-3, expect="no text"),
    Case("llama_d512_8x16", "llama", 512, 8, 18, expect="exact (beginning token + 16 + end)"),
    Case("bert_d256_4x10", "bert", 256, 4, 12, send="gradient", expect="ROUGE-1 >= 0.95"),
    Case("bert_d256_4x14", "bert", 256, 4, 16, send="gradient", expect="ROUGE-1 >= 0.95"),
    Case("bert_d256_1x30", "bert", 256, 1, 32, send="gradient", expect="exact from layer 1"),
    Case("bert_d256_4x10_delta", "bert", 256, 4, 12, lr=1.0, expect="the float32 delta"),
]
SCALING = [
    Case(f"scaling_d{d}_{b}x16", "gpt2", d, b, 17) for d in (256, 512, 768) for b in (1, 4, 16, 64)
]
TAG = (("steps", 200),)
BASELINE = [
    Case("tag_d256_1x16", "gpt2", 256, 1, 17, attack="tag", settings=TAG),
    Case("dager_d256_1x16", "gpt2", 256, 1, 17),
    Case("tag_d256_4x16", "gpt2", 256, 4, 17, attack="tag", settings=TAG),
    Case("dager_d256_4x16", "gpt2", 256, 4, 17),
]
LLAMA_4096 = (("heads", 32), ("kv_heads", 8), ("intermediate", 11008))
LLAMA = [Case("llama_d4096_8x16", "llama", 4096, 8, 18, model_kwargs=LLAMA_4096, expect="exact")]
MINIBATCHES = [
    Case(f"minibatch{bs}_lr{lr}_d256_8x16", "gpt2", 256, 8, 17, batch_size=bs, lr=lr)
    for lr in (0.1, 0.01, 0.001)
    for bs in (8, 4, 2, 1)
]
TOKENS = [
    Case(f"tokens_llama_d512_{b}x{n}_lr{lr}", "llama", 512, b, n + 2, lr=lr, attack="token-set")
    for b, n in ((16, 16), (4, 32))
    for lr in (0.01, 1e-4)
] + [
    Case("tokens_llama_d512_8x16_3steps", "llama", 512, 8, 18, epochs=3, attack="token-set"),
    Case("tokens_gpt2_d512_8x16", "gpt2", 512, 8, 17, attack="token-set", expect="infeasible"),
    Case("tokens_noised_llama_d512_8x16", "llama", 512, 8, 18, noise=1e-3, attack="token-set"),
]
CACHE = OUT / ".text_cache"


def _corpus():
    """Faker notes (3 sentences each) and the 8,000-token BPE of 40,000 of their sentences,
    cached."""
    from gradleak.text.corpus import Record, faker_records
    from gradleak.text.vocabulary import Vocabulary

    CACHE.mkdir(parents=True, exist_ok=True)
    notes, tok = CACHE / "notes.json", CACHE / "tokenizer.json"
    if not (notes.exists() and tok.exists()):
        records = faker_records(14_000, seed=0)
        vocab = Vocabulary.train([r.text for r in records], vocab_size=8000)
        notes.write_text(json.dumps([[r.text, list(r.personal), r.kind] for r in records]))
        vocab.tokenizer.save(str(tok))
    records = [Record(t, tuple(p), k) for t, p, k in json.loads(notes.read_text())]
    return records, Vocabulary.load(CACHE)


def _spec(case: Case, vocab, known=None):
    import dataclasses

    from gradleak.text.spec import TextSpec

    v = dataclasses.replace(vocab, size=max(vocab.size, case.vocab))
    return TextSpec(v, case.seq_len, case.task, known or {})


def _model(case: Case, spec):
    import torch

    from gradleak.modality import TASKS
    from gradleak.models import build_model

    torch.manual_seed(0)
    kwargs = {"d_model": case.d, "layers": 2, **dict(case.model_kwargs)}
    if case.lora_rank:
        kwargs["lora_rank"] = case.lora_rank
    task = TASKS.get(case.task)()
    return build_model(case.family, spec=spec, num_classes=2, kwargs=kwargs, task=task), task


def prepare(case: Case, path: Path) -> dict:
    """The client: a batch of notes, one round of local training, the update saved."""
    import time

    import torch

    from gradleak.data.dataset import Dataset
    from gradleak.data.partition import ClientData
    from gradleak.fl.client import LocalTraining, train_client
    from gradleak.text import personal
    from gradleak.text.sources import encode

    records, vocab = _corpus()
    offset = 500 + 37 * case.batch + case.seq_len  # the same notes for cases of one shape
    ids, kept = encode(
        vocab,
        [r.text for r in records[offset : offset + 4 * case.batch]],
        seq_len=case.seq_len,
        task=case.task,
        bos=case.family == "llama",
    )
    ids, kept = ids[: case.batch], kept[: case.batch]
    chosen = [records[offset + i] for i in kept]
    texts = vocab.decode_batch(ids.tolist())
    spec = _spec(case, vocab, personal.index(texts, [r.personal for r in chosen]))
    model, task = _model(case, spec)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = Dataset(ids, torch.tensor([r.kind % 2 for r in chosen]))
    client = ClientData(1, data, case.batch_size or case.batch)
    start = time.perf_counter()
    lr = 1.0 if case.send == "gradient" else case.lr
    settings = LocalTraining(case.epochs, lr)
    update, _ = train_client(
        model, state, client, round=1, settings=settings, spec=spec, task=task, seed=0
    )
    if case.send == "gradient":  # FedSGD: the float32 gradient itself, as -1 x gradient
        model.load_state_dict(state)
        model.train()
        loss = task.loss(model, spec.model_inputs(ids), data.targets)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        delta = {k: torch.zeros_like(v) for k, v in update.delta.items()}
        delta |= {n: -g.detach() for n, g in zip(names, grads)}
        if "lm_head.weight" in delta and "transformer.wte.weight" in delta:
            delta["lm_head.weight"] = delta["transformer.wte.weight"]  # tied
        update = type(update)(delta, update.meta, update.buffers)
    client_seconds = time.perf_counter() - start
    if case.noise:
        gen = torch.Generator().manual_seed(0)
        noise = case.noise * case.lr  # on the delta: case.noise on the gradient
        delta = {
            k: v + noise * torch.randn(v.shape, generator=gen) for k, v in update.delta.items()
        }
        update = type(update)(delta, update.meta, update.buffers)
    torch.save({"case": asdict(case), "state": state, "update": update, "truth": ids}, path)
    return {"client_seconds": client_seconds, "tokens_with_gradient": _tokens(case)}


def _tokens(case: Case) -> int:
    return case.batch * (case.seq_len - (case.task == "causal-lm"))


def attack(path: Path) -> dict:
    """The server, in a fresh process: the skeleton, the weights and the update; the attack."""
    import torch

    from gradleak.attacks.base import ServerView
    from gradleak.attacks.registry import attack_factory
    from gradleak.metrics import score
    from gradleak.text import personal

    torch.set_num_threads(1)
    saved = torch.load(path, weights_only=False)
    raw = saved["case"]
    pairs = {k: tuple(map(tuple, raw[k])) for k in ("settings", "model_kwargs")}
    case = Case(**{**raw, **pairs})
    _, vocab = _corpus()
    truth = saved["truth"]
    model, _ = _model(case, _spec(case, vocab))
    spec = _spec(case, vocab)
    view = ServerView.of(model, saved["state"], saved["update"], spec=spec, num_classes=2)
    settings = dict(case.settings)
    if case.send == "gradient" and case.attack == "dager":
        settings["float_noise"] = False  # a gradient carries no rounding of the weights
    rec = attack_factory(case.attack)(**settings).run(view, seed=0)
    out = {"feasible": rec.feasible, "reason": rec.reason, "confidence": rec.confidence}
    out |= {"seconds": rec.seconds, "peak_rss_mb": _peak_rss_mb()}
    if rec.examples is not None:
        texts = vocab.decode_batch(truth.tolist())
        spec = _spec(case, vocab, personal.index(texts, [personal.find(t) for t in texts]))
        found = score(rec.examples, truth, spec)
        out |= {k: v for k, v in found.summary().items() if k != "label_accuracy"}
        got = {tuple(r) for r in rec.examples.tolist()}
        out["sentences_exact"] = sum(tuple(r) in got for r in truth.tolist())
    if rec.match_scores and case.attack == "tag":
        out["final_cosine"] = rec.match_scores[0]
    return out


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM restarts at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(cases: list[Case]) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            path = Path(tmp) / f"{case.name}.pt"
            row = {**asdict(case), **prepare(case, path)}
            proc = subprocess.run(
                [sys.executable, __file__, "--attack", str(path)],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            if proc.returncode != 0:
                row["error"] = proc.stderr[-3000:]
            else:
                row |= json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(_line(row), file=sys.stderr, flush=True)
    return {"load_average": os.getloadavg(), "results": rows}


def _line(row: dict) -> str:
    if "error" in row:
        return f"{row['name']}: ERROR {row['error'][-300:]}"
    got = (
        f"exact {row.get('exact', 0):.2f} R1 {row.get('rouge1', 0):.3f}" if row["feasible"] else "-"
    )
    return (
        f"{row['name']:32s} feasible={row['feasible']!s:5} conf={row['confidence'] or 0:.3f} "
        f"{got} personal={row.get('personal')} {row['seconds']:.1f}s {row['peak_rss_mb']:.0f}MB"
    )


CASES = {
    "targets": lambda: run(TARGETS),
    "scaling": lambda: run(SCALING),
    "baseline": lambda: run(BASELINE),
    "llama4096": lambda: run(LLAMA),
    "minibatches": lambda: run(MINIBATCHES),
    "tokens": lambda: run(TOKENS),
}

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--attack":
        print(json.dumps(attack(Path(sys.argv[2]))))
    else:
        run_cases(CASES, "text", __doc__)
