"""Live intake benchmark: N small batches (1-3 messages) posted by 16 concurrent clients to a two-worker
`privseg serve`, a tenth resent, against the baseline of the same events ingested as one NDJSON file.

    .venv/bin/python benchmarks/intake.py --batches 10000

Checks that every unique message is stored exactly once (and that the file baseline stored the same
number of events), and reports batches/s, events/s and the per-event cost ratio intake / file.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, write_results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=10_000)
    args = parser.parse_args()

    import httpx2

    from privseg import apikeys
    from privseg.deployment import Deployment
    from privseg.ingest.files import ingest_files
    from privseg.keyset import create_keyset
    from tests.conftest import make_settings, running_server
    from tests.test_intake import track

    rng = random.Random(7)
    batches = [
        [track(f"CUST-{rng.randrange(5000)}") for _ in range(rng.randint(1, 3))] for _ in range(args.batches)
    ]
    sends = batches + rng.sample(batches, args.batches // 10)
    rng.shuffle(sends)
    unique = len({m["messageId"] for b in batches for m in b})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = make_settings(root / "intake")
        create_keyset(settings.keyset, "bench")
        dep = Deployment(settings)
        _, token = apikeys.create(dep.store.conn, dep.keyset, role="intake", name="pipeline")
        stored, lock = [0], threading.Lock()
        with running_server(settings, workers=2) as (base, _proc):

            def worker(share: list[list[dict[str, Any]]]) -> None:
                with httpx2.Client(
                    base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=300
                ) as c:
                    for batch in share:
                        r = c.post("/v1/intake/batch", json={"batch": batch})
                        r.raise_for_status()
                        with lock:
                            stored[0] += r.json()["stored"]

            t = time.perf_counter()
            threads = [threading.Thread(target=worker, args=(sends[i::16],)) for i in range(16)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            intake_s = time.perf_counter() - t
        events = dep.store.scan_events()
        assert events is not None and events.collect().height == unique == stored[0]
        dep.close()

        # Baseline: the same unique events as one NDJSON file, ingested in one call.
        base_settings = make_settings(root / "file")
        create_keyset(base_settings.keyset, "bench")
        base_dep = Deployment(base_settings)
        path = root / "events.ndjson"
        with open(path, "w") as fh:
            for b in batches:
                for m in b:
                    props = m["properties"]
                    row = {
                        "customer_id": m["userId"],
                        "ts": m["timestamp"],
                        "event_type": "purchase",
                        "value": props["revenue"],
                        "product_category": props["category"],
                        "campaign": m["context"]["campaign"]["name"],
                    }
                    fh.write(json.dumps(row) + "\n")
        t = time.perf_counter()
        ingest_files(
            store=base_dep.store,
            keyset=base_dep.keyset,
            policy=base_dep.ingest_policy,
            kind="events",
            paths=[path],
        )
        file_s = time.perf_counter() - t
        file_events = base_dep.store.scan_events()
        assert file_events is not None and file_events.collect().height == unique
        base_dep.close()
    rows = [
        ["intake (HTTP, 16 clients, 2 workers)", len(sends), unique, f"{intake_s:.1f}"],
        ["one NDJSON file (ingest_files)", 1, unique, f"{file_s:.2f}"],
    ]
    rows[0] += [f"{len(sends) / intake_s:.0f}", f"{unique / intake_s:.0f}"]
    rows[1] += ["-", f"{unique / file_s:.0f}"]
    print_table(["path", "requests", "events stored", "seconds", "requests/s", "events/s"], rows)
    print(f"per-event cost, intake / file: {intake_s / file_s:.0f}x")
    path_out = write_results(
        "intake",
        {
            "batches": args.batches,
            "sends": len(sends),
            "unique_events": unique,
            "intake_s": intake_s,
            "file_s": file_s,
        },
    )
    print(f"results: {path_out}")


if __name__ == "__main__":
    main()
