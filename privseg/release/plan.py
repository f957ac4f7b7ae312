"""Release plans: the rules a release falls under, its cells, and the vectors it draws noise for.

A plan fixes the category policy, the public cells and, for each released vector, its L1 sensitivity
and its share of the epsilon; the shares sum to the charged epsilon (basic composition). Kind modules
(release/kinds/) build plans, each arguing its sensitivity next to the code; the engine
(release/engine.py) charges and draws the noise for every kind alike.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from opendp.accuracy import discrete_laplacian_scale_to_accuracy
from opendp.domains import atom_domain, vector_domain
from opendp.measurements import make_laplace
from opendp.metrics import l1_distance
from opendp.mod import enable_features

from privseg.policy.categories import CategoryPolicy
from privseg.segments import engine

# Specific modules, not opendp.prelude: the prelude imports scikit-learn (0.75 s on every CLI call).
enable_features("contrib")

ALPHA = 0.05  # intervals are 95%, two-sided
UNKNOWN = "unknown"  # the cell of a person whose dimension value is missing
# OpenDP's exact discrete Laplace sampler costs 5-10 us a coordinate on the 2-core machines measured
# (880 cells: 4.3-8.8 ms of CPU) and releases the GIL: a long vector is drawn in two halves at once.
# Shorter vectors are not worth a thread. The cost is inside OpenDP's wheel, whatever the scale (1 to
# 2e7: 6.6-11 us): ~10 calls a coordinate to the OpenSSL 3.0 DRBG it links in (strace: 87,220 getpid
# calls for 8,800 draws), each re-keying AES and making a getpid system call (perf: ~16% of the CPU in
# the system call, ~25% in the DRBG). Nothing on our side of the FFI shortens it.
_NOISE_THREADS = 2
_PARALLEL_FROM = 256
_NOISE_POOL = ThreadPoolExecutor(_NOISE_THREADS, thread_name_prefix="privseg-noise")
# Each thread's measurements by (sensitivity, epsilon), built once: building one (and checking its
# privacy map) cost ~0.6 ms, a tenth of drawing 880 cells. Per thread: OpenDP objects are not shared
# between threads here.
_BUILT = threading.local()
_BUILT_MAX = 64


@dataclass(frozen=True)
class Vector:
    """One released integer vector. ``sensitivity`` is the most one person can move it in L1 (argued
    by the kind that plans it); the noise is OpenDP's discrete Laplace with scale d_in / epsilon, which
    costs exactly ``epsilon`` (checked against OpenDP's own privacy map when the measurement is built)."""

    name: str
    sensitivity: int
    epsilon: float
    unit: float = 1.0  # what one integer step is worth in the released unit (spend: a cent)

    @property
    def scale(self) -> float:
        return self.sensitivity / self.epsilon

    def measurement(self) -> Any:
        # 64-bit: OpenDP's T=int is i32, which refused a spend total past 2**31 cents ($21.5M in one
        # cell) after the release was charged.
        m = make_laplace(vector_domain(atom_domain(T="i64")), l1_distance(T="i64"), scale=self.scale)
        cost = m.map(self.sensitivity)  # type: ignore[no-untyped-call]
        if cost > self.epsilon * (1 + 1e-9):
            raise RuntimeError(f"measurement costs {cost}, more than the planned {self.epsilon}")
        return m

    def noise(self, exact: Sequence[int]) -> list[int]:
        """``exact`` with OpenDP's noise, as integers. A long vector is drawn in contiguous parts on
        two threads, each part by its thread's instance of :meth:`measurement` (built once per
        sensitivity and epsilon; every call draws fresh noise). Privacy: the vector
        measurement adds independent, identically distributed noise to each coordinate, so the parts'
        draws put side by side have exactly the distribution of one draw of the whole vector, whose
        cost the map check in :meth:`measurement` bounds by ``epsilon`` at ``sensitivity`` (what one
        person moves the whole vector by, so each part by at most as much). Nothing is drawn twice."""
        # As a numpy array OpenDP takes the vector in one copy, where a list is checked value by value.
        values = np.asarray(exact, dtype=np.int64)
        if len(values) < _PARALLEL_FROM:
            return [int(x) for x in self._built()(values)]
        size = -(-len(values) // _NOISE_THREADS)
        parts = [values[i : i + size] for i in range(0, len(values), size)]
        drawn = _NOISE_POOL.map(lambda part: self._built()(part), parts)
        return [int(x) for part in drawn for x in part]

    def prepare(self) -> None:
        """Build (and check the cost of) this thread's measurement now: called before the charge, so
        that a measurement OpenDP refuses to build refuses the release instead of failing it after
        the budget is spent."""
        self._built()

    def _built(self) -> Any:
        """:meth:`measurement` for this thread, built (and its cost checked) once per parameters."""
        cache: dict[tuple[int, float], Any] = _BUILT.__dict__.setdefault("measurements", {})
        key = (self.sensitivity, self.epsilon)
        if key not in cache:
            if len(cache) >= _BUILT_MAX:
                cache.clear()
            cache[key] = self.measurement()
        return cache[key]

    @property
    def half_width(self) -> float:
        """Half the width of the 95% interval of one noisy value, in the released unit."""
        return float(discrete_laplacian_scale_to_accuracy(self.scale, ALPHA)) * self.unit


@dataclass(frozen=True, kw_only=True)
class ReleasePlan:
    """What every kind shares. Kinds subclass it for what only they need, and override
    :meth:`identity` (what else makes two requests different) and :meth:`details` (what else to show)."""

    kind: str
    recipient: str
    policy: CategoryPolicy  # the strictest rules of every category the release reads
    charged: tuple[CategoryPolicy, ...]  # every category whose budget the release is charged to
    segments: list[str]
    breakdown: list[str]
    keys: list[tuple[str, ...]]  # every cell, in release order
    snapshot: engine.Snapshot
    policy_hash: str
    vectors: tuple[Vector, ...]
    # A continual release (see release/series.py): the kind's identity of the series, without the
    # snapshot; None for a one-off release.
    series: str | None = None

    def __post_init__(self) -> None:
        if not self.charged:
            raise ValueError("a release plan must name the categories it charges")
        if not self.vectors or len({v.name for v in self.vectors}) != len(self.vectors):
            raise ValueError("a release plan draws one or more vectors, each named once")
        if self.epsilon > self.policy.epsilon_per_release * (1 + 1e-9):
            raise ValueError("the vectors of a release together cost more than its policy allows")

    @property
    def epsilon(self) -> float:
        """What the release costs: its vectors' epsilons add up (basic composition); fsum, so that
        shares like epsilon / 6 add back to epsilon exactly."""
        return math.fsum(v.epsilon for v in self.vectors)

    def vector(self, name: str) -> Vector:
        return next(v for v in self.vectors if v.name == name)

    @property
    def counts(self) -> Vector:
        """The headline vector (its interval is the one every release states)."""
        return self.vectors[0]

    def identity(self) -> dict[str, Any]:
        """Request parts beyond the shared ones that change the answer (they enter the cache key)."""
        return {}

    def closed(self, vector: str) -> list[int] | None:
        """A series' blocks of ``vector`` that have closed (may be released now); None: all of them."""
        return None

    def details(self) -> dict[str, Any]:
        """What the kind adds to the description of a release."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "recipient": self.recipient,
            "category": self.policy.name,
            "charged_categories": [p.name for p in self.charged],
            "segments": self.segments,
            "breakdown": self.breakdown,
            "cells_per_segment": len(self.keys),
            "epsilon": self.epsilon,
            "delta": self.policy.delta,
            "noise_scale": self.counts.scale,
            "interval_95_half_width": self.counts.half_width,
            "min_cohort_size": self.policy.min_cohort_size,
            "allowed_dimensions": self.policy.allowed_dimensions(),
            "max_dimensions": self.policy.breakdowns.max_dimensions,
            "snapshot": self.snapshot.id,
            "as_of": self.snapshot.as_of,
            "policy_hash": self.policy_hash,
        } | self.details()
