"""Personal strings in text: what a leak of a sentence gives away verbatim.

Two sources, joined: the strings a data source knows it put in a sentence (the bundled Faker text
knows its names, e-mail addresses, phone and account numbers, street addresses and planted
canaries), and patterns found in any text (e-mail addresses, phone numbers, IBANs and other long
digit runs). Names in the user's own text are found only where the source knows them: no pattern
finds a name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

PATTERNS = {
    "email": re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),
    "iban": re.compile(r"\b[A-Z]{2}\d{2}[A-Z0-9]{10,30}\b"),
    "phone": re.compile(r"(?<![\w.])\+?\(?\d[\d ().x-]{6,}\d\b"),
    "number": re.compile(r"\b\d{6,}\b"),
}


def find(text: str, known: Iterable[str] = ()) -> list[str]:
    """The personal strings of ``text``: those of ``known`` that occur in it as whole words, and
    every pattern match; each once, in order of first appearance."""
    found: dict[str, int] = {}
    for s in known:
        m = re.search(rf"(?<!\w){re.escape(s)}(?!\w)", text) if s else None
        if m is not None:
            found.setdefault(s, m.start())
    for pattern in PATTERNS.values():
        for m in pattern.finditer(text):
            found.setdefault(m.group(0).strip(), m.start())
    return sorted(found, key=lambda s: (found[s], -len(s)))


def recovered(strings: Iterable[str], text: str) -> list[bool]:
    """For each personal string, whether ``text`` holds it verbatim (as whole words)."""
    return [re.search(rf"(?<!\w){re.escape(s)}(?!\w)", text) is not None for s in strings]


def spans(text: str, strings: Iterable[str]) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, string) occurrences of ``strings`` in ``text``, longest first
    where they overlap, in text order (what a renderer highlights)."""
    hits: list[tuple[int, int, str]] = []
    for s in sorted(set(strings), key=len, reverse=True):
        for m in re.finditer(rf"(?<!\w){re.escape(s)}(?!\w)", text):
            if all(m.end() <= a or m.start() >= b for a, b, _ in hits):
                hits.append((m.start(), m.end(), s))
    return sorted(hits)


def index(texts: Iterable[str], known: Iterable[Iterable[str]]) -> Mapping[str, tuple[str, ...]]:
    """Each text's known personal strings that it still holds (after truncation), by text."""
    out: dict[str, tuple[str, ...]] = {}
    for text, strings in zip(texts, known, strict=True):
        held = tuple(s for s in strings if s and recovered([s], text)[0])
        if held:
            out[text] = tuple(dict.fromkeys((*out.get(text, ()), *held)))
    return out
