"""The evaluation as people read it: markdown tables and plots, written to a folder."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from .evaluate import Evaluation
from .metrics import DIRECTIONS, STEPS
from ..data.schema import ACTION_DIMS

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
PREDICTIONS_PLOT = "predictions.png"
CONFUSION_PLOT = "confusion.png"
PLOTTED_EPISODES = 3


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(_number(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(result: dict) -> str:
    """Model against the constant baselines: direction accuracy and errors, first step and all steps."""
    header = ["predictor"] + [f"{key} ({steps})" for steps in STEPS for key in ("direction acc", "MSE", "MAE")]
    contenders = {"**model**": result["model"], **{f"baseline: {k}": v for k, v in result["baselines"].items()}}
    rows = [[name] + [scored[s][k] for s in STEPS for k in ("direction_accuracy", "mse", "mae")]
            for name, scored in contenders.items()]
    margin = result["margin"]  # accuracy gained, MSE saved: positive is better than every baseline
    rows.append(["margin over best baseline"] + [
        value for s in STEPS for value in (margin[s]["direction_accuracy_margin"], margin[s]["mse_margin"], None)
    ])
    return _table(header, rows)


def per_dimension_table(result: dict) -> str:
    header = ["steps", *(f"{m} {d}" for d in ACTION_DIMS for m in ("MSE", "MAE", "RMSE"))]
    rows = [[steps, *(result["model"][steps][f"{m}_{d}"] for d in ACTION_DIMS for m in ("mse", "mae", "rmse"))]
            for steps in STEPS]
    return _table(header, rows)


def per_class_table(result: dict, steps: str = "first") -> str:
    scored = result["model"][steps]
    rows = [[name, scored["support"][name], scored["recall"][name], scored["precision"][name]] for name in DIRECTIONS]
    return _table(["class", "true count", "recall", "precision"], rows)


def confusion_table(result: dict, steps: str = "first") -> str:
    confusion = result["model"][steps]["confusion"]
    return _table(["true \\ predicted", *DIRECTIONS], [[name, *row] for name, row in zip(DIRECTIONS, confusion)])


def group_table(groups: dict, label: str) -> str:
    return _table([label, "predictions", "direction acc (first)", "MAE (first)"],
                  [[name, g["predictions"], g["direction_accuracy"], g["mae"]] for name, g in groups.items()])


def sensitivity_table(sensitivity: dict) -> str:
    if not sensitivity.get("predictions"):
        return "No left/right validation episodes: instruction sensitivity not measured."
    return _table(["steps", "sign of linear_y flips", "mean |change| of linear_y"],
                  [[steps, sensitivity[f"flip_fraction_{steps}"], sensitivity[f"mean_abs_change_{steps}"]]
                   for steps in STEPS])


def markdown(result: dict) -> str:
    return "\n\n".join([
        f"## Evaluation on {result['episodes']} validation episodes, {result['predictions']} predictions "
        f"(window {result['window']}, chunk {result['chunk']}, dead band {result['dead_band']} × {result['action_scale']})",
        summary_table(result),
        "### Errors per action dimension (robot units)", per_dimension_table(result),
        "### Direction classes, first step", per_class_table(result), confusion_table(result),
        "### Instruction sensitivity (left ↔ right swapped)", sensitivity_table(result["instruction_sensitivity"]),
        "### By side", group_table(result["by_side"], "side"),
        "### By scenario", group_table(result["by_scenario"], "scenario"),
    ]) + "\n"


def plot_predictions(evaluation: Evaluation, path: Path) -> Path:
    """First-step predicted vs recorded linear_x / linear_y along a few validation episodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    episodes = evaluation.episodes[:PLOTTED_EPISODES]
    fig, axes = plt.subplots(len(episodes), 2, figsize=(10, 2.4 * len(episodes)), squeeze=False, sharey=True)
    for row, episode in zip(axes, episodes):
        for dim, ax in enumerate(row):
            ax.step(range(len(episode.true)), episode.true[:, 0, dim], where="mid", label="recorded", color="black")
            ax.plot(episode.pred[:, 0, dim], marker="o", markersize=3, label="predicted", color="tab:orange")
            ax.set_title(f"{episode.episode_id[:40]} · {ACTION_DIMS[dim]}", fontsize=8)
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
    fig, ax = plt.subplots(figsize=(5, 4.4))
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
