"""The evaluation as people read it: markdown tables and plots, written to a folder."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .metrics import DIRECTIONS, STEPS
from ..data.schema import ACTION_DIMS

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
PREDICTIONS_PLOT = "predictions.png"
CONFUSION_PLOT = "confusion.png"
PLOTTED_EPISODES = 3

if TYPE_CHECKING:  # evaluate imports torch; the report does not need it
    from .evaluate import Evaluation


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Table:
    """A table as data: rendered to markdown for report.md, to a Dagster table for the UI."""

    header: list[str]
    rows: list[list]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |",
                 "| " + " | ".join(["---"] + ["---:"] * (len(self.header) - 1)) + " |"]
        lines += ["| " + " | ".join(_number(cell) for cell in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def cells(self) -> list[list[str]]:
        """Every cell as display text (numbers rounded as in the markdown)."""
        return [[_number(cell) for cell in row] for row in self.rows]


def summary_table(result: dict, steps: str = "first") -> Table:
    """Model against the baselines on direction accuracy and errors, for the first step of the
    chunk (the command sent) or all its steps, with the scripted replay when it was scored; the
    last rows are the margins over the best constant baseline and over the replay (accuracy
    gained, MSE saved: positive is better)."""
    contenders = {"model": result["model"], **{f"baseline: {k}": v for k, v in result["baselines"].items()}}
    if result.get("scripted_replay"):
        contenders["scripted replay"] = result["scripted_replay"]
    rows = [[name, scored[steps]["direction_accuracy"], scored[steps]["mse"], scored[steps]["mae"]]
            for name, scored in contenders.items()]
    margin = result["margin"][steps]
    rows.append(["margin over best constant", margin["direction_accuracy_margin"], margin["mse_margin"], None])
    if result.get("margin_over_replay"):
        rows.append(["margin over replay", result["margin_over_replay"][steps],
                     result["scripted_replay"][steps]["mse"] - result["model"][steps]["mse"], None])
    return Table(["predictor", "dir. acc", "MSE", "MAE"], rows)


def per_dimension_table(result: dict) -> Table:
    rows = [[steps, dim, *(result["model"][steps][f"{m}_{dim}"] for m in ("mse", "mae", "rmse"))]
            for steps in STEPS for dim in ACTION_DIMS]
    return Table(["steps", "action", "MSE", "MAE", "RMSE"], rows)


def per_class_table(result: dict, steps: str = "first") -> Table:
    scored = result["model"][steps]
    rows = [[name, scored["support"][name], scored["recall"][name], scored["precision"][name]] for name in DIRECTIONS]
    return Table(["class", "true count", "recall", "precision"], rows)


def confusion_table(result: dict, steps: str = "first") -> Table:
    confusion = result["model"][steps]["confusion"]
    return Table(["recorded \\ predicted", *DIRECTIONS], [[name, *row] for name, row in zip(DIRECTIONS, confusion)])


def group_table(groups: dict, label: str) -> Table:
    return Table([label, "predictions", "dir. acc", "MAE"],
                 [[name, g["predictions"], g["direction_accuracy"], g["mae"]] for name, g in groups.items()])


def sensitivity_table(sensitivity: dict) -> Table | None:
    """None when there were no left/right validation episodes to swap."""
    if not sensitivity.get("predictions"):
        return None
    return Table(["steps", "linear_y sign flips", "mean abs change"],
                 [[steps, sensitivity[f"flip_fraction_{steps}"], sensitivity[f"mean_abs_change_{steps}"]]
                  for steps in STEPS])


NO_SENSITIVITY = "No left/right validation episodes: instruction sensitivity not measured."


def sight_table(sight: dict) -> Table:
    """First-step direction accuracy on the real frames and on each sight ablation, with its drop
    from the real; the last row is `sight_reliance`, the smaller drop."""
    other = sight["other_episodes"]
    rows = [["real frames", sight["real"], None],
            ["first frame only", sight["first_frame"], sight["real"] - sight["first_frame"]],
            ["another episode's frames", other if other is not None else f"not run: {sight['other_episodes_skipped']}",
             sight["real"] - other if other is not None else None],
            ["sight reliance (smaller drop)", None, sight["drop"]]]
    return Table(["frames shown", "dir. acc", "drop"], rows)


def markdown(result: dict) -> str:
    sensitivity = sensitivity_table(result["instruction_sensitivity"])
    return "\n\n".join([
        f"## Evaluation on {result['episodes']} validation episodes, {result['predictions']} predictions "
        f"(window {result['window']}, chunk {result['chunk']}, dead band {result['dead_band']} × {result['action_scale']})",
        "### Model against the baselines, first step (the command sent)", summary_table(result).markdown(),
        "### Model against the baselines, all chunk steps", summary_table(result, "all").markdown(),
        "### Errors per action dimension (robot units)", per_dimension_table(result).markdown(),
        "### Direction classes, first step", per_class_table(result).markdown(), confusion_table(result).markdown(),
        "### Instruction sensitivity (left ↔ right swapped in the instruction; linear_y)", sensitivity.markdown() if sensitivity else NO_SENSITIVITY,
        *(["### Sight ablations, first step (the instruction kept)", sight_table(result["sight_reliance"]).markdown()]
          if result.get("sight_reliance") else []),
        "### By side, first step", group_table(result["by_side"], "side").markdown(),
        "### By scenario, first step", group_table(result["by_scenario"], "scenario").markdown(),
    ]) + "\n"


def plot_predictions(evaluation: Evaluation, path: Path) -> Path:
    """First-step predicted vs recorded linear_x / linear_y along a few validation episodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    episodes = evaluation.episodes[:PLOTTED_EPISODES]
    fig, axes = plt.subplots(len(episodes), 2, figsize=(5.2, 2.0 * len(episodes)), squeeze=False, sharey=True)
    for row, episode in zip(axes, episodes):
        for dim, ax in enumerate(row):
            ax.step(episode.frames, episode.true[:, 0, dim], where="mid", label="recorded", color="black")
            ax.plot(episode.frames, episode.pred[:, 0, dim], marker="o", markersize=3, label="predicted", color="tab:orange")
            ax.set_title(f"{episode.episode_id.removeprefix('episode_')[:32]} · {ACTION_DIMS[dim]}", fontsize=7)
            ax.axhline(0, color="grey", linewidth=0.5)
    axes[0][0].legend(fontsize=7)
    axes[-1][0].set_xlabel("frame")
    axes[-1][1].set_xlabel("frame")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_confusion(result: dict, path: Path, steps: str = "first") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = np.asarray(result["model"][steps]["confusion"])
    fig, ax = plt.subplots(figsize=(5, 4.2))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(DIRECTIONS)), DIRECTIONS)
    ax.set_yticks(range(len(DIRECTIONS)), DIRECTIONS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("recorded")
    ax.set_title(f"direction classes ({steps} step), accuracy {result['model'][steps]['direction_accuracy']:.2f}")
    for (i, j), count in np.ndenumerate(confusion):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                    color="white" if count > confusion.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_report(evaluation: Evaluation, directory: Path | str) -> Path:
    """metrics.json, report.md and the two plots in `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / METRICS_FILE).write_text(evaluation.to_json() + "\n")
    (directory / REPORT_FILE).write_text(markdown(evaluation.metrics))
    plot_predictions(evaluation, directory / PREDICTIONS_PLOT)
    plot_confusion(evaluation.metrics, directory / CONFUSION_PLOT)
    return directory


def inline_image(path: Path, title: str) -> str:
    """Markdown with the PNG embedded (Dagster's UI renders it in the asset's metadata)."""
    return f"![{title}](data:image/png;base64,{base64.b64encode(Path(path).read_bytes()).decode()})"
