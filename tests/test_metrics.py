"""Metrics on hand-made predictions: every number is worked out by hand."""

import math

import numpy as np
import pytest

from vla_pipeline.evaluation import metrics
from vla_pipeline.evaluation.metrics import DIRECTIONS

S = 1.15  # action scale
F, B, L, R, STOP = (S, 0.0), (-S, 0.0), (0.0, S), (0.0, -S), (0.0, 0.0)


def chunks(*actions):
    """(N, 1, 2) float32 from N (x, y) actions."""
    return np.array(actions, np.float32)[:, None, :]


def test_direction_classes_cover_all_nine_keys_and_the_dead_band():
    keys = np.array([STOP, F, B, L, R, (S, S), (S, -S), (-S, S), (-S, -S)], np.float32)
    assert [DIRECTIONS[c] for c in metrics.direction_classes(keys, S)] == list(DIRECTIONS)
    # 0.3 × 1.15 = 0.345 is the dead band: at or below it a component counts as 0
    near = np.array([[0.34, 0.0], [0.35, 0.0], [0.35, -0.2], [-0.4, 0.5]], np.float32)
    assert [DIRECTIONS[c] for c in metrics.direction_classes(near, S)] == ["STOP", "F", "F", "BL"]
    assert [DIRECTIONS[c] for c in metrics.direction_classes(near, S, dead_band=0.4)] == ["STOP", "STOP", "STOP", "L"]


def test_regression_errors_per_dimension_in_robot_units():
    pred = chunks((1.0, 0.0), (0.0, 0.0))
    true = chunks((0.0, 0.0), (0.0, 2.0))
    scored = metrics.score(pred, true, S)["first"]
    assert scored["mse_linear_x"] == pytest.approx(0.5)  # (1² + 0²) / 2
    assert scored["mse_linear_y"] == pytest.approx(2.0)  # (0² + 2²) / 2
    assert scored["mae_linear_x"] == pytest.approx(0.5)
    assert scored["mae_linear_y"] == pytest.approx(1.0)
    assert scored["rmse_linear_y"] == pytest.approx(math.sqrt(2.0))
    assert scored["mse"] == pytest.approx(1.25)


def test_first_step_and_all_steps_are_scored_separately():
    true = np.array([[F, L]], np.float32)  # one chunk of two steps
    pred = np.array([[F, R]], np.float32)
    scored = metrics.score(pred, true, S)
    assert scored["first"]["direction_accuracy"] == 1.0
    assert scored["all"]["direction_accuracy"] == 0.5
    assert scored["first"]["mse"] == 0.0 and scored["all"]["mse"] > 0


def test_accuracy_recall_precision_and_confusion():
    true = chunks(F, F, F, L, R, STOP)
    pred = chunks(F, F, L, L, L, STOP)
    scored = metrics.score(pred, true, S)["first"]
    assert scored["direction_accuracy"] == pytest.approx(4 / 6)
    assert scored["recall"]["F"] == pytest.approx(2 / 3)
    assert scored["recall"]["R"] == 0.0
    assert scored["precision"]["L"] == pytest.approx(1 / 3)
    assert scored["precision"]["R"] is None  # never predicted
    assert scored["recall"]["BL"] is None  # never recorded
    confusion = np.array(scored["confusion"])
    assert confusion[DIRECTIONS.index("F"), DIRECTIONS.index("L")] == 1
    assert confusion[DIRECTIONS.index("R"), DIRECTIONS.index("L")] == 1
    assert confusion.sum() == 6 and np.trace(confusion) == 4


def test_chunk_steps_past_the_episode_end_are_not_scored_and_the_stop_is():
    # Two 2-step chunks; the second is the episode's closing stop, whose next step has no target.
    true = np.array([[F, L], [STOP, (np.nan, np.nan)]], np.float32)
    pred = np.array([[F, R], [STOP, (S, 0.0)]], np.float32)
    scored = metrics.score(pred, true, S)
    assert scored["first"]["direction_accuracy"] == 1.0 and scored["first"]["recall"]["STOP"] == 1.0
    assert sum(scored["all"]["support"].values()) == 3  # F, L, STOP: the missing step is left out
    assert scored["all"]["direction_accuracy"] == pytest.approx(2 / 3)  # the R for L is wrong
    assert scored["all"]["mse"] == pytest.approx((2 * S) ** 2 / 3 / 2)  # one wrong y among 3 × 2 values
    never_stops = metrics.score(np.array([[F, L], [F, F]], np.float32), true, S)["first"]
    assert never_stops["recall"]["STOP"] == 0.0 and never_stops["precision"]["STOP"] is None


