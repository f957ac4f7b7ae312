"""Where HTTP uploads wait while they are ingested: raw files (identifiers included), so they live
outside the state directory (which backups copy) in a private folder, each upload in its own
sub-folder locked while in use, and anything a killed server left behind is deleted at the next start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from pathlib import Path

from privseg.errors import InvalidInput, PayloadTooLarge
from privseg.fsutil import owned_folder, remove_abandoned

log = logging.getLogger(__name__)


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


def upload_folder(root: Path) -> AbstractContextManager[Path]:
    """A fresh private folder for one upload, locked while the upload is in flight, removed after."""
    return owned_folder(root)


def clear_stale(root: Path) -> int:
    """Delete upload folders nobody holds (their server died mid-upload); returns how many."""
    removed = remove_abandoned(root, lockless=True)
    if removed:
        log.warning("removed %d upload(s) left by a server that stopped mid-upload", removed)
    return removed
