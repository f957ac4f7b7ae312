"""The batched AES-SIV is hand-assembled crypto: it must give exactly the bytes of cryptography's
AESSIV, for the RFC's vectors, every key size, every plaintext length and a million identifiers."""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from hypothesis import given, settings
from hypothesis import strategies as st

from privseg import shards
from privseg.keyset import Keyset
from privseg.pseudonym import BATCH_MIN, IdType, Pseudonymizer
from privseg.siv import BatchSIV

H = bytes.fromhex


def test_rfc5297_vectors() -> None:
    # A.1: deterministic authenticated encryption.
    key = H("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    ad = [H("101112131415161718191a1b1c1d1e1f2021222324252627")]
    (out,) = BatchSIV(key, ad).encrypt_many([H("112233445566778899aabbccddee")])
    assert out == H("85632d07c6e8f37f950acd320a2ecc9340c02b9690c4dc04daef7f6afe5c")
    # A.2: several associated-data components (the last one a nonce).
    key = H("7f7e7d7c7b7a79787776757473727170404142434445464748494a4b4c4d4e4f")
    ad = [
        H("00112233445566778899aabbccddeeffdeaddadadeaddadaffeeddccbbaa99887766554433221100"),
        H("102030405060708090a0"),
        H("09f911029d74e35bd84156c5635688c0"),
    ]
    pt = H("7468697320697320736f6d6520706c61696e7465787420746f20656e6372797074207573696e67205349562d414553")
    (out,) = BatchSIV(key, ad).encrypt_many([pt])
    assert out == H(
        "7bdb6e3b432667eb06f4d14bff2fbd0fcb900f2fddbe404326601965c889bf17"
        "dba77ceb094fa663b7a3f748ba8af829ea64ad544a272e9c485b62a3fd5c0d"
    )


@pytest.mark.parametrize("key_bytes", [32, 48, 64])
def test_every_length_from_0_to_130_and_every_key_size(key_bytes: int) -> None:
    key = os.urandom(key_bytes)
    for ad in ([], [b""], [b"privseg/pseudonym|ns=x|type=email|key=1|norm=1"], [b"a" * 16, b"b" * 33]):
        plaintexts = [os.urandom(n) for n in range(131) for _ in range(4)]
        stock = AESSIV(key)
        assert BatchSIV(key, ad).encrypt_many(plaintexts) == [stock.encrypt(p, ad) for p in plaintexts]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=100), min_size=1, max_size=40), st.binary(max_size=40))
def test_random_batches_match_the_stock_implementation(plaintexts: list[bytes], ad: bytes) -> None:
    key = bytes(range(64))
    stock = AESSIV(key)
    assert BatchSIV(key, [ad]).encrypt_many(plaintexts) == [stock.encrypt(p, [ad]) for p in plaintexts]


def _pseudonymizer(tmp_path) -> Pseudonymizer:  # type: ignore[no-untyped-def]
    from privseg.keyset import create_keyset

    keyset: Keyset = create_keyset(tmp_path / "keyset.json", "siv-test")
    return Pseudonymizer(keyset, IdType.EMAIL)


def test_a_million_identifiers_give_the_stock_pseudonyms(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pz = _pseudonymizer(tmp_path)
    rng = np.random.default_rng(7)
    # Realistic lengths (5 to 60 bytes, so several padded sizes), all distinct.
    ids = [f"{i}.{'x' * int(n)}@example.com" for i, n in enumerate(rng.integers(0, 45, 1_000_000))]
    batched, keys = pz._seal_batched(pl.Series(ids))
    stock = pz._seal_many([s.encode() for s in ids])
    assert batched.equals(stock)
    assert [pz.decrypt(t) for t in batched.head(1000).to_list()] == ids[:1000]
    # The shard keys taken from the SIV bytes are the ones read back off the tokens, and they spread.
    read_back = stock.to_frame("pid").select(shards.key_expr()).to_series()
    assert keys.equals(read_back, check_names=False)
    assert keys.n_unique() > 200_000


@pytest.mark.parametrize("width", [10, 16, 32])  # sealed widths 32, 48, 64: each base64 tail (W % 3)
def test_identifiers_of_one_length_give_the_stock_pseudonyms(tmp_path, width: int) -> None:  # type: ignore[no-untyped-def]
    # All of one length (customer numbers): the padding is one reshape instead of a scatter.
    pz = _pseudonymizer(tmp_path)
    ids = [f"C{i:0{width - 1}d}" for i in range(5_000)]
    batched, keys = pz._seal_batched(pl.Series(ids))
    stock = pz._seal_many([s.encode() for s in ids])
    assert batched.equals(stock)
    # One padded size is sealed in place, with no reordering: the keys are still each token's own.
    assert keys.equals(stock.to_frame("pid").select(shards.key_expr()).to_series(), check_names=False)


@pytest.mark.parametrize("count", [1, 6, 7, 8, 14, 15, 100])
def test_identifiers_sealed_in_chunks_give_the_stock_pseudonyms(tmp_path, monkeypatch, count: int) -> None:  # type: ignore[no-untyped-def]
    # Each padded size is sealed SEAL_CHUNK identifiers at a time: a small chunk puts boundaries
    # (exact multiples, one over, one under) inside groups of two sizes.
    from privseg import pseudonym

    monkeypatch.setattr(pseudonym, "SEAL_CHUNK", 7)
    pz = _pseudonymizer(tmp_path)
    ids = [f"{i}@example.com" if i % 3 else f"{i}.{'y' * 20}@example.com" for i in range(count)]
    batched, keys = pz._seal_batched(pl.Series(ids))
    stock = pz._seal_many([s.encode() for s in ids])
    assert batched.equals(stock)
    assert keys.equals(stock.to_frame("pid").select(shards.key_expr()).to_series(), check_names=False)


LENGTH_CLASSES = st.one_of(
    st.text(min_size=1, max_size=1),
    st.text(min_size=15, max_size=17),
    st.text(min_size=30, max_size=80),
    st.text(alphabet="éçøß漢字🙂", min_size=1, max_size=20),  # multi-byte UTF-8
    st.binary(min_size=1, max_size=40).map(lambda b: b.decode("latin-1")),
)


@settings(max_examples=40, deadline=None)
@given(st.lists(LENGTH_CLASSES, min_size=BATCH_MIN, max_size=BATCH_MIN + 50, unique=True))
def test_identifiers_of_every_length_class(ids: list[str]) -> None:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        pz = _pseudonymizer(Path(tmp))
        tokens, keys = pz._seal_batched(pl.Series(ids, dtype=pl.String))
        assert tokens.to_list() == [pz.encrypt(i) for i in ids]
        assert keys.equals(tokens.to_frame("pid").select(shards.key_expr()).to_series(), check_names=False)


def test_an_empty_identifier_is_refused_by_the_batched_path_too(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from privseg.errors import InvalidInput

    pz = _pseudonymizer(tmp_path)
    with pytest.raises(InvalidInput, match="empty"):
        pz._seal_batched(pl.Series(["a@b.c"] * BATCH_MIN + [""]))


def test_the_batch_cipher_does_not_show_its_key() -> None:
    key = bytes(range(64))
    siv = BatchSIV(key, [b"ad"])
    assert key.hex() not in repr(siv) and "hidden" in repr(siv)
