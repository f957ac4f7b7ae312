from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from privseg.deployment import Deployment
from privseg.segments import definitions, engine
from privseg.segments.features import bucket
from privseg.segments.language import BUCKETS, DefinitionError
from tests.segment_helpers import AS_OF, D, S, compiler, events, members, profiles, segment

PEOPLE = profiles(
    {
        "a": {
            "age_band": "55-64",
            "gender": "female",
            "interests": ["travel", "hearing_aids"],
            "signup_date": date(2025, 1, 1),
        },
        "b": {
            "age_band": "25-34",
            "gender": "male",
            "interests": ["fitness"],
            "signup_date": date(2026, 5, 1),
        },
        "c": {"age_band": "65+", "gender": None, "interests": None, "signup_date": None},
        "d": {"age_band": "18-24", "gender": "female", "interests": [], "consent_marketing": False},
    }
)


@pytest.mark.parametrize(
    "condition, expected",
    [
        ({"gender": {"eq": "female"}}, {"a"}),  # d is female but has not consented
        ({"gender": {"neq": "female"}}, {"b"}),  # c's gender is unknown: no comparison holds
        ({"age_band": {"in": ["55-64", "65+"]}}, {"a", "c"}),
        ({"age_band": {"not_in": ["55-64", "65+"]}}, {"b"}),
        ({"gender": {"is_null": True}}, {"c"}),
        ({"gender": {"is_set": True}}, {"a", "b"}),
        ({"interests": {"contains": "hearing_aids"}}, {"a"}),
        ({"interests": {"is_null": True}}, {"c"}),
        ({"signup_date": {"gt": "2025-01-01"}}, {"b"}),
        ({"signup_date": {"gte": "2025-01-01"}}, {"a", "b"}),
        ({"signup_date": {"lt": "2026-05-01"}}, {"a"}),
        ({"signup_date": {"lte": "2026-05-01"}}, {"a", "b"}),
        ({"signup_date": {"between": ["2025-01-01", "2025-12-31"]}}, {"a"}),
        ({"consent_sensitive": {"eq": True}}, {"a", "b", "c"}),
    ],
)
def test_property_operators(condition: dict, expected: set[str]) -> None:  # type: ignore[type-arg]
    assert members({"property": condition}, PEOPLE) == expected


def test_category_conditions_read_as_categoricals_equal_the_text() -> None:
    # The engine evaluates category attributes as Polars categoricals (faster is_in); every text
    # operator must give what it gives on the plain text, nulls and values no one holds included.
    conditions = [
        {"gender": {"eq": "female"}},
        {"gender": {"eq": "non_binary"}},  # held by no one
        {"gender": {"neq": "male"}},
        {"age_band": {"in": ["55-64", "65+", "<18"]}},
        {"age_band": {"not_in": ["55-64", "<18"]}},
        {"gender": {"not_in_or_unknown": ["male", "undisclosed"]}},
        {"gender": {"is_null": True}},
        {"age_band": {"is_set": True}},
    ]
    segments = [segment({"property": c}, sid=f"s{i}") for i, c in enumerate(conditions)]
    segments.append(segment({"not": {"any": [{"property": c} for c in conditions[:4]]}}, sid="none_of"))
    plan = compiler(segments).compile(AS_OF)
    assert plan.categorical == {"gender", "age_band"}
    fast, _ = engine.evaluate(plan, profiles=PEOPLE, events=events([]))
    plan.categorical.clear()
    text, _ = engine.evaluate(plan, profiles=PEOPLE, events=events([]))
    assert fast.equals(text)
    counts = fast.select(pl.exclude("pid").sum()).row(0, named=True)
    assert counts == {"s0": 1, "s1": 0, "s2": 1, "s3": 2, "s4": 2, "s5": 2, "s6": 1, "s7": 3, "none_of": 1}


def test_not_of_a_leaf_is_its_complement_including_nulls() -> None:
    assert members({"not": {"property": {"gender": {"eq": "female"}}}}, PEOPLE) == {"b", "c"}


