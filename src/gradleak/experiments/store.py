"""A run directory: the resolved config, append-only results, checkpoints, pending updates.

Layout::

    RUN/config.yaml                   the resolved config (every default filled in)
    RUN/results.jsonl                 one row per (round, client), appended as each finishes
    RUN/rounds.jsonl                  one row per round: participants, test accuracy and loss
    RUN/timings.jsonl                 wall-clock seconds per (round, client), kept apart so that
                                      results are bitwise reproducible
    RUN/checkpoints/global_RRRR.safetensors   the global model after round R (0 = initial)
    RUN/pending/round_RRRR/client_C.safetensors  updates of the round in progress
    RUN/secure_sum/round_RRRR.safetensors  under secure aggregation: the round's sum of updates,
                                      all that the server observes of the round
    RUN/disaggregation/               the disaggregation attack on those sums (experiments.secure_sum)
    RUN/run.log                       the log

Crash safety: a client's update is written (atomically) before its row, and a round's checkpoint
before its round row, so every row on disk can be trusted; a torn last line (kill -9 mid-write)
is cut off when the run resumes.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from gradleak.errors import DataError, GradleakError
from gradleak.fl.simulator import ClientResult
from gradleak.fl.update import ClientUpdate


# The JSON types of the row fields that readers rely on (``None`` where the field may be null);
# fields the filters add beyond these pass as they are.
_NUM, _INT, _BOOL, _STR = "number", "integer", "boolean", "string"
RESULT_FIELDS = {
    "round": _INT, "client": _INT, "num_samples": _INT, "batch_size": _INT, "lr": _NUM, "epochs": _INT,
    "steps": _INT, "train_loss": _NUM, "update_norm": _NUM, "withheld": _BOOL, "audited": _BOOL,
    "rdlv": (_NUM, None), "ssim": (_NUM, None), "psnr": (_NUM, None), "mse": (_NUM, None),
    "label_accuracy": (_NUM, None), "label_strategy": (_STR, None), "attack_seconds": (_NUM, None),
}  # fmt: skip
ROUND_FIELDS = {"round": _INT, "clients": "list of integers", "aggregated": _INT, "test_accuracy": _NUM,
                "test_loss": _NUM}  # fmt: skip
TIMING_FIELDS = {"round": _INT, "client": _INT, "seconds": _NUM}
# Where a field has a range, any file's rows keep to it.
# NaN passes (a diverged run's losses are NaN).
RANGES = {"round": (1, math.inf), "client": (1, math.inf), "num_samples": (1, math.inf),
          "batch_size": (1, math.inf), "aggregated": (0, math.inf), "test_accuracy": (0, 1),
          "label_accuracy": (0, 1), "test_loss": (0, math.inf), "train_loss": (0, math.inf),
          "update_norm": (0, math.inf), "seconds": (0, math.inf), "attack_seconds": (0, math.inf),
          "ssim": (-1, 1), "mse": (0, math.inf)}  # fmt: skip


def _is(value: Any, kind: str | None) -> bool:
    if kind is None:
        return value is None
    if kind == _BOOL:
        return type(value) is bool
    if kind == _INT:
        return type(value) is int
    if kind == _NUM:
        return type(value) in (int, float)
    if kind == _STR:
        return type(value) is str
    return type(value) is list and all(type(v) is int for v in value)  # list of integers


def check_row(row: Any, fields: dict[str, Any], required: tuple[str, ...]) -> str | None:
    """What is wrong with one row (None: nothing): not an object, a required field missing, or a
    known field of the wrong type."""
    if not isinstance(row, dict):
        return f"not a JSON object but {json.dumps(row)[:40]}"
    for key in required:
        if key not in row:
            return f"no {key!r} field"
    for key, kinds in fields.items():
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if key in row and not any(_is(row[key], k) for k in kinds):
            expected = " or ".join("null" if k is None else k for k in kinds)
            return f"{key!r} is {json.dumps(row[key])[:40]}, not {expected}"
        low, high = RANGES.get(key, (-math.inf, math.inf))
        value = row.get(key)
        if key in RANGES and value is not None and not low <= value <= high and not math.isnan(value):
            return f"{key!r} is {row[key]}, outside [{low}, {high}]"
    return None


class JsonLines:
    """An append-only JSON-lines file, flushed and synced after every row.

    ``fields`` and ``required`` describe its rows (``check_row``), ``key`` the fields that
    identify a row (the first never decreasing: rounds are appended in order): reading a damaged file (undecodable, a row of the wrong shape, a row repeated or
    out of order) raises one ``DataError`` naming the file and line, never a wrong table.
    """

    def __init__(self, path: Path, fields: dict[str, Any] | None = None, required: tuple[str, ...] = (),
                 key: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.path = path
        self.fields, self.required, self.key = fields or {}, required, key

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        """The complete rows: a torn last line (no trailing newline, left by a killed writer) is
        not a row, so every reader sees what a repair would keep."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        data = data[: data.rfind(b"\n") + 1]
        rows, seen = [], set()
        for i, line in enumerate(data.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode())
            except (UnicodeDecodeError, json.JSONDecodeError):
                problem: str | None = "not a JSON row"
            else:
                problem = check_row(row, self.fields, self.required)
            if problem is None and self.key:
                ident = tuple(row[k] for k in self.key)
                if ident in seen or (rows and ident[0] < rows[-1][self.key[0]]):
                    problem = f"{', '.join(f'{k} {v}' for k, v in zip(self.key, ident, strict=True))} repeated or out of order"
                seen.add(ident)
            if problem:
                raise DataError(f"{self.path}, line {i}: {problem}; the run directory is damaged")
            rows.append(row)
        return rows

    def repair(self) -> None:
        """Cut a torn last line, through a temporary file and a rename (a kill during the repair
        leaves the old file or the new one, never an emptied one)."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            self._replace(data[: data.rfind(b"\n") + 1])

    def rewrite(self, rows: list[dict[str, Any]]) -> None:
        self._replace("".join(json.dumps(r) + "\n" for r in rows).encode())

    def _replace(self, data: bytes) -> None:
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write safetensors atomically (write, then rename), so a killed run leaves no torn file."""
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


