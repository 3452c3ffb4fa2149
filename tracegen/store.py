"""Crash-safe storage: append-only JSONL with one fsync per record, and atomically written manifests.

Guarantees: a record :meth:`JsonlStore.append` returned from is on disk (flushed and fsynced) and
survives ``kill -9`` or power loss of the process. A crash mid-write leaves at most one torn last
line, which :meth:`JsonlStore.open` cuts off before anything new is appended, so the file is always
a sequence of complete lines. A record may be appended again under the same id (a retried
trajectory): readers see the newest one, in its place. One run directory has one writer:
:func:`writer_lock` refuses a second process. Not guaranteed: durability when the filesystem lies
about fsync.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from tracegen.errors import BadInputError, TracegenError
from tracegen.records import SCHEMA_VERSION, Trajectory


class JsonlStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def open(self) -> list[str]:
        """Repair a torn tail, open for appending, and return the ids of the records already there."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ids = repair_and_index(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return ids

    def append(self, line: str) -> None:
        """Write one JSON line and fsync it; blocking, so call it from a worker thread in async code."""
        assert self._fd is not None, "open() first"
        data = (line + "\n").encode()
        start = os.lseek(self._fd, 0, os.SEEK_END)
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
            os.fsync(self._fd)
        except OSError:  # a full disk: take the partial line back, so the file stays whole lines
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def repair_and_index(path: Path) -> list[str]:
    """Cut a torn last line off ``path`` (if any) and return the ids of its records, in order."""
    if not path.exists():
        return []
    ids: list[str] = []
    good_end = 0
    with path.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # torn tail: the writer died mid-line
            try:
                ids.append(json.loads(raw)["id"])
            except (ValueError, KeyError, TypeError):
                break  # a complete but unreadable last line is a torn write too; only ever at the end
            good_end += len(raw)
    size = path.stat().st_size
    if good_end < size:
        _check_only_tail(path, good_end, line_no=len(ids) + 1)
        with path.open("r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return ids


def _check_only_tail(path: Path, good_end: int, line_no: int) -> None:
    """Refuse to truncate more than one line: damage in the middle is not ours to discard."""
    with path.open("rb") as f:
        f.seek(good_end)
        rest = f.read()
    if rest.count(b"\n") > 1 or (rest.count(b"\n") == 1 and not rest.endswith(b"\n")):
        raise BadInputError(
            f"{path}:{line_no}: corrupt record in the middle of the file",
            hint="inspect that line; tracegen only repairs a torn last line",
        )


@contextlib.contextmanager
def writer_lock(lock_file: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (holding our pid) for the block; refuse when another
    process holds it. The kernel drops the lock when the holder exits, ``kill -9`` included."""
    with disk_errors(lock_file.parent):
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise TracegenError(
                f"{what} is being written by another tracegen process (pid {holder})",
                hint="wait for it to finish (or stop it), or use another --out",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


_DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded"}
_DISK_ERRORS |= {errno.EFBIG: "the file size limit is reached", errno.EROFS: "it is on a read-only file system"}
_DISK_ERRORS |= {errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


@contextlib.contextmanager
def disk_errors(where: Path) -> Iterator[None]:
    """Turn a full disk, a quota or a read-only/unwritable folder into one TracegenError naming ``where``."""
    try:
        yield
    except OSError as exc:
        reason = _DISK_ERRORS.get(exc.errno or 0)
        if reason is None:
            raise
        raise TracegenError(
            f"cannot write to {where}: {reason} ({exc.filename or where})",
            hint="free some space or choose a writable --out; re-running the same command resumes",
        ) from exc


def read_trajectories(path: Path) -> Iterator[Trajectory]:
    """Every trajectory in a JSONL file; a bad line is an error naming file:line."""
    for _, _, trajectory in read_trajectory_lines(path):
        yield trajectory


def read_trajectory_lines(path: Path) -> Iterator[tuple[int, str, Trajectory]]:
    """(line number, raw line, trajectory) for every record; a bad line is an error naming file:line.

    A record appended again under the same id (a retried trajectory) supersedes the earlier one: only
    the newest is yielded, so each (task, sample) is seen once."""
    superseded = _superseded_lines(path)
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip() or line_no in superseded:
                continue
            try:
                trajectory = Trajectory.model_validate_json(line)
            except ValidationError as exc:
                _refuse_newer(path, line_no, _declared_version(line))
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "line"
                raise BadInputError(f"{path}:{line_no}: not a trajectory record ({where}: {first['msg']})") from exc
            _refuse_newer(path, line_no, trajectory.schema_version)
            yield line_no, line, trajectory


_ID_PREFIX = re.compile(r'\{"schema_version":\d+,"id":"([^"\\]*)"')


def _superseded_lines(path: Path) -> set[int]:
    """Line numbers of records a later line with the same id replaces (usually none)."""
    last: dict[str, int] = {}
    superseded: set[int] = set()
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            match = _ID_PREFIX.match(line)  # tracegen's own lines: no JSON parse needed
            if match:
                record_id: object = match.group(1)
            else:
                try:
                    record_id = json.loads(line).get("id")
                except (ValueError, AttributeError):
                    continue  # the typed read below reports it with its line number
            if not isinstance(record_id, str):
                continue
            if record_id in last:
                superseded.add(last[record_id])
            last[record_id] = line_no
    return superseded


def _declared_version(line: str) -> int | None:
    try:
        version = json.loads(line).get("schema_version")
    except (ValueError, AttributeError):
        return None
    return version if isinstance(version, int) else None


def _refuse_newer(path: Path, line_no: int, version: int | None) -> None:
    """A record from a newer tracegen may mean something this one cannot read: say so, by version."""
    if version is not None and version > SCHEMA_VERSION:
        raise BadInputError(
            f"{path}:{line_no}: written by a newer tracegen (schema_version {version}; "
            f"this one reads up to {SCHEMA_VERSION})",
            hint="upgrade tracegen (pip install -U tracegen) to read this file",
        )


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; when the block succeeds it is fsynced and replaces ``out``.

    On any failure (Ctrl-C included) the temporary folder is removed. A crash leaves the old folder or
    the new one under ``out``, never half of one; a kill between the two renames leaves the old one as
    ``.NAME.old`` beside it.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the result should be readable like any other folder
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_lines_atomic(path: Path, lines: Iterable[str]) -> None:
    """Write JSON lines atomically (see :func:`write_atomic`): the file is complete or absent."""

    def write(f: TextIO) -> None:
        for line in lines:
            f.write(line)
            f.write("\n")

    write_atomic(path, write)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write one JSON document atomically (see :func:`write_atomic`)."""
    write_atomic(path, lambda f: f.write(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def write_atomic(path: Path, write: Callable[[TextIO], object]) -> None:
    """Write to a temp file, fsync, rename, fsync the folder: readers see the old file or the new one,
    never half of one, and after a crash the rename itself is on disk too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
