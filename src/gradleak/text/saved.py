"""A saved update of a language model (``gradleak attack --meta`` with ``modality: text``): how many
sequences of how many tokens, the task, the tokenizer where there is one, LoRA where the client
trained adapters; the model is a local transformers directory (``--model DIR``), whose weights are
the global model unless ``--global`` says otherwise."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import DirectoryPath, Field
from torch import nn

from gradleak.attacks.files import UpdateMetadata, load_tensors
from gradleak.errors import ConfigError, DataError
from gradleak.modality import METADATA, TASKS
from gradleak.schema import Section
from gradleak.text.render import renderer
from gradleak.text.spec import TextSpec, TextTask
from gradleak.text.vocabulary import Vocabulary


class LoraMetadata(Section):
    """The LoRA adapters the client trained (the update holds peft's names)."""

    rank: int = Field(gt=0, description="LoRA rank r.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (default: the rank).")
    targets: list[str] | None = Field(
        None, description="Target modules (default: the projections reading each block's input)."
    )


@METADATA.register("text")
class TextUpdateMetadata(UpdateMetadata):
    """The metadata of a language model's update."""

    modality: Literal["text"] = Field(description="The kind of data: text.")
    num_sequences: int = Field(gt=0, description="Sequences the client trained on this round.")
    seq_len: int = Field(ge=2, description="Tokens per sequence as fed to the model.")
    task: TextTask = Field("causal-lm", description="causal-lm or classification.")
    num_classes: int = Field(2, gt=1, description="Classes of a classifier (causal-lm: unused).")
    tokenizer: DirectoryPath | None = Field(
        None,
        description="The tokenizer's local directory (decodes the recovered text); without it "
        "texts are token ids.",
    )
    end_token: int | None = Field(
        None,
        ge=0,
        description="The token the client appended to every sequence (causal-lm; default: the "
        "tokenizer's end token, or 0).",
    )
    lora: LoraMetadata | None = Field(None, description="The client's LoRA adapters, if any.")

    @property
    def num_examples(self) -> int:
        return self.num_sequences

    def spec(self) -> TextSpec:
        if self.tokenizer is not None:
            vocab = Vocabulary.load(self.tokenizer)
            if self.end_token is not None:
                vocab = dataclasses.replace(vocab, end=self.end_token)
        else:
            vocab = Vocabulary.ids_only(2**31 - 1, end=self.end_token or 0)
        return TextSpec(vocab, self.seq_len, self.task)

    def build_model(self, name: str) -> nn.Module:
        """``name``: a local transformers directory (its weights are the global model), or a
        registered text model built from scratch (then ``--global`` gives the weights and the
        tokenizer the vocabulary)."""
        lora = {}
        if self.lora is not None:
            lora = dict(
                lora_rank=self.lora.rank, lora_alpha=self.lora.alpha, lora_targets=self.lora.targets
            )
        if Path(name).is_dir():
            from gradleak.text.models import load_directory

            return load_directory(name, task=self.task, **lora)
        if self.tokenizer is None:
            raise ConfigError(
                "--model", f"{name} is not a directory; a built model needs tokenizer"
            )
        from gradleak.models import build_model

        return build_model(
            name,
            spec=self.spec(),
            num_classes=self.num_classes,
            kwargs=lora,
            task=TASKS.get(self.task, key="task")(),
        )

    def load_truth(self, path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
        """True sequences (an npz 'sequences' array, N x L token ids) and optional labels."""
        t = load_tensors(path)
        if "sequences" not in t or t["sequences"].is_floating_point():
            raise DataError(f"{path} has no integer 'sequences' array")
        seqs = t["sequences"].long()
        if tuple(seqs.shape) != (self.num_sequences, self.seq_len):
            raise DataError(
                f"{path}: sequences have shape {tuple(seqs.shape)}, the update is of "
                f"{(self.num_sequences, self.seq_len)}"
            )
        labels = t["labels"].long() if "labels" in t else None
        return seqs, labels

    def load_prior(self, path: Path) -> torch.Tensor:
        """The server's guess (npz 'sequences', 1 or N x L token ids)."""
        seqs = load_tensors(path).get("sequences")
        if seqs is None or seqs.ndim != 2 or seqs.shape[1] != self.seq_len:
            raise DataError(f"{path}: expected 'sequences' of shape N x {self.seq_len}")
        return seqs.long()

    def write_result(self, owner: Any, rec: Any, truth: torch.Tensor | None, found: Any) -> None:
        """``reconstruction.json``: ``feasible``, ``reason``, ``confidence``, ``sequences`` (token
        ids, those recovered) and ``texts`` (decoded; token ids without a tokenizer); and
        ``reconstruction.html``, each sentence beside its original when the truth is given."""
        spec = self.spec()
        recovered = [] if rec.examples is None else recovered_rows(rec.examples, spec)
        owner.write_text(
            "reconstruction.json",
            json.dumps(
                {
                    "feasible": bool(rec.feasible),
                    "reason": rec.reason,
                    "confidence": rec.confidence,
                    "sequences": recovered,
                    "texts": spec.vocab.decode_batch(recovered),
                    "seconds": rec.seconds,
                },
                indent=2,
            ),
        )
        if rec.examples is None:
            return
        rows = [("reconstruction", rec.examples)]
        if truth is not None and found is not None:
            rows = [
                ("original", truth),
                ("reconstruction", rec.examples[torch.as_tensor(found.assignment)]),
            ]
        owner.write_bytes("reconstruction.html", renderer(spec).file(rows))


def recovered_rows(examples: torch.Tensor, spec: TextSpec) -> list[list[int]]:
    """The rows an attack recovered: a row of padding only holds the place of a sentence it did
    not find (metrics pair every original with some row)."""
    return [row for row in examples.long().tolist() if any(t != spec.vocab.pad for t in row)]
