"""What every Dagster process pays before it does any work: importing the code location.

    .venv/bin/python benchmarks/startup.py [--repeat 5]

The code server, every run worker and every step process import `vla_pipeline.definitions`.
Each row is the fastest of --repeat fresh interpreters, measured in the same run:
  import dagster                    the floor: Dagster itself
  import vla_pipeline.definitions   the code location                 target <= 2x import dagster
and the heavy libraries the code location import left loaded (target: none). Always exits 0.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "accelerate", "mlflow", "matplotlib")


def import_seconds(module: str, repeat: int) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return min(float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                    check=True).stdout) for _ in range(repeat))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="fresh interpreters per row (default 5)")
    args = parser.parse_args()
    dagster_s = import_seconds("dagster", args.repeat)
    definitions_s = import_seconds("vla_pipeline.definitions", args.repeat)
    code = f"import sys, vla_pipeline.definitions; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    print(f"{'import dagster':<34} {dagster_s:6.2f} s")
    print(f"{'import vla_pipeline.definitions':<34} {definitions_s:6.2f} s   "
          f"{definitions_s / dagster_s:.2f}x import dagster (target <= 2x)")
    print(f"heavy libraries loaded by the code location: {loaded.stdout.strip() or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
