"""Tokenizers of the text modality: a byte-level BPE trained offline on the text itself (GPT-2's
kind; 40,000 sentences train in about 2 s), or one read from a local directory (``tokenizer.json``,
or GPT-2's ``vocab.json`` and ``merges.txt``); nothing is downloaded. Special tokens are found by
role (end, padding, beginning, [CLS], [SEP]) from the directory's ``tokenizer_config.json`` or by
their usual names."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradleak.errors import DataError
from gradleak.safeio import read_file, read_json
from gradleak.text.extra import require

# Special tokens of a trained tokenizer, in id order from 0.
SPECIAL_TOKENS = ("<|endoftext|>", "<pad>", "<bos>", "[CLS]", "[SEP]", "[MASK]", "[UNK]")
# Each role's usual token names, first found wins (tokenizer_config.json overrides them).
ROLES = {
    "end": ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]"),
    "pad": ("<pad>", "[PAD]", "<|endoftext|>", "</s>"),
    "bos": ("<bos>", "<s>", "<|begin_of_text|>"),
    "cls": ("[CLS]",),
    "sep": ("[SEP]",),
}


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer and its special tokens. Without a tokenizer (an update attacked with no
    tokenizer at hand) token ids are shown as numbers, and text metrics compare those."""

    size: int
    end: int
    pad: int
    bos: int | None = None
    cls: int | None = None
    sep: int | None = None
    tokenizer: Any = field(default=None, compare=False, repr=False)  # tokenizers.Tokenizer

    @property
    def special(self) -> frozenset[int]:
        return frozenset(
            i for i in (self.end, self.pad, self.bos, self.cls, self.sep) if i is not None
        )

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise DataError("no tokenizer: text cannot be encoded")
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``, special tokens left out (ids outside the vocabulary too)."""
        keep = [int(i) for i in ids if 0 <= int(i) < self.size and int(i) not in self.special]
        if self.tokenizer is None:
            return " ".join(str(i) for i in keep)
        return self.tokenizer.decode(keep, skip_special_tokens=True)

    def decode_batch(self, rows: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(r) for r in rows]

    @classmethod
    def ids_only(cls, size: int, end: int = 0, pad: int | None = None) -> Vocabulary:
        """A vocabulary of ``size`` ids and no tokenizer."""
        return cls(size, end, end if pad is None else pad)

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int) -> Vocabulary:
        """A byte-level BPE trained on ``texts`` (``SPECIAL_TOKENS`` take ids 0-6)."""
        tk = require("tokenizers")
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(list(texts), trainer=trainer)
        return cls.of(tok)

    @classmethod
    def load(cls, directory: Path) -> Vocabulary:
        """The tokenizer of a local directory: ``tokenizer.json`` (any kind the tokenizers
        package reads), or a byte-level BPE from ``vocab.json`` and ``merges.txt``."""
        tk = require("tokenizers")
        directory = Path(directory)
        if (directory / "tokenizer.json").is_file():
            text = read_file(directory / "tokenizer.json", kind="json").decode("utf-8", "replace")
            try:
                tok = tk.Tokenizer.from_str(text)
            except Exception as exc:  # noqa: BLE001 - the library's parse error, as one line
                raise DataError(f"{directory / 'tokenizer.json'}: {exc}") from None
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            vocab = read_json(directory / "vocab.json")
            lines = read_file(directory / "merges.txt", kind="json").decode("utf-8").splitlines()
            merges = [tuple(m.split(" ")) for m in lines if m and not m.startswith("#")]
            if not isinstance(vocab, dict) or any(len(m) != 2 for m in merges):
                raise DataError(f"{directory}: vocab.json or merges.txt is not a BPE vocabulary")
            tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges))
            tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = tk.decoders.ByteLevel()
        else:
            raise DataError(
                f"{directory} holds no tokenizer (tokenizer.json, or vocab.json and merges.txt)"
            )
        named = _configured_roles(directory)
        return cls.of(tok, named, where=str(directory))

    @classmethod
    def of(
        cls, tok: Any, named: dict[str, str] | None = None, where: str = "the tokenizer"
    ) -> Vocabulary:
        """A tokenizers.Tokenizer with its special tokens found by role."""
        ids: dict[str, int | None] = {}
        for role, names in ROLES.items():
            candidates = ([named[role]] if named and role in named else []) + list(names)
            ids[role] = next(
                (tok.token_to_id(n) for n in candidates if tok.token_to_id(n) is not None), None
            )
        if ids["end"] is None:
            raise DataError(f"{where} has no end-of-text token ({', '.join(ROLES['end'])})")
        pad = ids["pad"] if ids["pad"] is not None else ids["end"]
        return cls(
            tok.get_vocab_size(with_added_tokens=True),
            ids["end"],
            pad,
            ids["bos"],
            ids["cls"],
            ids["sep"],
            tok,
        )


def _configured_roles(directory: Path) -> dict[str, str]:
    """Special tokens named in ``tokenizer_config.json`` (eos_token, pad_token, ...), if any."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    raw = read_json(path)
    keys = {"end": "eos_token", "pad": "pad_token", "bos": "bos_token"}
    keys |= {"cls": "cls_token", "sep": "sep_token"}
    out = {}
    for role, key in keys.items():
        value = raw.get(key) if isinstance(raw, dict) else None
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[role] = value
    return out
