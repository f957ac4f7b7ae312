"""Pseudonyms: deterministic AES-SIV encryption of normalized identifiers (RFC 5297).

A pseudonym (``pid``) is ``k<version>.`` + base64url(AES-SIV(key_v, pad(normalized id), [ad])).

- Deterministic, so events join to profiles across batches; it leaks equality only.
- The associated data binds the token to the deployment namespace, the identifier type, the key
  version and the normalization version, so a token relabelled with another prefix, or taken to
  another deployment, fails to decrypt (``InvalidTag``) instead of meaning something else.
- Plaintexts are padded (ISO/IEC 7816-4) to a multiple of 16 bytes so that token length does not
  reveal identifier length.
- Reversible by the key holder alone: erasure, access requests and key rotation need no stored raw id.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

import numpy as np
import polars as pl
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from privseg.errors import InvalidInput, InvalidPseudonym
from privseg.identity import IdType as IdType  # re-exported: callers name it with the pseudonymizer
from privseg.keyset import Keyset
from privseg.shards import KEY, KEY_DTYPE, key_expr, siv_keys
from privseg.siv import BatchSIV

# Bump when a normalization rule changes: it is part of the associated data, so old and new
# pseudonyms of one person differ, and the store must be re-pseudonymized (like a key rotation).
NORMALIZATION_VERSION = 1
_BLOCK = 16
# Everything Python calls whitespace (Polars' default strip_chars() leaves e.g. U+001F in place).
_WHITESPACE = "".join(ch for ch in map(chr, range(0x3001)) if ch.isspace())
_TOKEN_RE = re.compile(r"^k([1-9][0-9]{0,5})\.([A-Za-z0-9_-]+)$")


def normalize_expr(expr: pl.Expr, id_type: IdType) -> pl.Expr:
    """Normalize identifiers so that one person does not become two.

    email: NFKC, trim, lower-case; phone: digits only; customer number: trim. This expression is the
    only implementation of the rules: a Python twin disagreed with it on 24 BMP characters (Rust's
    Unicode case tables are newer than Python 3.11's), and any disagreement splits a person in two.
    """
    if id_type is IdType.EMAIL:
        return expr.str.normalize("NFKC").str.strip_chars(_WHITESPACE).str.to_lowercase()
    if id_type is IdType.PHONE:
        return expr.str.replace_all(r"[^0-9]", "")
    return expr.str.strip_chars(_WHITESPACE)


def normalize(value: str, id_type: IdType) -> str:
    """:func:`normalize_expr` applied to one value (erasure and look-ups by raw identifier)."""
    out = pl.select(normalize_expr(pl.lit(value, dtype=pl.String), id_type)).item()
    return str(out)


# Below this many distinct identifiers the stock AESSIV loop is as fast as setting up arrays.
BATCH_MIN = 64
# Identifiers of one padded size are sealed this many at a time: every array of a chunk (a few MB) is
# served from the allocator's heap and reused, where arrays for all of them were mapped afresh and
# faulted in page by page on each call. 1M distinct ids, sealed first in a process: 1.36 s whole,
# 0.35 s in chunks (0.32-0.38 s for chunks of 2**14 to 2**18); the benchmark's siv phase peaked at
# 417-426 MB instead of 465-499 MB.
SEAL_CHUNK = 1 << 16
_B64URL = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", dtype=np.uint8)
_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64url(rows: np.ndarray) -> np.ndarray:
    """base64url without padding of every row of an (N, W) uint8 array, as (N, ceil(4W/3)) ASCII.

    Each row's first 3 * (W // 3) bytes are encoded by binascii as one buffer (every 3 bytes are 4
    characters, so the rows' characters stay apart); the last W % 3 bytes by table lookups. Per 1M
    tokens: 0.23 s with lookups for every byte, well under 0.1 s this way."""
    count, width = rows.shape
    whole, tail = width - width % 3, width % 3
    head = whole // 3 * 4
    out = np.empty((count, head + (tail + 1 if tail else 0)), dtype=np.uint8)
    if whole:
        text = binascii.b2a_base64(np.ascontiguousarray(rows[:, :whole]).tobytes(), newline=False)
        out[:, :head] = np.frombuffer(text.translate(_URLSAFE), dtype=np.uint8).reshape(count, head)
    if tail:
        a = rows[:, whole]
        b = rows[:, whole + 1] if tail == 2 else np.zeros(count, dtype=np.uint8)
        out[:, head] = _B64URL[a >> 2]
        out[:, head + 1] = _B64URL[((a & 3) << 4) | (b >> 4)]
        if tail == 2:
            out[:, head + 2] = _B64URL[(b & 15) << 2]
    return out


def _padded(values: pl.Series, size: int) -> np.ndarray:
    """Each value's UTF-8 bytes padded (ISO/IEC 7816-4: 0x80, then zeros) to ``size`` bytes, as an
    (N, size) array (every value is shorter than ``size``). The bytes come from one joined buffer,
    not N Python objects (0.3 s per 1M values that way)."""
    lengths = values.str.len_bytes().to_numpy().astype(np.int64)
    flat = np.frombuffer(values.str.join("").item().encode(), dtype=np.uint8)
    out = np.zeros((len(values), size), dtype=np.uint8)
    if lengths.min() == lengths.max():  # one length (fixed-format customer numbers): a reshape
        out[:, : lengths[0]] = flat.reshape(len(values), -1)
    else:
        starts = np.arange(len(values), dtype=np.int64) * size
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        out.reshape(-1)[np.repeat(starts - offsets, lengths) + np.arange(flat.size)] = flat
    out[np.arange(len(values)), lengths] = 0x80
    return out


# ISO/IEC 7816-4 suffixes indexed by len % 16: 0x80 then zeros up to the next multiple of 16.
_PADS = tuple(b"\x80" + b"\x00" * (15 - r) for r in range(16))


def _pad(data: bytes) -> bytes:
    padded_len = (len(data) // _BLOCK + 1) * _BLOCK
    return data + b"\x80" + b"\x00" * (padded_len - len(data) - 1)


def _unpad(data: bytes) -> bytes:
    end = data.rstrip(b"\x00")
    if not end.endswith(b"\x80"):
        raise InvalidPseudonym("the pseudonym decrypted but its padding is invalid")
    return end[:-1]


@dataclass(frozen=True)
class EncryptedColumn:
    tokens: pl.Series
    distinct: int  # number of distinct identifiers, i.e. people
    shard_keys: pl.Series  # per row, the token's shard key (shards.KEY): what shards.key_expr reads


class Pseudonymizer:
    """Encrypts normalized identifiers of one type under one key version, and decrypts any version."""

    def __init__(self, keyset: Keyset, id_type: IdType, version: int | None = None) -> None:
        self._keyset = keyset
        self.id_type = id_type
        self.version = keyset.primary if version is None else version
        self._ciphers: dict[int, AESSIV] = {}
        self._batches: dict[int, BatchSIV] = {}
        self._cipher(self.version)  # fail now, not mid-batch, if the version is missing

    def __repr__(self) -> str:
        return f"Pseudonymizer(namespace={self._keyset.namespace!r}, type={self.id_type}, k{self.version})"

    def _cipher(self, version: int) -> AESSIV:
        if version not in self._ciphers:
            self._ciphers[version] = AESSIV(self._keyset.pseudonym_key(version).reveal())
        return self._ciphers[version]

    def _ad(self, version: int) -> list[bytes]:
        # Exactly one AD component: RFC 5297 treats a last extra component as a nonce.
        return [
            f"privseg/pseudonym|ns={self._keyset.namespace}|type={self.id_type}"
            f"|key={version}|norm={NORMALIZATION_VERSION}".encode()
        ]

    def encrypt(self, normalized: str) -> str:
        """Pseudonym of one already-normalized identifier."""
        if not normalized:
            raise InvalidInput("an identifier is empty after normalization")
        ct = self._cipher(self.version).encrypt(_pad(normalized.encode()), self._ad(self.version))
        return f"k{self.version}." + base64.urlsafe_b64encode(ct).rstrip(b"=").decode("ascii")

    def pseudonymize(self, raw: str) -> str:
        """Normalize, then encrypt, one raw identifier."""
        return self.encrypt(normalize(raw, self.id_type))

    def decrypt(self, token: str) -> str:
        """The normalized identifier behind a pseudonym (key holder only; audited by callers)."""
        match = _TOKEN_RE.match(token)
        if match is None:
            raise InvalidPseudonym("not a privseg pseudonym (expected 'k<version>.<base64url>')")
        version = int(match.group(1))
        if version not in self._keyset.pseudonym_keys:
            raise InvalidPseudonym(f"the pseudonym names key version {version}, which the keyset lacks")
        body = match.group(2)
        try:
            ct = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise InvalidPseudonym("the pseudonym is not valid base64url") from None
        try:
            pt = self._cipher(version).decrypt(ct, self._ad(version))
        except InvalidTag:
            raise InvalidPseudonym(
                "the pseudonym does not authenticate: tampered, relabelled, or from another deployment"
            ) from None
        return _unpad(pt).decode()

    def _seal_many(self, plaintexts: list[bytes]) -> pl.Series:
        """:meth:`encrypt` for many values: the reference implementation (stock ``AESSIV``, one call
        per value), used for small batches and as the yardstick of the batched path."""
        if not all(plaintexts):
            raise InvalidInput("an identifier is empty after normalization")
        seal = self._cipher(self.version).encrypt
        ad = self._ad(self.version)
        pads = _PADS
        sealed = pl.Series([seal(b + pads[len(b) & 15], ad) for b in plaintexts], dtype=pl.Binary)
        # base64url without padding, vectorized: the Python base64 module cost more than AES here.
        b64 = sealed.bin.encode("base64").str.replace_all("+", "-", literal=True)
        b64 = b64.str.replace_all("/", "_", literal=True).str.strip_chars_end("=")
        return pl.select(pl.format(f"k{self.version}.{{}}", pl.lit(b64))).to_series()

    def _seal_batched(self, values: pl.Series) -> tuple[pl.Series, pl.Series]:
        """:meth:`encrypt` for many values with :class:`~privseg.siv.BatchSIV` (byte-identical to the
        stock path, tests/test_siv.py): values of one padded length are encrypted as one array.
        Returns the tokens and their shard keys (taken from the SIV bytes at hand)."""
        lengths = values.str.len_bytes()
        if values.is_null().any() or (lengths == 0).any():
            raise InvalidInput("an identifier is empty after normalization")
        if self.version not in self._batches:
            key = self._keyset.pseudonym_key(self.version).reveal()
            self._batches[self.version] = BatchSIV(key, self._ad(self.version))
        siv, prefix = self._batches[self.version], f"k{self.version}.".encode()
        padded = (lengths // _BLOCK + 1) * _BLOCK
        sizes = padded.unique().sort().to_list()
        parts, keys, positions = [], [], []
        for size in sizes:
            # One padded size (customer numbers of one length): the group is the column, in order.
            group = values
            if len(sizes) > 1:
                where = (padded == size).arg_true()
                positions.append(where)
                group = values.gather(where)
            width = len(prefix) + -(-(_BLOCK + size) * 4 // 3)  # base64url of the SIV and ciphertext
            tokens = np.empty((len(group), width), dtype=np.uint8)
            tokens[:, : len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
            shard_keys = np.empty(len(group), dtype=np.uint32)
            # In chunks of SEAL_CHUNK (why: there), into arrays allocated once for the group.
            for start in range(0, len(group), SEAL_CHUNK):
                sealed = siv.encrypt_fixed(_padded(group.slice(start, SEAL_CHUNK), size))
                tokens[start : start + len(sealed), len(prefix) :] = _b64url(sealed)
                shard_keys[start : start + len(sealed)] = siv_keys(sealed)
            parts.append(pl.Series(tokens.view(f"S{width}").ravel()).cast(pl.String))
            keys.append(pl.Series(shard_keys, dtype=KEY_DTYPE))
        if len(sizes) == 1:
            return parts[0], keys[0]
        order = pl.concat(positions).arg_sort()
        return pl.concat(parts).gather(order), pl.concat(keys).gather(order)

    def encrypt_column(self, normalized: pl.Series) -> EncryptedColumn:
        """Pseudonyms for a column of normalized identifiers, encrypting each distinct value once.

        Events repeat people, so the column is reduced to its distinct values (a dense rank, then a
        gather: the fastest route measured here, see benchmarks/ingest.py), which also gives the
        number of people for free. The column must hold no nulls or empty strings. Not a
        Categorical: its global string cache would keep raw identifiers in memory for the life of
        the process.
        """
        distinct, codes = self._distinct(normalized)
        if distinct.len() >= BATCH_MIN:
            tokens, keys = self._seal_batched(distinct)
        else:
            tokens = self._seal_many(distinct.cast(pl.Binary).to_list())
            keys = tokens.to_frame("pid").select(key_expr()).to_series()
        if codes is not None:
            tokens, keys = tokens.gather(codes), keys.gather(codes)
        return EncryptedColumn(tokens.rename(normalized.name), distinct.len(), keys.rename(KEY))

    def encrypt_series(self, normalized: pl.Series) -> pl.Series:
        return self.encrypt_column(normalized).tokens

    def decrypt_series(self, tokens: pl.Series) -> pl.Series:
        distinct, codes = self._distinct(tokens)
        plain = pl.Series([self.decrypt(v) for v in distinct.to_list()], dtype=pl.String)
        return (plain if codes is None else plain.gather(codes)).rename(tokens.name)

    @staticmethod
    def _distinct(values: pl.Series) -> tuple[pl.Series, pl.Series | None]:
        """Distinct values and, per row, the index of its value among them; None instead of the
        indexes when no value repeats (a profile file): the distinct values are then the rows, in order.

        Each run of equal values (an export grouped by person) is looked at once, and the runs' values
        are told apart by a 64-bit hash, checked against the values themselves: a collision (odds
        ~3e-8 for a million people) takes an exact sort of the strings instead. Per 10M events of 1M
        people, a dense rank of the strings took 0.5-0.9 s on rows grouped by person but 9.6-10.4 s
        on rows in time order (the common export); this takes 0.8 s and 2.3 s."""
        if values.null_count():
            raise InvalidInput("an identifier is missing")
        # One chunk first: a CSV read gives hundreds, and every pass below reads them all.
        values = values.rechunk()
        starts = values.to_frame("v").select(pl.col("v").ne_missing(pl.col("v").shift(1)).fill_null(True))
        every = bool(starts.to_series().all())
        heads = values if every else values.filter(starts.to_series())
        distinct, head_codes = _by_hash(heads) or _by_sort(heads)
        if every and head_codes is None:
            return distinct, None
        run = starts.select(pl.first().cast(pl.UInt32).cum_sum() - 1).to_series().to_numpy()
        return distinct, pl.Series(run if head_codes is None else head_codes[run])


def _hash(column: pl.Expr) -> pl.Expr:
    return column.hash(0)


def _firsts(values: pl.Series, codes: np.ndarray) -> pl.Series:
    """The value of each code (codes are dense from 0): a row of each, the last one written winning,
    gathered instead of a second hash pass (unique + sort) over every row."""
    first = np.empty(int(codes.max()) + 1 if codes.size else 0, dtype=np.int64)
    first[codes] = np.arange(codes.size, dtype=np.int64)
    return values.gather(first)


def _by_hash(values: pl.Series) -> tuple[pl.Series, np.ndarray | None] | None:
    """Distinct values and each row's code by a dense rank of 64-bit hashes (None for the codes when
    every value differs: each row is then its own code); None when two different values share a hash
    (every row is compared with its code's value)."""
    frame = values.to_frame("v")
    codes = frame.select(_hash(pl.col("v")).rank("dense").cast(pl.UInt32) - 1).to_series().to_numpy()
    if codes.size and int(codes.max()) == codes.size - 1:
        # Equal values hash equally, so values whose hashes all differ all differ: nothing to gather
        # or check (a profile file, or events grouped by person, whose runs are people). Read off the
        # rank, not counted apart: a count cost 0.25 s per 10M events in time order, where it fails.
        return values, None
    distinct = _firsts(values, codes)
    same = frame.select((pl.col("v") == distinct.gather(pl.Series(codes))).all()).item()
    return (distinct, codes) if same else None


def _by_sort(values: pl.Series) -> tuple[pl.Series, np.ndarray]:
    """Distinct values and each row's code by a dense rank of the values themselves (exact)."""
    codes = values.to_frame("v").select(pl.first().rank("dense").cast(pl.UInt32) - 1).to_series().to_numpy()
    return _firsts(values, codes), codes
