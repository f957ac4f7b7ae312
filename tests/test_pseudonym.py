from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from hypothesis import given, settings
from hypothesis import strategies as st

from privseg import shards
from privseg.errors import InvalidInput, InvalidPseudonym
from privseg.keyset import Keyset, add_pseudonym_version, create_keyset
from privseg.pseudonym import IdType, Pseudonymizer, normalize, normalize_expr


def test_rfc5297_deterministic_vector_a1() -> None:
    key = bytes.fromhex("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    ad = bytes.fromhex("101112131415161718191a1b1c1d1e1f2021222324252627")
    pt = bytes.fromhex("112233445566778899aabbccddee")
    expected = bytes.fromhex("85632d07c6e8f37f950acd320a2ecc9340c02b9690c4dc04daef7f6afe5c")
    assert AESSIV(key).encrypt(pt, [ad]) == expected
    assert AESSIV(key).decrypt(expected, [ad]) == pt


def test_rfc5297_nonce_vector_a2() -> None:
    key = bytes.fromhex("7f7e7d7c7b7a79787776757473727170404142434445464748494a4b4c4d4e4f")
    ad1 = bytes.fromhex("00112233445566778899aabbccddeeffdeaddadadeaddadaffeeddccbbaa99887766554433221100")
    ad2 = bytes.fromhex("102030405060708090a0")
    nonce = bytes.fromhex("09f911029d74e35bd84156c5635688c0")
    pt = bytes.fromhex(
        "7468697320697320736f6d6520706c61696e7465787420746f20656e6372797074207573696e67205349562d414553"
    )
    expected = bytes.fromhex(
        "7bdb6e3b432667eb06f4d14bff2fbd0fcb900f2fddbe404326601965c889bf17dba77ceb094fa663b7a3f748ba8af829ea64ad544a272e9c485b62a3fd5c0d"
    )
    assert AESSIV(key).encrypt(pt, [ad1, ad2, nonce]) == expected


@pytest.fixture
def keyset(tmp_path: Path) -> Keyset:
    return create_keyset(tmp_path / "keyset.json", "tenant-a")


def test_deterministic_and_round_trips(keyset: Keyset) -> None:
    p = Pseudonymizer(keyset, IdType.EMAIL)
    a = p.pseudonymize("  Alice@Example.COM ")
    assert a == p.pseudonymize("alice@example.com")
    assert a.startswith("k1.") and "alice" not in a.lower()
    assert p.decrypt(a) == "alice@example.com"
    assert p.pseudonymize("bob@example.com") != a


def test_namespace_and_id_type_and_key_change_the_token(tmp_path: Path, keyset: Keyset) -> None:
    other_ns = create_keyset(tmp_path / "other.json", "tenant-b")
    same_key_other_ns = Keyset("tenant-b", keyset.created_at, 1, keyset.pseudonym_keys, keyset.audit_key)
    base = Pseudonymizer(keyset, IdType.CUSTOMER_NUMBER).pseudonymize("C1")
    assert Pseudonymizer(same_key_other_ns, IdType.CUSTOMER_NUMBER).pseudonymize("C1") != base
    assert Pseudonymizer(other_ns, IdType.CUSTOMER_NUMBER).pseudonymize("C1") != base
    assert Pseudonymizer(keyset, IdType.EMAIL).pseudonymize("C1") != base
    # A token from one namespace does not decrypt in another, even with the same key bytes.
    with pytest.raises(InvalidPseudonym, match="does not authenticate"):
        Pseudonymizer(same_key_other_ns, IdType.CUSTOMER_NUMBER).decrypt(base)


def test_tampered_relabelled_and_foreign_tokens_fail_cleanly(tmp_path: Path, keyset: Keyset) -> None:
    p = Pseudonymizer(keyset, IdType.CUSTOMER_NUMBER)
    token = p.pseudonymize("C000123")
    body = token[3:]
    flipped = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    with pytest.raises(InvalidPseudonym, match="does not authenticate"):
        p.decrypt(flipped)
    with pytest.raises(InvalidPseudonym, match="not a privseg pseudonym"):
        p.decrypt("x1." + body)
    with pytest.raises(InvalidPseudonym, match="not a privseg pseudonym"):
        p.decrypt("C000123")
    with pytest.raises(InvalidPseudonym, match="version 9"):
        p.decrypt("k9." + body)
    # Relabel under a version the keyset does hold: the AD binds the version, so it fails.
    ks2 = add_pseudonym_version(tmp_path / "keyset.json")
    p2 = Pseudonymizer(ks2, IdType.CUSTOMER_NUMBER, version=1)
    assert p2.decrypt(token) == "C000123"
    with pytest.raises(InvalidPseudonym, match="does not authenticate"):
        p2.decrypt("k2." + body)


def test_padding_hides_identifier_length(keyset: Keyset) -> None:
    p = Pseudonymizer(keyset, IdType.CUSTOMER_NUMBER)
    lengths = {len(p.encrypt("x" * n)) for n in range(1, 16)}
    assert len(lengths) == 1
    assert len(p.encrypt("x" * 16)) > lengths.pop()
    for n in (1, 15, 16, 17, 40):
        assert p.decrypt(p.encrypt("é" * n)) == "é" * n


def test_empty_identifier_is_refused(keyset: Keyset) -> None:
    p = Pseudonymizer(keyset, IdType.PHONE)
    with pytest.raises(InvalidInput, match="empty"):
        p.pseudonymize("(no digits)")
    with pytest.raises(InvalidInput, match="empty"):
        p.encrypt_series(pl.Series(["123", ""]))
    with pytest.raises(InvalidInput, match="missing"):
        p.encrypt_series(pl.Series(["123", None]))


def test_normalization_rules() -> None:
    assert normalize(" ＡLICE@Example.com\t", IdType.EMAIL) == "alice@example.com"  # NFKC folds full-width
    assert normalize("+1 (555) 010-2030", IdType.PHONE) == "15550102030"
    assert normalize("  C-001 ", IdType.CUSTOMER_NUMBER) == "C-001"
    # Every character Python calls whitespace is trimmed, including ones Polars' default keeps.
    assert normalize("\x1fC-001\u3000\x85", IdType.CUSTOMER_NUMBER) == "C-001"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=30), min_size=1, max_size=20), st.sampled_from(list(IdType)))
