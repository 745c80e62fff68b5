"""Directories that gradleak owns: a run, a sweep, a recommendation, the output of ``attack`` or
``disaggregate``.

The rules, which every file gradleak writes goes through:

- **Ownership.** A directory is gradleak's when it holds a manifest, ``.gradleak``, naming its kind
  (``run``, ``sweep``, ``recommend``, ``attack``, ``disaggregation``, ``audit``: the audit of a
  Flower or NVFlare app). A command writes into an existing directory only when it is empty or
  already gradleak's of the command's kind; anything else is refused with one line. Every path
  gradleak creates is added to the manifest *before* it exists, so a kill at any moment leaves
  nothing unlisted; a file the manifest does not name is never overwritten or deleted, on a fresh
  run, a resume or a clean-up.
- **No links, no special files.** Inside the directory every component of a path is opened without
  following symbolic links, and only regular files and real directories are opened; a FIFO, a
  device or a link where gradleak expects its own file is one clear error (never a hang or a write
  elsewhere). A file with another hard link is never written in place.
- **Bounded reads.** Every read checks the file's size against the limit of its kind
  (``safeio.LIMITS``) before reading.
- **Atomic writes.** A file is written to a listed temporary name, synced and renamed over its
  target: a kill or a full disk leaves the old file or the new one, never a torn one. Append-only
  row files are the exception; their readers drop a torn last line.

The manifest is itself append-only JSON lines (a header naming the kind, then ``{"+": path}`` and
``{"-": path}`` lines; a directory's path ends in ``/``), so that the worker processes of a run can
add their files at the same time (appends of one short line are atomic).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from gradleak.errors import DataError, GradleakError
from gradleak.safeio import LIMITS, read_fd

MANIFEST = ".gradleak"
LOCK = ".lock"
FORMAT = 1
KINDS = ("run", "sweep", "recommend", "attack", "disaggregation", "audit")

# Called with (operation, relative path) just before every change to an owned directory: a seam
# for fault injection (tests kill the process there to check that every state resumes).
on_change: Callable[[str, str], None] | None = None

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class NotOwned(GradleakError):
    """A directory or file that is not gradleak's where gradleak would write."""


def _changing(op: str, rel: str) -> None:
    if on_change is not None:
        on_change(op, rel)


def check_relative(rel: str) -> str:
    """``rel`` as a normalised relative path inside a directory (no '..', no absolute path, no
    empty or '.' component); a ``ValueError`` otherwise."""
    if not rel or "\x00" in rel or rel.startswith("/") or "\\" in rel:
        raise ValueError(f"not a relative path: {rel!r}")
    parts = rel.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a plain relative path: {rel!r}")
    return rel


def _parents(rel: str) -> list[str]:
    """The directories ``a/``, ``a/b/`` above ``a/b/c``."""
    parts = rel.rstrip("/").split("/")[:-1]
    return ["/".join(parts[: i + 1]) + "/" for i in range(len(parts))]


