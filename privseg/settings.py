"""Runtime settings, read from ``PRIVSEG_*`` environment variables (pydantic-settings).

Defaults are the embedded ones: everything lives under the working directory, so ``privseg demo``
runs on a fresh machine with nothing else set up.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PRIVSEG_", frozen=True)

    home: Path = Field(
        Path(".privseg"),
        description="State directory: the SQLite database and the pseudonymized Parquet store.",
    )
    keyset: Path = Field(
        Path("keys/keyset.json"),
        description="Keyset file (created by `privseg keys init`, mode 0600). Keep it out of backups "
        "that leave the deployment.",
    )
    policy_dir: Path = Field(
        Path("policies"), description="Directory holding ingest.yaml and categories/*.yaml."
    )
    log_file: Path | None = Field(
        None, description="Also write logs to this file (logs never contain raw identifiers)."
    )
    max_upload_bytes: int = Field(
        2 * 1024**3,
        ge=1,
        description="Largest accepted upload; bodies are streamed to disk, never held in memory.",
    )
    log_level: str = Field("WARNING", description="Python logging level name (INFO shows each batch).")
    log_format: Literal["text", "json"] = Field(
        "text", description="text: one readable line per record; json: one JSON object per line."
    )
    audit_anchor_file: Path | None = Field(
        None,
        description="`privseg serve` appends a signed head of the audit log here at start, every "
        "audit_anchor_interval_seconds and at shutdown. Put it where the server's database is not "
        "(another volume, or a file shipped off the machine): it is what shows a cut log.",
    )
    audit_anchor_interval_seconds: float = Field(3600.0, gt=0, description="Seconds between anchors.")

    upload_dir: Path | None = Field(
        None,
        description="Where HTTP uploads (raw files) wait while ingested; default: a private folder "
        "under the system temporary directory, outside the state directory that backups copy.",
    )
    max_decompressed_bytes: int = Field(
        4 * 1024**3,
        ge=1,
        description="Largest decompressed size of a .gz source; a file past it is refused (gzip bombs).",
    )

    warm_release_cache: bool = Field(
        True,
        description="Each `privseg serve` worker builds the latest snapshot's release dimensions (a join "
        "over every person), the cell codes of the 8 breakdowns released most recently and the counts "
        "of the segments released under them at start and after each refresh, instead of in its first "
        "fresh releases (which then waited ~2.7 s at a million people). Costs that memory in every "
        "worker up front.",
    )
    snapshot_refresh_seconds: float = Field(
        300.0,
        ge=0,
        description="`privseg serve` recomputes a stale snapshot this often (live intake makes it stale); "
        "0: only on request. Reads go on from the current snapshot meanwhile.",
    )
    shards: int = Field(
        64,
        ge=1,
        le=4096,
        description="Person shards a new store is partitioned into (a power of two; fixed when the store "
        "is created and recorded in it). Bounded-memory and Spark computation work shard by shard.",
    )
    engine: Literal["local", "sharded", "spark"] = Field(
        "local",
        description="How snapshots are computed: local (whole store in memory, fastest up to a few million "
        "people), sharded (a few shards at a time: memory bounded by the shard size), spark (the same "
        "per-shard kernels as Spark tasks).",
    )
    engine_memory_gb: float = Field(
        8.0,
        gt=0,
        description="The sharded engine loads as many shards at a time as fit this much memory (estimated "
        "from the manifest's people and event counts and the columns the segments read).",
    )
    spark_master: str = Field(
        "local[2]", description="Spark master URL for the spark engine (local[N], spark://host:port, yarn)."
    )
    spark_store_uri: str | None = Field(
        None,
        description="Where Spark executors read the store's data directory (e.g. s3a://bucket/privseg/data "
        "or a shared mount); default: the local data directory (local[N] masters).",
    )
    spark_conf: dict[str, str] = Field(
        default_factory=dict,
        description='Extra Spark settings for the spark engine, as JSON (e.g. {"spark.executor.memory": '
        '"8g"}); a local master gets spark.driver.memory 4g unless set here.',
    )
    console_idle_minutes: float = Field(
        30.0, gt=0, description="A console session ends after this many minutes without a request."
    )
    console_max_hours: float = Field(
        8.0, gt=0, description="A console session ends this many hours after sign-in, in use or not."
    )

    @field_validator("shards")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        # (Not shards.check_count: that module imports Polars, which the CLI's start-up must not.)
        if value & (value - 1):
            raise ValueError("the shard count must be a power of two")
        return value

    @property
    def uploads_path(self) -> Path:
        if self.upload_dir is not None:
            return self.upload_dir
        # One folder per deployment (keyed by its state directory), so servers of different
        # deployments never clear each other's uploads.
        tag = hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"privseg-uploads-{os.getuid()}-{tag}"

    @property
    def db_path(self) -> Path:
        return self.home / "privseg.db"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def ingest_policy_path(self) -> Path:
        return self.policy_dir / "ingest.yaml"
