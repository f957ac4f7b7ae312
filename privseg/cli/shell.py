"""The command line's frame: the Typer app and its groups, and what every command shares (the
deployment, --json output, progress)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:  # the command modules are imported by the commands that use them: a fast --help
    from privseg.deployment import Deployment


def group(help_text: str) -> typer.Typer:
    """A command group. Help is Click's plain text (``rich_markup_mode=None``): Typer's rich help
    imports rich's Markdown, traceback and panel modules at every ``--help``, which was 0.26 s of a
    0.5 s start (benchmarks/cli_startup.py). Commands still print tables and errors with rich."""
    return typer.Typer(no_args_is_help=True, rich_markup_mode=None, help=help_text)


# pretty_exceptions would print local variables of every frame, key material included.
app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False, add_completion=False
)
keys_app = group("Create, rotate and inspect the keyset.")
ingest_app = group("Ingest profiles or events (CSV, CSV.gz, Parquet, NDJSON).")
store_app = group("Inspect and maintain the pseudonymized store.")
audit_app = group("Read and verify the tamper-evident audit log.")
policy_app = group("Check policy files.")
segments_app = group("Define, explain and compute segments.")
app.add_typer(keys_app, name="keys")
app.add_typer(ingest_app, name="ingest")
app.add_typer(store_app, name="store")
app.add_typer(audit_app, name="audit")
app.add_typer(policy_app, name="policy")
app.add_typer(segments_app, name="segments")


def _version(show: bool) -> None:
    if show:
        from privseg import __version__

        typer.echo(f"privseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """privseg: privacy-preserving customer segmentation. Only differentially private aggregates leave."""


JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
SeparatorOpt = Annotated[
    str | None,
    typer.Option(help="CSV field separator (default: detected among comma, semicolon, tab and pipe)."),
]
EncodingOpt = Annotated[
    str, typer.Option(help="CSV text encoding: utf-8 (a byte-order mark is fine) or e.g. latin-1.")
]
Files = Annotated[list[Path], typer.Argument(help="Files to ingest, all or none.", show_default=False)]


def _deployment() -> Deployment:
    from privseg.deployment import Deployment, configure_logging
    from privseg.settings import Settings

    settings = Settings()
    configure_logging(settings)
    return Deployment(settings)


def _governed() -> Deployment:
    """A deployment for a command that acts under the policies: they are loaded first, and a policy
    set not seen before is recorded in the audit log."""
    dep = _deployment()
    dep.record_policies()
    return dep


@contextmanager
def _progress(as_json: bool) -> Iterator[Callable[[str], None]]:
    """A status line on a terminal (stderr) for long work; nothing when not a TTY or with --json."""
    if as_json or not sys.stderr.isatty():
        yield lambda _message: None
        return
    from rich.console import Console

    with Console(stderr=True).status("starting") as status:
        yield lambda message: status.update(message)


def _table(columns: list[str], rows: list[list[Any]], title: str | None = None) -> str:
    """Rows as a plain-text table (rich, no colour: the output is often piped)."""
    import io
    import shutil

    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, title=title, box=None, header_style="bold", pad_edge=False)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    out = io.StringIO()
    Console(file=out, width=max(100, shutil.get_terminal_size().columns), no_color=True).print(table)
    return out.getvalue().rstrip("\n")


def _emit(data: Any, as_json: bool, text: str | None = None) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        typer.echo(text if text is not None else json.dumps(data, indent=2, default=str))
