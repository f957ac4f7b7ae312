"""What a release may read and under which rules: its snapshots, its categories, its cells.

Shared by every release kind. The categories come from the data (the effective categories recorded
with the snapshot, and whatever a breakdown or measure reads), never from the request.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from privseg.errors import Conflict, InvalidInput, NotFound, NotPermitted, PolicyViolation
from privseg.policy.categories import CategoryPolicy, strictest
from privseg.release.context import ReleaseContext
from privseg.release.plan import UNKNOWN
from privseg.schema import Schema
from privseg.segments import engine
from privseg.segments.language import Step


def categories(
    ctx: ReleaseContext,
    snaps: Sequence[engine.Snapshot],
    segments: Sequence[str],
    *,
    breakdown: Sequence[str] = (),
    spend: Step | None = None,
    steps: Sequence[Step] = (),
) -> tuple[CategoryPolicy, tuple[CategoryPolicy, ...]]:
    """The policy a release is made under, and the categories it charges: every effective category
    of its segments (recorded with the snapshot, under the policy set in force) plus whatever its
    breakdown and measures read; general drops out once a stigmatized category is in."""
    names: set[str] = {"general"}
    for snap in snaps:
        if snap.policy_hash != ctx.categories.content_hash or snap.categories is None:
            raise Conflict(
                f"snapshot {snap.id} was computed under another policy set (its consent filters and "
                "categories may differ): run `privseg segments compute`"
            )
        for sid in segments:
            if sid not in snap.segments:
                raise NotFound(
                    f"segment {sid!r} is not in snapshot {snap.id}; apply it and run "
                    "`privseg segments compute`"
                )
            names.update(snap.categories[sid])
    index = ctx.sensitivity
    taints = [t for dim in breakdown for t in index.dimension_reads(dim, f"breakdown {dim}")]
    if spend is not None:
        taints += index.step_reads(spend, "spend")
    for i, step in enumerate(steps):  # other events a release reads (e.g. persona features)
        taints += index.step_reads(step, f"steps[{i}]")
    names.update(t.category for t in taints)
    members = [ctx.categories.get(n) for n in sorted(names)]
    if any(p.stigmatized for p in members):
        members = [p for p in members if p.name != "general"]
    return strictest(members), tuple(members)


def distinct(names: Sequence[str], what: str = "a segment is named twice") -> None:
    if len(set(names)) != len(names):
        raise InvalidInput(what)


def dimensions_exist(ctx: ReleaseContext, breakdown: Sequence[str]) -> None:
    unknown = [d for d in breakdown if d not in ctx.schema.profile]
    if unknown:
        raise InvalidInput(f"unknown breakdown dimension(s) {unknown}; known: {sorted(ctx.schema.profile)}")


def cells(ctx: ReleaseContext, policy: CategoryPolicy, breakdown: Sequence[str]) -> list[tuple[str, ...]]:
    """Every cell of a breakdown, from the dimensions' public domains (plus unknown), never from the
    data: so the cells themselves reveal nothing, and each person is in exactly one."""
    distinct(breakdown, f"breakdown names a dimension twice: {list(breakdown)}")
    if len(breakdown) > policy.breakdowns.max_dimensions:
        raise PolicyViolation(
            f"category {policy.name!r} allows at most {policy.breakdowns.max_dimensions} breakdown "
            f"dimension(s); the request has {len(breakdown)}"
        )
    allowed = policy.allowed_dimensions()
    for dim in breakdown:
        if dim in policy.breakdowns.forbidden:
            raise PolicyViolation(f"category {policy.name!r} forbids breaking down by {dim!r}")
        if dim not in allowed:
            raise PolicyViolation(
                f"category {policy.name!r} does not allow breaking down by {dim!r}; allowed: {allowed}"
            )
    return domain(ctx.schema, breakdown)


def domain(schema: Schema, breakdown: Sequence[str]) -> list[tuple[str, ...]]:
    """The public cells of a breakdown, in release order (also how a reader of a release names the
    cells it suppressed)."""
    domains = []
    for dim in breakdown:
        ft = schema.profile[dim]
        values = list(ft.values or ()) if ft.type == "category" else ["true", "false"]
        domains.append([*values, UNKNOWN])
    return [tuple(k) for k in itertools.product(*domains)]


def snapshot(ctx: ReleaseContext, snapshot_id: int | None = None) -> engine.Snapshot:
    """The latest snapshot, or the one asked for; refused if pruned or keyed under another key."""
    if snapshot_id is None:
        snap = engine.latest(ctx.store.conn)
        if snap is None or snap.file is None:
            raise NotFound("no membership snapshot yet: run `privseg segments compute`")
        return _same_key(ctx, snap)
    found = engine.get(ctx.store.conn, snapshot_id)
    if found is None:
        raise NotFound(f"no snapshot {snapshot_id}")
    if found.file is None:
        raise NotFound(f"snapshot {snapshot_id} was pruned (only the last {engine.KEEP_SNAPSHOTS} are kept)")
    return _same_key(ctx, found)


def _same_key(ctx: ReleaseContext, snap: engine.Snapshot) -> engine.Snapshot:
    # Pseudonyms under two key versions are two people to every join and every transition table.
    if snap.key_version is None or snap.key_version != ctx.store.key_version():
        raise Conflict(
            f"snapshot {snap.id} is keyed under another pseudonym key version than the store "
            "(a rotation did not finish re-keying it): run `privseg segments compute`"
        )
    return snap


def marketer(policy: CategoryPolicy, recipient: str) -> None:
    if recipient not in policy.recipients.marketers:
        raise NotPermitted(f"{recipient!r} may not receive releases for category {policy.name!r}")