class OwnedDir:
    """A handle on a directory that gradleak reads and, once claimed, writes.

    Reading works on any directory with the same care (no links, regular files, bounded sizes);
    writing needs ``claim`` (or ``join`` in a worker process of the claiming one). The handle is
    picklable: a worker re-reads the manifest when it needs to.
    """

    def __init__(self, root: Path, kind: str | None = None) -> None:
        self.root = Path(root)
        self.kind = kind
        self._owned: set[str] | None = None  # paths the manifest names (None: not read yet)
        self._writable = False

    def __repr__(self) -> str:
        return f"OwnedDir({str(self.root)!r}, {self.kind!r})"

    def __getstate__(self) -> dict:
        return {"root": self.root, "kind": self.kind, "_owned": None, "_writable": self._writable}

    # -- paths and descriptors --------------------------------------------------------------------
    def path(self, rel: str) -> Path:
        """The path of ``rel`` for messages (never opened as a path)."""
        return self.root / rel

    def _root_fd(self) -> int:
        try:
            return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such directory", str(self.root)) from None
        except NotADirectoryError:
            raise NotOwned(f"{self.root} is a file, not a directory") from None

    @contextlib.contextmanager
    def _parent(self, rel: str, *, create: bool = False) -> Iterator[tuple[int, str]]:
        """(descriptor of ``rel``'s directory, its last component), walking from the root without
        following links; with ``create``, missing directories are made (and listed first)."""
        check_relative(rel)
        parts = rel.rstrip("/").split("/")
        fd = self._root_fd()
        try:
            for i, part in enumerate(parts[:-1]):
                try:
                    nxt = os.open(part, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise FileNotFoundError(
                            errno.ENOENT,
                            "no such directory",
                            str(self.path("/".join(parts[: i + 1]))),
                        ) from None
                    sub = "/".join(parts[: i + 1]) + "/"
                    self._list(sub)
                    _changing("mkdir", sub)
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                    nxt = os.open(part, _DIR, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise NotOwned(
                            f"{self.path('/'.join(parts[: i + 1]))} is a symbolic link or a file, "
                            "not a directory gradleak made: move it away"
                        ) from None
                    raise
                os.close(fd)
                fd = nxt
            yield fd, parts[-1]
        finally:
            os.close(fd)

    def _entry(self, fd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    # -- reading ----------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        """Whether anything (a file, a directory, a link) is at ``rel``."""
        try:
            with self._parent(rel) as (fd, name):
                return self._entry(fd, name) is not None
        except (FileNotFoundError, NotOwned):
            return False

    def is_file(self, rel: str) -> bool:
        """Whether ``rel`` is a regular file (a link to one is not)."""
        try:
            with self._parent(rel) as (fd, name):
                st = self._entry(fd, name)
                return st is not None and stat.S_ISREG(st.st_mode)
        except (FileNotFoundError, NotOwned):
            return False

    def is_dir(self, rel: str) -> bool:
        """Whether ``rel`` is a real directory (a link to one is not)."""
        try:
            with self._parent(rel) as (fd, name):
                st = self._entry(fd, name)
                return st is not None and stat.S_ISDIR(st.st_mode)
        except (FileNotFoundError, NotOwned):
            return False

    def read_bytes(self, rel: str, *, kind: str, limit: int | None = None) -> bytes:
        """The content of the regular file ``rel``, at most ``limit`` bytes (default
        ``LIMITS[kind]``); a link, a special file or an oversized file is a ``DataError`` naming
        it."""
        where = self.path(rel)
        try:
            with self._parent(rel) as (dfd, name):
                try:
                    fd = os.open(name, _READ, dir_fd=dfd)
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        raise DataError(
                            f"{where} is a symbolic link (not followed inside a gradleak directory)"
                        ) from None
                    raise
                try:
                    return read_fd(fd, where, LIMITS[kind] if limit is None else limit)
                finally:
                    os.close(fd)
        except NotOwned as exc:
            raise DataError(str(exc)) from None
        except FileNotFoundError:
            raise DataError(f"file not found: {where}") from None
        except OSError as exc:
            raise DataError(f"cannot read {where}: {exc.strerror or exc}") from None

    def listdir(self, rel: str = "") -> list[str]:
        """Names in the directory ``rel`` (sorted; [] when it is missing or not a real
        directory)."""
        try:
            if not rel:
                fd = self._root_fd()
                try:
                    return sorted(os.listdir(fd))
                finally:
                    os.close(fd)
            with self._parent(rel) as (dfd, name):
                fd = os.open(name, _DIR, dir_fd=dfd)
                try:
                    return sorted(os.listdir(fd))
                finally:
                    os.close(fd)
        except (OSError, NotOwned):
            return []

    # -- the manifest -----------------------------------------------------------------------------
    def _read_manifest(self) -> tuple[str | None, set[str]] | None:
        """(kind, listed paths) of the manifest, or None when there is none."""
        if not self.exists(MANIFEST):
            return None
        data = self.read_bytes(MANIFEST, kind="manifest")
        kind, owned = None, set()
        lines = data[: data.rfind(b"\n") + 1].split(b"\n")  # a torn last line is not a line
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if "gradleak" in entry:
                    kind = kind or str(entry["gradleak"])
                elif "+" in entry:
                    owned.add(check_relative(entry["+"]))
                elif "-" in entry:
                    owned.discard(check_relative(entry["-"]))
                else:
                    raise ValueError("unknown entry")
            except (ValueError, TypeError, AttributeError, RecursionError):
                raise DataError(
                    f"{self.path(MANIFEST)}, line {i}: not a manifest entry; the directory is "
                    "damaged"
                ) from None
        if kind is not None and kind not in KINDS:
            raise DataError(
                f"{self.path(MANIFEST)}: unknown kind {kind!r}; the directory is damaged"
            )
        return kind, owned

    @property
    def owned(self) -> set[str]:
        if self._owned is None:
            found = self._read_manifest()
            self._owned = set() if found is None else found[1]
        return self._owned

    def _log(self, entry: dict) -> None:
        line = (json.dumps(entry) + "\n").encode()
        with self._parent(MANIFEST) as (dfd, name):
            fd = os.open(name, _APPEND, 0o644, dir_fd=dfd)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
                    raise NotOwned(
                        f"{self.path(MANIFEST)} is not gradleak's manifest (not a regular file of "
                        "one link)"
                    )
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def _list(self, rel: str) -> None:
        """Add ``rel`` (and the directories above it) to the manifest before it is created."""
        for p in [*_parents(rel), rel]:
            if p not in self.owned:
                _changing("list", p)
                self._log({"+": p})
                self.owned.add(p)

    def _unlist(self, rel: str) -> None:
        if rel in self.owned:
            _changing("unlist", rel)
            self._log({"-": rel})
            self.owned.discard(rel)

    def is_owned(self, rel: str) -> bool:
        """Whether the manifest names ``rel`` (read again when another process may have added
        it)."""
        if rel in (MANIFEST, LOCK) or rel in self.owned:
            return True
        self._owned = None
        return rel in self.owned

    # -- claiming ---------------------------------------------------------------------------------
    def manifest_kind(self) -> str | None:
        """The kind the manifest names, or None when the directory has none (not gradleak's)."""
        found = self._read_manifest()
        return None if found is None else found[0]

    def _what(self) -> str:
        return "an attack's output" if self.kind == "attack" else f"a gradleak {self.kind}"

    def check_claimable(self) -> None:
        """Refuse (one line, writing nothing) a directory that ``claim`` would refuse: a file, a
        directory that is neither empty nor gradleak's of this kind, or one this user cannot
        write."""
        assert self.kind in KINDS, self.kind
        where = self.root
        while not os.path.lexists(where) and where != where.parent:
            where = where.parent
        if where != self.root:  # it will be created: its nearest existing parent must take it
            if not where.is_dir():
                raise NotOwned(
                    f"{self.root}: {where} is a file, not a directory: choose another --out"
                )
            if not os.access(where, os.W_OK | os.X_OK):
                raise NotOwned(f"{self.root} cannot be created: {where} is not writable")
            return
        if not self.root.is_dir():
            raise NotOwned(f"{self.root} is a file, not a directory: choose another --out")
        kind = self.manifest_kind() if self.exists(MANIFEST) else None
        if kind is None:
            extra = [n for n in self.listdir() if n != MANIFEST]
            if extra:
                raise NotOwned(
                    f"{self.root} is not empty and is not {self._what()} directory (it has no "
                    f"{MANIFEST} "
                    f"manifest; it holds {extra[0]!r}): choose a new or empty directory"
                )
        elif kind != self.kind:
            raise NotOwned(
                f"{self.root} holds a gradleak {kind}, not {self._what()}: choose another directory"
            )
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise NotOwned(f"{self.root} is not writable")

    def claim(self) -> OwnedDir:
        """Make this directory gradleak's of ``self.kind`` for writing: create it, adopt it when it
        is empty, or open it when it already is one; refuse (one line) anything else."""
        self.check_claimable()
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise NotOwned(f"{self.root} cannot be created: {exc.strerror or exc}") from None
        self._owned = None
        if self.manifest_kind() is None:
            _changing("claim", MANIFEST)
            self._log({"gradleak": self.kind, "format": FORMAT})
        self._owned = None
        self._writable = True
        return self

    def join(self) -> OwnedDir:
        """Write into a directory that is already gradleak's of this kind (a worker of the process
        that claimed it, or ``gradleak report``); refuse anything else with one line."""
        if not self.root.is_dir():
            raise NotOwned(f"{self.root} is not a directory")
        kind = self.manifest_kind()
        if kind != self.kind:
            held = "has no gradleak manifest" if kind is None else f"holds a gradleak {kind}"
            raise NotOwned(f"{self.root} is not {self._what()} directory (it {held})")
        self._writable = True
        return self

    def sub(self, prefix: str) -> SubDir:
        """A view of the directory ``prefix`` inside this one (same manifest)."""
        return SubDir(self, check_relative(prefix).rstrip("/"))

    # -- writing ----------------------------------------------------------------------------------
    def _writable_target(self, fd: int, name: str, rel: str) -> os.stat_result | None:
        """The existing entry at ``rel`` when gradleak may replace it; refuse a foreign one."""
        if not self._writable:
            raise NotOwned(f"{self.root} was not claimed for writing")
        st = self._entry(fd, name)
        if st is None:
            return None
        if not self.is_owned(rel):
            raise NotOwned(
                f"{self.path(rel)} exists and was not written by gradleak: move it away, or choose "
                "another directory"
            )
        if not stat.S_ISREG(st.st_mode):
            raise NotOwned(
                f"{self.path(rel)} is not a regular file (a link, a directory or a special file): "
                "move it away"
            )
        return st

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``rel`` atomically (a listed temporary file, synced, renamed over it)."""
        tmp = rel + ".tmp"
        self._list(rel)
        self._list(tmp)
        with self._parent(rel, create=True) as (dfd, name):
            self._writable_target(dfd, name, rel)
            tname = name + ".tmp"
            if self._writable_target(dfd, tname, tmp) is not None:
                _changing("unlink", tmp)
                os.unlink(tname, dir_fd=dfd)
            _changing("create", tmp)
            fd = os.open(tname, _CREATE, 0o644, dir_fd=dfd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            _changing("rename", rel)
            os.rename(tname, name, src_dir_fd=dfd, dst_dir_fd=dfd)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def make_dir(self, rel: str) -> Path:
        """Create the directory ``rel`` (listed first; an existing real directory is kept) and
        return its path: what a sweep does for each of its runs."""
        if not self._writable:
            raise NotOwned(f"{self.root} was not claimed for writing")
        rel = rel.rstrip("/")
        with self._parent(rel + "/x", create=True):
            pass
        return self.path(rel)

    @contextlib.contextmanager
    def appending(self, rel: str) -> Iterator[IO[bytes]]:
        """``rel`` opened for appending (created and listed when missing); a file that is not
        gradleak's, not regular, or has another hard link is refused."""
        self._list(rel)
        with self._parent(rel, create=True) as (dfd, name):
            self._writable_target(dfd, name, rel)
            _changing("append", rel)
            fd = os.open(name, _APPEND, 0o644, dir_fd=dfd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            os.close(fd)
            raise NotOwned(f"{self.path(rel)} is not a regular file of one link: move it away")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "ab", buffering=0) as f:
            yield f

    def append(self, rel: str, data: bytes) -> None:
        """Append ``data`` to ``rel`` and sync it."""
        with self.appending(rel) as f:
            f.write(data)
            os.fsync(f.fileno())

    def remove(self, rel: str) -> None:
        """Delete ``rel`` if the manifest names it (a foreign file is left alone), never through a
        link."""
        if not self._writable or not self.is_owned(rel) or rel in (MANIFEST, LOCK):
            return
        try:
            with self._parent(rel) as (dfd, name):
                if self._entry(dfd, name) is not None:
                    _changing("unlink", rel)
                    os.unlink(name, dir_fd=dfd)
        except (FileNotFoundError, NotOwned):
            pass
        except IsADirectoryError:
            return
        self._unlist(rel)

    def remove_tree(self, rel: str) -> None:
        """Delete the listed files under the directory ``rel``, then each listed directory that is
        left empty (one holding anything else stays)."""
        prefix = check_relative(rel).rstrip("/") + "/"
        for path in sorted(
            (p for p in self.owned if p.startswith(prefix) and not p.endswith("/")), reverse=True
        ):
            self.remove(path)
        for path in sorted(
            (p for p in self.owned if p.startswith(prefix) and p.endswith("/")),
            key=len,
            reverse=True,
        ) + [prefix]:
            self.remove_dir(path)

    def remove_dir(self, rel: str) -> None:
        """Remove the listed, empty directory ``rel`` (else leave it)."""
        rel = rel.rstrip("/") + "/"
        if not self._writable or not self.is_owned(rel):
            return
        try:
            with self._parent(rel) as (dfd, name):
                st = self._entry(dfd, name)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    _changing("rmdir", rel)
                    os.rmdir(name, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return
            if not isinstance(exc, FileNotFoundError):
                raise
        except NotOwned:
            return
        self._unlist(rel)

    def listed(self, prefix: str = "") -> list[str]:
        """The files the manifest names under ``prefix`` (sorted)."""
        return sorted(p for p in self.owned if p.startswith(prefix) and not p.endswith("/"))

    # -- the lock ---------------------------------------------------------------------------------
    def lock(self, what: str = "gradleak process") -> int:
        """Take the directory's exclusive lock (``.lock``) and return its descriptor (``unlock``
        releases it); refuse when another process holds it."""
        with self._parent(LOCK) as (dfd, name):
            _changing("lock", LOCK)
            fd = os.open(
                name,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                0o644,
                dir_fd=dfd,
            )
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise NotOwned(f"{self.path(LOCK)} is not a regular file: move it away")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise GradleakError(
                f"{self.root} is in use by another {what}: wait for it to end, or choose "
                "another --out"
            ) from None
        return fd

    @staticmethod
    def unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @contextlib.contextmanager
    def locked(self, what: str = "gradleak process") -> Iterator[None]:
        fd = self.lock(what)
        try:
            yield
        finally:
            self.unlock(fd)


class SubDir:
    """A directory inside an ``OwnedDir`` (same manifest): what a component writes into, e.g. the
    audit's images under ``RUN/audit``."""

    def __init__(self, owner: OwnedDir, prefix: str) -> None:
        self.owner, self.prefix = owner, prefix

    def rel(self, name: str) -> str:
        return f"{self.prefix}/{check_relative(name)}"

    def path(self, name: str) -> Path:
        return self.owner.path(self.rel(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        self.owner.write_bytes(self.rel(name), data)

    def write_text(self, name: str, text: str) -> None:
        self.owner.write_bytes(self.rel(name), text.encode())

    def append(self, name: str, data: bytes) -> None:
        self.owner.append(self.rel(name), data)

    def read_bytes(self, name: str, *, kind: str, limit: int | None = None) -> bytes:
        return self.owner.read_bytes(self.rel(name), kind=kind, limit=limit)

    def exists(self, name: str) -> bool:
        return self.owner.exists(self.rel(name))

    def sub(self, prefix: str) -> SubDir:
        return SubDir(self.owner, self.rel(prefix))


def safe_component(name: str, key: str) -> str:
    """``name`` when it is one safe path component (letters, digits, ``._-=,+``, not starting with
    a dot, at most 100 characters), else a ``ConfigError`` naming ``key``."""
    from gradleak.errors import ConfigError

    if (
        not isinstance(name, str)
        or not name
        or len(name) > 100
        or name.startswith(".")
        or any(not (c.isascii() and (c.isalnum() or c in "._-=,+")) for c in name)
    ):
        raise ConfigError(
            key,
            f"{name!r} is not a plain name: use 1 to 100 letters, digits, '.', '_', '-', "
            "'=', ',' or '+', not starting with '.' (it names a directory)",
        )
    return name


__all__ = [
    "KINDS",
    "MANIFEST",
    "NotOwned",
    "OwnedDir",
    "SubDir",
    "check_relative",
    "safe_component",
]
