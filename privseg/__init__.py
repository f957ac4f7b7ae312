"""privseg: privacy-preserving customer segmentation."""

import os

__version__ = "0.1.0"

# Polars allocates through its own jemalloc, which reads this once, when Polars loads (privseg is
# imported first by the CLI, the server and its workers, which also inherit it). Polars' own setting
# hands freed pages back to the system within a second or two (dirty 500 ms, muzzy 1,000 ms), and
# every stage of an ingest (read, validate, pseudonymize, sort, write) frees what the one before
# allocated, so the kernel kept unmapping and faulting the same memory. Kept 10 s (jemalloc's own
# default) and then returned outright (muzzy 0: no MADV_FREE pages lingering in RSS), an ingest of 1M
# customers and 10.4M events spent 3.8-5.3 s of system time instead of 6.0-7.4 s and took 7-17% less
# wall time (4 alternated pairs), for 5% more peak memory (benchmarks/ingest.py --phase privseg
# under /usr/bin/time). An operator's own value is kept.
os.environ.setdefault("_RJEM_MALLOC_CONF", "background_thread:true,dirty_decay_ms:10000,muzzy_decay_ms:0")
