"""Bounded, non-blocking reads and safe decoders for every file gradleak reads.

What gradleak reads may be damaged or hostile: a user's input file, or a run directory someone
handed over. A FIFO or a device where a file should be blocks a reader forever; a file can be far
larger than its kind ever is; JSON can nest a million levels deep; an npz can claim gigabytes in its
headers or hide a pickle. So every read goes through here: only a regular file is read (opened
without blocking), its size is checked against the limit of its kind before reading, and the
decoders refuse pickles, object arrays and contents larger than their limit. Every failure is a
``DataError`` naming the file, never a traceback or a hang.
"""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from gradleak.errors import DataError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# Size limits by kind of file: far above what gradleak writes or a real input needs, far below
# what would exhaust the machine.
LIMITS = {
    "config": 4 * MiB,  # YAML configs, config.yaml of a run
    "json": 64 * MiB,  # summaries, metadata, sweep.json, split lists
    "rows": 1 * GiB,  # results.jsonl and the other row files
    "tensors": 16 * GiB,  # safetensors, npz and .pt files of weights, updates and sums
    "manifest": 256 * MiB,
}
# JSON nested deeper than this is refused: gradleak's own files nest at most five levels.
MAX_JSON_DEPTH = 64
# numpy's own default bound on an .npy header (np.load's max_header_size).
MAX_NPY_HEADER = 10_000

_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC


def read_fd(fd: int, where: object, limit: int) -> bytes:
    """The whole content of the open file ``fd``: a regular file of at most ``limit`` bytes."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{where} is not a regular file")
    if st.st_size > limit:
        raise DataError(
            f"{where} has {st.st_size:,} bytes, more than the {limit:,} such a file may have"
        )
    chunks, size = [], 0
    while True:  # the file may grow while it is read: never past the limit
        chunk = os.read(fd, min(limit + 1 - size, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise DataError(f"{where} grew past the {limit:,} bytes such a file may have")
    return b"".join(chunks)


def read_file(path: Path, *, kind: str) -> bytes:
    """A user's input file (``kind``: a key of ``LIMITS``): a regular file within its limit.

    Symbolic links are followed here: the user named the path. Inside a run directory,
    ``rundir.OwnedDir`` reads instead (no link is followed there)."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return read_fd(fd, path, LIMITS[kind])
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            stack.extend(
                (v, depth + 1) for v in (node.values() if isinstance(node, dict) else node)
            )
    return deepest


def check_depth(value: Any, where: object, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``value`` when it nests at most ``max_depth`` levels, else a ``DataError``."""
    if json_depth(value) > max_depth:
        raise DataError(f"{where}: nested more than {max_depth} levels deep")
    return value


def parse_json(data: bytes, where: object, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON text as plain data; undecodable, invalid or too deeply nested text is a
    ``DataError``."""
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{where} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{where} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except RecursionError:
        raise DataError(f"{where}: nested more than {max_depth} levels deep") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise DataError(f"{where} is not valid JSON ({exc})") from None
    return check_depth(value, where, max_depth)


def read_json(path: Path, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A user's JSON file (``read_file`` with the JSON limit, then ``parse_json``)."""
    return parse_json(read_file(path, kind="json"), path, max_depth=max_depth)


_NPZ_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
)


def load_npz(
    data: bytes, where: object, *, limit: int = LIMITS["tensors"]
) -> dict[str, np.ndarray]:
    """The arrays of an npz file (never unpickles): each array's header is read and its size
    checked, all together at most ``limit`` bytes, before any array is decompressed."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            members = [i for i in z.infolist() if i.filename.endswith(".npy")]
            total = 0
            for info in members:
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = {
                        (1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0,
                    }.get(version)
                    if read_header is None:
                        raise ValueError(f"unsupported .npy version {version}")
                    shape, _, dtype = read_header(f, max_header_size=MAX_NPY_HEADER)
                if dtype.hasobject:
                    raise ValueError(
                        f"{info.filename[:-4]} holds Python objects (pickles are never loaded)"
                    )
                total += int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                if total > limit:
                    raise ValueError(f"its arrays hold more than {limit:,} bytes")
            out = {}
            for info in members:
                with z.open(info) as f:
                    out[info.filename[:-4]] = np.lib.format.read_array(
                        f, allow_pickle=False, max_header_size=MAX_NPY_HEADER
                    )
            return out
    except _NPZ_ERRORS as exc:
        raise DataError(
            f"{where} is not a readable npz file ({type(exc).__name__}: {exc})".replace("\n", " ")
        ) from None


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """An npz file (compressed) holding ``arrays``, as bytes."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def load_safetensors(data: bytes, where: object) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file; a damaged file is a ``DataError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n]) if 8 + n <= len(data) else {}
    except (SafetensorError, ValueError, RuntimeError, OverflowError, MemoryError) as exc:
        raise DataError(
            f"{where} is not a readable safetensors file ({exc})".replace("\n", " ")
        ) from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    # Names in sorted order, as safetensors' load_file gives them (load's own order is a hash
    # map's),
    # each tensor copied into memory of torch's own alignment: values read from the middle of a byte
    # string made a replayed attack differ in the last bits (vectorised kernels depend on
    # alignment).
    return {k: tensors[k].clone() for k in sorted(tensors)}, metadata if isinstance(
        metadata, dict
    ) else {}


def safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file holding ``tensors`` (made contiguous) and ``metadata``, as bytes."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
