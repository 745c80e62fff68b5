"""The text attacks, registered in ``attacks.ATTACKS``: ``dager``, exact recovery of a batch of
sentences from a transformer's update (``attacks.exact.dager``), ``token-set``, the batch's tokens
read off the input embedding's gradient (``attacks.exact.tokens``), and ``tag``, the optimisation
baseline they are compared with (``text.baseline``). Each sees only the server's view: the model,
the global weights, the update and the protocol's metadata (how many sequences, how long)."""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field, ValidationError

from gradleak.attacks.base import ATTACKS, Progress, Reconstruction, ServerView
from gradleak.schema import Section, one_line


def _text_view(view: ServerView) -> str | None:
    """Why ``view`` is not a transformer's update on text (None: it is)."""
    from gradleak.attacks.exact.dager.arch import ADAPTERS

    if getattr(view.spec, "kind", None) != "text":
        return f"it recovers text, and these examples are {view.spec.kind}"
    base = view.model.get_base_model() if hasattr(view.model, "get_base_model") else view.model
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        return f"the model is not a transformers model of {', '.join(sorted(ADAPTERS))}"
    return None


def _gradient(view: ServerView) -> dict[str, torch.Tensor]:
    """The update as a gradient (``-delta / lr``: the gradient after one step, the sum of the
    step gradients after several), for the weights the client trained (LoRA: the adapters)."""
    trained = {n for n, p in view.model.named_parameters() if p.requires_grad}
    return {n: g for n, g in view.pseudo_gradient().items() if n in trained}


def _examples(seqs: list[list[int]], view: ServerView) -> torch.Tensor:
    """N x L token ids, one row per original: the recovered sequences (cut or padded to the
    spec's length), then rows of padding for sentences not recovered."""
    spec = view.spec
    blank = spec.blank(max(view.num_examples, len(seqs)))
    for i, s in enumerate(seqs):
        row = torch.as_tensor(s[: spec.seq_len], dtype=torch.long)
        blank[i, : len(row)] = row
    return blank


def _embedding_check(view: ServerView, sequences: list[list[int]]) -> str:
    """A second, independent witness for recovered text: the tokens it uses against the set read
    off the input embedding's gradient (nothing where that set cannot be read, e.g. tied
    embeddings)."""
    from gradleak.attacks.exact.tokens import embedding_tokens

    found = embedding_tokens(
        view.model, view.update, max_tokens=view.num_examples * view.spec.seq_len
    )
    if not found.feasible:
        return ""
    used = {t for s in sequences for t in s} - view.spec.vocab.special
    outside = used - set(found.tokens)
    if not outside:
        return f"; every recovered token is among the {len(found.tokens)} the embedding shows"
    return (
        f"; {len(outside)} recovered tokens left the embedding unchanged (rounded away in the "
        "update, or recovered wrongly)"
    )


def _settings(cls: type[Section], settings: dict[str, Any]) -> Any:
    try:
        return cls.model_validate(settings)
    except ValidationError as exc:
        raise one_line(exc, "audit.attack") from None


class DagerSettings(Section):
    """DAGER's settings (Petrov et al., NeurIPS 2024, as implemented in attacks.exact.dager)."""

    rel_tol: float = Field(
        1e-6, gt=0, lt=1, description="Singular values below rel_tol x the largest are rounding."
    )
    rank_margin: int | None = Field(
        None,
        ge=0,
        description="Refuse a span of rank >= width - rank_margin (default: min(20, width / 8), "
        "at least 4).",
    )
    min_confidence: float = Field(
        0.5, ge=0, le=1, description="Report infeasible below this confidence, emitting no text."
    )
    chunk_size: int = Field(
        4096, gt=0, description="Candidates per block of the distance computations (memory)."
    )
    max_prefixes: int | None = Field(
        None, gt=0, description="Decoder search gives up past this many live prefixes."
    )
    float_noise: bool = Field(
        True,
        description="Drop span directions below the rounding error of the update as sent (the "
        "weights' dtype, the local steps, the learning rate) rather than counting them.",
    )


