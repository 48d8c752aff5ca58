"""Training in several processes on one machine (one per GPU), through torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 4 \\
        -m vla_pipeline.training.launch SPEC.json

`train()` itself is multi-process aware (accelerate: sharded loaders, gathered validation loss,
main-process writes behind barriers); this module is the entry point torchrun starts in every
process. Launched by Dagster (`lora_adapter`, through `dg.PipesSubprocessClient`), the main
process reports its log lines and, at the end, its TrainResult through dagster-pipes; started by
hand, every process prints. A process that fails writes its reason beside the training
(`failed-rank<N>.txt`), where the launcher finds it. torchrun starts each process in a session of
its own, so a launcher killed outright (SIGKILL, the OOM killer) would leave them training on,
racing the run that retries: each process asks the kernel to kill it when its launcher dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import signal
import sys
import traceback
from dataclasses import asdict
from pathlib import Path

SPEC_FILE = "launch.json"
FAILURE_FILE = "failed-rank{rank}.txt"


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


def launch_command(spec: Path, processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "vla_pipeline.training.launch", str(spec)]


def output_dir_of(spec: Path) -> Path:
    return Path(json.loads(Path(spec).read_text())["output_dir"])


def clear_failures(spec: Path) -> None:
    """Forget the failures of an earlier launch of `spec` (before launching it again)."""
    for path in output_dir_of(spec).glob(FAILURE_FILE.format(rank="*")):
        path.unlink(missing_ok=True)


def failure_reasons(spec: Path) -> list[str]:
    """`rank N: Type: message` for every process of the last launch of `spec` that failed."""
    return [f"rank {path.stem.removeprefix('failed-rank')}: {path.read_text().strip()}"
            for path in sorted(output_dir_of(spec).glob(FAILURE_FILE.format(rank="*")))]


def result_from_report(report: dict):
    """The TrainResult the main process reported (`report_custom_message`)."""
    from .train import TrainResult

    values = {key: (math.nan if value is None and key in ("steady_windows_per_s", "peak_memory_gib") else value)
              for key, value in report.items()}
    return TrainResult(**{**values, "output_dir": Path(values["output_dir"])})


def _report(result) -> dict:
    """The TrainResult as JSON types (NaN as null: the message channel is strict JSON)."""
    return {key: (None if isinstance(value, float) and math.isnan(value) else value)
            for key, value in {**asdict(result), "output_dir": str(result.output_dir)}.items()}


def die_with_launcher() -> None:
    """Be killed (SIGKILL) when the process that started this one dies; Linux only.

    If the launcher died before the request took effect, this process has already been handed
    to another parent: it exits at once."""
    if not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    pr_set_pdeathsig = 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != launcher:
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    """One process's training (started by torchrun)."""
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        die_with_launcher()
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    from ..policy.policy_config import PolicyConfig
    from .compute import plan_compute
    from .train import train
    from .train_config import TrainConfig

    (spec_path,) = argv if argv is not None else sys.argv[1:]
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    failure = Path(spec["output_dir"]) / FAILURE_FILE.format(rank=rank)
    failure.unlink(missing_ok=True)
    with contextlib.ExitStack() as stack:
        # The main process speaks for all of them: to Dagster when launched through Pipes.
        pipes = (stack.enter_context(open_dagster_pipes())
                 if rank == 0 and PipesEnvVarParamsLoader().is_dagster_pipes_process() else None)

        def log(line: str) -> None:
            if pipes is not None:
                pipes.log.info(line)
            else:
                print(f"[rank{rank}] {line}", flush=True)

        try:
            result = train(
                PolicyConfig.from_dict(spec["policy"]), TrainConfig(**spec["train"]), spec["store"],
                spec["train_ids"], spec["val_ids"], spec["output_dir"],
                compute=plan_compute(spec["device"], spec["precision"], spec["batch_size"]), log=log,
            )
        except Exception as error:
            failure.write_text(f"{type(error).__name__}: {error}\n")
            traceback.print_exc()
            return 1
        if pipes is not None:
            pipes.report_custom_message(_report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
