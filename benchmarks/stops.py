"""Where a policy's BoxNav-v1 rollouts end, against the operator's own driving of the same rooms.

    .venv/bin/vla-pipeline rollout POLICY --episodes 48 --seed 11 --no-baselines --json > rollouts.jsonl
    .venv/bin/python benchmarks/stops.py rollouts.jsonl [--keys]

Counts every rollout that ended with a stop by how it was lined up (the target within 0.3 m to the
side, a strafe press off (0.3–0.8 m) or more) and how far ahead the target was (the arrival's
0.6–1.15 m, a press early (up to 1.7 m), earlier, a press late (0.3–0.6 m) or later); the other
endings by outcome. `--keys` also prints each rollout's presses beside the operator's
(`varied.operator_keys`): w forward, a / d strafe left / right, `.` none.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys

from vla_pipeline.sim import varied
from vla_pipeline.sim.scene import STEP


def pressed(path: list) -> str:
    keys = []
    for (x0, y0), (x1, y1) in zip(path, path[1:]):
        key = ("w" if x1 - x0 > STEP / 2 else "s" if x1 - x0 < -STEP / 2 else "")
        key += "a" if y1 - y0 > STEP / 2 else "d" if y1 - y0 < -STEP / 2 else ""
        keys.append(key or ".")
    return "".join(keys)


def ending(record: dict) -> str:
    if record["outcome"] not in ("success", "stopped_away"):
        return record["outcome"]
    (x, y), (tx, ty) = record["path"][-1], record["target_xy"]
    side = abs(ty - y)
    lined = "lined up" if side <= 0.3 else "a strafe off" if side <= 0.8 else "more than a strafe off"
    ahead, (near, far) = tx - x, varied.ARRIVAL_DISTANCE
    if near <= ahead <= far:
        distance = "at the arrival distance"
    elif ahead > far:
        distance = "a press early" if ahead <= 1.7 else "earlier"
    else:
        distance = "a press late" if ahead >= 0.3 else "later"
    return f"{lined}, {distance}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rollouts", help="`vla-pipeline rollout --json` output ('-': stdin)")
    parser.add_argument("--keys", action="store_true", help="each rollout's presses beside the operator's")
    args = parser.parse_args()
    lines = sys.stdin if args.rollouts == "-" else open(args.rollouts)
    records = [json.loads(line) for line in lines if line.startswith("{")]
    records = [r for r in records if r.get("driver", "policy") == "policy" and "path" in r]
    if not records:
        print("no policy rollouts in the input: run `vla-pipeline rollout ... --json`", file=sys.stderr)
        return 1
    for record in records if args.keys else []:
        operator = varied.operator_keys(record["obstacles"], record["target_xy"], record["side"])
        (x, y), target = record["path"][-1], record["target_xy"]
        print(f"{record['outcome']:<13} operator {operator:<24} policy {pressed(record['path']):<30} "
              f"{math.dist((x, y), target):.2f} m from the target")
    counts = collections.Counter(ending(record) for record in records)
    print(f"{len(records)} rollouts:")
    for name, count in counts.most_common():
        print(f"{count:>4}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
