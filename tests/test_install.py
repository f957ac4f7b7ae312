"""The installed versions are the tested ones, and the layering holds."""

from importlib.metadata import version

import polars as pl


def test_the_installed_versions_are_the_tested_ones() -> None:
    # OpenDP's privacy maps are version-specific (the sensitivity arguments were checked against 0.16.0),
    # and the suite and the benchmarks were run on polars 2.1 (pyproject admits 2.x from 2.1 on).
    assert version("opendp") == "0.16.0"
    major, minor = (int(p) for p in pl.__version__.split(".")[:2])
    assert major == 2 and minor >= 1, pl.__version__
    # Only OpenDP's core is a dependency: its Polars extra (scikit-learn, scipy, a polars pin) is not.
    from importlib.metadata import PackageNotFoundError

    # (pyarrow is installed by the [spark] extra, which the test command installs.)
    for extra in ("scikit-learn", "scipy"):
        try:
            version(extra)
        except PackageNotFoundError:
            continue
        raise AssertionError(f"{extra} is installed; nothing privseg declares needs it")


def test_fastapi_is_imported_only_by_the_http_shells() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "privseg"
    offenders = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not {"api", "console"} & set(p.relative_to(root).parts)
        and ("import fastapi" in p.read_text() or "from fastapi" in p.read_text())
    ]
    assert offenders == []


SHELLS = ("privseg.cli", "privseg.api", "privseg.console", "privseg.demo", "privseg.__main__")
# The small modules everything stands on: they import only each other (and third-party packages).
CORE = {
    "privseg",
    "privseg.errors",
    "privseg.settings",
    "privseg.shards",
    "privseg.db",
    "privseg.fsutil",
    "privseg.keyset",
    "privseg.identity",
    "privseg.pseudonym",
    "privseg.siv",
    "privseg.audit",
    "privseg.store",
    "privseg.batches",
    "privseg.schema",
    "privseg.metrics",
    "privseg.policy",
    "privseg.policy.categories",
    "privseg.policy.checks",
    "privseg.policy.diff",
    "privseg.policy.ingest",
    "privseg.yamltext",
}


def _imports() -> dict[str, set[str]]:
    """Every privseg module and the privseg modules it imports (at any depth of its code)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    graph: dict[str, set[str]] = {}
    for path in (root / "privseg").rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:  # relative: resolve against the package
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    base = ".".join([*package[: len(package) - node.level + 1], node.module])
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
        graph[module] = {m for m in found if m == "privseg" or m.startswith("privseg.")}
    return graph


def _is(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_dependencies_point_one_way() -> None:
    graph = _imports()
    modules = set(graph)
    upward = sorted((m, d) for m, deps in graph.items() if not _is(m, SHELLS) for d in deps if _is(d, SHELLS))
    assert upward == [], "services and core must not import the CLI, the API or the demo"
    core_out = sorted((m, d) for m in CORE for d in graph[m] if d in modules and d not in CORE and d != m)
    assert core_out == [], "core modules import only core modules"
    # The console stands beside the API (the app mounts it), not on it: it calls the services.
    console_on_api = sorted(
        (m, d)
        for m, deps in graph.items()
        if _is(m, ("privseg.console",))
        for d in deps
        if _is(d, ("privseg.api",))
    )
    assert console_on_api == []


def test_polars_runs_with_the_allocator_setting_privseg_gives_it() -> None:
    # privseg/__init__.py sets jemalloc's options before Polars loads (an ingest's system time: 6.0-7.4 s
    # under Polars' own, 3.8-5.3 s under these). stats_print, added after privseg set them, makes
    # jemalloc print the options it runs with when the process ends.
    import os
    import subprocess
    import sys

    def options(code: str, env: dict[str, str]) -> str:
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        return run.stderr

    env = {k: v for k, v in os.environ.items() if k != "_RJEM_MALLOC_CONF"}
    printed = options(
        "import os, privseg; os.environ['_RJEM_MALLOC_CONF'] += ',stats_print:true'; "
        "import polars as pl; pl.Series(range(10)).sum()",
        env,
    )
    assert "opt.dirty_decay_ms: 10000 " in printed and "opt.muzzy_decay_ms: 0 " in printed
    # An operator's own setting is left alone.
    printed = options(
        "import privseg, polars as pl; pl.Series(range(10)).sum()",
        {**env, "_RJEM_MALLOC_CONF": "dirty_decay_ms:2000,stats_print:true"},
    )
    assert "opt.dirty_decay_ms: 2000 " in printed and "opt.muzzy_decay_ms: 0 " not in printed
