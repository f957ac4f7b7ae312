"""The spark engine's runner: the store read by Spark, grouped by person shard, each group evaluated
by the local engine's kernel in a task, memberships written by the executors.

Only the job's outcome comes back to the driver: no action here collects rows (``write`` is the only
action). The snapshot writer then publishes the written parts exactly as it does the local
engines' (see segments/engine.py), so a failed job leaves no snapshot and its staging folder is
removed.
"""

from __future__ import annotations

import logging
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from privseg import shards
from privseg.errors import StoreError
from privseg.segments import staging
from privseg.segments.compiler import Compiler, Plan
from privseg.segments.engine import Progress, Runner
from privseg.segments.features import TS_DTYPE
from privseg.spark import session as spark_session
from privseg.spark.kernel import BATCH, EVENT, KIND, PROFILE, Kernel, event_column, profile_column, unpack
from privseg.store import Store

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)
PACKED = "packed"


def spark_runner(
    *,
    master: str,
    store_uri: str | None = None,
    partitions: int | None = None,
    conf: dict[str, str] | None = None,
) -> Runner:
    """A runner on the Spark cluster at ``master``; ``store_uri``: where executors read the store's
    data directory (default: its local path, right for ``local[N]`` masters and shared mounts)."""

    def run(
        compiler: Compiler, store: Store, as_of: datetime, folder: Path, progress: Progress
    ) -> dict[str, float]:
        plan = compiler.compile(as_of)
        t = time.perf_counter()
        with spark_session.session(master, conf=conf) as spark:
            started = time.perf_counter() - t
            progress(f"Spark session on {master} ({started:.1f}s); evaluating {len(plan.segments)} segments")
            t = time.perf_counter()
            frame, kernel = _inputs(spark, plan, compiler, store, store_uri or str(store.data_dir))
            # One partition per shard (hashed: a partition may get two small ones, another none), so a
            # task's memory follows the shard size, as the scaling model in the README assumes.
            count = partitions or max(spark.sparkContext.defaultParallelism, store.shard_count())
            result = frame.repartition(count, shards.SHARD).mapInArrow(kernel, "pid string, bits binary")
            try:
                result.write.mode("errorifexists").option("compression", "zstd").parquet(str(folder / PACKED))
            except Exception as exc:
                # The JVM's message may quote a row; the failed task's log on the cluster has it.
                log.error("the Spark job failed: %s", type(exc).__name__)
                raise StoreError(
                    "the Spark job computing the snapshot failed (the failed task's log on the cluster "
                    "says why); no snapshot was recorded"
                ) from None
        job = time.perf_counter() - t
        t = time.perf_counter()
        _unpack_parts(folder, list(plan.segments))
        return {
            "spark_session": started,
            "spark_job": job,
            "unpack": time.perf_counter() - t,
            "features_count": len(plan.features),
            "partitions": count,
        }

    return run


def _unpack_parts(folder: Path, segments: list[str]) -> None:
    """Turn each packed part the executors wrote into a part of Boolean columns, one at a time (memory:
    one part), and remove the packed output."""
    packed = folder / PACKED
    for i, part in enumerate(staging.parts(packed)):
        staging.write_members(unpack(pl.read_parquet(part), segments), folder / f"part-{i:05d}.parquet")
        part.unlink()
    shutil.rmtree(packed, ignore_errors=True)


def _inputs(
    spark: SparkSession, plan: Plan, compiler: Compiler, store: Store, base: str
) -> tuple[DataFrame, Kernel]:
    """One Spark frame of every profile and event row the plan reads (prefixed, tagged with their
    kind and profile batch), and the kernel that turns a partition of it into memberships."""
    from pyspark.sql import functions as F

    wanted = [c for c in plan.profile_columns() if c != "pid"]
    parts: list[DataFrame] = []
    carried: list[tuple[str, ...]] = []
    dtypes: dict[str, pl.DataType] = {"pid": pl.String()}
    for i, batch in enumerate(store.batches("profiles")):
        schema = pl.read_parquet_schema(store.path_of(batch))
        has = tuple(c for c in wanted if c in schema)
        carried.append(has)
        for c in has:
            dtypes.setdefault(c, schema[c])
        parts.append(
            spark.read.parquet(f"{base}/profiles/{batch.file}").select(
                F.col(shards.SHARD).cast("int").alias(shards.SHARD),
                F.lit(PROFILE).alias(KIND),
                F.lit(i).alias(BATCH),
                *(F.col(c).alias(profile_column(c)) for c in ("pid", *has)),
            )
        )
    for c in wanted:
        if c not in dtypes and c in compiler.schema.profile:
            dtypes[c] = compiler.schema.profile[c].dtype()
    needed = plan.event_columns()
    event_dtypes: dict[str, pl.DataType] = {"pid": pl.String(), "ts": TS_DTYPE, "event_type": pl.String()}
    for batch in store.batches("events"):
        schema = pl.read_parquet_schema(store.path_of(batch))
        has = tuple(c for c in needed if c in schema)
        for c in has:
            event_dtypes.setdefault(c, schema[c])
        parts.append(
            spark.read.parquet(f"{base}/events/{batch.file}")
            .where(F.col("ts") <= F.lit(plan.as_of))
            .select(
                F.col(shards.SHARD).cast("int").alias(shards.SHARD),
                F.lit(EVENT).alias(KIND),
                F.lit(-1).alias(BATCH),
                *(F.col(c).alias(event_column(c)) for c in has),
            )
        )
    event_dtypes = {c: event_dtypes.get(c, pl.String()) for c in needed}
    kernel = Kernel(plan, tuple(carried), dtypes, event_dtypes)
    if not parts:
        empty = spark.createDataFrame([], f"{shards.SHARD} int, {KIND} int, {BATCH} int")
        return empty, kernel
    frame = parts[0]
    for part in parts[1:]:
        frame = frame.unionByName(part, allowMissingColumns=True)
    return frame, kernel
