"""The dependency pins OpenDP needs (../shared/OPENDP_NOTES.md)."""

from importlib.metadata import version

import polars as pl


def test_polars_is_the_version_opendp_requires() -> None:
    # OpenDP 0.16.0 refuses any other polars at run time; a resolver drifting the pin would break
    # every release, so fail here, early and clearly.
    assert version("opendp") == "0.16.0"
    assert pl.__version__ == "1.36.1"


def test_fastapi_is_imported_only_by_the_api_package() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "privseg"
    offenders = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if "api" not in p.relative_to(root).parts
        and ("import fastapi" in p.read_text() or "from fastapi" in p.read_text())
    ]
    assert offenders == []


def test_core_modules_do_not_import_the_shells() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "privseg"
    core = [
        "keyset",
        "pseudonym",
        "store",
        "db",
        "audit",
        "ingest_policy",
        "settings",
        "errors",
        "fsutil",
        "sources",
    ]
    for name in core:
        text = (root / f"{name}.py").read_text()
        for upper in ("privseg.cli", "privseg.api", "import typer", "privseg.ingest ", "privseg.maintenance"):
            assert upper not in text, f"{name}.py imports {upper}"
