from __future__ import annotations

from fastapi.testclient import TestClient

from privseg.api.app import create_app
from privseg.deployment import Deployment
from privseg.settings import Settings


def test_health_and_readiness(dep: Deployment) -> None:
    client = TestClient(create_app(dep))
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert client.get("/openapi.json").status_code == 200


def test_not_ready_without_keys_reports_codes_only(settings: Settings) -> None:
    client = TestClient(create_app(Deployment(settings)))
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["keyset"] == "keyset-error"
    assert str(settings.keyset) not in ready.text


def test_privseg_serve_answers_on_loopback_and_stops(dep: Deployment) -> None:
    import httpx2

    from tests.conftest import running_server

    with running_server(dep.settings) as (base, proc):
        response = httpx2.get(f"{base}/readyz", timeout=5)
        assert response.status_code == 200 and response.json()["ready"] is True
    assert proc.poll() is not None  # stopped, and (checked by the helper) cleanly


def test_a_server_builds_the_release_dimensions_at_start(dep: Deployment, demo_files) -> None:  # type: ignore[no-untyped-def]
    # A worker's first fresh release must not pay the join over every person (a cold worker's
    # requests waited ~2.7 s at a million people): the server builds it when it starts.
    from privseg import release
    from privseg.release import data as release_data
    from privseg.segments import engine
    from tests.conftest import prepare

    prepare(dep, demo_files.customers, demo_files.events)
    snap = engine.latest(dep.store.conn)
    assert snap is not None
    key = (str(dep.store.data_dir.resolve()), f"{snap.id}/{snap.file}")
    # A breakdown released before: its cell codes are built ahead too (the newest first).
    for by in (["age_band"], ["region", "age_band"]):
        req = release.CohortReportRequest(segments=["cart_abandoners_7d"], breakdown=by)
        release.run(dep.release_context(), req, "growth_team")
    # A later release adds a segment under the first breakdown.
    req = release.CohortReportRequest(
        segments=["cart_abandoners_7d", "frequent_buyers"], breakdown=["age_band"]
    )
    release.run(dep.release_context(), req, "growth_team")
    recent = release_data.recent_breakdowns(dep.store.conn)
    assert list(recent.items()) == [
        (("age_band",), ["cart_abandoners_7d", "frequent_buyers"]),
        (("region", "age_band"), ["cart_abandoners_7d"]),
    ]
    cells = {(*key, ("age_band",)), (*key, ("region", "age_band"))}
    counted = {(*key, by, s) for by, segments in recent.items() for s in segments}
    release_data._DIMS_CACHE.clear()
    release_data._CELLS_CACHE.clear()
    release_data._COUNTS_CACHE.clear()
    app = create_app(dep)
    with TestClient(app) as client:
        app.state.release_warmer.join(timeout=60)
        assert key in release_data._DIMS_CACHE
        assert cells <= set(release_data._CELLS_CACHE)
        assert all(k in release_data._COUNTS_CACHE for k in counted)
        assert client.get("/readyz").json()["warm"] is True
    # Off by setting: nothing is built ahead.
    release_data._DIMS_CACHE.clear()
    release_data._CELLS_CACHE.clear()
    release_data._COUNTS_CACHE.clear()
    off = Deployment(dep.settings.model_copy(update={"warm_release_cache": False}))
    app = create_app(off)
    with TestClient(app):
        app.state.release_warmer.join(timeout=60)
        assert key not in release_data._DIMS_CACHE and not release_data._CELLS_CACHE
        assert not any(k in release_data._COUNTS_CACHE for k in counted)
    off.close()


def test_a_serving_app_keeps_its_start_up_objects_out_of_full_collections(settings: Settings) -> None:
    """A full collection while serving does not walk what start-up made: under load such passes took
    50-64 ms per worker, stalling every request on it. They are handed back at shutdown."""
    import gc

    from privseg.keyset import create_keyset

    create_keyset(settings.keyset, "test")
    server = Deployment(settings)
    assert gc.get_freeze_count() == 0
    made = create_app(server)
    with TestClient(made) as client:
        assert client.get("/healthz").status_code == 200
        frozen = gc.get_freeze_count()
        # The app, its routes and the modules it imported are all frozen, not a handful of objects.
        assert frozen > 10_000
        walked = gc.get_objects()  # what a full collection still walks
        assert not any(obj is made or obj is made.router for obj in walked)
        assert len(walked) < frozen
        del walked
    assert gc.get_freeze_count() == 0
    server.close()


def test_a_started_server_shares_what_it_derives_from_its_policies(settings: Settings) -> None:
    """A request's deployment reuses the server's policies and their sensitivity index, built once at
    start (each request built the index again)."""
    from privseg.keyset import create_keyset

    create_keyset(settings.keyset, "test")
    server = Deployment(settings)  # nothing loaded yet, as in a worker process
    with TestClient(create_app(server)):
        fork = server.for_request()
        try:
            assert fork.sensitivity is server.sensitivity and fork.categories is server.categories
        finally:
            fork.close()
    server.close()
