"""Reading source files (CSV, gzip CSV, Parquet, NDJSON) into all-text frames, with errors that name
the file and line but never quote the data."""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import polars as pl

from privseg.errors import InvalidInput

Format = Literal["csv", "parquet", "ndjson"]

_SUFFIXES: dict[str, Format] = {
    ".csv": "csv",
    ".csv.gz": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
    ".ndjson.gz": "ndjson",
    ".jsonl.gz": "ndjson",
}
GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"
DEFAULT_MAX_DECOMPRESSED = 4 * 1024**3  # Settings.max_decompressed_bytes
_PLAIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_ .-]{0,63}$")


def column_label(position: int, name: str) -> str:
    """How an error names a column: by name when the name looks like a column name (letters, digits,
    _ . - and spaces, no @, no long digit runs), else by position only, since a header that is really
    a data row holds identifiers."""
    if _PLAIN_NAME.match(name) and not re.search(r"\d{3,}", name):
        return repr(name)
    return f"#{position} (name not shown: it does not look like a column name)"


def detect_format(path: Path) -> Format:
    name = path.name.lower()
    for suffix, fmt in sorted(_SUFFIXES.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return fmt
    raise InvalidInput(f"{path.name}: unknown file type; use .csv, .csv.gz, .parquet, .ndjson or .jsonl")


SEPARATORS = (",", ";", "\t", "|")
_SNIFF_LINES = 50


def _open_text(path: Path, encoding: str = "utf-8") -> io.TextIOBase:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    raw = gzip.open(path, "rb") if magic == GZIP_MAGIC else open(path, "rb")  # noqa: SIM115
    # utf-8-sig: exports from spreadsheet tools often start with a byte-order mark.
    codec = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
    return io.TextIOWrapper(raw, encoding=codec, errors="strict", newline="")


def _label(encoding: str) -> str:
    return "UTF-8" if codecs.lookup(encoding).name == "utf-8" else encoding


@contextmanager
def _reading(path: Path, encoding: str) -> Iterator[None]:
    """Turn decoding and decompression failures of a text read into errors that name the file."""
    try:
        yield
    except UnicodeDecodeError:
        raise InvalidInput(
            f"{path.name}: not {_label(encoding)} text (binary data or another encoding; see --encoding)"
        ) from None
    except (OSError, EOFError, gzip.BadGzipFile):
        raise InvalidInput(f"{path.name}: the gzip stream is corrupt or truncated") from None


def check_encoding(encoding: str) -> str:
    try:
        return codecs.lookup(encoding).name
    except (LookupError, ValueError):  # ValueError: a NUL in the name (found by schemathesis)
        raise InvalidInput("encoding: unknown text encoding (e.g. utf-8, latin-1)") from None


def sniff_separator(path: Path, encoding: str = "utf-8") -> str:
    """The separator of a CSV: the candidate (comma, semicolon, tab, pipe) that splits the header into
    the most fields; on a tie, the one that splits the first lines consistently. A header with none of
    them is one column (comma). Ragged lines are the parser's to report, with their line numbers."""
    with _reading(path, encoding), _open_text(path, encoding) as fh:
        lines = [line for _, line in zip(range(_SNIFF_LINES), fh, strict=False)]
    if not lines:
        return ","
    widths = {sep: len(next(csv.reader([lines[0]], delimiter=sep), [])) for sep in SEPARATORS}
    best = max(widths.values())
    tied = [sep for sep in SEPARATORS if widths[sep] == best]
    if best <= 1 or len(tied) == 1:
        return tied[0] if best > 1 else ","
    body = lines[1:-1] if len(lines) == _SNIFF_LINES else lines[1:]  # the last line may be cut short
    consistent = [sep for sep in tied if all(len(r) == best for r in csv.reader(body, delimiter=sep) if r)]
    if len(consistent) == 1:
        return consistent[0]
    names = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
    raise InvalidInput(
        f"{path.name}: cannot tell the separator: the header splits into {best} fields on "
        f"{' and on '.join(names[s] for s in tied)}; give it with --separator"
    )


def _first_problem_csv(path: Path, separator: str, encoding: str) -> str:
    """Find the first structurally bad line of a CSV: the error path only, so speed does not matter."""
    try:
        with _open_text(path, encoding) as fh:
            reader = csv.reader(fh, delimiter=separator)
            width = None
            for row in reader:
                if width is None:
                    width = len(row)
                elif row and len(row) != width:
                    return f"line {reader.line_num}: expected {width} fields, found {len(row)}"
    except UnicodeDecodeError:
        return f"not {_label(encoding)} text (binary data or another encoding; see --encoding)"
    except (OSError, EOFError, gzip.BadGzipFile):
        return "the gzip stream is corrupt or truncated"
    except csv.Error as exc:
        return f"malformed CSV ({exc})"
    return "could not be parsed as CSV"


def _csv_header(path: Path, separator: str, encoding: str) -> list[str]:
    try:
        with _reading(path, encoding), _open_text(path, encoding) as fh:
            header = next(csv.reader(fh, delimiter=separator), None)
    except csv.Error as exc:
        raise InvalidInput(f"{path.name}: malformed CSV header ({exc})") from None
    if not header or not any(h.strip() for h in header):
        raise InvalidInput(f"{path.name}: the file is empty (expected a header line)")
    return header


def _check_names(path: Path, names: Iterable[str]) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names, start=1):
        if not name.strip():
            raise InvalidInput(f"{path.name}: column {i} of the header has no name")
        if name in seen:
            raise InvalidInput(f"{path.name}: the header names column {column_label(i, name)} twice")
        seen.add(name)


