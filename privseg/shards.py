"""Person shards: the unit of bounded-memory and distributed execution.

Everything privseg computes is per person until the final aggregate (features, memberships, the
cell a person lands in), so the store is partitioned by person: every row of every batch file
carries the shard of its pseudonym, rows are sorted by shard, and a reader that wants a few shards
reads only the row groups holding them (Parquet statistics on the ``shard`` column).

The shard is read off the pseudonym itself. A pseudonym is ``k<version>.`` followed by the base64url
AES-SIV ciphertext, whose first 16 bytes are the synthetic IV: AES-CMAC of the identifier under the
pseudonym key, a keyed pseudo-random function. Its first 18 bits are therefore a keyed hash of the
identifier, uniform over people, stable for a key version, and re-keyed with a rotation (which
rewrites every file, so files and shards move together). Nothing secret is needed to compute it:
Spark executors shard without the keyset.

Correctness never depends on the spread, only on the shard being a function of the pseudonym
(all of a person's rows meet in one shard); a string that is not a pseudonym (tests build some)
falls into shard 0.
"""

from __future__ import annotations

import string

import polars as pl

SHARD = "shard"
SHARD_DTYPE = pl.UInt16
DEFAULT_SHARDS = 64
MAX_SHARDS = 4096  # 12 of the 18 bits read; a power of two keeps every shard the same size
_ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
_VALUE = {c: i for i, c in enumerate(_ALPHABET)}


def check_count(shards: int) -> int:
    """``shards`` if it is a usable shard count: a power of two from 1 to MAX_SHARDS."""
    if not 1 <= shards <= MAX_SHARDS or shards & (shards - 1):
        raise ValueError(f"the shard count must be a power of two from 1 to {MAX_SHARDS}")
    return shards


def shard_expr(shards: int, pid: str = "pid") -> pl.Expr:
    """The shard (0 .. shards-1) of each pseudonym in column ``pid``."""
    check_count(shards)
    body = pl.col(pid).str.split_exact(".", 1).struct.field("field_1").fill_null("")

    def char(i: int) -> pl.Expr:
        return body.str.slice(i, 1).replace_strict(_VALUE, default=0, return_dtype=pl.UInt32)

    bits18 = (char(0) * 4096) + (char(1) * 64) + char(2)
    return (bits18 % shards).cast(SHARD_DTYPE).alias(SHARD)


def with_shards(frame: pl.DataFrame, shards: int) -> pl.DataFrame:
    """``frame`` with its ``shard`` column (recomputed: a rewrite may have changed the pseudonyms),
    rows sorted by shard and, within a shard, in their original order."""
    return frame.with_columns(shard_expr(shards)).sort(SHARD, maintain_order=True)


def groups(shards: int, parts: int) -> list[range]:
    """``shards`` split into at most ``parts`` runs of consecutive shards, as even as possible."""
    parts = max(1, min(parts, shards))
    size, extra = divmod(shards, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(range(start, end))
        start = end
    return out


def in_group(group: range) -> pl.Expr:
    """Rows whose shard is in ``group`` (a run of consecutive shards: one range test, which Parquet
    row-group statistics answer without reading the rows)."""
    return pl.col(SHARD).is_between(group.start, group.stop - 1)