class RunStore:
    """Reads and writes one run directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.results = JsonLines(root / "results.jsonl", RESULT_FIELDS, ClientResult.BASE_KEYS, ("round", "client"))
        self.rounds = JsonLines(root / "rounds.jsonl", ROUND_FIELDS, tuple(ROUND_FIELDS), ("round",))
        self.timings = JsonLines(root / "timings.jsonl", TIMING_FIELDS, tuple(TIMING_FIELDS))
        self.checkpoints = root / "checkpoints"
        self.pending = root / "pending"
        self.config_path = root / "config.yaml"
        self.secure_sums = root / "secure_sum"

    def exists(self) -> bool:
        return self.config_path.exists()

    def lock(self) -> int:
        """Take the directory's exclusive lock (``RUN/.lock``) for this process and return its file
        descriptor (``unlock`` releases it); refuse when another process holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise GradleakError(f"{self.root} is in use by another gradleak process: wait for it to end, "
                                "or choose another --out") from None  # fmt: skip
        return fd

    @staticmethod
    def unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    # config ---------------------------------------------------------------------------------
    def write_config(self, resolved: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
        tmp.replace(self.config_path)

    def read_config(self) -> dict[str, Any]:
        """The resolved config as written, checked to be an experiment config (read as YAML without
        aliases or object tags); a damaged file is one ``DataError``."""
        from gradleak.experiments.config import parse_yaml, validate_config

        damaged = f"{self.config_path}: %s; the run directory is damaged"
        try:
            config = parse_yaml(self.config_path.read_bytes().decode())
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise DataError(damaged % f"not a readable YAML file ({problem})") from None
        if not isinstance(config, dict) or not isinstance(config.get("data"), dict):
            raise DataError(damaged % "not a config (a YAML mapping with a data: section)")
        # The data section is checked as written, not validated: its paths need not exist any more
        # (a run stays readable after its data has moved), and a file cut short inside it loses
        # the sections after it, which the comparison below finds.
        try:
            resolved = validate_config({**config, "data": {"source": "digits"}}).resolved()
        except GradleakError as exc:
            raise DataError(damaged % f"not an experiment config ({exc})") from None
        resolved["data"] = config["data"]
        if resolved != config:  # the run wrote every key: one missing or changed means damage
            from gradleak.experiments.runner import first_difference

            raise DataError(damaged % f"not the resolved config gradleak wrote (at {first_difference(resolved, config)})")
        return config

    # checkpoints ----------------------------------------------------------------------------
    def checkpoint_path(self, round: int) -> Path:
        return self.checkpoints / f"global_{round:04d}.safetensors"

    def save_checkpoint(self, round: int, state: dict[str, torch.Tensor]) -> None:
        _save_tensors(self.checkpoint_path(round), state)

    def load_checkpoint(self, round: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.checkpoint_path(round)))

    def prune_checkpoints(self, latest: int, keep_every: int) -> None:
        """Keep the initial model, the latest, and every ``keep_every``-th round."""
        for path in self.checkpoints.glob("global_*.safetensors"):
            r = int(path.stem.split("_")[1])
            if r in (0, latest) or (keep_every and r % keep_every == 0):
                continue
            path.unlink()

    def load_secure_sums(self) -> list[dict[str, torch.Tensor]]:
        """The recorded round sums, round 1 first (empty dicts for rounds with nothing summed)."""
        rounds = len(self.rounds.read())
        return [load_file(str(self.secure_sums / f"round_{r:04d}.safetensors")) for r in range(1, rounds + 1)]

    # rows and pending updates ---------------------------------------------------------------
    def _pending_path(self, round: int, client: int) -> Path:
        return self.pending / f"round_{round:04d}" / f"client_{client}.safetensors"

    def record_client(self, result: ClientResult) -> None:
        m = result.update.meta
        path = self._pending_path(m.round, m.client_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        result.update.save(path)
        # the timing row first: a kill between the two leaves a timing row without its result
        # row, which resume_point drops (the client runs again), never a result without timing
        self.timings.append({"round": m.round, "client": m.client_id, "seconds": result.seconds})
        self.results.append(result.row())

    def record_round(
        self,
        row: dict[str, Any],
        state: dict[str, torch.Tensor],
        keep_every: int,
        observed: dict[str, torch.Tensor] | None = None,
    ) -> None:
        r = row["round"]
        if observed is not None:
            self.secure_sums.mkdir(exist_ok=True)
            _save_tensors(self.secure_sums / f"round_{r:04d}.safetensors", observed)
        self.save_checkpoint(r, state)
        self.rounds.append(row)
        shutil.rmtree(self.pending / f"round_{r:04d}", ignore_errors=True)
        if self.pending.is_dir() and not any(self.pending.iterdir()):
            self.pending.rmdir()
        self.prune_checkpoints(r, keep_every)

    def read_rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(round rows, result rows), checked against each other: a finished round has exactly one
        result row per participant, and no result row belongs to a round beyond the one in progress.
        Anything else (rows lost or added by hand) is a ``DataError``."""
        rounds, results = self.rounds.read(), self.results.read()
        last = rounds[-1]["round"] if rounds else 0
        by_round: dict[int, list[int]] = {}
        for row in results:
            by_round.setdefault(row["round"], []).append(row["client"])
        for r in rounds:
            if sorted(by_round.get(r["round"], [])) != sorted(r["clients"]):
                raise DataError(f"{self.results.path}: the rows of round {r['round']} are not those of its "
                                f"participants {r['clients']} ({self.rounds.path}); the run directory is damaged")  # fmt: skip
        beyond = [r for r in by_round if r > last + 1 or (r <= last and r not in {x["round"] for x in rounds})]
        if beyond:
            raise DataError(f"{self.results.path}: rows of round {beyond[0]}, which {self.rounds.path} does not "
                            "finish or continue; the run directory is damaged")  # fmt: skip
        return rounds, results

    def resume_point(self, partial: bool = True) -> tuple[int, dict[int, ClientResult]]:
        """(last finished round, results already finished in the round after it).

        Repairs torn lines and drops result rows that have no saved update (none in normal
        operation: the update is written first), so that no finished row is lost or repeated.
        ``partial=False`` (rounds that must run whole, as under SecAgg+) drops the unfinished
        round's rows too, so that it is run again from its start.
        """
        for f in (self.results, self.rounds, self.timings):
            f.repair()
        rounds, rows = self.read_rows()
        last = rounds[-1]["round"] if rounds else 0
        if not self.checkpoint_path(last).exists():
            raise GradleakError(f"{self.root}: checkpoint of round {last} is missing; cannot resume")
        done, kept = {}, []
        for row in rows:
            if row["round"] <= last:
                kept.append(row)
                continue
            path = self._pending_path(row["round"], row["client"])
            if partial and row["round"] == last + 1 and path.exists():
                done[row["client"]] = ClientResult.from_row(row, ClientUpdate.load(path))
                kept.append(row)
        if len(kept) != len(rows):
            self.results.rewrite(kept)
        finished = {(r["round"], r["client"]) for r in kept}
        timings = self.timings.read()
        # one timing row per kept result: drop those of clients that will run again
        latest = {(t["round"], t["client"]): i for i, t in enumerate(timings)}
        timed = [t for i, t in enumerate(timings) if (key := (t["round"], t["client"])) in finished and latest[key] == i]
        if len(timed) != len(timings):
            self.timings.rewrite(timed)
        self.clean(last, keep_next=partial)
        return last, done

    def clean(self, last: int, keep_next: bool = True) -> None:
        """Remove what a killed run leaves behind: temporary files, and pending updates of any
        round but the one being resumed (of every round unless ``keep_next``)."""
        for tmp in self.root.rglob("*.tmp"):
            tmp.unlink(missing_ok=True)
        if self.pending.is_dir():
            for d in self.pending.iterdir():
                if d.name != f"round_{last + 1:04d}" or not keep_next:
                    shutil.rmtree(d, ignore_errors=True)
            if not any(self.pending.iterdir()):
                self.pending.rmdir()