class _TextAttack:
    """What every text attack shares: its settings, no labels wanted, applicable to a text
    update (``_text_view``), no training setting refused."""

    wants_labels = False

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def applies(self, view: ServerView) -> str | None:
        return _text_view(view)

    def refuses(self, training: Any) -> tuple[str, str] | None:
        return None


class Dager(_TextAttack):
    """Exact recovery of a text batch (DAGER): the span of each linear layer's inputs from its
    weight gradient (the update's float32 rounding counted as noise), the token sets of layer 1,
    then whole sequences through layer 2 (decoders, position by position) or by search
    (encoders). Infeasible, with the reason and no text, when a span fills its layer (too many
    tokens for the width) or the recovery does not explain the update (noise, dropout);
    confidence is the gap between true and false distances."""

    name = "dager"
    settings: DagerSettings

    def run(
        self,
        view: ServerView,
        *,
        seed: int = 0,
        prior: torch.Tensor | None = None,
        progress: Progress | None = None,
        device: Any = "cpu",
    ) -> Reconstruction:
        """Recover the batch (on the CPU, in float64 where it decides)."""
        from gradleak.attacks.exact.dager import recover
        from gradleak.attacks.exact.dager.api import float32_noise
        from gradleak.attacks.exact.dager.arch import architecture_for

        start = time.perf_counter()
        spec, s = view.spec, self.settings
        try:
            kind = architecture_for(view.model, view.global_state).kind
            gradient = _gradient(view)
            noise = (
                float32_noise(
                    view.global_state,
                    {n: view.update[n] for n in gradient},
                    lr=view.meta.lr,
                    steps=view.meta.steps,
                )
                if s.float_noise
                else None
            )
            result = recover(
                view.model,
                view.global_state,
                gradient,
                num_sequences=view.num_examples,
                seq_len=spec.seq_len,
                kind=kind,
                end_token=spec.vocab.end if kind == "decoder" else None,
                rel_tol=s.rel_tol,
                rank_margin=s.rank_margin,
                min_confidence=s.min_confidence,
                chunk_size=s.chunk_size,
                max_prefixes=s.max_prefixes,
                seed=seed,
                noise=noise,
            )
        except ValueError as exc:  # the architecture cannot be attacked (one block, ...)
            seconds = time.perf_counter() - start
            return Reconstruction(
                None, None, "none", feasible=False, reason=str(exc), seconds=seconds
            )
        if progress is not None:
            progress(1, 0.0)
        examples = _examples(result.sequences, view) if result.feasible else None
        reason = result.reason
        if result.feasible:
            reason += _embedding_check(view, result.sequences)
        return Reconstruction(
            examples,
            None,
            "none",
            feasible=result.feasible,
            reason=reason,
            confidence=result.confidence,
            match_scores=list(result.scores),
            seconds=time.perf_counter() - start,
        )


class TokenSetSettings(Section):
    """The token set has no settings; the section exists so that ``audit.attack`` is checked."""


