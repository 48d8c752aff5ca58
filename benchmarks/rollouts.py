"""Closed-loop rollout throughput: the model-free baselines (and a policy) at the collector's 720p.

    .venv/bin/python benchmarks/rollouts.py [--episodes 48] [--seed 0] [--envs 1 2 4] [--height 720 --width 1280]
                                            [--policy MODEL_URI] [--env vla_pipeline/BoxNav-v1]

--policy adds the policy (a registry URI, a policy directory or a bundle) as a fourth driver, loaded
once before the clock starts.

For each number of environments (1: the env in this process; more: gymnasium's AsyncVectorEnv,
forkserver workers, drivers in this process) every baseline drives the same plan; a row gives
its wall time, including the workers' start, rollouts/s and presses/s (a press renders one frame).
`start s` is the time to start and close that many workers alone. Then the baselines' scores over
the plan, and whether every parallel run gave the serial run's results. Exits 1 if one did not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from vla_pipeline.sim.operator import SAMPLE_WORLD
from vla_pipeline.sim.rollout import BASELINES, ROLLOUT_OUTCOMES, open_envs, plan, run_rollouts, summarise


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--envs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--env", default=SAMPLE_WORLD, help=f"the world to drive in (default {SAMPLE_WORLD})")
    parser.add_argument("--policy", help="also drive this policy (models:/…, a policy directory or a bundle)")
    args = parser.parse_args()
    drivers = dict(BASELINES)
    if args.policy:
        from vla_pipeline.evaluation.closed_loop import PolicyDriver
        from vla_pipeline.evaluation.registry import load_policy

        loaded = load_policy(args.policy)
        drivers["policy"] = lambda: PolicyDriver(loaded)
    env_kwargs = {"height": args.height, "width": args.width}
    rollouts = plan(args.episodes, args.seed)
    print(f"{args.episodes} rollouts per driver at {args.height}x{args.width}, plan seed {args.seed}, "
          f"{os.cpu_count()} CPUs")
    print("| envs | start s | driver | rollouts | presses | wall s | rollouts/s | presses/s |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    first, scores, same = {}, {}, True
    for envs in args.envs:
        started = time.perf_counter()
        open_envs(envs, env_kwargs, env_id=args.env).close()
        start_s = time.perf_counter() - started
        for name, driver in drivers.items():
            started = time.perf_counter()
            results = run_rollouts(driver, rollouts, envs=envs, env_kwargs=env_kwargs, env_id=args.env)
            wall = time.perf_counter() - started
            presses = sum(r.presses for r in results)
            print(f"| {envs} | {start_s:.1f} | {name} | {len(results)} | {presses} | {wall:.1f} | "
                  f"{len(results) / wall:.2f} | {presses / wall:.1f} |", flush=True)
            records = [r.to_dict() for r in results]
            scores.setdefault(name, summarise(results))
            first.setdefault(name, records)
            same = same and records == first[name]
    outcomes = ROLLOUT_OUTCOMES[1:]
    print("\n| driver | success | SPL | " + " | ".join(o.replace("_", " ") for o in outcomes) + " |")
    print("| --- | ---: | ---: |" + " ---: |" * len(outcomes))
    for name, summary in scores.items():
        print(f"| {name} | {summary['success_rate']:.3f} | {summary['spl']:.3f} | "
              + " | ".join(f"{summary[f'{o}_rate']:.3f}" for o in outcomes) + " |")
    print(f"\nevery run gave the first run's results: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
