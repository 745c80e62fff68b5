"""The text modality's input spec: token ids (N x L, int64) of a fixed length, fed to the model as
they are, compared by exact match, ROUGE, token sets and the personal strings recovered verbatim,
paired by the share of differing positions, and shown decoded (``render``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from gradleak.data.dataset import Dataset
from gradleak.errors import ConfigError
from gradleak.modality import Metric
from gradleak.text import metrics as m
from gradleak.text import personal
from gradleak.text.vocabulary import Vocabulary

TextTask = Literal["causal-lm", "classification"]


@dataclass(frozen=True)
class TextSpec:
    """Sequences of ``seq_len`` token ids of ``vocab`` for ``task``: a causal language model
    (every sequence ends with the end token the source appends, since a causal LM's last position
    gets no gradient and would otherwise be lost to any attack) or a sequence classifier
    ([CLS] ... [SEP]). ``known``: the personal strings the source put in each sentence, by its
    decoded text."""

    kind: ClassVar[str] = "text"
    vocab: Vocabulary
    seq_len: int
    task: TextTask = "causal-lm"
    known: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False, repr=False)

    PRIORS: ClassVar[tuple[str, ...]] = ("unigram", "positional")

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    @property
    def metrics(self) -> dict[str, Metric]:
        precision, recall = m.token_sets(self.vocab)
        return {
            "exact": Metric("exact", m.exact_match, True),
            **{k: Metric(k, m.rouge(self.vocab, k), True) for k in m.ROUGE},
            "token_precision": Metric("token_precision", precision, True),
            "token_recall": Metric("token_recall", recall, True),
            "personal": Metric("personal", m.personal_share(self.vocab, self.known), True),
        }

    def model_inputs(self, examples: torch.Tensor) -> torch.Tensor:
        return examples.long()

    def cost(self, recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        return m.hamming(recon, truth)

    def factory_args(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab.size,
            "seq_len": self.seq_len,
            "task": self.task,
            "pad_token_id": self.vocab.pad,
        }

    def blank(self, n: int) -> torch.Tensor:
        return torch.full((n, self.seq_len), self.vocab.pad, dtype=torch.long)

    def prior(self, name: str, public: Dataset) -> torch.Tensor:
        """What the server guesses from public (test) text without the update. positional: at
        every position, the token most frequent there; unigram: the most frequent tokens of the
        public text, most frequent first, in the positions that do not hold special tokens (the
        bag of tokens a unigram model expects in any sentence; special tokens where the positional
        guess has them)."""
        if name not in self.PRIORS:
            raise ConfigError(
                "audit.prior",
                f"{name!r} is not a prior of text (one of {', '.join(self.PRIORS)})",
            )
        if len(public) == 0:
            return self.blank(1)
        ids = public.examples.long()
        row = ids.mode(dim=0).values
        if name == "positional":
            return row[None]
        special = torch.tensor([int(t) in self.vocab.special for t in row])
        plain = ids[~torch.isin(ids, torch.tensor(sorted(self.vocab.special)))]
        counts = torch.bincount(plain, minlength=int(ids.max()) + 1)
        top = torch.argsort(counts, descending=True, stable=True)[: int((~special).sum())]
        row = row.clone()
        row[~special] = top[: int((~special).sum())]
        return row[None]

    def text(self, ids: torch.Tensor) -> list[str]:
        """The decoded text of each row of ``ids``."""
        return self.vocab.decode_batch(ids.long().tolist())

    def personal_strings(self, text: str) -> list[str]:
        """The personal strings of one decoded sentence (known to the source, or patterns)."""
        return personal.find(text, self.known.get(text, ()))
