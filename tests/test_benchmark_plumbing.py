"""The benchmarks' shared plumbing: which runs count as quiet, and what the median of repeated runs is.
(The benchmarks themselves run on demand, not here: they take minutes at 1M customers.)"""

from pathlib import Path

import pytest

from benchmarks import common


def test_the_box_load_is_what_others_used_beside_our_children(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "cpus", lambda: 2)
    # 10 s of wall time on 2 CPUs: the box was busy 12 s, of which our children took 11 s; 0.5 s stolen.
    before = ((50.0, 1.0, 500.0), 100.0, 0.0)
    after = ((62.0, 1.5, 520.0), 111.0, 10.0)
    load = common.box_load(before, after)
    assert load == {"others_cpu_pct": 5.0, "steal_pct": 2.5}
    assert common.quiet(load) is False
    # Children that used more than the box counted (tick rounding) leave others at 0, not below.
    zero = (0.0, 0.0, 0.0)
    assert common.box_load((zero, 0.0, 0.0), ((1.0, 0.0, 2.0), 1.5, 1.0))["others_cpu_pct"] == 0.0
    assert common.quiet({"others_cpu_pct": 2.0, "steal_pct": 2.9}) is True
    # Without /proc/stat nothing is claimed either way.
    assert common.box_load((None, 0.0, 0.0), (None, 1.0, 1.0)) == {}
    assert common.quiet({}) is None


def test_the_box_cpu_is_read_off_this_machine() -> None:
    reading = common.box_cpu()
    if not Path("/proc/stat").exists():
        assert reading is None
        return
    assert reading is not None
    busy, steal, total = reading
    assert 0 < busy <= total and 0 <= steal <= total


def test_the_median_run_keeps_every_time_and_the_highest_peak() -> None:
    runs = [
        {"seconds": 5.0, "peak_rss_mb": 100.0, "profiles_seconds": 1.5},
        {"seconds": 3.0, "peak_rss_mb": 120.0, "profiles_seconds": 1.0},
        {"seconds": 4.0, "peak_rss_mb": 110.0, "profiles_seconds": 1.2},
    ]
    m = common.median_run(runs)
    assert m["seconds"] == 4.0 and m["profiles_seconds"] == 1.2  # the middle run's own split
    assert m["runs_seconds"] == [5.0, 3.0, 4.0]
    assert m["peak_rss_mb"] == 120.0
    # An even count: the median time, the split of the lower middle run.
    m = common.median_run(runs[:2])
    assert m["seconds"] == 4.0 and m["profiles_seconds"] == 1.0


def test_reading_through_reads_every_byte_of_every_file(tmp_path: Path) -> None:
    sizes = {"empty": 0, "small": 10, "steps": (1 << 22) * 2 + 7}  # 0 bytes, under one step, past two
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(b"x" * size)
    assert common.read_through([tmp_path / n for n in sizes]) == sum(sizes.values())
    with pytest.raises(FileNotFoundError):
        common.read_through([tmp_path / "missing"])


def test_a_repeated_wrk_row_reports_each_figures_median_and_every_run() -> None:
    from benchmarks.server import _median_run

    runs = [
        {"rps": 4000.0, "p50": 0.007, "p99": 0.027, "errors": 0},
        {"rps": 4400.0, "p50": 0.006, "p99": 0.018, "errors": 1},
        {"rps": 3600.0, "p50": 0.008, "p99": 0.024, "errors": 2},
    ]
    r = _median_run(runs)
    assert (r["rps"], r["p50"], r["p99"]) == (4000.0, 0.007, 0.024)
    assert r["errors"] == 3 and r["runs"] == runs
