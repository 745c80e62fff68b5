"""The text data sources: private notes made up by Faker (bundled: nothing to download) and the
user's own text (JSON lines, CSV or plain text), each a config section that loads itself into a
``DataBundle`` of fixed-length token ids with their ``TextSpec`` (registered in ``data.SOURCES``).

Every example is ``seq_len`` tokens. For a causal language model: [beginning token, if ``bos``]
text [end token]; the end token is what makes the text's last token count, since a causal LM's
last position gets no gradient. For a classifier: [CLS] text [SEP], padded. A text too short to
fill a causal LM's example is left out (padding would put tokens in the update that are not the
client's text); the number left out is logged.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, FilePath, field_validator

from gradleak.data.dataset import DataBundle, Dataset, stratified_split
from gradleak.data.sources import SOURCES, SourceConfig
from gradleak.errors import DataError
from gradleak.safeio import parse_json, read_file
from gradleak.seeding import derive_seed
from gradleak.text import personal
from gradleak.text.corpus import KINDS, Record, faker_records, plant_canaries
from gradleak.text.spec import TextSpec, TextTask
from gradleak.text.vocabulary import Vocabulary

log = logging.getLogger("gradleak")


def encode(
    vocab: Vocabulary, texts: Sequence[str], *, seq_len: int, task: TextTask, bos: bool = False
) -> tuple[torch.Tensor, list[int]]:
    """(token ids N x seq_len, the indices of ``texts`` kept): see the module's docstring."""
    if task == "classification":
        if vocab.cls is None or vocab.sep is None:
            raise DataError("a classifier's examples need [CLS] and [SEP] tokens in the tokenizer")
        prefix, suffix = [vocab.cls], [vocab.sep]
    else:
        if bos and vocab.bos is None:
            raise DataError("bos is set but the tokenizer has no beginning-of-text token")
        prefix, suffix = ([vocab.bos] if bos else []), [vocab.end]
    room = seq_len - len(prefix) - len(suffix)
    if room < 1:
        raise DataError(f"seq_len {seq_len} leaves no room for text")
    rows, kept = [], []
    for i, text in enumerate(texts):
        ids = vocab.encode(text)[:room]
        if len(ids) < room and task == "causal-lm":
            continue
        row = [*prefix, *ids, *suffix]
        rows.append(row + [vocab.pad] * (seq_len - len(row)))
        kept.append(i)
    if not rows:
        return torch.empty(0, seq_len, dtype=torch.long), kept
    return torch.tensor(rows, dtype=torch.long), kept


