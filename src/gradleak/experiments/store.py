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
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from gradleak.errors import GradleakError
from gradleak.fl.simulator import ClientResult
from gradleak.fl.update import ClientUpdate


class JsonLines:
    """An append-only JSON-lines file, flushed and synced after every row."""

    def __init__(self, path: Path) -> None:
        self.path = path

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
        return [json.loads(line) for line in data.decode().splitlines() if line.strip()]

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
        self.results = JsonLines(root / "results.jsonl")
        self.rounds = JsonLines(root / "rounds.jsonl")
        self.timings = JsonLines(root / "timings.jsonl")
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
        return yaml.safe_load(self.config_path.read_text())

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
        self.results.append(result.row())
        self.timings.append({"round": m.round, "client": m.client_id, "seconds": result.seconds})

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

    def resume_point(self, partial: bool = True) -> tuple[int, dict[int, ClientResult]]:
        """(last finished round, results already finished in the round after it).

        Repairs torn lines and drops result rows that have no saved update (none in normal
        operation: the update is written first), so that no finished row is lost or repeated.
        ``partial=False`` (rounds that must run whole, as under SecAgg+) drops the unfinished
        round's rows too, so that it is run again from its start.
        """
        for f in (self.results, self.rounds, self.timings):
            f.repair()
        rounds = self.rounds.read()
        last = rounds[-1]["round"] if rounds else 0
        if not self.checkpoint_path(last).exists():
            raise GradleakError(f"{self.root}: checkpoint of round {last} is missing; cannot resume")
        rows, done, kept = self.results.read(), {}, []
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

