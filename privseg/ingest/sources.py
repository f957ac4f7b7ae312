"""Reading source files (CSV, gzip CSV, Parquet, NDJSON) into all-text frames, with errors that name
the file and line but never quote the data."""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import mmap
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
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
QUOTE = '"'
# Bytes compared per step when counting characters: 4 MB stays in cache (700 MB: 0.12 s; 16 MB steps
# 0.16-0.21 s; numpy's bincount of every byte value 2.7 s).
_COUNT_STEP = 1 << 22
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


def _first_problem_csv(
    path: Path, separator: str, encoding: str, otherwise: str = "could not be parsed as CSV"
) -> str:
    """Find the first structurally bad line of a CSV: the error path only, so speed does not matter."""
    try:
        with _open_text(path, encoding) as fh:
            reader = csv.reader(fh, delimiter=separator)
            width = None
            for row in reader:
                if width is None:
                    width = len(row)
                elif not row and width > 1:
                    return f"line {reader.line_num}: blank line (expected {width} fields)"
                elif row and len(row) != width:
                    return f"line {reader.line_num}: expected {width} fields, found {len(row)}"
    except UnicodeDecodeError:
        return f"not {_label(encoding)} text (binary data or another encoding; see --encoding)"
    except (OSError, EOFError, gzip.BadGzipFile):
        return "the gzip stream is corrupt or truncated"
    except csv.Error as exc:
        return f"malformed CSV ({exc})"
    return otherwise


def count_chars(
    buffer: bytes | mmap.mmap, chars: str, counts: dict[str, int] | None = None
) -> dict[str, int]:
    """How often each of ``chars`` (single-byte characters) occurs in ``buffer``, added to ``counts``."""
    counts = counts if counts is not None else {}
    data = np.frombuffer(buffer, dtype=np.uint8)
    codes = {char: ord(char) for char in chars}
    for char in chars:
        counts.setdefault(char, 0)
    for start in range(0, data.size, _COUNT_STEP):
        step = data[start : start + _COUNT_STEP]  # every character is counted while the step is in cache
        for char, code in codes.items():
            counts[char] += int(np.count_nonzero(step == code))
    return counts


def _file_counts(path: Path, chars: str) -> dict[str, int]:
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
        counts = count_chars(view, chars)
        del view  # numpy's view of the map must be gone before the map closes
    return counts


def _fields_add_up(df: pl.DataFrame, header: list[str], separator: str, counts: dict[str, int]) -> bool:
    """Refuse a row with fewer fields than the header. Polars refuses a row with more, but fills a short
    row's missing fields with nulls, so a file cut off between two fields (or a row that lost its last
    values) would be stored as if those values were blank. Every row has at most ``len(header) - 1``
    separators outside quotes (the parser saw to that), so they all have exactly that many if and only
    if the file holds as many separators as the rows need, plus those in the header and inside quoted
    values; the latter are counted only when the file has a quote character at all."""
    inside = sum(name.count(separator) for name in header)
    if counts.get(QUOTE, 0) and df.height:
        per_column = [pl.col(c).str.count_matches(separator, literal=True).sum() for c in df.columns]
        inside += int(df.select(pl.sum_horizontal(per_column)).item() or 0)
    return counts[separator] == (len(header) - 1) * (df.height + 1) + inside  # + 1: the header line


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


def _check_gzip(path: Path, max_bytes: int, chars: str) -> dict[str, int] | None:
    """Read a gzip stream through (constant memory) before anything parses it: Polars decompresses a
    truncated stream without complaint and returns what it got (a cut-off upload would silently lose
    rows), and a small file can expand to far more than memory holds (a gzip bomb). Returns how often
    each of ``chars`` occurs in the decompressed stream (None: not gzip)."""
    with open(path, "rb") as fh:
        if fh.read(2) != GZIP_MAGIC:
            return None
    total = 0
    counts: dict[str, int] = dict.fromkeys(chars, 0)
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                count_chars(chunk, chars, counts)
                total += len(chunk)
                if total > max_bytes:
                    raise InvalidInput(
                        f"{path.name}: decompresses to more than {max_bytes} bytes "
                        "(PRIVSEG_MAX_DECOMPRESSED_BYTES); refused"
                    )
    except (OSError, EOFError, gzip.BadGzipFile):
        raise InvalidInput(f"{path.name}: the gzip stream is corrupt or truncated") from None
    return counts


def _read_csv(
    path: Path, separator: str | None, encoding: str, gzip_counts: dict[str, int] | None
) -> pl.DataFrame:
    if separator is None:
        separator = sniff_separator(path, encoding)
    header = _csv_header(path, separator, encoding)
    _check_names(path, header)
    utf8 = codecs.lookup(encoding).name == "utf-8"
    try:
        if utf8:
            # The count runs beside the parser (numpy releases the GIL): 0.3 s per 700 MB alone, ~0 beside.
            with ThreadPoolExecutor(max_workers=1) as pool:
                counting = pool.submit(_file_counts, path, separator + QUOTE) if gzip_counts is None else None
                # An empty field is missing (null); a quoted "" is an empty string (Polars' default).
                df = pl.read_csv(path, separator=separator, infer_schema=False)
                counts = counting.result() if counting is not None else gzip_counts or {}
        else:
            # Another encoding: decode strictly here (Polars' own decoding would not say where it failed).
            with _open_text(path, encoding) as fh:
                data = fh.read().encode("utf-8")
            df = pl.read_csv(io.BytesIO(data), separator=separator, infer_schema=False)
            counts = count_chars(data, separator + QUOTE)
            del data
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError):
        raise InvalidInput(f"{path.name}: {_first_problem_csv(path, separator, encoding)}") from None
    if not _fields_add_up(df, header, separator, counts):
        if _bare_carriage_returns(path, encoding):
            # Polars ends lines at \n only: the whole file looked like one header line to it.
            raise InvalidInput(
                f"{path.name}: lines end with a bare carriage return (classic Mac OS line endings); "
                "save the file with LF or CRLF line endings"
            )
        problem = _first_problem_csv(
            path,
            separator,
            encoding,
            otherwise="the rows do not add up to the header's fields (a quote character inside an "
            "unquoted value?)",
        )
        raise InvalidInput(f"{path.name}: {problem}")
    return df


def _bare_carriage_returns(path: Path, encoding: str) -> bool:
    """Whether the file's start has line breaks, all of them a lone ``\r`` (the error path only)."""
    with _open_text(path, encoding) as fh:
        start = fh.read(1 << 20)
    return "\r" in start and "\n" not in start


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
    if separator is not None and len(separator.encode("utf-8")) != 1:
        raise InvalidInput("separator: expected one ASCII character (e.g. ';' or a tab)")
    # A CSV's characters are counted as the stream is checked, for every separator it may turn out to use.
    chars = "".join(dict.fromkeys([*SEPARATORS, *(separator or ""), QUOTE])) if fmt == "csv" else ""
    gzip_counts = _check_gzip(path, max_decompressed_bytes, chars)
    if fmt == "csv":
        df = _read_csv(path, separator, encoding, gzip_counts)
    elif fmt == "ndjson":
        df = _as_text(_read_ndjson(path, list_columns), list_columns, path.name)
    else:
        df = _as_text(_read_parquet(path), list_columns, path.name)
    if df.height == 0:
        raise InvalidInput(f"{path.name}: the file has a header but no rows")
    return df