def _check_gzip(path: Path, max_bytes: int) -> None:
    """Read a gzip stream through (constant memory) before anything parses it: Polars decompresses a
    truncated stream without complaint and returns what it got (a cut-off upload would silently lose
    rows), and a small file can expand to far more than memory holds (a gzip bomb)."""
    with open(path, "rb") as fh:
        if fh.read(2) != GZIP_MAGIC:
            return
    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                total += len(chunk)
                if total > max_bytes:
                    raise InvalidInput(
                        f"{path.name}: decompresses to more than {max_bytes} bytes "
                        "(PRIVSEG_MAX_DECOMPRESSED_BYTES); refused"
                    )
    except (OSError, EOFError, gzip.BadGzipFile):
        raise InvalidInput(f"{path.name}: the gzip stream is corrupt or truncated") from None


def _read_csv(path: Path, separator: str | None, encoding: str) -> pl.DataFrame:
    if separator is None:
        separator = sniff_separator(path, encoding)
    elif len(separator) != 1:
        raise InvalidInput("separator: expected one character (e.g. ';' or a tab)")
    _check_names(path, _csv_header(path, separator, encoding))
    utf8 = codecs.lookup(encoding).name == "utf-8"
    try:
        if utf8:
            # An empty field is missing (null); a quoted "" is an empty string (Polars' default).
            return pl.read_csv(path, separator=separator, infer_schema=False)
        # Another encoding: decode strictly here (Polars' own decoding would not say where it failed).
        with _open_text(path, encoding) as fh:
            text = fh.read()
        return pl.read_csv(io.BytesIO(text.encode("utf-8")), separator=separator, infer_schema=False)
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError):
        raise InvalidInput(f"{path.name}: {_first_problem_csv(path, separator, encoding)}") from None


def _first_problem_ndjson(path: Path) -> str:
    try:
        with _open_text(path) as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError:
                    return f"line {number}: not valid JSON"
                if not isinstance(value, dict):
                    return f"line {number}: expected a JSON object"
    except UnicodeDecodeError:
        return "not UTF-8 text (binary data or another encoding)"
    except (OSError, EOFError, gzip.BadGzipFile):
        return "the gzip stream is corrupt or truncated"
    return "could not be parsed as NDJSON"