def test_consent_of_the_category_is_required() -> None:
    prof = profiles(
        {
            "a": {"consent_sensitive": False},
            "b": {"consent_sensitive": True},
            "c": {"consent_sensitive": None},
        }
    )
    everyone = {"property": {"consent_marketing": {"eq": True}}}
    assert members(everyone, prof, category="general") == {"a", "b", "c"}
    assert members(everyone, prof, category="hearing_aids") == {"b"}


EV = events(
    [
        (
            "a",
            1 * D,
            "purchase",
            {"value": 10.0, "product_category": "electronics", "campaign": "spring_sale"},
        ),
        ("a", 2 * D, "purchase", {"value": 30.0, "product_category": "hearing_aids"}),
        ("a", 40 * D, "purchase", {"value": 100.0, "product_category": "electronics"}),
        ("b", 3 * D, "purchase", {"value": 5.0, "product_category": "electronics"}),
        ("b", 3 * D, "add_to_cart", {}),
        ("c", 400 * D, "page_view", {}),
    ]
)


@pytest.mark.parametrize(
    "leaf, expected",
    [
        ({"type": "purchase"}, {"a", "b"}),
        ({"type": "purchase", "last": "7d", "count": {"gte": 2}}, {"a"}),
        ({"type": "purchase", "last": "7d", "count": {"eq": 1}}, {"b"}),
        ({"type": "purchase", "count": {"eq": 0}}, {"c"}),  # no purchases at all counts as 0
        ({"type": "purchase", "sum": {"gte": 140}}, {"a"}),
        ({"type": "purchase", "last": "7d", "sum": {"eq": 0}}, {"c"}),  # sum of nothing is 0
        ({"type": "purchase", "avg": {"lt": 10}}, {"b"}),  # c has no purchases: avg unknown
        ({"type": "purchase", "min": {"lte": 5}}, {"b"}),
        ({"type": "purchase", "max": {"gte": 100}}, {"a"}),
        ({"type": "purchase", "where": {"product_category": {"eq": "hearing_aids"}}}, {"a"}),
        (
            {"type": "purchase", "where": {"value": {"gt": 7}, "product_category": {"eq": "electronics"}}},
            {"a"},
        ),
        ({"type": "purchase", "where": {"campaign": {"is_set": True}}}, {"a"}),
        ({"type": "purchase", "between": ["60d", "30d"]}, {"a"}),
        ({"type": "page_view", "last": "365d"}, set()),
        ({"type": "checkout"}, set()),  # an event type nobody has
    ],
)
def test_event_aggregates(leaf: dict, expected: set[str]) -> None:  # type: ignore[type-arg]
    assert members({"event": leaf}, PEOPLE, EV) == expected


def test_not_over_events_includes_people_without_events() -> None:
    assert members({"not": {"event": {"type": "purchase", "last": "7d"}}}, PEOPLE, EV) == {"c"}


def test_events_without_a_profile_or_a_pid_never_count_for_someone_else() -> None:
    prof = profiles({"a": {}})
    ev = events([("a", D, "purchase", {}), ("b", D, "purchase", {}), ("b", 2 * D, "purchase", {})])
    # A row without a pid (ingest refuses one; a frame built by hand may hold it) counts for no one.
    ev = pl.concat([ev, ev.head(1).with_columns(pl.lit(None, dtype=pl.String).alias("pid"))])
    twice = {"event": {"type": "purchase", "count": {"gte": 2}}}
    # b has no profile, so no consent (a member of nothing), and neither b's purchases nor the
    # pid-less one are a's: a has exactly one.
    assert members(twice, prof, ev) == set()
    assert members({"event": {"type": "purchase", "count": {"eq": 1}}}, prof, ev) == {"a"}


