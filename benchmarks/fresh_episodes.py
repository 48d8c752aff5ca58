"""A registered policy on episodes it has never seen, through `vla-pipeline predict` alone.

    .venv/bin/python benchmarks/fresh_episodes.py [--model-uri models:/mobile-vla@champion] [-n 12] [--seed 7]

Writes N sample episodes of another seed than the demo's (`vla-pipeline sample-episodes`), runs
`vla-pipeline predict` on each twice — with its own instruction and with left and right swapped —
and scores the JSON lines it prints, as a user would:
  accuracy  first-step direction class of the prediction vs the recorded action, over every frame
            but `episode_start` (whose zero action is no key press)
  majority  the share of the most common recorded class (always predicting it scores this)
  flip      among frames where either prediction strafes, the share strafing to opposite sides
Exit code 1 if accuracy < majority + 0.10 or flip < 0.80 (the demo's acceptance).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from vla_pipeline.evaluation.metrics import DIRECTIONS, direction_classes
from vla_pipeline.data.schema import mirror_instruction

CLI = str(Path(sys.executable).with_name("vla-pipeline"))


def predict(model_uri: str, episode: Path, instruction: str | None = None) -> list[dict]:
    command = [CLI, "predict", "--model-uri", model_uri, str(episode)]
    if instruction:
        command += ["--instruction", instruction]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def side(direction: str) -> str | None:
    return "left" if "L" in direction else "right" if "R" in direction else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default="models:/mobile-vla@champion")
    parser.add_argument("-n", type=int, default=12, help="fresh episodes (default 12)")
    parser.add_argument("--seed", type=int, default=7, help="their seed (default 7; the demo uses 0)")
    parser.add_argument("--action-scale", type=float, default=1.15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([CLI, "sample-episodes", folder, "-n", str(args.n), "--seed", str(args.seed)],
                       check=True, capture_output=True)
        correct, recorded, flips, strafing = 0, collections.Counter(), 0, 0
        for episode in sorted(Path(folder).glob("*.h5")):
            rows = predict(args.model_uri, episode)
            swapped = predict(args.model_uri, episode, mirror_instruction(rows[0]["instruction"]))
            for row, other in zip(rows, swapped):
                if row["event"] == "episode_start":
                    continue
                truth = DIRECTIONS[int(direction_classes(row["recorded"], args.action_scale))]
                recorded[truth] += 1
                correct += row["direction"] == truth
                sides = {side(row["direction"]), side(other["direction"])}
                if sides != {None}:
                    strafing += 1
                    flips += sides == {"left", "right"}
    total = sum(recorded.values())
    accuracy, (majority_class, majority) = correct / total, recorded.most_common(1)[0]
    majority /= total
    flip = flips / max(strafing, 1)
    print(f"{args.model_uri} on {args.n} fresh episodes (seed {args.seed}), {total} scored frames")
    print(f"first-step direction accuracy {accuracy:.3f}; majority class {majority_class} {majority:.3f}; "
          f"margin {accuracy - majority:+.3f} (needs ≥ +0.10)")
    print(f"instruction flip {flip:.3f} ({flips} of {strafing} strafing predictions; needs ≥ 0.80)")
    return 0 if accuracy >= majority + 0.10 and flip >= 0.80 else 1


if __name__ == "__main__":
    sys.exit(main())