class _TextSource(SourceConfig):
    kind: ClassVar[str] = "text"
    task: TextTask = Field(
        "causal-lm",
        description="causal-lm (next-token prediction; models gpt2, llama) or classification "
        "(the text's label; model bert).",
    )
    seq_len: int = Field(
        16,
        ge=3,
        le=8192,
        description="Tokens per example as the model reads them, the end token (causal-lm) or "
        "[CLS] and [SEP] (classification) included.",
    )
    bos: bool = Field(
        False, description="Prepend the beginning-of-text token (LLaMA-style models), causal-lm."
    )
    test_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="Fraction of each class held out as the test split."
    )
    tokenizer: Path | None = Field(
        None,
        description="A local tokenizer directory (tokenizer.json, or vocab.json and merges.txt); "
        "null: a byte-level BPE trained offline on the text.",
    )
    vocab_size: int = Field(
        4000,
        ge=300,
        le=1_000_000,
        description="Vocabulary of the BPE trained when tokenizer is null.",
    )

    @field_validator("tokenizer")
    @classmethod
    def _directory(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise ValueError(f"{v} is not a directory")
        return v

    def _vocabulary(self, texts: Sequence[str]) -> Vocabulary:
        if self.tokenizer is not None:
            return Vocabulary.load(self.tokenizer)
        return Vocabulary.train(texts, vocab_size=self.vocab_size)

    def _bundle(
        self,
        name: str,
        records: list[Record],
        classes: Sequence[str],
        seed: int,
        canaries: int = 0,
    ) -> DataBundle:
        """Split the records (stratified by kind), plant canaries in the training part, train or
        load the tokenizer, encode, and index each sentence's known personal strings."""
        labels = np.array([r.kind for r in records], dtype=np.int64)
        train_idx, test_idx = stratified_split(labels, self.test_fraction, seed)
        train = plant_canaries([records[i] for i in train_idx], canaries, seed=seed)
        test = [records[i] for i in test_idx]
        vocab = self._vocabulary([r.text for r in train + test])
        parts, texts, strings = [], [], []
        for part in (train, test):
            ids, kept = encode(
                vocab, [r.text for r in part], seq_len=self.seq_len, task=self.task, bos=self.bos
            )
            targets = torch.tensor([part[i].kind for i in kept], dtype=torch.long)
            parts.append(Dataset(ids, targets))
            texts += vocab.decode_batch(ids.tolist())
            strings += [part[i].personal for i in kept]
        if len(parts[0]) < len(train):
            log.info(
                "%s: %d of %d training texts are shorter than seq_len %d and were left out",
                name,
                len(train) - len(parts[0]),
                len(train),
                self.seq_len,
            )
        if len(parts[0]) == 0 or len(parts[1]) == 0:
            raise DataError(
                f"{name}: no text fills an example of seq_len {self.seq_len} (train "
                f"{len(parts[0])}, test {len(parts[1])}): lower data.seq_len"
            )
        spec = TextSpec(vocab, self.seq_len, self.task, personal.index(texts, strings))
        return DataBundle(name, parts[0], parts[1], tuple(classes), spec, self.task)


class FakerTextSource(_TextSource):
    """Private notes made up by Faker (seeded, bundled: nothing is downloaded).

    Notes and messages holding names, e-mail addresses, phone and account numbers and street
    addresses, and planted canaries; six kinds of note (the classes)."""

    source: Literal["faker-text"] = "faker-text"
    size: int = Field(2000, ge=10, le=1_000_000, description="Notes made up (train and test).")
    sentences: int = Field(
        3, ge=1, le=20, description="Sentences per note (a long seq_len needs more)."
    )
    canaries: int = Field(
        8,
        ge=0,
        description="Training notes that open with a canary: a made-up access code that no "
        "template produces, counted among the personal strings.",
    )
    locale: str = Field("en_US", description="Faker's locale.")

    def load(self, seed: int) -> DataBundle:
        records = faker_records(
            self.size,
            seed=derive_seed(seed, "faker-text") % 2**32,
            sentences=self.sentences,
            locale=self.locale,
        )
        return self._bundle(
            "faker-text", records, [k for k, _ in KINDS], seed, canaries=self.canaries
        )


class TextFilesSource(_TextSource):
    """The user's own text, one example per record (JSON lines, CSV or plain text).

    JSON lines and CSV (with a header) hold ``text_field`` and optionally ``label_field`` and
    ``personal_field``; plain text has one example per non-empty line and no labels."""

    source: Literal["text-files"] = "text-files"
    path: FilePath = Field(description="A .jsonl, .csv or .txt file.")
    text_field: str = Field("text", description="The field holding the text (JSON lines, CSV).")
    label_field: str | None = Field(
        None,
        description="The field holding the label (classes in order of first appearance); "
        "null: one class (a causal LM needs none).",
    )
    personal_field: str | None = Field(
        None,
        description="A field listing the record's known personal strings (a JSON list, or "
        "';'-separated in CSV); patterns (e-mails, phone and account numbers) are found anyway.",
    )

    def load(self, seed: int) -> DataBundle:
        rows = self._rows()
        if self.task == "classification" and self.label_field is None:
            raise DataError(f"{self.path}: a classifier needs data.label_field")
        names = list(dict.fromkeys(str(r.get(self.label_field, "")) for r in rows))
        if self.label_field is None:
            names = ["text"]
        records = []
        for i, r in enumerate(rows):
            text = r.get(self.text_field)
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{self.path}: record {i + 1} has no text in {self.text_field!r}")
            label = names.index(str(r.get(self.label_field, ""))) if self.label_field else 0
            records.append(Record(text.strip(), self._personal(r, i), label))
        if len(records) < 2:
            raise DataError(f"{self.path}: at least two records are needed (train and test)")
        return self._bundle(self.path.stem, records, names, seed)

    def _rows(self) -> list[dict]:
        data = read_file(self.path, kind="rows").decode("utf-8", errors="replace")
        suffix = self.path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            rows = []
            for n, line in enumerate(data.splitlines(), 1):
                if not line.strip():
                    continue
                row = parse_json(line.encode(), f"{self.path}, line {n}")
                if not isinstance(row, dict):
                    raise DataError(f"{self.path}, line {n}: not a JSON object")
                rows.append(row)
            return rows
        if suffix == ".csv":
            reader = csv.DictReader(io.StringIO(data))
            if reader.fieldnames is None or self.text_field not in reader.fieldnames:
                raise DataError(f"{self.path}: no {self.text_field!r} column in the header")
            return list(reader)
        if suffix == ".txt":
            return [{self.text_field: line} for line in data.splitlines() if line.strip()]
        raise DataError(f"{self.path}: unsupported text file (use .jsonl, .csv or .txt)")

    def _personal(self, row: dict, i: int) -> tuple[str, ...]:
        if self.personal_field is None or row.get(self.personal_field) in (None, ""):
            return ()
        value = row[self.personal_field]
        if isinstance(value, str):
            value = value.split(";")
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(
                f"{self.path}: record {i + 1}'s {self.personal_field!r} is not a list of strings"
            )
        return tuple(v.strip() for v in value if v.strip())


for _cls in (FakerTextSource, TextFilesSource):
    SOURCES.register(_cls.model_fields["source"].default)(_cls)

__all__ = ["FakerTextSource", "TextFilesSource", "encode"]