class TokenSet(_TextAttack):
    """The batch's tokens from the rows of the input embedding that moved (an untied table: LLaMA,
    BERT; not GPT-2, whose table is tied to the output layer). A set without order or positions:
    every reconstructed row holds the whole set (most moved first), so a sentence's
    ``token_recall`` is the share of its tokens the server learned and ``token_precision`` how
    little the set narrows them down; exact match and ROUGE stay near 0 by design. Infeasible,
    with the reason, where the table is tied, frozen (LoRA) or moved in more rows than the batch
    has tokens (noise)."""

    name = "token-set"
    settings: TokenSetSettings

    def run(
        self,
        view: ServerView,
        *,
        seed: int = 0,
        prior: torch.Tensor | None = None,
        progress: Progress | None = None,
        device: Any = "cpu",
    ) -> Reconstruction:
        from gradleak.attacks.exact.tokens import embedding_tokens

        start = time.perf_counter()
        spec = view.spec
        found = embedding_tokens(
            view.model, view.update, max_tokens=view.num_examples * spec.seq_len
        )
        if progress is not None:
            progress(1, 0.0)
        seconds = time.perf_counter() - start
        if not found.feasible:
            return Reconstruction(
                None, None, "none", feasible=False, reason=found.reason, seconds=seconds
            )
        tokens = [t for t in found.tokens if t not in spec.vocab.special]
        width = max(len(tokens), spec.seq_len)
        row = torch.full((width,), spec.vocab.pad, dtype=torch.long)
        row[: len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
        return Reconstruction(
            row.expand(view.num_examples, width).clone(),
            None,
            "none",
            reason=found.reason,
            confidence=1.0,
            seconds=seconds,
        )


class TagSettings(Section):
    """The optimisation baseline's settings (TAG / LAMP style gradient matching)."""

    steps: int = Field(300, gt=0, description="Adam iterations.")
    lr: float = Field(0.05, gt=0, description="Step size, relative to the embeddings' scale.")
    l2_weight: float = Field(0.1, ge=0, description="Weight of the relative L2 term.")
    temperature: float = Field(0.05, gt=0, description="Softmax temperature of the soft labels.")
    match: str = Field(
        r"(^|\.)(h|layers|layer)\.[01]\.",
        description="Regular expression of the parameter gradients matched (the first two blocks).",
    )


class Tag(_TextAttack):
    """Gradient matching on soft input embeddings, projected to the nearest tokens (TAG, LAMP
    without its language-model prior): the optimisation baseline for causal LMs. It always
    returns text; its confidence is not calibrated (the final gradient cosine is kept in
    ``match_scores``)."""

    name = "tag"
    settings: TagSettings

    def applies(self, view: ServerView) -> str | None:
        why = _text_view(view)
        if why is None and getattr(view.spec, "task", None) != "causal-lm":
            return "the baseline matches a causal language model's update"
        return why

    def run(
        self,
        view: ServerView,
        *,
        seed: int = 0,
        prior: torch.Tensor | None = None,
        progress: Progress | None = None,
        device: Any = "cpu",
    ) -> Reconstruction:
        from gradleak.text.baseline import optimisation_baseline

        start = time.perf_counter()
        s, spec = self.settings, view.spec
        seqs, cosine = optimisation_baseline(
            view.model,
            view.global_state,
            _gradient(view),
            num_sequences=view.num_examples,
            seq_len=spec.seq_len,
            end_token=spec.vocab.end,
            match=s.match,
            steps=s.steps,
            lr=s.lr,
            l2_weight=s.l2_weight,
            temperature=s.temperature,
            seed=seed,
            progress=progress,
        )
        return Reconstruction(
            _examples(seqs, view),
            None,
            "none",
            reason=f"gradient matching, {s.steps} steps, final cosine {cosine:.4f}",
            match_scores=[cosine],
            iterations=s.steps,
            seconds=time.perf_counter() - start,
        )


@ATTACKS.register("dager")
def dager(**settings: Any) -> Dager:
    """Petrov, Dimitrov, Baader, Müller, Vechev: DAGER, Exact Gradient Inversion for Large
    Language Models (NeurIPS 2024)."""
    return Dager(_settings(DagerSettings, settings))


@ATTACKS.register("token-set")
def token_set(**settings: Any) -> TokenSet:
    """Melis et al.: Exploiting Unintended Feature Leakage in Collaborative Learning (S&P 2019):
    the words of a batch from the rows of the embedding gradient that are not zero."""
    return TokenSet(_settings(TokenSetSettings, settings))


@ATTACKS.register("tag")
def tag(**settings: Any) -> Tag:
    """Deng et al.: TAG, Gradient Attack on Transformer-based Language Models (EMNLP 2021
    Findings); Balunović et al.: LAMP (NeurIPS 2022), without its language-model prior."""
    return Tag(_settings(TagSettings, settings))
