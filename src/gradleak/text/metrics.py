"""How close a recovered sentence is to the client's: exact match, ROUGE-1/2/L (rouge-score's own
implementation, F-measure, on the decoded text), token-set precision and recall, and the share of
the sentence's personal strings recovered verbatim. Each takes recovered and true token ids (N x L,
paired row by row) and gives one value per pair."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from gradleak.text import personal
from gradleak.text.extra import require
from gradleak.text.vocabulary import Vocabulary

ROUGE = ("rouge1", "rouge2", "rougeL")


def exact_match(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """1 where the whole sequence is recovered token for token, else 0 (rows of another length,
    such as a token set's, never match)."""
    if recon.shape[1:] != truth.shape[1:]:
        return torch.zeros(len(recon))
    return (recon.long() == truth.long()).all(dim=1).float()


def token_sets(
    vocab: Vocabulary,
) -> tuple[
    Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
]:
    """(precision, recall) of the sets of non-special tokens: the share of recovered tokens that
    the sentence holds, and of the sentence's tokens that were recovered (an empty set: 0)."""

    def counts(recon: torch.Tensor, truth: torch.Tensor) -> list[tuple[int, int, int]]:
        out = []
        for r, t in zip(recon.tolist(), truth.tolist(), strict=True):
            a, b = set(r) - vocab.special, set(t) - vocab.special
            out.append((len(a & b), len(a), len(b)))
        return out

    def precision(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        return torch.tensor([c / a if a else 0.0 for c, a, _ in counts(recon, truth)])

    def recall(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        return torch.tensor([c / b if b else 0.0 for c, _, b in counts(recon, truth)])

    return precision, recall


def rouge(vocab: Vocabulary, kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """ROUGE ``kind`` (rouge1, rouge2, rougeL) F-measure of the decoded texts, by rouge-score."""

    def fn(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        scorer = require("rouge_score.rouge_scorer", "audit.metric").RougeScorer([kind])
        pairs = zip(vocab.decode_batch(recon.tolist()), vocab.decode_batch(truth.tolist()))
        return torch.tensor([scorer.score(t, r)[kind].fmeasure for r, t in pairs])

    return fn


def personal_share(
    vocab: Vocabulary, known: Mapping[str, tuple[str, ...]]
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The share of the sentence's personal strings (``personal.find``: known to the source or
    matching a pattern) that the recovered text holds verbatim; NaN for a sentence that holds
    none (left out of the mean)."""

    def fn(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        out = []
        for r, t in zip(vocab.decode_batch(recon.tolist()), vocab.decode_batch(truth.tolist())):
            strings = personal.find(t, known.get(t, ()))
            hits = personal.recovered(strings, r)
            out.append(sum(hits) / len(hits) if hits else math.nan)
        return torch.tensor(out, dtype=torch.float64)

    return fn


def hamming(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """R x M: the share of positions where reconstruction r and sentence m differ (the cheap cost
    that pairs them before the metrics run)."""
    r, t = recon.long(), truth.long()
    length = min(r.shape[1], t.shape[1])
    differ = (r[:, None, :length] != t[None, :, :length]).float().mean(dim=2)
    return differ + (r.shape[1] != t.shape[1])
