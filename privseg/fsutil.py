"""Crash-safe file writes: temporary name, fsync, rename, fsync of the directory."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".tmp-"
OWNER_LOCK = ".in-use"


def tmp_path_for(final: Path) -> Path:
    """A unique temporary name beside ``final`` (same directory, so the rename is atomic)."""
    return final.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{final.name}")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and make it 0700: state is nobody else's to read."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def private_files(*paths: Path) -> None:
    """Make existing files 0600 (SQLite creates its files with the process umask)."""
    for path in paths:
        if path.exists():
            os.chmod(path, 0o600)


def publish(tmp: Path, final: Path) -> None:
    """Make a fully written temporary file visible under its final name (mode 0600), durably."""
    os.chmod(tmp, 0o600)
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_private_bytes(final: Path, data: bytes) -> None:
    """Atomically write ``data`` to ``final`` with mode 0600 from the first byte on.

    The file is created 0600 (not chmod-ed after the write), so key material is never readable by
    anyone else, not even for an instant.
    """
    final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = tmp_path_for(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask could only have narrowed it; make it exact
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(final.parent)


@contextmanager
def owned_folder(root: Path) -> Iterator[Path]:
    """A new private folder under ``root`` (made private too), held by this process (a lock inside it)
    while in use and removed after, whatever happens: for files that must not outlive their use
    (raw uploads, a computation's person-level parts)."""
    folder = Path(tempfile.mkdtemp(dir=private_dir(root)))
    fd = os.open(folder / OWNER_LOCK, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)


def remove_abandoned(root: Path, *, lockless: bool) -> int:
    """Delete the :func:`owned_folder` folders under ``root`` whose owner is gone (their lock is free);
    with ``lockless``, also those without a lock (killed between creating the folder and locking it;
    only safe when no owner can be starting, e.g. at server start). Returns how many."""
    if not root.is_dir():
        return 0
    removed = 0
    for folder in root.iterdir():
        try:
            fd: int | None = os.open(folder / OWNER_LOCK, os.O_RDONLY)
        except FileNotFoundError:
            if not lockless:
                continue
            fd = None
        except NotADirectoryError:
            folder.unlink(missing_ok=True)
            removed += 1
            continue
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: its owner is at work
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
        except BlockingIOError:
            pass
        finally:
            if fd is not None:
                os.close(fd)
    return removed