def test_window_edges() -> None:
    prof = profiles({p: {} for p in "abcdefg"})
    ev = events(
        [
            ("a", 7 * D, "purchase", {}),  # exactly at as_of - 7d: inside last 7d (inclusive start)
            ("b", 7 * D + S, "purchase", {}),  # one second earlier: outside
            ("c", timedelta(0), "purchase", {}),  # exactly at as_of: inside
            ("d", -S, "purchase", {}),  # after as_of: never counts
            ("e", 30 * D, "purchase", {}),  # exactly as_of - 30d: end of between[90d,30d] is exclusive
            ("f", 90 * D, "purchase", {}),  # exactly as_of - 90d: start of between is inclusive
            ("g", datetime(2026, 3, 1, tzinfo=UTC), "purchase", {}),  # 92.5 days before as_of
        ]
    )
    assert members({"event": {"type": "purchase", "last": "7d"}}, prof, ev) == {"a", "c"}
    assert members({"event": {"type": "purchase", "last": "30d"}}, prof, ev) == {"a", "b", "c", "e"}
    assert members({"event": {"type": "purchase", "between": ["90d", "30d"]}}, prof, ev) == {"f"}
    # from is inclusive, to exclusive: g sits on from, f (as_of - 90d = 2026-03-03 12:00) on to.
    absolute = {"type": "purchase", "from": "2026-03-01T00:00:00Z", "to": "2026-03-03T12:00:00+00:00"}
    assert members({"event": absolute}, prof, ev) == {"g"}
    assert (
        members({"event": {"type": "purchase", "from": "2026-02-28", "to": "2026-03-01"}}, prof, ev) == set()
    )
    # d's event lies in the future of as_of, but not of a later as_of.
    assert "d" in members({"event": {"type": "purchase", "last": "1d"}}, prof, ev, as_of=AS_OF + D)


def test_recency() -> None:
    prof = profiles({p: {} for p in "abc"})
    ev = events([("a", 10 * D, "purchase", {}), ("b", 200 * D, "purchase", {})])
    assert members({"recency": {"type": "purchase", "within": "30d"}}, prof, ev) == {"a"}
    assert members({"recency": {"type": "purchase", "not_within": "30d"}}, prof, ev) == {"b", "c"}
    assert members({"recency": {"type": "purchase", "within": "10d"}}, prof, ev) == {"a"}  # inclusive


def test_sequences() -> None:
    prof = profiles({p: {} for p in "abcdefg"})
    ev = events(
        [
            ("a", 5 * D, "product_view", {}),
            ("a", 5 * D - 3600 * S, "add_to_cart", {}),  # 1h later
            ("b", 5 * D, "product_view", {}),
            ("b", 4 * D, "add_to_cart", {}),  # exactly 1d later: inside
            ("c", 5 * D, "product_view", {}),
            ("c", 4 * D - S, "add_to_cart", {}),  # 1d + 1s: outside
            ("d", 5 * D, "add_to_cart", {}),
            ("d", 4 * D, "product_view", {}),  # wrong order
            ("e", 5 * D, "product_view", {}),
            ("e", 5 * D, "add_to_cart", {}),  # same instant: counts
            ("f", 50 * D, "product_view", {}),
            ("f", 50 * D - S, "add_to_cart", {}),  # outside the window
            ("g", 3 * D, "product_view", {}),
            ("g", 2 * D, "product_view", {}),  # second view, for the same-step case
        ]
    )
    seq = {"steps": [{"type": "product_view"}, {"type": "add_to_cart"}], "within": "1d", "last": "30d"}
    assert members({"sequence": seq}, prof, ev) == {"a", "b", "e"}
    twice = {"steps": [{"type": "product_view"}, {"type": "product_view"}], "within": "2d"}
    assert members({"sequence": twice}, prof, ev) == {"g"}


TRAIT = {
    "name": "r",
    "source": {"days_since": {"type": "purchase"}},
    "edges": [30, 90],
    "scores": [3, 2, 1],
    "missing": 0,
}


def test_traits_on_fixed_edges() -> None:
    prof = profiles({p: {} for p in "abcd"})
    ev = events([("a", 29 * D, "purchase", {}), ("b", 30 * D, "purchase", {}), ("c", 90 * D, "purchase", {})])
    assert members({"trait": {"r": {"eq": 3}}}, prof, ev, traits=[TRAIT]) == {"a"}  # < 30 days
    assert members({"trait": {"r": {"eq": 2}}}, prof, ev, traits=[TRAIT]) == {"b"}  # 30 <= d < 90
    assert members({"trait": {"r": {"eq": 1}}}, prof, ev, traits=[TRAIT]) == {"c"}
    assert members({"trait": {"r": {"eq": 0}}}, prof, ev, traits=[TRAIT]) == {"d"}  # never bought


