"""Private text made up by Faker (seeded): notes and messages holding names, e-mail addresses,
phone and account numbers and street addresses, the kind of text federated fine-tuning is used on
(clinical notes, customer messages, keyboards). Each record keeps the personal strings it holds and
its kind (the class of a classifier, or what splits and skews the clients of a language model).
Planted canaries are sentences no template makes, with a secret a leak would give away verbatim.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from gradleak.text.extra import require


@dataclass(frozen=True)
class Record:
    """A note, the personal strings in it (in order of appearance) and its kind (an index of
    ``KINDS``)."""

    text: str
    personal: tuple[str, ...]
    kind: int


Template = Callable[..., tuple[str, tuple[str, ...]]]


def _referral(f) -> tuple[str, tuple[str, ...]]:  # noqa: ANN001 - a faker.Faker
    n, e = f.name(), f.email()
    return f"{n} asked us to use {e} from now on.", (n, e)


def _callback(f) -> tuple[str, tuple[str, ...]]:  # noqa: ANN001
    n, ph = f.first_name(), f.phone_number()
    return f"Call {n} back on {ph} before noon.", (n, ph)


def _refund(f) -> tuple[str, tuple[str, ...]]:  # noqa: ANN001
    n, acct = f.name(), f.bban()
    return f"Refund for {n}, account {acct}, approved.", (n, acct)


def _parcel(f) -> tuple[str, tuple[str, ...]]:  # noqa: ANN001
    n, a = f.last_name(), f.street_address()
    return f"Parcel for {n} goes to {a}, {f.city()}.", (n, a)


def _message(f) -> tuple[str, tuple[str, ...]]:  # noqa: ANN001
    n, e, ph = f.first_name(), f.free_email(), f.msisdn()
    return f"Hi {n}, confirm {e} or text {ph}.", (n, e, ph)


def _payout(f) -> tuple[str, tuple[str, ...]]:  # noqa: ANN001
    n, i = f.name(), f.iban()
    return f"{n} changed the payout IBAN to {i}.", (n, i)


# The kinds of note, in class order: (name, template of its first sentence).
KINDS: tuple[tuple[str, Template], ...] = (
    ("referral", _referral),
    ("call-back", _callback),
    ("refund", _refund),
    ("parcel", _parcel),
    ("message", _message),
    ("payout", _payout),
)


def faker_records(n: int, *, seed: int, sentences: int = 3, locale: str = "en_US") -> list[Record]:
    """``n`` notes of ``sentences`` sentences each, the same for the same seed; a note's kind is
    that of its first sentence (the rest are drawn from every kind)."""
    faker = require("faker")
    fake = faker.Faker(locale)
    fake.seed_instance(seed)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.randrange(len(KINDS))
        parts = [KINDS[kind][1](fake)]
        parts += [rng.choice(KINDS)[1](fake) for _ in range(sentences - 1)]
        text = " ".join(t for t, _ in parts)
        out.append(Record(text, tuple(s for _, p in parts for s in p), kind))
    return out


def canary(rng: random.Random, name: str) -> tuple[str, str]:
    """A canary sentence and its secret: a made-up access code no template produces."""
    code = "-".join(f"{rng.randrange(10_000):04d}" for _ in range(3))
    return f"The vault code of {name} is {code}.", code


def plant_canaries(records: list[Record], count: int, *, seed: int) -> list[Record]:
    """``records`` with ``count`` of them (a seeded choice) opening with a canary sentence, so that
    it survives truncation; the canary's name and code join the record's personal strings."""
    rng = random.Random(f"canary-{seed}")
    chosen = set(rng.sample(range(len(records)), min(count, len(records))))
    out = []
    for i, r in enumerate(records):
        if i in chosen:
            name = r.personal[0] if r.personal else "the client"
            sentence, code = canary(rng, name)
            r = Record(f"{sentence} {r.text}", (name, code, *r.personal), r.kind)
        out.append(r)
    return out
