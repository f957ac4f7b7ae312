"""CLI cold start: `privseg --help` against the floor of any Typer CLI in the same interpreter.

    .venv/bin/python benchmarks/cli_startup.py [--runs 15]

Each command runs in a fresh process (cold imports); medians of ``--runs``. The baseline is a Typer
app with one command printing its help: what a CLI built on the same library cannot beat. Also
reported: `privseg budget --json` on an empty temporary deployment (it must load policies and open
the database, so it pulls in the data stack).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, write_results

HERE = Path(__file__).resolve()
TYPER_FLOOR = (
    "import typer\napp = typer.Typer(add_completion=False)\n@app.command()\ndef hello() -> None:\n"
    "    'Say hello.'\n@app.command()\ndef bye() -> None:\n    'Say bye.'\napp(['--help'])\n"
)
# The same app with Click's plain help, as privseg prints it (rich_markup_mode=None): the floor for
# its --help. And a one-option command run for real: the floor for `privseg budget --json` (Typer
# coerces options through pydantic).
TYPER_PLAIN_FLOOR = TYPER_FLOOR.replace("add_completion=False", "add_completion=False, rich_markup_mode=None")
TYPER_OPTION_FLOOR = (
    "import typer\napp = typer.Typer(add_completion=False)\n@app.command()\n"
    "def hello(as_json: bool = typer.Option(False, '--json')) -> None:\n"
    "    print('{}' if as_json else 'hi')\n"
    "@app.command()\ndef bye() -> None:\n    'Say bye.'\napp(['hello', '--json'])\n"
)


def _time(cmd: list[str], runs: int, env: dict[str, str] | None = None) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=False, capture_output=True, env=env)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    py = sys.executable
    privseg = str(Path(py).with_name("privseg"))
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "PRIVSEG_HOME": str(Path(tmp) / "home"),
            "PRIVSEG_KEYSET": str(Path(tmp) / "keys" / "keyset.json"),
            "PRIVSEG_POLICY_DIR": str(HERE.parent.parent / "policies"),
        }
        subprocess.run([privseg, "keys", "init"], check=True, capture_output=True, env=env)
        rows = {
            "python -c pass": _time([py, "-c", "pass"], args.runs),
            "typer floor (2 commands, --help)": _time([py, "-c", TYPER_FLOOR], args.runs),
            "typer floor, plain help": _time([py, "-c", TYPER_PLAIN_FLOOR], args.runs),
            "typer floor, a command with --json": _time([py, "-c", TYPER_OPTION_FLOOR], args.runs),
            "privseg --help": _time([privseg, "--help"], args.runs),
            "privseg budget --json": _time([privseg, "budget", "--json"], args.runs, env),
        }
    floor = rows["typer floor (2 commands, --help)"]
    print_table(
        ["command", "median ms", "x typer floor"],
        [[k, f"{v:.0f}", f"{v / floor:.2f}"] for k, v in rows.items()],
    )
    path = write_results("cli_startup", {"runs": args.runs, "median_ms": rows})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