def test_segment_references_and_buckets() -> None:
    prof = profiles({f"p{i}": {"gender": "female" if i % 2 else "male"} for i in range(200)})
    holdout = segment({"bucket": {"salt": "t1", "range": [0, 4999]}}, sid="holdout")
    women = segment({"property": {"gender": {"eq": "female"}}}, sid="women")
    got = members(
        {"all": [{"segment": "women"}, {"not": {"segment": "holdout"}}]}, prof, others=[holdout, women]
    )
    buckets = dict(zip(prof.get_column("pid"), bucket(prof.get_column("pid"), "t1").to_list(), strict=True))
    assert got == {p for p in buckets if int(p[1:]) % 2 and buckets[p] >= 5000}
    assert 0 < len(got) < 100


def test_cycles_and_unknown_references_are_refused() -> None:
    a = segment({"segment": "b"}, sid="a")
    b = segment({"any": [{"property": {"gender": {"eq": "male"}}}, {"segment": "c"}]}, sid="b")
    c = segment({"not": {"segment": "a"}}, sid="c")
    with pytest.raises(DefinitionError, match=r"reference cycle a -> b -> c -> a"):
        compiler([a, b, c]).check()
    with pytest.raises(DefinitionError, match=r"where\.segment: unknown segment 'nope'"):
        compiler([segment({"segment": "nope"}, sid="x")]).check()
    with pytest.raises(DefinitionError, match="reference cycle self -> self"):
        compiler([segment({"segment": "self"}, sid="self")]).check()


