"""One deployment's moving parts (settings, keyset, ingest policy, store), opened on demand.

The CLI and the HTTP API both start from a :class:`Deployment`, so they see the same state and call
the same service functions.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
import threading
from functools import cached_property
from typing import TYPE_CHECKING

from privseg.db import ConnectionPool, connect, get_meta, set_meta, transaction
from privseg.errors import InvalidInput, loggable
from privseg.policy.categories import CategorySet
from privseg.policy.ingest import IngestPolicy, load_ingest_policy
from privseg.settings import Settings

# The data stack (Polars, OpenDP, the segment compiler) and the keyset and audit log (cryptography) are
# imported by the methods that need them: a command that only reads the ledger or the policies
# (`privseg budget`) starts without them.
if TYPE_CHECKING:
    from privseg.keyset import Keyset
    from privseg.release.context import ReleaseContext
    from privseg.schema import Schema
    from privseg.segments.compiler import Compiler
    from privseg.segments.engine import Runner, Snapshot
    from privseg.segments.sensitivity import SensitivityIndex
    from privseg.store import Store

log = logging.getLogger(__name__)
# Deployment.staleness's unbuildable definitions, by (definition versions, both policies' hashes).
_BLOCKED: dict[tuple[frozenset[tuple[tuple[str, str], int]], str, str], list[str]] = {}
_BLOCKED_LOCK = threading.Lock()


class Deployment:
    def __init__(self, settings: Settings | None = None, pool: ConnectionPool | None = None) -> None:
        self.settings = settings or Settings()
        # Set for a request's deployment: its connection is borrowed from the server's pool.
        self._pool = pool
        # A deployment that serves requests lends them connections from here (see for_request).
        self._root_pool = ConnectionPool(self.settings.db_path) if pool is None else None
        # A request's deployment: the server's, whose keyset it shares (see _shared_keyset).
        self._server: Deployment | None = None
        self._keyset_seen: tuple[tuple[int, ...], Keyset] | None = None

    @cached_property
    def keyset(self) -> Keyset:
        """The keyset, refused if its keys are not the ones the store was written with."""
        if self._server is not None:
            return self._server._shared_keyset(self.store)
        from privseg.keyset import load_keyset

        keyset = load_keyset(self.settings.keyset)
        self.store.check_keyset(keyset)
        return keyset

    def _shared_keyset(self, store: Store) -> Keyset:
        """The keyset for a request (checked against its ``store``): loaded once, and loaded again only
        when the file's status changes, so a rotation by the CLI reaches a running server, and a file
        swapped, loosened (mode) or removed is refused as at start. Loading it for every request was
        11% of a server worker's CPU (py-spy, cached reports at concurrency 32, 2 workers).
        Status is read before content: a file replaced between the two is loaded again next time."""
        from privseg.keyset import load_keyset

        try:
            st = os.lstat(self.settings.keyset)
            status: tuple[int, ...] = (
                st.st_dev,
                st.st_ino,
                st.st_mode,
                st.st_uid,
                st.st_size,
                st.st_mtime_ns,
            )
        except OSError:
            status = ()  # load_keyset says what is wrong
        seen = self._keyset_seen
        if seen is not None and status and seen[0] == status:
            return seen[1]
        keyset = load_keyset(self.settings.keyset)
        store.check_keyset(keyset)
        self._keyset_seen = (status, keyset)
        return keyset

    @cached_property
    def ingest_policy(self) -> IngestPolicy:
        return load_ingest_policy(self.settings.ingest_policy_path)

    @cached_property
    def categories(self) -> CategorySet:
        """The category policies, refused (PolicyError) if any finding stands against them. Reading
        them writes nothing; :meth:`record_policies` audits a set not seen before."""
        from privseg.policy.checks import load_categories

        return load_categories(self.settings.policy_dir, self.schema)

    def record_policies(self) -> CategorySet:
        """Load the policies at start-up and record a set not seen before in the audit log, with its
        hash (the server and every CLI command that acts under policies call this once)."""
        from privseg import audit

        cats = self.categories
        conn = self.conn
        with transaction(conn):
            if get_meta(conn, "policy_hash") != cats.content_hash:
                set_meta(conn, "policy_hash", cats.content_hash)
                audit.append(
                    conn,
                    self.keyset,
                    "policy_load",
                    {"policy_hash": cats.content_hash, "categories": sorted(cats.categories)},
                )
        return cats

    @cached_property
    def schema(self) -> Schema:
        from privseg.schema import Schema

        return Schema.from_ingest_policy(self.ingest_policy)

    @cached_property
    def sensitivity(self) -> SensitivityIndex:
        """The category policies' sensitivity tags, indexed."""
        from privseg.segments.sensitivity import SensitivityIndex

        return SensitivityIndex(self.categories, self.schema)

    def recompute_if_stale(self) -> None:
        """Recompute the membership snapshot if data or policies changed since the latest one (after
        an upload; run after the response has gone out)."""
        from privseg.segments import engine
        from privseg.segments.definitions import active

        stale = engine.staleness(
            self.store, engine.latest(self.store.conn), policy_hash=self.categories.content_hash
        )
        if stale and active(self.store.conn):
            engine.compute_snapshot(
                store=self.store, compiler=self.compiler(), keyset=self.keyset, runner=self.snapshot_runner()
            )

    def staleness(self, snap: Snapshot | None) -> list[str]:
        """Why ``snap`` (the latest snapshot) no longer reflects the store, definitions and policies
        (see engine.staleness) and, when it does not, the stored definitions that stop any new snapshot
        under the policies in force: what the status pages show, so that a blocked refresh is seen
        where its staleness is."""
        from privseg.segments import engine
        from privseg.segments.definitions import active, unbuildable

        reasons = engine.staleness(self.store, snap, policy_hash=self.categories.content_hash)
        if reasons:
            stored = active(self.store.conn)
            # The answer depends only on the definitions and both policies: worked out once for them
            # (0.6 s at 2,000 segments), not on every status request while a snapshot is due.
            key = (
                frozenset((k, s.version) for k, s in stored.items()),
                self.categories.content_hash,
                self.ingest_policy.content_hash(),
            )
            with _BLOCKED_LOCK:
                blocked = _BLOCKED.get(key)
            if blocked is None:
                blocked = unbuildable(stored, schema=self.schema, categories=self.categories)
                with _BLOCKED_LOCK:
                    if len(_BLOCKED) >= 8:
                        _BLOCKED.clear()
                    _BLOCKED[key] = blocked
            if blocked:
                reasons.append(
                    f"no snapshot can be computed under the policies in force until these definitions are "
                    f"changed or retired: {'; '.join(blocked)}"
                )
        return reasons

    def refresh_snapshot(self) -> None:
        """:meth:`recompute_if_stale` on a deployment of its own (its own connection): for work after a
        response has gone out (an upload's background task). A failure is logged as the server's
        periodic refresher logs it, and not raised: raised from a background task, it reached the log
        as uvicorn's "Exception in ASGI application" and a traceback carrying whatever message the
        failing library wrote. The upload itself is stored; the next refresh tries again."""
        fresh = self.for_request()
        try:
            fresh.recompute_if_stale()
        except Exception as exc:
            log.error("snapshot refresh failed: %s", loggable(exc))
        finally:
            fresh.close()

    def snapshot_runner(self, engine_name: str | None = None, *, spark_master: str | None = None) -> Runner:
        """How snapshots are computed: the configured engine (``PRIVSEG_ENGINE``) unless one is named."""
        name = engine_name or self.settings.engine
        if name == "local":
            from privseg.segments.engine import local_runner

            return local_runner
        if name == "sharded":
            from privseg.segments.sharded import sharded_runner

            return sharded_runner(memory_gb=self.settings.engine_memory_gb)
        if name == "spark":
            from privseg.spark.runner import spark_runner

            return spark_runner(
                master=spark_master or self.settings.spark_master,
                store_uri=self.settings.spark_store_uri,
                conf=self.settings.spark_conf,
            )
        raise InvalidInput(f"unknown engine {name!r}: local, sharded or spark")

    def compiler(self) -> Compiler:
        """A compiler over the currently active definitions (they change as segments are applied)."""
        from privseg.segments.definitions import active, build_compiler

        return build_compiler(active(self.store.conn), schema=self.schema, categories=self.categories)

    def release_context(self) -> ReleaseContext:
        """What release code needs, and nothing else."""
        from privseg.release.context import ReleaseContext

        return ReleaseContext(
            store=self.store,
            keyset=self.keyset,
            categories=self.categories,
            schema=self.schema,
            sensitivity=self.sensitivity,
        )

    @cached_property
    def conn(self) -> sqlite3.Connection:
        """The deployment's database connection (the store's; the ledger and audit log live there)."""
        return self._pool.acquire() if self._pool is not None else connect(self.settings.db_path)

    @cached_property
    def store(self) -> Store:
        from privseg.store import Store

        return Store(self.conn, self.settings.data_dir, new_shards=self.settings.shards)

    def for_request(self) -> Deployment:
        """A deployment sharing what is already loaded (policies; the keyset, see :meth:`keyset`) but
        with its own database connection, borrowed from the pool until :meth:`close`: SQLite
        connections must not be shared by concurrent requests."""
        assert self._root_pool is not None, "fork the server's deployment, not a request's"
        fork = Deployment(self.settings, self._root_pool)
        fork._server = self
        for name in ("ingest_policy", "schema", "categories", "sensitivity"):
            if name in self.__dict__:
                fork.__dict__[name] = self.__dict__[name]
        return fork

    def close(self) -> None:
        self.__dict__.pop("store", None)
        if "conn" in self.__dict__:
            conn = self.__dict__.pop("conn")
            if self._pool is not None:
                self._pool.release(conn)
            else:
                conn.close()
        if self._root_pool is not None:
            self._root_pool.close()


class JsonFormatter(logging.Formatter):
    """One JSON object per record (``PRIVSEG_LOG_FORMAT=json``), with the request id when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "at": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "method", "route", "status", "ms"):
            if hasattr(record, key):
                doc[key] = getattr(record, key)
        return json.dumps(doc)


def configure_logging(settings: Settings) -> None:
    """Log to stderr (and a file when configured). Nothing privseg logs carries a raw identifier."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.log_file is not None:
        settings.log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(settings.log_file, encoding="utf-8"))
    formatter = (
        JsonFormatter()
        if settings.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=settings.log_level.upper(), handlers=handlers, force=True)
