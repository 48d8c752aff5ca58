"""The promotion rule: when a newly registered policy may take the `champion` alias.

Plain logic, no MLflow: the registry asset, the CLI and the tests share it.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL_NAME = "mobile-vla"
CHAMPION, CHALLENGER = "champion", "challenger"
GATE_METRIC = "direction_accuracy_first"  # the command actually sent: first step of the chunk


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
) -> PromotionDecision:
    """Champion only if the first-step direction accuracy beats the best constant baseline by
    more than `min_margin`, beats the scripted replay when `replay_accuracy` is given (the gate
    asks for it only when so configured), and is at least the current champion's on the same
    validation set."""
    margin = accuracy - baseline_accuracy
    against_baseline = (f"first-step direction accuracy {accuracy:.3f}, best constant baseline {best_baseline} "
                        f"{baseline_accuracy:.3f}: margin {margin:+.3f}, required more than {min_margin:+.3f}")
    if not margin > min_margin:
        return PromotionDecision(CHALLENGER, f"{against_baseline}: not met")
    if replay_accuracy is not None:
        against_baseline += f"; scripted replay {replay_accuracy:.3f}"
        if not accuracy > replay_accuracy:
            return PromotionDecision(CHALLENGER, f"{against_baseline}: not beaten, as required")
    if champion_accuracy is not None and accuracy < champion_accuracy:
        return PromotionDecision(CHALLENGER, (
            f"{against_baseline}: met; but below champion v{champion_version}'s {champion_accuracy:.3f} "
            "on the same validation set"))
    if champion_accuracy is None:
        return PromotionDecision(CHAMPION, f"{against_baseline}: met; there was no champion")
    return PromotionDecision(CHAMPION, (
        f"{against_baseline}: met; champion v{champion_version} scores {champion_accuracy:.3f} on the same validation set"))