def test_a_constant_predictor_scores_exactly_its_baseline():
    true = chunks(F, F, F, L, L, R, STOP, (S, S))
    baselines = metrics.constant_baselines(train_mean=(0.6, 0.1), action_scale=S)
    scored = metrics.score_baselines(true, baselines, S)
    for name, value in baselines.items():
        assert metrics.score(np.broadcast_to(value, true.shape), true, S) == scored[name]
    assert scored["always_forward"]["first"]["direction_accuracy"] == pytest.approx(3 / 8)
    assert scored["zero"]["first"]["direction_accuracy"] == pytest.approx(1 / 8)
    assert scored["train_mean"]["first"]["direction_accuracy"] == pytest.approx(3 / 8)  # (0.6, 0.1) is F


def test_one_sided_collapse_shows_as_zero_margin_despite_a_small_loss():
    # Balanced left/right data; a policy that always strafes left.
    true = chunks(*([L] * 5 + [R] * 5))
    collapsed = chunks(*([L] * 10))
    model = metrics.score(collapsed, true, S)
    baselines = metrics.score_baselines(true, metrics.constant_baselines((0.0, 0.0), S), S)
    margin = metrics.margins(model, baselines)["first"]
    assert model["first"]["direction_accuracy"] == 0.5
    assert model["first"]["recall"]["R"] == 0.0
    assert margin["best_accuracy_baseline"] in ("zero", "train_mean", "always_forward")
    assert margin["direction_accuracy_margin"] == pytest.approx(0.5)  # every constant baseline scores 0 here
    # ... and a policy that is always right on such data beats it
    perfect = metrics.margins(metrics.score(true, true, S), baselines)["first"]
    assert perfect["direction_accuracy_margin"] == pytest.approx(1.0)
    assert perfect["mse_margin"] > 0


def test_margin_is_measured_against_the_best_baseline():
    true = chunks(F, F, F, STOP)
    model = metrics.score(chunks(F, F, STOP, STOP), true, S)
    baselines = metrics.score_baselines(true, metrics.constant_baselines((S, 0.0), S), S)
    margin = metrics.margins(model, baselines)["first"]
    assert margin["best_accuracy_baseline"] in ("always_forward", "train_mean")
    assert margin["direction_accuracy_margin"] == pytest.approx(0.75 - 0.75)


def test_instruction_sensitivity_counts_flips_among_strafing_predictions():
    # dead band 0.3 × 1.0: |linear_y| > 0.3 strafes
    lateral = np.array([[1.0, 1.0], [1.0, -1.0], [-0.5, 0.0], [0.0, 0.0], [0.1, 0.0]])
    swapped = np.array([[-1.0, -1.0], [1.0, 1.0], [-0.5, 0.0], [0.4, 0.0], [-0.1, 0.0]])
    result = metrics.instruction_sensitivity(lateral, swapped, action_scale=1.0)
    # first step: rows 0-3 strafe with one instruction or both; only row 0 flips; row 4 never strafes
    assert result["lateral_predictions_first"] == 4
    assert result["flip_fraction_first"] == pytest.approx(1 / 4)
    # all steps: 6 strafing (rows 0 and 1 twice, rows 2 and 3 once), flipped: row 0 twice, row 1's second step
    assert result["lateral_predictions_all"] == 6
    assert result["flip_fraction_all"] == pytest.approx(3 / 6)
    assert result["mean_abs_change_first"] == pytest.approx((2 + 0 + 0 + 0.4 + 0.2) / 5)
    never = metrics.instruction_sensitivity(np.zeros((3, 1)), np.zeros((3, 1)), action_scale=1.0)
    assert never["flip_fraction_first"] == 0.0 and never["lateral_predictions_first"] == 0
    assert metrics.instruction_sensitivity(np.zeros((0, 2)), np.zeros((0, 2)), 1.0) == {"predictions": 0}


def test_breakdown_per_group():
    true = chunks(L, L, R, R)
    pred = chunks(L, R, R, R)
    groups = metrics.breakdown(pred, true, ["left", "left", "right", None], S)
    assert groups["left"] == {"predictions": 2, "direction_accuracy": 0.5, "mae": pytest.approx(S / 2)}
    assert groups["right"]["direction_accuracy"] == 1.0
    assert groups["unknown"]["predictions"] == 1


def test_score_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must both be"):
        metrics.score(np.zeros((2, 1, 2)), np.zeros((3, 1, 2)), S)
