"""The promotion rule: when a newly registered policy may take the `champion` alias.

Plain logic, no MLflow: the registry asset, the CLI and the tests share it.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL_NAME = "mobile-vla"
CHAMPION, CHALLENGER = "champion", "challenger"
GATE_ALIASES = (CHAMPION, CHALLENGER)  # a version holds at most one of them: its gate decision
GATE_METRIC = "direction_accuracy_first"  # the command actually sent: first step of the chunk
# Where the data comes from a simulated world, the policy must also reach the goal in that many of
# its closed-loop rollouts there (measured: docs/evaluation.md, closed loop).
DEFAULT_MIN_CLOSED_LOOP_SUCCESS = 0.5
# A success rate from fewer rollouts is too noisy to promote on: one lucky rollout reads as 1.00.
# 24 is two per side × distance × boxes cell (the default plan drives 48).
DEFAULT_MIN_CLOSED_LOOP_ROLLOUTS = 24
# A success rate that a driver blind to the image also reaches is no evidence that the policy looks:
# the side-aware script reaches the goal in some scenes from the instruction alone. The policy must
# beat the best such driver, in the same scenes, by this much.
DEFAULT_MIN_MARGIN_OVER_BLIND = 0.25
# What the gate reads of closed_loop_metrics' headline (`ClosedLoopReport.headline`, MLflow metrics).
CLOSED_LOOP_SUCCESS = "closed_loop_success_rate"
CLOSED_LOOP_ROLLOUTS = "closed_loop_rollouts"
BEST_BLIND_SUCCESS = "closed_loop_best_blind_success_rate"
# A success rate is k/n: compared with a sum of floats, it must not lose to a rounding error.
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class PromotionDecision:
    alias: str  # CHAMPION or CHALLENGER
    reason: str

    @property
    def promoted(self) -> bool:
        return self.alias == CHAMPION


def decide_promotion(
    accuracy: float,
    best_baseline: str,
    baseline_accuracy: float,
    min_margin: float,
    champion_accuracy: float | None = None,
    champion_version: str | None = None,
    replay_accuracy: float | None = None,
    closed_loop_success: float | None = None,
    min_closed_loop_success: float = DEFAULT_MIN_CLOSED_LOOP_SUCCESS,
    closed_loop_rollouts: float | None = None,
    min_closed_loop_rollouts: int = DEFAULT_MIN_CLOSED_LOOP_ROLLOUTS,
    closed_loop_best_blind: float | None = None,
    min_margin_over_blind: float = DEFAULT_MIN_MARGIN_OVER_BLIND,
) -> PromotionDecision:
    """Champion only if the first-step direction accuracy beats the best constant baseline by
    more than `min_margin`, beats the scripted replay when `replay_accuracy` is given (the gate
    asks for it only when so configured), and is at least the current champion's on the same
    validation set.

    When `closed_loop_success` is given (data from a simulated world; `closed_loop_rollouts` must
    come with it), it must also come from at least `min_closed_loop_rollouts` rollouts, be at least
    `min_closed_loop_success`, and be at least `closed_loop_best_blind` (the best success rate of a
    driver blind to the image, in the same scenes) + `min_margin_over_blind`; a best blind success
    that was not recorded (None) does not pass. Without `closed_loop_success` (robot data: no world
    to drive in) the closed-loop clause is skipped."""
    if closed_loop_success is not None and closed_loop_rollouts is None:
        raise ValueError("decide_promotion: closed_loop_success was given without closed_loop_rollouts; "
                         "pass how many rollouts the success rate comes from")
    margin = accuracy - baseline_accuracy
    against_baseline = (f"first-step direction accuracy {accuracy:.3f}, best constant baseline {best_baseline} "
                        f"{baseline_accuracy:.3f}: margin {margin:+.3f}, required more than {min_margin:+.3f}")
    if not margin > min_margin:
        return PromotionDecision(CHALLENGER, f"{against_baseline}: not met")
    if replay_accuracy is not None:
        against_baseline += f"; scripted replay {replay_accuracy:.3f}"
        if not accuracy > replay_accuracy:
            return PromotionDecision(CHALLENGER, f"{against_baseline}: not beaten, as required")
    if closed_loop_success is not None:
        against_baseline += (f"; closed-loop success {closed_loop_success:.2f} in {closed_loop_rollouts:.0f} rollouts, "
                             f"required at least {min_closed_loop_success:.2f} in at least {min_closed_loop_rollouts}")
        if closed_loop_rollouts < min_closed_loop_rollouts:
            return PromotionDecision(CHALLENGER, (
                f"{against_baseline}: {closed_loop_rollouts:.0f} rollouts are fewer than the minimum "
                f"{min_closed_loop_rollouts}, not counted as passed"))
        if not closed_loop_success >= min_closed_loop_success:
            return PromotionDecision(CHALLENGER, f"{against_baseline}: not met")
        if closed_loop_best_blind is None:
            return PromotionDecision(CHALLENGER, (
                f"{against_baseline}: met; but the best blind driver's success was not recorded "
                f"({BEST_BLIND_SUCCESS}), so sight cannot be told from the instruction alone: "
                f"required at least {min_margin_over_blind:+.2f} over it, not counted as passed"))
        over_blind = closed_loop_success - closed_loop_best_blind
        against_baseline += (f"; over the best blind driver's {closed_loop_best_blind:.2f} in the same scenes: "
                             f"margin {over_blind:+.2f}, required at least {min_margin_over_blind:+.2f}")
        if not over_blind + _TOLERANCE >= min_margin_over_blind:
            return PromotionDecision(CHALLENGER, f"{against_baseline}: not met")
    if champion_accuracy is not None and accuracy < champion_accuracy:
        return PromotionDecision(CHALLENGER, (
            f"{against_baseline}: met; but below champion v{champion_version}'s {champion_accuracy:.3f} "
            "on the same validation set"))
    if champion_accuracy is None:
        return PromotionDecision(CHAMPION, f"{against_baseline}: met; there was no champion")
    return PromotionDecision(CHAMPION, (
        f"{against_baseline}: met; champion v{champion_version} scores {champion_accuracy:.3f} on the same validation set"))