def _read_ndjson(path: Path, list_columns: frozenset[str]) -> pl.DataFrame:
    try:
        if path.stat().st_size == 0:
            raise InvalidInput(f"{path.name}: the file is empty")
        with open(path, "rb") as fh:
            data = fh.read()
        if data[:2] == GZIP_MAGIC:
            data = gzip.decompress(data)
        # First learn the column names, then read every value as text (lists as lists of text),
        # so validation sees exactly what the file says, whatever JSON type it used.
        names = pl.read_ndjson(io.BytesIO(data), infer_schema_length=None).columns
        schema = {n: (pl.List(pl.String) if n in list_columns else pl.String) for n in names}
        return pl.read_ndjson(io.BytesIO(data), schema=schema)
    except InvalidInput:
        raise
    except (pl.exceptions.PolarsError, OSError, EOFError, gzip.BadGzipFile):
        raise InvalidInput(f"{path.name}: {_first_problem_ndjson(path)}") from None


def _read_parquet(path: Path) -> pl.DataFrame:
    with open(path, "rb") as fh:
        if fh.read(4) != PARQUET_MAGIC:
            raise InvalidInput(f"{path.name}: not a Parquet file")
    try:
        df = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError):
        raise InvalidInput(f"{path.name}: the Parquet file is corrupt or truncated") from None
    _check_names(path, df.columns)
    return df


def _as_text(df: pl.DataFrame, list_columns: frozenset[str], source: str) -> pl.DataFrame:
    """Typed columns (Parquet) to the same text form CSV gives, so one validator serves all."""
    exprs: list[pl.Expr] = []
    for name, dtype in df.schema.items():
        col = pl.col(name)
        if name in list_columns and isinstance(dtype, pl.List):
            exprs.append(col.cast(pl.List(pl.String)))
        elif isinstance(dtype, pl.Datetime):
            if dtype.time_zone is None:
                col = col.dt.replace_time_zone("UTC")
            exprs.append(col.dt.to_string("%Y-%m-%dT%H:%M:%S%.f%z"))
        elif dtype == pl.Date:
            exprs.append(col.dt.to_string("%Y-%m-%d"))
        elif dtype == pl.Boolean:
            exprs.append(pl.when(col).then(pl.lit("true")).when(~col).then(pl.lit("false")))
        elif (
            dtype == pl.String or isinstance(dtype, pl.Categorical | pl.Enum | pl.Null) or dtype.is_numeric()
        ):
            exprs.append(col.cast(pl.String))
        else:
            label = column_label(len(exprs) + 1, name)
            raise InvalidInput(f"{source}: column {label} has type {dtype}, which privseg cannot ingest")
        exprs[-1] = exprs[-1].alias(name)
    return df.select(exprs)


def read_source(
    path: Path,
    *,
    list_columns: frozenset[str] = frozenset(),
    max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED,
    separator: str | None = None,
    encoding: str = "utf-8",
) -> pl.DataFrame:
    """Read a source file into a frame of text columns (``list_columns`` may be lists of text).

    CSV: ``separator`` None is sniffed (comma, semicolon, tab, pipe); ``encoding`` is the text
    encoding (UTF-8 with or without a byte-order mark by default; e.g. latin-1 for older exports)."""
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file")
    fmt = detect_format(path)
    encoding = check_encoding(encoding)
    _check_gzip(path, max_decompressed_bytes)
    if fmt == "csv":
        df = _read_csv(path, separator, encoding)
    elif fmt == "ndjson":
        df = _as_text(_read_ndjson(path, list_columns), list_columns, path.name)
    else:
        df = _as_text(_read_parquet(path), list_columns, path.name)
    if df.height == 0:
        raise InvalidInput(f"{path.name}: the file has a header but no rows")
    return df