def test_bucket_is_stable_and_uniform() -> None:
    pids = pl.Series([f"k1.{i:08d}pseudonym" for i in range(20_000)])
    first = bucket(pids, "salt-a")
    assert first.equals(bucket(pids, "salt-a"))  # stable
    assert first.min() >= 0 and first.max() < BUCKETS  # type: ignore[operator]
    other = bucket(pids, "salt-b")
    assert (first == other).mean() < 0.01  # a new salt reshuffles
    # Chi-square over 10 equal groups of buckets; 27.88 is the 0.1% critical value for 9 d.o.f.
    counts = (first // 1000).value_counts().get_column("count").to_list()
    expected = pids.len() / 10
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    assert len(counts) == 10 and chi2 < 27.88, chi2
    assert math.isclose(((first >= 0) & (first <= 999)).mean(), 0.1, abs_tol=0.01)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "where, path, message",
    [
        ({"property": {"shoe_size": {"eq": 3}}}, "where.property.shoe_size", "unknown profile attribute"),
        ({"event": {"type": "purchse"}}, "where.event.type", "unknown event type 'purchse'"),
        ({"property": {"gender": {"gt": "male"}}}, "where.property.gender.gt", "does not apply to category"),
        ({"property": {"age_band": {"eq": "55_64"}}}, "where.property.age_band.eq", "not a known value"),
        ({"property": {"gender": {"like": "f"}}}, "where.property.gender.like", "unknown operator"),
        (
            {"all": [{"event": {"type": "purchase", "count": {"gte": "many"}}}]},
            "where.all[0].event.count.gte",
            "expected a number",
        ),
        # Python's JSON reads Infinity and NaN: neither is a threshold.
        ({"event": {"type": "purchase", "sum": {"gte": float("inf")}}}, "where.event.sum.gte", "finite"),
        ({"event": {"type": "purchase", "count": {"gte": float("nan")}}}, "where.event.count.gte", "finite"),
        ({"event": {"type": "purchase", "last": "7 days"}}, "where.event.last", "expected a duration"),
        # as_of - 999999d is before year 1: it stopped every snapshot computation (OverflowError).
        ({"event": {"type": "purchase", "last": "999999d"}}, "where.event.last", "100 years"),
        (
            {"sequence": {"steps": [{"type": "search"}, {"type": "purchase"}], "within": "999999h"}},
            "where.sequence.within",
            "100 years",
        ),
        ({"event": {"type": "purchase", "between": ["7d", "30d"]}}, "where.event.between", "longer one"),
        (
            {"event": {"type": "purchase", "where": {"colour": {"eq": "x"}}}},
            "where.event.where.colour",
            "unknown event field",
        ),
        (
            {"sequence": {"steps": [{"type": "purchase"}], "within": "1d"}},
            "where.sequence.steps",
            "exactly two",
        ),
        ({"bucket": {"salt": "x", "range": [0, 10000]}}, "where.bucket.range", "9999"),
        ({"nor": []}, "where.nor", "unknown node"),
        ({"trait": {"unknown_trait": {"gte": 1}}}, "where.trait", "unknown trait"),
    ],
)
def test_invalid_definitions_name_the_path(where: dict, path: str, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(DefinitionError) as info:
        compiler([segment(where)]).check()
    assert f"(segment 's').{path}" in str(info.value) or f"segment 's': {path}" in str(info.value)
    assert message in str(info.value)


def test_unknown_category_is_refused() -> None:
    with pytest.raises(DefinitionError, match=r"\.category: unknown category 'gambling'"):
        compiler([segment({"property": {"gender": {"eq": "male"}}}, category="gambling")])


def test_explain_says_it_in_words() -> None:
    comp = compiler(
        [
            segment(
                {
                    "all": [
                        {"event": {"type": "add_to_cart", "last": "7d"}},
                        {"not": {"event": {"type": "purchase", "last": "7d"}}},
                    ]
                },
                category="cannabis",
            )
        ]
    )
    text = comp.explain("s")
    assert "the number of add_to_cart events in the last 7 days is at least 1" in text
    assert "NOT:" in text and "(stigmatized)" in text and "consent_sensitive is true" in text


# -- stored definitions and snapshots ---------------------------------------------------------
EXAMPLES = Path(__file__).resolve().parent.parent / "privseg" / "segments" / "examples"


def test_apply_versions_and_is_all_or_nothing(dep: Deployment, tmp_path: Path) -> None:
    conn, ks = dep.store.conn, dep.keyset
    kw = {"schema": dep.schema, "categories": dep.categories, "actor": definitions.ADMIN_CLI}
    first = definitions.apply(conn, ks, [EXAMPLES / "traits.yaml", EXAMPLES / "segments.yaml"], **kw)  # type: ignore[arg-type]
    assert {r.status for r in first} == {"created"} and len(first) == 18
    again = definitions.apply(conn, ks, [EXAMPLES / "traits.yaml", EXAMPLES / "segments.yaml"], **kw)  # type: ignore[arg-type]
    assert {r.status for r in again} == {"unchanged"}
    edited = tmp_path / "edit.yaml"
    edited.write_text(
        "id: coupon_responders\ncategory: general\nobjective: performance\n"
        "where: {event: {type: coupon_redeem, last: 30d, where: {product_category: {is_null: true}}}}\n"
    )
    (r,) = definitions.apply(conn, ks, [edited], **kw)  # type: ignore[arg-type]
    assert (r.status, r.version) == ("updated", 2)
    assert [s.version for s in definitions.history(conn, "segment", "coupon_responders")] == [1, 2]
    before = definitions.active(conn)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "segments:\n"
        "  - {id: ok_one, category: general, objective: brand, where: {event: {type: purchase}}}\n"
        "  - {id: broken, category: general, objective: brand, where: {segment: ok_two}}\n"
    )
    with pytest.raises(DefinitionError, match="unknown segment 'ok_two'"):
        definitions.apply(conn, ks, [bad], **kw)  # type: ignore[arg-type]
    assert definitions.active(conn) == before  # nothing applied
    dup = tmp_path / "dup.yaml"
    dup.write_text("- {id: x, category: general, objective: brand, where: {event: {type: purchase}}}\n" * 2)
    with pytest.raises(DefinitionError, match="defined twice"):
        definitions.apply(conn, ks, [dup], **kw)  # type: ignore[arg-type]


