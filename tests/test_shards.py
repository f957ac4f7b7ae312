"""Person shards: the store partitioned by person, and the sharded engine giving the unsharded
engine's memberships exactly, in bounded pieces."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import polars as pl
import pytest

from privseg import fsutil, shards
from privseg.db import get_meta
from privseg.demo_data import DemoFiles
from privseg.deployment import Deployment
from privseg.ingest.files import ingest_files
from privseg.pseudonym import Pseudonymizer
from privseg.segments import engine, staging
from privseg.segments.sharded import estimate_bytes, parts_for, sharded_runner
from privseg.settings import Settings
from tests.conftest import (
    AS_OF,
    PROFILE_HEADER,
    by_pid,
    make_settings,
    prepare,
    profile_row,
    snapshot_with,
    write_csv,
)


def test_shards_of_real_pseudonyms_are_spread_and_stable(dep: Deployment) -> None:
    pseudo = Pseudonymizer(dep.keyset, "email")
    pids = pseudo.encrypt_series(pl.Series([f"person{i}@example.com" for i in range(20_000)]))
    frame = pl.DataFrame({"pid": pids}).with_columns(shards.shard_expr(64))
    sizes = frame.group_by("shard").len().get_column("len")
    assert frame.get_column("shard").n_unique() == 64
    # 20,000 over 64 shards: 312 expected, a binomial spread of about 17.
    assert sizes.min() > 230 and sizes.max() < 400  # type: ignore[operator]
    again = pl.DataFrame({"pid": pids}).with_columns(shards.shard_expr(64))
    assert again.equals(frame)
    # A coarser count is the finer one folded: shard mod 8 (the 18 bits are read the same way).
    coarse = pl.DataFrame({"pid": pids}).with_columns(shards.shard_expr(8)).get_column("shard")
    assert (coarse == frame.get_column("shard") % 8).all()


@pytest.mark.parametrize("with_list", [False, True])  # filtered passes; one sort (a list column)
@pytest.mark.parametrize("with_key", [True, False])
@pytest.mark.parametrize("count", [16, 256])  # one pass per shard; one per run of four shards
def test_by_shard_sorts_by_shard_keeping_each_shards_row_order(
    dep: Deployment, with_key: bool, count: int, with_list: bool
) -> None:
    pseudo = Pseudonymizer(dep.keyset, "email")
    pids = pseudo.encrypt_series(pl.Series([f"p{i % 700}@example.com" for i in range(3_000)]))
    # Several chunks, as a frame built from batches arrives.
    frame = pl.concat(
        [pl.DataFrame({"pid": pids[i : i + 1_000], "row": range(i, i + 1_000)}) for i in (0, 1_000, 2_000)],
        rechunk=False,
    )
    if with_list:  # each row's items name the row: they must travel with it
        frame = frame.with_columns(pl.concat_list(pl.col("row").cast(pl.String), pl.lit("x")).alias("items"))
    if with_key:
        frame = frame.with_columns(shards.key_expr().alias(shards.KEY))
    out = shards.by_shard(frame, count).collect()
    assert out.columns == ["pid", "row", *(["items"] if with_list else []), "shard"]
    if with_list:
        assert (
            out.get_column("items")
            .list.first()
            .cast(pl.Int64)
            .equals(out.get_column("row"), check_names=False)
        )
    assert out.height == frame.height and out.get_column("shard").is_sorted()
    assert out.get_column("shard").equals(frame.select(shards.shard_expr(count)).to_series().sort())
    assert out.get_column("shard").n_unique() > count // 2  # at 256, runs of four shards each sorted
    # Within a shard, rows keep their order; nothing is lost or duplicated.
    assert out.group_by("shard").agg(pl.col("row").is_sorted().alias("kept")).get_column("kept").all()
    assert sorted(out.get_column("row").to_list()) == list(range(3_000))


def test_shard_count_must_be_a_power_of_two() -> None:
    for bad in (0, 3, 100, 8192):
        with pytest.raises(ValueError, match="power of two"):
            shards.check_count(bad)
    with pytest.raises(ValueError, match="power of two"):
        Settings(shards=48)
    assert [len(g) for g in shards.groups(64, 3)] == [22, 21, 21]
    assert [g.start for g in shards.groups(4, 9)] == [0, 1, 2, 3]


def test_store_files_carry_sorted_shards_and_the_count_is_fixed_at_creation(
    tmp_path: Path, demo_files: DemoFiles
) -> None:
    settings = make_settings(tmp_path).model_copy(update={"shards": 16})
    from privseg.keyset import create_keyset

    create_keyset(settings.keyset, "test")
    dep = Deployment(settings)
    try:
        prepare(dep, demo_files.customers, demo_files.events, snapshots=())
        assert get_meta(dep.store.conn, "shards") == "16"
        for batch in dep.store.batches():
            frame = pl.read_parquet(dep.store.path_of(batch))
            assert frame.get_column("shard").is_sorted()
            # Ingest hands the writer shard keys from the SIV bytes: they agree with the pids, and the
            # working column is not stored.
            assert frame.get_column("shard").equals(frame.select(shards.shard_expr(16)).to_series())
            assert shards.KEY not in frame.columns
        # The store's readers never show the column.
        assert "shard" not in dep.store.scan_events().collect_schema()  # type: ignore[union-attr]
        assert "shard" not in dep.store.scan_profiles().collect_schema()  # type: ignore[union-attr]
    finally:
        dep.close()
    # Another process configured for 64 shards keeps the store's 16: mixed counts would split a
    # person's rows across shards.
    later = Deployment(settings.model_copy(update={"shards": 64}))
    try:
        assert later.store.shard_count() == 16
        rows = [profile_row("NEW1")]
        path = write_csv(tmp_path / "more.csv", PROFILE_HEADER, rows)
        ingest_files(
            store=later.store, keyset=later.keyset, policy=later.ingest_policy, kind="profiles", paths=[path]
        )
        newest = later.store.batches("profiles")[-1]
        assert pl.read_parquet(later.store.path_of(newest)).get_column("shard").max() < 16  # type: ignore[operator]
    finally:
        later.close()


def test_groups_of_shards_partition_people_and_their_rows(patched: Deployment) -> None:
    store = patched.store
    whole_events = store.scan_events().collect()  # type: ignore[union-attr]
    whole_profiles = store.scan_profiles().collect()  # type: ignore[union-attr]
    seen_people: set[str] = set()
    events_rows = profile_rows = 0
    for group in shards.groups(store.shard_count(), 5):
        events = store.scan_events(group).collect()  # type: ignore[union-attr]
        profiles = store.scan_profiles(group).collect()  # type: ignore[union-attr]
        people = set(events.get_column("pid")) | set(profiles.get_column("pid"))
        assert not people & seen_people, "a person's rows must all be in one group"
        seen_people |= people
        events_rows += events.height
        profile_rows += profiles.height
    assert events_rows == whole_events.height
    assert profile_rows == whole_profiles.height
    assert seen_people == set(whole_events.get_column("pid")) | set(whole_profiles.get_column("pid"))


@pytest.mark.parametrize("parts", [1, 3, 64])
def test_sharded_engine_gives_the_local_engine_memberships_cell_by_cell(
    patched: Deployment, parts: int, tmp_path: Path
) -> None:
    compiler = patched.compiler()
    local, _ = engine.membership(compiler, patched.store, AS_OF)
    folder = tmp_path / "parts"
    folder.mkdir()
    timings = sharded_runner(parts=parts)(compiler, patched.store, AS_OF, folder, lambda _m: None)
    assert timings["groups"] == parts
    written = staging.parts(folder)
    assert len(written) == parts
    sharded = pl.concat([pl.read_parquet(p) for p in written], how="vertical")
    assert local.height == sharded.height == sharded.get_column("pid").n_unique()
    assert by_pid(sharded).equals(by_pid(local))
    # Not a vacuous comparison: the example segments hold people and leave people out.
    sums = local.drop("pid").sum().row(0)
    assert any(s > 0 for s in sums) and any(s < local.height for s in sums)


def test_sharded_snapshot_releases_the_same_exact_counts(patched: Deployment) -> None:
    compiler = patched.compiler()
    local, _ = engine.compute_snapshot(
        store=patched.store, compiler=compiler, keyset=patched.keyset, as_of=AS_OF
    )
    sharded, timings = engine.compute_snapshot(
        store=patched.store,
        compiler=compiler,
        keyset=patched.keyset,
        as_of=AS_OF,
        runner=sharded_runner(parts=4),
    )
    assert timings["groups"] == 4
    assert sharded.people == local.people
    a = pl.read_parquet(engine.snapshot_path(patched.store, local))
    b = pl.read_parquet(engine.snapshot_path(patched.store, sharded))
    assert by_pid(a).equals(by_pid(b))
    assert not any(staging.root(patched.store.data_dir).iterdir()), "staging folders are removed"


def test_a_failed_computation_leaves_no_snapshot_and_no_staged_rows(patched: Deployment) -> None:
    def failing(*args: object) -> dict[str, float]:
        compiler, store, as_of, folder, progress = args
        sharded_runner(parts=2)(compiler, store, as_of, folder, progress)  # type: ignore[arg-type]
        raise RuntimeError("task lost")

    snapshots = patched.store.data_dir / "snapshots"
    before = os.listdir(snapshots) if snapshots.exists() else []
    with pytest.raises(RuntimeError, match="task lost"):
        snapshot_with(patched, failing)
    assert engine.latest(patched.store.conn) is None
    assert (os.listdir(snapshots) if snapshots.exists() else []) == before
    assert not any(staging.root(patched.store.data_dir).iterdir())


def test_staging_left_by_a_dead_process_is_swept_but_a_live_one_is_kept(patched: Deployment) -> None:
    data = patched.store.data_dir
    dead = staging.root(data) / "dead"
    dead.mkdir(parents=True)
    (dead / fsutil.OWNER_LOCK).touch()
    (dead / "part-00000.parquet").write_bytes(b"person rows")
    with staging.folder(data) as live:
        assert live.stat().st_mode & 0o777 == 0o700
        assert staging.sweep(data) == 1
        assert live.exists() and not dead.exists()
    assert not live.exists()


def test_a_part_with_other_columns_is_refused(patched: Deployment) -> None:
    def shifted(
        compiler: object, store: object, as_of: object, folder: Path, progress: object
    ) -> dict[str, float]:
        pl.DataFrame({"pid": ["k1.x"], "not_a_segment": [True]}).write_parquet(folder / "part-0.parquet")
        return {}

    from privseg.errors import StoreError

    with pytest.raises(StoreError, match="columns"):
        snapshot_with(patched, shifted)
    assert engine.latest(patched.store.conn) is None


def test_parts_follow_the_memory_budget(patched: Deployment) -> None:
    plan = patched.compiler().compile(AS_OF)
    store = patched.store
    whole = estimate_bytes(plan, store)
    assert parts_for(plan, store, whole * 2) == 1
    assert parts_for(plan, store, whole / 5) == 8  # 5 groups needed: the next power of two
    assert parts_for(plan, store, whole / 1000) == store.shard_count()  # never more than the shards


def test_unsharded_files_from_before_are_read_shard_by_shard(patched: Deployment) -> None:
    """A store written before shards existed has no shard column: readers compute it."""
    store = patched.store
    for batch in store.batches():
        path = store.path_of(batch)
        pl.read_parquet(path).drop("shard").write_parquet(path.with_suffix(".tmp"))
        shutil.move(path.with_suffix(".tmp"), path)
    local, _ = engine.membership(patched.compiler(), store, AS_OF)
    parts = []
    for group in shards.groups(store.shard_count(), 4):
        plan = patched.compiler().compile(AS_OF)
        profiles, events = engine.load(plan, patched.compiler(), store, group)
        parts.append(engine.evaluate(plan, profiles=profiles, events=events)[0])
    assert by_pid(pl.concat(parts)).equals(by_pid(local))


def test_cli_computes_with_the_sharded_engine(patched: Deployment, settings: Settings) -> None:
    from tests.conftest import run_cli

    out = run_cli(
        settings, "segments", "compute", "--engine", "sharded", "--as-of", AS_OF.isoformat(), "--json"
    )
    assert '"groups"' in out.stdout
    snap = engine.latest(patched.store.conn)
    assert snap is not None
    local, _ = engine.membership(patched.compiler(), patched.store, AS_OF)
    assert by_pid(pl.read_parquet(engine.snapshot_path(patched.store, snap))).equals(by_pid(local))
    bad = run_cli(settings, "segments", "compute", "--engine", "gpu", check=False)
    assert bad.returncode == 2 and "unknown engine" in bad.stderr


def test_after_a_key_rotation_every_row_is_in_its_new_pseudonyms_shard(patched: Deployment) -> None:
    """A rotation rewrites every pseudonym, so every shard moves with it (rows are re-sharded by the
    one file writer), and the sharded engine still gives the local engine's memberships."""
    from privseg import maintenance

    before = {b.file for b in patched.store.batches()}
    maintenance.rotate_keys(
        store=patched.store, keyset_path=patched.settings.keyset, policy=patched.ingest_policy
    )
    dep = Deployment(patched.settings)
    try:
        assert {b.file for b in dep.store.batches()}.isdisjoint(before), "every batch file was rewritten"
        for batch in dep.store.batches():
            frame = pl.read_parquet(dep.store.path_of(batch))
            assert frame.get_column("pid").str.starts_with("k2.").all()
            assert frame.get_column("shard").equals(frame.select(shards.shard_expr(64)).to_series())
            assert frame.get_column("shard").is_sorted()
        local, _ = engine.membership(dep.compiler(), dep.store, AS_OF)
        folder = dep.store.data_dir / "check"
        folder.mkdir()
        sharded_runner(parts=4)(dep.compiler(), dep.store, AS_OF, folder, lambda _m: None)
        parts = pl.concat([pl.read_parquet(p) for p in staging.parts(folder)])
        assert by_pid(parts).equals(by_pid(local))
    finally:
        dep.close()
