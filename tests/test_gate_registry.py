"""The registry's lookups against a registry that errs: only "does not exist" reads as not found,
anything else reaches the caller (and `vla-pipeline` prints it in one line); a metric a version's
tags lack reads as missing, never as a measured 0. No training: a small sqlite registry."""

from __future__ import annotations

from types import SimpleNamespace

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from vla_pipeline import cli
from vla_pipeline.evaluation import registry
from vla_pipeline.evaluation.gate import PromotionDecision
from vla_pipeline.tracking import mlflow_client, tracking_uri

NAME = "mobile-vla-flaky"
OTHER_ERRORS = ["TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "INVALID_PARAMETER_VALUE"]


@pytest.fixture(scope="module")
def one_version(tmp_path_factory):
    """A sqlite registry holding NAME v1 (fingerprint `abc`) at @champion."""
    root = tmp_path_factory.mktemp("flaky-registry")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        client = registry.client()
        client.create_registered_model(NAME)
        client.create_model_version(NAME, source=str(root / "model"), tags={"training_fingerprint": "abc"})
        client.set_registered_model_alias(NAME, "champion", "1")
        yield root
    mlflow.set_tracking_uri(tracking_uri())  # back to the session's registry for the tests after these


class FlakyRegistry:
    """The real client, except that the `failing` calls raise as a database or network error would."""

    def __init__(self, real, failing: tuple[str, ...], code: str):
        self.real, self.failing, self.code = real, failing, code

    def __getattr__(self, method: str):
        if method not in self.failing:
            return getattr(self.real, method)

        def fail(*args, **kwargs):
            raise MlflowException(f"{method}: (sqlite3.OperationalError)\ndatabase is locked", error_code=self.code)
        return fail


@pytest.fixture
def flaky(one_version, monkeypatch):
    """flaky(code, *methods): from now on those registry calls fail with MlflowException(code)."""
    real = registry.client()

    def make(code: str, *failing: str) -> None:
        monkeypatch.setattr(registry, "client", lambda: FlakyRegistry(real, failing, code))
    return make


def test_a_missing_model_alias_or_tag_reads_as_none(one_version):
    assert str(registry.version_by_alias(NAME, "champion").version) == "1"
    assert registry.version_by_alias(NAME, "challenger") is None  # MLflow: INVALID_PARAMETER_VALUE, not read
    assert registry.version_by_alias("no-such-model", "champion") is None
    assert str(registry.version_with_tag(NAME, "training_fingerprint", "abc").version) == "1"
    assert registry.version_with_tag(NAME, "training_fingerprint", "other") is None
    assert registry.version_with_tag("no-such-model", "training_fingerprint", "abc") is None


@pytest.mark.parametrize("code", OTHER_ERRORS)
def test_a_registry_error_is_not_read_as_not_found(flaky, code):
    flaky(code, "get_registered_model", "get_model_version_by_alias", "get_model_version", "search_model_versions")
    with pytest.raises(MlflowException, match="database is locked"):
        registry.version_by_alias(NAME, "champion")
    with pytest.raises(MlflowException, match="database is locked"):
        registry.version_with_tag(NAME, "training_fingerprint", "abc")


@pytest.mark.parametrize("failing", ["get_registered_model", "get_model_version"])
def test_resolve_version_calls_only_a_missing_model_a_lookup_error(flaky, failing):
    with pytest.raises(registry.ModelLookupError, match="no registered model 'no-such-model'"):
        registry.resolve_version("models:/no-such-model@champion")
    with pytest.raises(registry.ModelLookupError, match="has no version 7"):
        registry.resolve_version(f"models:/{NAME}/7")
    flaky("INTERNAL_ERROR", failing)
    with pytest.raises(MlflowException, match="database is locked") as raised:
        registry.resolve_version(f"models:/{NAME}@champion")
    assert not isinstance(raised.value, registry.ModelLookupError)


def test_a_failed_lookup_registers_no_duplicate_version(flaky, tmp_path):
    flaky("TEMPORARILY_UNAVAILABLE", "search_model_versions")
    with pytest.raises(MlflowException, match="database is locked"):
        registry.register_gated_version(NAME, tmp_path / "never-logged", {"training_fingerprint": "abc"},
                                        PromotionDecision("challenger", "-"), run_id=None, experiment_id="0")
    versions = mlflow_client().search_model_versions(f"name = '{NAME}'")
    assert [str(v.version) for v in versions] == ["1"]


def test_cli_prints_a_registry_error_in_one_line(flaky, capsys):
    flaky("INTERNAL_ERROR", "get_registered_model")
    assert cli.main(["model", "--model-uri", f"models:/{NAME}@champion"]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: MLflow registry at {tracking_uri()}: get_registered_model: "
                   "(sqlite3.OperationalError) database is locked\n")


def _version_without_spl():
    tags = {"closed_loop": "vla_pipeline/BoxNav-v0", "metric.closed_loop_rollouts": "48.0000",
            "metric.closed_loop_success_rate": "0.5000", "metric.closed_loop_collision_rate": "0.0000",
            "promotion": "challenger", "promotion_reason": "-"}  # no metric.closed_loop_spl
    return SimpleNamespace(name=NAME, version="2", run_id="r", tags=tags)


def test_a_metric_the_tags_lack_reads_as_missing_not_zero():
    closed = registry.version_summary(_version_without_spl())["closed_loop"]
    assert closed["spl"] is None
    assert closed["collision_rate"] == 0.0 and closed["rollouts"] == 48.0  # a measured 0 stays 0


def test_cli_model_shows_a_missing_metric_as_not_recorded(monkeypatch, capsys):
    monkeypatch.setattr(registry, "resolve_version", lambda uri: _version_without_spl())
    assert cli.main(["model", "--model-uri", f"models:/{NAME}/2"]) == 0
    shown = capsys.readouterr().out
    assert "(48 rollouts): success 0.50, SPL not recorded, collisions 0.00" in shown, shown


def test_sight_and_blind_drivers_the_tags_lack_read_as_missing_not_zero():
    older = registry.version_summary(_version_without_spl())  # registered before either was measured
    assert older["sight_reliance"] == {"real": None, "first_frame": None, "other_episodes": None, "drop": None,
                                       "other_episodes_skipped": None}
    closed = older["closed_loop"]
    assert closed["best_blind"] is None and closed["frozen_success"] is None and closed["blank_success"] is None
    assert closed["baselines"] == {}
    tags = {**_version_without_spl().tags, "metric.direction_accuracy_first": "0.8000",
            "metric.direction_accuracy_first_frame": "0.0000", "metric.sight_reliance": "0.8000",
            "metric.direction_accuracy_other_episode": "0.5000",  # an earlier gating's, say
            "sight_other_episode": "skipped: one validation episode: there is no other episode",
            "metric.closed_loop_best_blind_success_rate": "0.0000", "metric.closed_loop_blank_success": "0.0000"}
    summary = registry.version_summary(SimpleNamespace(name=NAME, version="3", run_id="r", tags=tags))
    assert summary["sight_reliance"] == {"real": 0.8, "first_frame": 0.0, "other_episodes": None, "drop": 0.8,
                                         "other_episodes_skipped": "one validation episode: there is no other episode"}
    closed = summary["closed_loop"]
    assert closed["best_blind"] == 0.0 and closed["blank_success"] == 0.0  # measured zeros stay zeros
    assert closed["frozen_success"] is None and closed["baselines"] == {"best_blind": 0.0}
