"""Privacy invariants of the foundation: no raw identifier, and no key byte, anywhere it could leak."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import polars as pl

from privseg.demo_data import DemoFiles
from privseg.settings import Settings
from tests.conftest import run_cli


def _raw_identifiers(demo: DemoFiles) -> dict[str, list[str]]:
    customers = pl.read_csv(demo.customers, infer_schema=False)
    events = pl.read_csv(demo.events, infer_schema=False)
    return {
        "customer_id": customers.get_column("customer_id").to_list(),
        "email": [e.strip() for e in customers.get_column("email").to_list()]
        + [e.strip().lower() for e in customers.get_column("email").to_list()],
        "phone": customers.get_column("phone").to_list(),
        "phone_digits": [
            "".join(c for c in p if c.isdigit()) for p in customers.get_column("phone").to_list()
        ],
        "ip": sorted(set(events.get_column("ip_address").to_list())),
    }


def _all_bytes(root: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def _parquet_text(root: Path) -> str:
    """Decoded content of every stored Parquet file (raw bytes are compressed, so scan values too)."""
    parts = []
    for f in sorted(root.rglob("*.parquet")):
        df = pl.read_parquet(f)
        parts.append(
            df.select(
                pl.col(name).list.join("|") if isinstance(dtype, pl.List) else pl.col(name).cast(pl.String)
                for name, dtype in df.schema.items()
            ).write_csv()
        )
    return "\n".join(parts)


def test_no_raw_identifier_in_store_database_logs_or_output(
    settings: Settings, demo_files: DemoFiles
) -> None:
    data = settings.home.parent / "incoming"
    data.mkdir()
    shutil.copy(demo_files.customers, data / "customers.csv")
    shutil.copy(demo_files.events, data / "events.csv")
    outputs = [run_cli(settings, "keys", "init", "--namespace", "scan")]
    outputs.append(run_cli(settings, "demo", "--data", str(data)))
    outputs.append(run_cli(settings, "store", "status", "--json"))
    outputs.append(run_cli(settings, "audit", "show", "--json"))
    outputs.append(run_cli(settings, "erase", "--id", "-", stdin="C000000007\n"))
    outputs.append(run_cli(settings, "keys", "rotate"))
    outputs.append(run_cli(settings, "store", "compact"))
    outputs.append(run_cli(settings, "segments", "compute", "--json"))
    outputs.append(run_cli(settings, "segments", "status", "--json"))
    # A refused batch must not echo what it refused.
    bad = data / "bad.csv"
    bad.write_text("customer_id,gender\nC000000001,leaked-C000000002@example.com\n")
    refused = run_cli(settings, "ingest", "profiles", str(bad), check=False)
    assert refused.returncode == 2 and "not one of" in refused.stderr
    outputs.append(refused)

    ids = _raw_identifiers(demo_files)
    assert all(len(v) > 100 or k == "ip" for k, v in ids.items())
    # Positive control: the same scan finds every needle in the raw source files.
    source = (demo_files.customers.read_text() + demo_files.events.read_text()).lower()
    for kind, values in ids.items():
        if kind != "phone_digits":
            assert all(v.lower() in source for v in values), kind
    stored_bytes = _all_bytes(settings.home / "data") + b"".join(
        p.read_bytes() for p in settings.home.glob("privseg.db*")
    )
    stored_text = _parquet_text(settings.home / "data")
    logs = settings.log_file.read_text()  # type: ignore[union-attr]
    assert "ingest" in logs  # the log really captured the run (DEBUG level)
    shown = "\n".join(o.stdout + o.stderr for o in outputs) + logs
    for kind, values in ids.items():
        for value in values:
            needle = value.encode()
            assert needle not in stored_bytes, f"raw {kind} in store bytes"
            assert value not in stored_text, f"raw {kind} in stored values"
            assert value not in shown, f"raw {kind} in output or logs"
    assert "C000000002" not in shown
    # Nothing person-level either: no pseudonym appears in any output or log line.
    assert re.search(r"k\d+\.[A-Za-z0-9_-]{20,}", shown) is None


def test_key_material_never_reaches_output_logs_or_store(settings: Settings) -> None:
    outputs = [run_cli(settings, "keys", "init")]
    outputs.append(run_cli(settings, "demo", "--customers", "300"))
    outputs.append(run_cli(settings, "keys", "rotate"))
    outputs.append(run_cli(settings, "keys", "status", "--json"))
    doc = json.loads(settings.keyset.read_text())
    secrets = [k["key"] for k in doc["pseudonym_keys"]] + [doc["audit_key"]]
    raw = [base64.b64decode(s) for s in secrets]
    settings.keyset.chmod(0o644)  # an unsafe keyset: the error must not quote it
    outputs.append(run_cli(settings, "keys", "status", check=False))
    assert outputs[-1].returncode == 2 and "chmod 600" in outputs[-1].stderr
    settings.keyset.chmod(0o600)
    shown = "\n".join(o.stdout + o.stderr for o in outputs) + settings.log_file.read_text()  # type: ignore[union-attr]
    stored = _all_bytes(settings.home)
    for s, r in zip(secrets, raw, strict=True):
        assert s not in shown and s[:12] not in shown
        assert r.hex() not in shown
        assert r not in stored and s.encode() not in stored
    status = json.loads(outputs[3].stdout)
    assert status["primary"] == 2 and status["store_key_version"] == 2
