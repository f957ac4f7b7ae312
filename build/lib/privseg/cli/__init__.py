"""The ``privseg`` command line: a thin shell over the service modules (as is ``privseg.api``).

Each command module imports what it runs inside the command, so ``privseg --help`` stays fast.
"""

from __future__ import annotations

import os
import sys

import typer

from privseg.cli import data, governance, releases, segments  # noqa: F401  (they register commands)
from privseg.cli.shell import app
from privseg.errors import PrivsegError

__all__ = ["app", "main"]


def main() -> None:
    # Everything privseg writes (database, Parquet, logs, anchors) is its own: owner-only from creation.
    os.umask(0o077)
    try:
        app()
    except PrivsegError as exc:
        typer.echo(f"error ({exc.code}): {exc.message}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
