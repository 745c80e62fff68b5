"""The audit directory: what gradleak writes while it audits a Flower or NVFlare app, and what
``gradleak report DIR`` reads back (no experiment config needed).

Layout::

    AUDIT/.gradleak                          the manifest (kind ``audit``): the directory is
                                             gradleak's, and these files are
    AUDIT/audit.json                         what was audited: the format version, the modality,
                                             the image shape and normalisation, the model, the
                                             attack, the similarity, the reduction, the threshold
                                             and the prior (written by the first auditor)
    AUDIT/results.jsonl                      one row per audited (round, client), appended as each
                                             audit ends (``ROW_FIELDS``)
    AUDIT/audit/round_RRRR/client_NAME.npz   originals, priors and paired reconstructions (pixels
                                             in [0, 1], one array each, the same shape)
    AUDIT/audit/round_RRRR/client_NAME.png   the same as a grid: original, prior, reconstruction
    AUDIT/report/                            ``gradleak report AUDIT``

Rounds are the framework's (Flower's server rounds count from 1, NVFlare's from 0); ``client`` is
the client's name as a safe path component (``node-3``, ``hospital-a``). Several processes (one
per client) may write to the same directory at once: each row is one short append, each image
file its own name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from gradleak.errors import DataError
from gradleak.experiments.store import RANGES, RESULT_FIELDS, JsonLines
from gradleak.rundir import NotOwned, OwnedDir
from gradleak.safeio import npz_bytes, parse_json

FORMAT = 1
KIND = "audit"
META = "audit.json"
ROWS = "results.jsonl"
IMAGES = "audit"

# The typed fields of a row (others pass as they are): a run's result fields, the client a name.
ROW_FIELDS: dict[str, Any] = {**RESULT_FIELDS, "client": "string", "momentum": "number"}
REQUIRED = ("round", "client", "num_samples", "batch_size", "withheld", "audited")
# A run's ranges, but rounds from 0 (NVFlare's) and clients by name.
ROW_RANGES = {**{k: v for k, v in RANGES.items() if k != "client"}, "round": (0, math.inf)}


def client_name(raw: object) -> str:
    """A client's name as one safe path component: letters, digits and ``._-=,+`` kept, any other
    character replaced by ``_`` (a site named ``hospital a/1`` is ``hospital_a_1``)."""
    text = "".join(c if c.isascii() and (c.isalnum() or c in "._-=,+") else "_" for c in str(raw))
    text = text.lstrip(".")[:100]
    return text or "client"


class AuditDir:
    """One audit directory, for writing (``claim``) or reading (``open``)."""

    def __init__(self, owner: OwnedDir) -> None:
        self.dir = owner
        self.root = owner.root
        self.rows = JsonLines(owner, ROWS, ROW_FIELDS, REQUIRED, ranges=ROW_RANGES)

    @classmethod
    def claim(cls, root: str | Path) -> AuditDir:
        """Create ``root`` or open it for writing (an empty directory or gradleak's audit)."""
        return cls(OwnedDir(Path(root).expanduser().absolute(), KIND).claim())

    @classmethod
    def open(cls, root: str | Path) -> AuditDir:
        """An existing audit directory, for ``gradleak report`` (refused when it is not one)."""
        path = Path(root)
        if not path.exists():
            raise DataError(f"{path} does not exist")
        return cls(OwnedDir(path, KIND).join())

    # -- writing ----------------------------------------------------------------------------------
    def write_meta(self, meta: dict[str, Any]) -> None:
        """``audit.json``, once: a directory keeps the description of its first auditor (another
        process may be writing it at the same moment; either copy describes the same audit)."""
        if self.dir.exists(META):
            return
        try:
            self.dir.write_text(META, json.dumps({"format": FORMAT, **meta}, indent=2))
        except (OSError, NotOwned):
            if not self.dir.exists(META):
                raise

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def save_images(
        self,
        round: int,
        client: str,
        originals: torch.Tensor,
        priors: torch.Tensor,
        reconstructions: torch.Tensor,
    ) -> str:
        """The npz and PNG of one audit; returns the npz's path inside the directory."""
        from gradleak.modality import RENDERERS

        stem = f"{IMAGES}/round_{round:04d}/client_{client}"
        arrays = {
            "originals": originals,
            "priors": priors.expand_as(originals) if len(priors) == 1 else priors,
            "reconstructions": reconstructions,
        }
        self.dir.write_bytes(
            f"{stem}.npz",
            npz_bytes(**{k: v.detach().float().cpu().numpy() for k, v in arrays.items()}),
        )
        renderer = RENDERERS.get("image")
        self.dir.write_bytes(f"{stem}.{renderer.suffix}", renderer.file(list(arrays.items())))
        return f"{stem}.npz"

    # -- reading ----------------------------------------------------------------------------------
    def read_meta(self) -> dict[str, Any]:
        """``audit.json`` (an empty mapping when no audit has written it yet)."""
        if not self.dir.exists(META):
            return {}
        meta = parse_json(self.dir.read_bytes(META, kind="json"), self.dir.path(META))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DataError(f"{self.dir.path(META)} is not an audit description of format {FORMAT}")
        return meta

    def read_rows(self) -> list[dict[str, Any]]:
        """The rows, ordered by round then client."""
        return sorted(self.rows.read(), key=lambda r: (r["round"], r["client"]))


def finite_or_none(value: Any) -> Any:
    """A float fit for JSON (NaN and infinities as None)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
