"""The text modality's renderer: recovered sentences beside the originals, decoded with the spec's
tokenizer, the original's personal strings underlined and highlighted where the recovered text
holds them verbatim. Everything that comes from data is HTML-escaped; the page written beside an
audit's examples runs no script (the same policy as the report).

Rows are captioned batches of token ids. In a file beside an audit's examples the rows are roles
(original, prior, reconstruction: N sentences each) and are laid out as columns, one line per
sentence; in the report each row is one round's (original, prior, reconstruction) and is one line.
Either way the first sentence of a line is the original the others are compared with. Without a
spec (a report whose data can no longer be loaded) token ids are shown as numbers.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import torch

from gradleak.modality import RENDERERS, InputSpec, Renderer, Rows
from gradleak.text import personal

CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
CELL = 'style="text-align:left;vertical-align:top;font-family:monospace;white-space:pre-wrap"'
# At most this many sentences per role in a file (a client of 512 sentences stays readable).
MAX_LINES = 512


def _texts(spec: InputSpec | None, ids: torch.Tensor) -> list[str]:
    if spec is None or not hasattr(spec, "text"):
        return [" ".join(str(int(i)) for i in row) for row in ids]
    return spec.text(ids)


def _marked(text: str, strings: Sequence[str], strong: set[str]) -> str:
    """``text`` escaped, each of ``strings`` underlined, those in ``strong`` highlighted too."""
    out, at = [], 0
    for start, end, s in personal.spans(text, strings):
        out.append(html.escape(text[at:start]))
        inner = html.escape(text[start:end])
        out.append(f"<mark><u>{inner}</u></mark>" if s in strong else f"<u>{inner}</u>")
        at = end
    out.append(html.escape(text[at:]))
    return "".join(out)


def _line(spec: InputSpec | None, texts: Sequence[str]) -> list[str]:
    """The cells of one line: the original (first) and the texts compared with it."""
    original, others = texts[0], texts[1:]
    strings = spec.personal_strings(original) if spec is not None else []
    last = others[-1] if others else ""
    recovered = {s for s, hit in zip(strings, personal.recovered(strings, last)) if hit}
    cells = [_marked(original, strings, recovered)]
    for t in others:
        held = [s for s, hit in zip(strings, personal.recovered(strings, t)) if hit]
        cells.append(_marked(t, held, set(held)))
    return cells


def _table(
    head: Sequence[str], lines: list[list[str]], caption: str, labels: Sequence[str] = ()
) -> str:
    """A table of HTML cells (already escaped); ``labels``: a header cell opening each line."""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>"
        + (f"<th {CELL}>{html.escape(labels[i])}</th>" if labels else "")
        + "".join(f"<td {CELL}>{c}</td>" for c in cells)
        + "</tr>"
        for i, cells in enumerate(lines)
    )
    return (
        f"<figure><figcaption>{html.escape(caption)}</figcaption><table>"
        f"<thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></figure>"
    )


def rows_html(spec: InputSpec | None, rows: Rows, alt: str) -> str:
    """A report fragment: one line per row (its caption, then its sentences side by side)."""
    lines = [_line(spec, _texts(spec, ids)) for _, ids in rows]
    width = max((len(x) for x in lines), default=1)
    roles = ["prior", "reconstruction"] if width == 3 else [""] * (width - 1)
    return _table(["", "original", *roles], lines, alt, [c for c, _ in rows])


def columns_file(spec: InputSpec | None, rows: Rows) -> bytes:
    """A page beside an audit's examples: the rows as columns, one line per sentence."""
    texts = [_texts(spec, ids[:MAX_LINES]) for _, ids in rows]
    lines = [_line(spec, [t[i] for t in texts]) for i in range(len(texts[0]))]
    total = len(rows[0][1])
    note = f" (the first {MAX_LINES} of {total})" if total > MAX_LINES else ""
    table = _table([c for c, _ in rows], lines, f"{total} sentences{note}")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>reconstructions</title></head><body>{table}</body></html>\n"
    ).encode()


def shows(array: np.ndarray) -> bool:
    """A batch of token ids this renderer can show: N x L non-negative integers."""
    return (
        array.ndim == 2
        and len(array) > 0
        and np.issubdtype(array.dtype, np.integer)
        and bool((array >= 0).all())
    )


def renderer(spec: InputSpec | None = None) -> Renderer:
    """The text renderer of ``spec``'s examples (None: token ids as numbers)."""
    return Renderer(
        "html",
        lambda rows: columns_file(spec, rows),
        lambda rows, alt: rows_html(spec, rows, alt),
        shows,
        bind=renderer,
    )


RENDERERS.register("text")(renderer())