def test_snapshot_records_inputs_goes_stale_and_prunes(dep: Deployment, demo_files) -> None:  # type: ignore[no-untyped-def]
    from privseg.ingest.files import ingest_files

    for kind, path in (("profiles", demo_files.customers), ("events", demo_files.events)):
        ingest_files(
            store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, kind=kind, paths=[path], now=AS_OF
        )  # type: ignore[arg-type]
    definitions.apply(
        dep.store.conn,
        dep.keyset,
        [EXAMPLES / "traits.yaml", EXAMPLES / "segments.yaml"],
        schema=dep.schema,
        categories=dep.categories,
        actor=definitions.ADMIN_CLI,
    )
    assert engine.staleness(
        dep.store, engine.latest(dep.store.conn), policy_hash=dep.categories.content_hash
    ) == ["no snapshot has been computed"]
    snap, _ = engine.compute_snapshot(
        store=dep.store, compiler=dep.compiler(), keyset=dep.keyset, as_of=AS_OF
    )
    assert engine.staleness(dep.store, snap, policy_hash=dep.categories.content_hash) == []
    assert snap.people == 2000 and len(snap.segments) == 15 and snap.as_of == AS_OF.isoformat()
    members = pl.read_parquet(engine.snapshot_path(dep.store, snap))
    assert members.columns[0] == "pid" and members.height == 2000
    assert all(members.schema[c] == pl.Boolean for c in members.columns[1:])
    # Every example segment matches someone in demo data, and nobody is in everything.
    shares = dict(zip(members.columns[1:], members.drop("pid").mean().row(0), strict=True))
    assert all(0 < s < 0.5 for s in shares.values()), sorted(shares.items(), key=lambda kv: kv[1])[:3]
    from tests.conftest import EVENT_HEADER, event_row, write_csv

    extra = write_csv(dep.settings.home.parent / "more.csv", EVENT_HEADER, [event_row("C000000001")])
    ingest_files(
        store=dep.store, keyset=dep.keyset, policy=dep.ingest_policy, kind="events", paths=[extra], now=AS_OF
    )
    assert engine.staleness(dep.store, snap, policy_hash=dep.categories.content_hash) == [
        "data batches changed since it was computed"
    ]
    for i in range(engine.KEEP_SNAPSHOTS + 1):
        engine.compute_snapshot(
            store=dep.store, compiler=dep.compiler(), keyset=dep.keyset, as_of=AS_OF + timedelta(hours=i)
        )
    kept = [s for s in engine.snapshots(dep.store.conn) if s.file is not None]
    assert len(kept) == engine.KEEP_SNAPSHOTS
    assert len(list((dep.settings.data_dir / "snapshots").glob("*.parquet"))) == engine.KEEP_SNAPSHOTS
    from privseg.errors import NotFound

    with pytest.raises(NotFound, match="pruned"):
        engine.snapshot_path(dep.store, engine.snapshots(dep.store.conn)[0])


def _snapshot_row(conn, segments: dict[str, int], file: str) -> None:  # type: ignore[no-untyped-def]
    conn.execute(
        "INSERT INTO snapshots (as_of, computed_at, file, people, segments, traits, batches, categories) "
        "VALUES ('2026-01-01T00:00:00+00:00', '2026-01-01T00:00:01+00:00', ?, 10, ?, '{}', '[1, 2]', ?)",
        (file, json.dumps(segments), json.dumps({s: ["general"] for s in segments})),
    )
    conn.commit()


def test_a_snapshots_recorded_columns_are_parsed_once_and_never_confused_between_databases(
    tmp_path: Path,
) -> None:
    from privseg import db

    first, second = db.connect(tmp_path / "a.db"), db.connect(tmp_path / "b.db")
    many = {f"segment_{i:04d}": 1 for i in range(2000)}
    _snapshot_row(first, many, "a.parquet")
    # The other database's snapshot 1 has other segments (and the same id): each reads its own.
    _snapshot_row(second, {"only_here": 3}, "b.parquet")
    a1, b1, a2 = engine.latest(first), engine.latest(second), engine.latest(first)
    assert a1 is not None and b1 is not None and a2 is not None
    assert a1.id == b1.id == 1
    assert a1.segments == many and b1.segments == {"only_here": 3}
    assert a1.categories == {s: ["general"] for s in many} and b1.categories == {"only_here": ["general"]}
    # The latest snapshot is read by every release: its columns are parsed once, then shared.
    assert a2.segments is a1.segments and a2.categories is a1.categories
    # What a rewrite changes (the file, after an erasure) is read fresh every time.
    first.execute("UPDATE snapshots SET file = 'a2.parquet', people = 9 WHERE id = 1")
    first.commit()
    a3 = engine.latest(first)
    assert a3 is not None and (a3.file, a3.people) == ("a2.parquet", 9) and a3.segments == many


