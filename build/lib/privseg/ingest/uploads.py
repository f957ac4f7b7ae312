"""Where HTTP uploads wait while they are ingested: raw files (identifiers included), so they live
outside the state directory (which backups copy) in a private folder, each upload in its own
sub-folder locked while in use, and anything a killed server left behind is deleted at the next start.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

from privseg.errors import InvalidInput, PayloadTooLarge
from privseg.fsutil import private_dir

log = logging.getLogger(__name__)
_LOCK = ".in-use"


def upload_name(filename: str) -> str:
    """The upload's file name as given, if it is one: errors never quote it (it may hold anything)."""
    if not filename or len(filename.encode("utf-8", "surrogatepass")) > 255:
        raise InvalidInput("filename: expected a file name of 1 to 255 bytes")
    if any(ord(c) < 32 or c in "/\\\x7f" for c in filename) or filename in (".", ".."):
        raise InvalidInput("filename: control characters, NUL and path separators are not allowed")
    return filename


async def receive(chunks: AsyncIterator[bytes], path: Path, limit: int) -> int:
    """Stream a request body to a new private file (never held in memory); refused past ``limit``
    bytes or when empty. Returns the size."""
    size = 0
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(
                    f"the upload exceeds the limit of {limit} bytes (PRIVSEG_MAX_UPLOAD_BYTES)"
                )
            fh.write(chunk)
    if size == 0:
        raise InvalidInput(f"{path.name}: the upload is empty")
    return size


@contextmanager
def upload_folder(root: Path) -> Iterator[Path]:
    """A fresh private folder for one upload, locked while the upload is in flight, removed after."""
    folder = Path(tempfile.mkdtemp(dir=private_dir(root)))
    fd = os.open(folder / _LOCK, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)


def clear_stale(root: Path) -> int:
    """Delete upload folders nobody holds (their server died mid-upload); returns how many."""
    if not root.is_dir():
        return 0
    removed = 0
    for folder in root.iterdir():
        lock = folder / _LOCK
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            fd = None  # a folder killed before its lock existed
        except NotADirectoryError:
            folder.unlink(missing_ok=True)
            removed += 1
            continue
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: an upload in flight elsewhere
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
        except BlockingIOError:
            pass
        finally:
            if fd is not None:
                os.close(fd)
    if removed:
        log.warning("removed %d upload(s) left by a server that stopped mid-upload", removed)
    return removed
