"""Training in several processes on one machine (one per GPU), through torchrun.

`train()` itself is multi-process aware (accelerate: sharded loaders, gathered validation
loss, main-process writes behind barriers); this module is the entry point torchrun starts in
every process, and the launcher that starts torchrun and streams its log lines back:

    python -m torch.distributed.run --standalone --nproc_per_node 4 \\
        -m vla_pipeline.training.launch SPEC.json

SPEC.json holds what `train()` takes (policy and training config, store, split, output folder,
device, precision, batch size). The main process writes `result.json` beside the policy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from ..data.atomic import write_text

RESULT_FILE = "result.json"
SPEC_FILE = "launch.json"


def write_spec(output_dir: Path | str, policy_config: dict, train_config: dict, store_path: str,
               train_ids: list[str], val_ids: list[str], device: str = "auto", precision: str = "auto",
               batch_size: str | None = None) -> Path:
    """The training's arguments as JSON in `output_dir` (what every process reads)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    spec = output_dir / SPEC_FILE
    spec.write_text(json.dumps({
        "policy": policy_config, "train": train_config, "store": str(store_path),
        "train_ids": list(train_ids), "val_ids": list(val_ids), "output_dir": str(output_dir),
        "device": device, "precision": precision, "batch_size": batch_size,
    }, indent=1))
    return spec


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the launching process dies (Linux), so a killed
    Dagster run leaves no training behind. torchrun passes the signal on to its workers."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def launch_command(spec: Path, processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "vla_pipeline.training.launch", str(spec)]


def run_distributed(spec: Path, processes: int, log: Callable[[str], None] = print):
    """Run the training in `spec` in `processes` processes; stream the main process's lines to
    `log`; return its TrainResult. Raises RuntimeError (with the last lines) if it fails."""
    from .train import TrainResult

    # One CPU thread per process unless set: N processes share the machine's cores.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    command = launch_command(spec, processes)
    log(f"launching {processes} training processes: {' '.join(command[1:])}")
    tail: deque[str] = deque(maxlen=40)
    failures: list[str] = []  # each failed process's one-line reason (main() below prints it)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          preexec_fn=_die_with_parent) as child:
        try:
            for line in child.stdout:
                line = line.rstrip()
                tail.append(line)
                if line.startswith("[rank") and "] FAILED " in line:
                    failures.append(line)
                elif line.startswith("[rank0] "):  # the main process's lines: the run log
                    log(line[len("[rank0] "):])
        except BaseException:
            child.terminate()
            raise
    if child.returncode != 0:
        reasons = "\n".join(failures) or f"torchrun exited with {child.returncode}"
        raise RuntimeError(f"distributed training failed:\n{reasons}\nits last output lines:\n" + "\n".join(tail))
    data = json.loads((Path(json.loads(spec.read_text())["output_dir"]) / RESULT_FILE).read_text())
    return TrainResult(**{**data, "output_dir": Path(data["output_dir"])})


def main(argv: list[str] | None = None) -> int:
    """One process's training (started by torchrun)."""
    from ..policy.policy_config import PolicyConfig
    from .compute import plan_compute
    from .train import TrainConfig, train

    (spec_path,) = argv if argv is not None else sys.argv[1:]
    spec = json.loads(Path(spec_path).read_text())
    rank = os.environ.get("RANK", "0")

    def log(line: str) -> None:
        print(f"[rank{rank}] {line}", flush=True)

    try:
        result = train(
            PolicyConfig.from_dict(spec["policy"]), TrainConfig(**spec["train"]), spec["store"],
            spec["train_ids"], spec["val_ids"], spec["output_dir"],
            compute=plan_compute(spec["device"], spec["precision"], spec["batch_size"]), log=log,
        )
    except Exception as error:  # one line the launcher reports, then the traceback
        log(f"FAILED {type(error).__name__}: {error}")
        traceback.print_exc()
        return 1
    if rank == "0":
        data = {**asdict(result), "output_dir": str(result.output_dir)}  # NaN stays NaN (Python's json)
        write_text(Path(spec["output_dir"]) / RESULT_FILE, json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