def test_unbuildable_names_each_definition_a_narrower_schema_cannot_serve_and_what_uses_it(
    dep: Deployment, tmp_path: Path
) -> None:
    import dataclasses

    from tests.conftest import EXAMPLES

    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "traits:\n"
        "  - name: spring_clicks\n"
        "    description: clicks in the spring campaign\n"
        "    source: {count: {type: email_click, last: 365d, where: {campaign: {eq: spring}}}}\n"
        "    edges: [1, 3]\n"
        "    scores: [1, 2, 3]\n"
        "segments:\n"
        "  - {id: spring_fans, objective: brand, where: {trait: {spring_clicks: {gte: 2}}}}\n"
        "  - {id: spring_fan_women, objective: brand,\n"
        "     where: {all: [{segment: spring_fans}, {property: {gender: {eq: female}}}]}}\n"
    )
    definitions.apply(
        dep.store.conn,
        dep.keyset,
        [EXAMPLES / "traits.yaml", EXAMPLES / "segments.yaml", extra],
        schema=dep.schema,
        categories=dep.categories,
        actor=definitions.ADMIN_CLI,
    )
    stored = definitions.active(dep.store.conn)
    assert definitions.unbuildable(stored, schema=dep.schema, categories=dep.categories) == []
    # The same policies without the campaign field (a schema in which only that changed).
    fields = {k: v for k, v in dep.schema.event_fields.items() if k != "campaign"}
    narrower = dataclasses.replace(dep.schema, event_fields=fields)
    found = definitions.unbuildable(stored, schema=narrower, categories=dep.categories)
    # The shipped discount_seekers reads the campaign too; no other shipped definition does.
    assert [line.split(":")[0] for line in found] == [
        "segment 'discount_seekers'",
        "segment 'spring_fan_women'",
        "segment 'spring_fans'",
        "trait 'spring_clicks'",
    ]
    assert found[0].startswith(
        "segment 'discount_seekers': v1.where.event.where.campaign: unknown event field"
    )
    assert found[3].startswith("trait 'spring_clicks': v1.source.count.where.campaign: unknown event field")
    assert found[1].endswith("uses segment 'spring_fans', which cannot be built")
    assert found[2].endswith("uses trait 'spring_clicks', which cannot be built")
    # Every one of them is what stops a snapshot: the stored set does not build under that schema.
    with pytest.raises(DefinitionError):
        definitions.build_compiler(stored, schema=narrower, categories=dep.categories).compile(AS_OF)
    # Under that schema every change is refused while they are stored, and the refusal names them.
    fine = tmp_path / "fine.yaml"
    fine.write_text(
        "segments:\n  - {id: women, category: general, objective: brand,\n"
        "     where: {property: {gender: {eq: female}}}}\n"
    )
    with pytest.raises(DefinitionError) as refused:
        definitions.apply(
            dep.store.conn,
            dep.keyset,
            [fine],
            schema=narrower,
            categories=dep.categories,
            actor=definitions.ADMIN_CLI,
        )
    assert "block every change until they are changed or retired" in refused.value.message
    assert all(f in refused.value.message for f in found)
    assert ("segment", "women") not in definitions.active(dep.store.conn)
    # And retiring them (the fix the check asks for) leaves a set that builds.
    kept = {k: s for k, s in stored.items() if f"{k[0]} {k[1]!r}" not in {f.split(":")[0] for f in found}}
    assert definitions.unbuildable(kept, schema=narrower, categories=dep.categories) == []
    definitions.build_compiler(kept, schema=narrower, categories=dep.categories).compile(AS_OF)
