"""Private staging folders where a snapshot's membership parts are written before it is published.

A computation (local, sharded or Spark) writes Parquet parts into its own folder under
``data/staging/``; the snapshot writer then publishes them as one file. The folder holds person-level
pseudonymous rows, so it is 0700 and removed when the computation ends, whatever the outcome. A folder
left by a process that died is recognised by its lock (held for the folder's whole life): the
snapshot writer sweeps every folder whose lock it can take.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from privseg import fsutil

LOCK = ".owner.lock"


def root(data_dir: Path) -> Path:
    return data_dir / "staging"


@contextmanager
def folder(data_dir: Path) -> Iterator[Path]:
    """A new private staging folder, locked by this process and removed on exit."""
    # (private_dir's mode applies to the leaf only: the root is made private first.)
    path = fsutil.private_dir(fsutil.private_dir(root(data_dir)) / uuid.uuid4().hex)
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def parts(path: Path) -> list[Path]:
    """The Parquet parts written into a staging folder (Spark nests them in its output folder)."""
    return sorted(p for p in path.rglob("*.parquet") if not p.name.startswith((".", "_")))


def sweep(data_dir: Path) -> int:
    """Remove staging folders whose owner is gone; returns how many."""
    base = root(data_dir)
    if not base.exists():
        return 0
    removed = 0
    for path in base.iterdir():
        try:
            fd = os.open(path / LOCK, os.O_RDWR)
        except FileNotFoundError:
            continue  # its owner is between creating the folder and locking it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # its computation is running
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        finally:
            os.close(fd)
    return removed