def test_single_value_and_column_normalization_agree(values: list[str], id_type: IdType) -> None:
    # Erasure normalizes one value, ingestion a column: they must give one person one pseudonym.
    series = pl.Series("v", values, dtype=pl.String)
    got = pl.select(normalize_expr(pl.lit(series), id_type)).to_series().to_list()
    assert got == [normalize(v, id_type) for v in values]


def test_series_encryption_matches_scalar_and_encrypts_each_distinct_value_once(
    keyset: Keyset, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = Pseudonymizer(keyset, IdType.CUSTOMER_NUMBER)
    values = ["C3", "C1", "C3", "C2", "C1", "C3", "é" * 20]
    calls: list[int] = []
    original = p._seal_many

    def counting(vs: list[bytes]) -> pl.Series:
        calls.append(len(vs))
        return original(vs)

    monkeypatch.setattr(p, "_seal_many", counting)
    column = p.encrypt_column(pl.Series("id", values))
    out = column.tokens
    assert column.distinct == 4
    assert out.name == "id"
    assert out.to_list() == [p.encrypt(v) for v in values]
    assert calls == [4]
    assert p.decrypt_series(out).to_list() == values
    assert column.shard_keys.to_list() == out.to_frame("pid").select(shards.key_expr()).to_series().to_list()


@pytest.mark.parametrize("order", ["grouped", "time order"])
def test_distinct_values_are_exact_in_any_row_order(order: str) -> None:
    import random

    people = [f"C{i:06d}" for i in range(2_000)] + ["é" * 13, "x"]
    rows = [p for p in people for _ in range(1 + len(p) % 4)]
    if order == "time order":
        random.Random(5).shuffle(rows)
    values = pl.Series("id", rows)
    distinct, codes = Pseudonymizer._distinct(values)
    assert distinct.len() == len(people) and distinct.n_unique() == len(people)
    assert distinct.gather(codes).to_list() == rows


def test_a_column_without_repeats_is_its_own_distinct_values(keyset: Keyset) -> None:
    # A profile file: no value repeats, so nothing is ranked or gathered back; every row still gets
    # its own pseudonym and shard key, on the batched path (over BATCH_MIN) and the stock one.
    p = Pseudonymizer(keyset, IdType.CUSTOMER_NUMBER)
    for values in (
        pl.Series("id", [*(f"C{i:05d}" for i in range(499, -1, -1)), "é" * 13]),
        pl.Series("id", ["C2", "C1", "é" * 20]),
    ):
        distinct, codes = Pseudonymizer._distinct(values)
        assert codes is None and distinct.to_list() == values.to_list()
        column = p.encrypt_column(values)
        assert column.distinct == values.len()
        assert column.tokens.to_list() == [p.encrypt(v) for v in values]
        read_back = column.tokens.to_frame("pid").select(shards.key_expr()).to_series()
        assert column.shard_keys.to_list() == read_back.to_list()
        assert p.decrypt_series(column.tokens).to_list() == values.to_list()


def test_runs_of_different_people_are_coded_by_run() -> None:
    # Events grouped by person whose runs are all different people: each run is its own code.
    distinct, codes = Pseudonymizer._distinct(pl.Series(["b", "b", "a", "c", "c", "c"]))
    assert distinct.to_list() == ["b", "a", "c"]
    assert codes is not None and codes.to_list() == [0, 0, 1, 2, 2, 2]


@pytest.mark.parametrize("rows", [["a", "b", "a"], ["a", "a", "b", "a"], ["x", "y", "x", "y"]])
def test_a_person_who_comes_back_later_is_one_person(rows: list[str]) -> None:
    # Every row (or run) looks new next to its neighbour, but a value repeats further on: the
    # shortcut for columns without repeats must not take it for a second person.
    distinct, codes = Pseudonymizer._distinct(pl.Series(rows))
    assert distinct.n_unique() == distinct.len() == len(set(rows))
    assert codes is not None and distinct.gather(codes).to_list() == rows


def test_a_hash_collision_falls_back_to_the_exact_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from privseg import pseudonym

    # A hash that collides for every two values of the same length: the check must catch it.
    monkeypatch.setattr(pseudonym, "_hash", lambda column: column.str.len_bytes().cast(pl.UInt64))
    used: list[int] = []
    exact = pseudonym._by_sort
    monkeypatch.setattr(pseudonym, "_by_sort", lambda values: used.append(values.len()) or exact(values))
    rows = ["b1", "b1", "a1", "b1", "ccc", "ccc", "a2", "a1"]
    distinct, codes = Pseudonymizer._distinct(pl.Series(rows))
    assert used == [6]  # the six runs, told apart exactly
    assert sorted(distinct.to_list()) == ["a1", "a2", "b1", "ccc"]
    assert distinct.gather(codes).to_list() == rows
