"""The evaluation and registry assets, promotion gating, lookup by alias, and `vla-pipeline predict`."""

from __future__ import annotations

import json
import logging
import re

import cv2
import dagster as dg
import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import scripted_actions, write_episode_file
from test_serving import set_constant_output

from assets.closed_loop import closed_loop_metrics
from assets.robustness import robustness
from assets.evaluation import evaluation_metrics, registered_model
from resources import ComputeResource, WindowStoreResource
from vla_pipeline import cli
from vla_pipeline.evaluation import registry
from vla_pipeline.evaluation.gate import PromotionDecision, decide_promotion
from vla_pipeline.data.ingest import ingest_episodes
from vla_pipeline.policy.model import build_policy, save_policy
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.tracking import RUN_ID_FILE, experiment_id
from vla_pipeline.training.train import ACTION_STATS_FILE

NAME = "mobile-vla-test"


def test_gate_needs_a_margin_over_the_best_baseline():
    decision = decide_promotion(0.60, "always_forward", 0.58, min_margin=0.05)
    assert decision.alias == "challenger" and "always_forward 0.580" in decision.reason
    assert "margin +0.020, required more than +0.050: not met" in decision.reason
    assert decide_promotion(0.70, "always_forward", 0.58, min_margin=0.05).promoted
    assert not decide_promotion(0.58, "always_forward", 0.58, min_margin=0.0).promoted  # a tie is no win


def test_gate_needs_at_least_the_champion_on_the_same_validation_set():
    worse = decide_promotion(0.70, "zero", 0.2, 0.05, champion_accuracy=0.75, champion_version="3")
    assert worse.alias == "challenger" and "champion v3" in worse.reason
    assert decide_promotion(0.75, "zero", 0.2, 0.05, champion_accuracy=0.75, champion_version="3").promoted
    first = decide_promotion(0.75, "zero", 0.2, 0.05)
    assert first.promoted and "no champion" in first.reason


def test_gate_needs_the_closed_loop_floor_when_there_is_a_world():
    below = decide_promotion(0.9, "zero", 0.2, 0.05, closed_loop_success=0.40, min_closed_loop_success=0.5,
                             closed_loop_rollouts=48.0)
    assert below.alias == "challenger"
    assert "closed-loop success 0.40 in 48 rollouts, required at least 0.50 in at least 24: not met" in below.reason
    assert decide_promotion(0.9, "zero", 0.2, 0.05, closed_loop_success=0.5, min_closed_loop_success=0.5,
                            closed_loop_rollouts=48.0, closed_loop_best_blind=0.25).promoted
    assert decide_promotion(0.9, "zero", 0.2, 0.05).promoted  # no world (robot data): no closed-loop clause
    assert "closed-loop" not in decide_promotion(0.9, "zero", 0.2, 0.05).reason


def test_gate_counts_no_closed_loop_success_from_too_few_rollouts():
    lucky = decide_promotion(0.9, "zero", 0.2, 0.05, closed_loop_success=1.0, closed_loop_rollouts=1.0,
                             closed_loop_best_blind=0.5)
    assert lucky.alias == "challenger"
    assert lucky.reason.endswith("1 rollouts are fewer than the minimum 24, not counted as passed")
    assert not _closed_loop_gate(0.80, 0.50, rollouts=23.0).promoted
    assert _closed_loop_gate(0.80, 0.50, rollouts=24.0).promoted
    assert _closed_loop_gate(1.0, 0.5, rollouts=4.0, min_closed_loop_rollouts=4).promoted
    with pytest.raises(ValueError, match="without closed_loop_rollouts"):  # a rate alone cannot be weighed
        decide_promotion(0.9, "zero", 0.2, 0.05, closed_loop_success=1.0)


def _closed_loop_gate(success, best_blind, rollouts=48.0, **options):
    """A model that passes offline, gated on its closed-loop success against the best blind driver."""
    return decide_promotion(0.9, "zero", 0.2, 0.05, closed_loop_success=success, closed_loop_rollouts=rollouts,
                            closed_loop_best_blind=best_blind, **options)


def test_gate_needs_a_margin_over_the_best_blind_driver():
    passed = _closed_loop_gate(0.80, 0.50)  # default margin 0.25
    assert passed.promoted and "over the best blind driver's 0.50 in the same scenes: margin +0.30, " \
                               "required at least +0.25: met" in passed.reason
    held = _closed_loop_gate(0.70, 0.50)
    assert held.alias == "challenger"
    assert held.reason.endswith("closed-loop success 0.70 in 48 rollouts, required at least 0.50 in at least 24; "
                                "over the best blind driver's 0.50 in the same scenes: margin +0.20, "
                                "required at least +0.25: not met")
    assert _closed_loop_gate(0.75, 0.50).promoted  # the margin exactly
    assert _closed_loop_gate(0.70, 0.45).promoted  # 0.70 − 0.45 is 0.2499…: no loss to a rounding error
    assert not _closed_loop_gate(0.80, 0.50, min_margin_over_blind=0.35).promoted
    assert _closed_loop_gate(0.60, 0.50, min_margin_over_blind=0.0).promoted
    assert not _closed_loop_gate(0.45, 0.0).promoted  # the floor min_closed_loop_success stays


def test_gate_holds_back_a_closed_loop_success_without_the_best_blind_drivers():
    missing = _closed_loop_gate(0.80, None)
    assert missing.alias == "challenger"
    assert "the best blind driver's success was not recorded (closed_loop_best_blind_success_rate)" in missing.reason
    assert missing.reason.endswith("not counted as passed")
    # Robot data: no world, no closed-loop clause, nothing about blind drivers asked.
    for best_blind in (None, 0.9):
        robot = decide_promotion(0.9, "zero", 0.2, 0.05, closed_loop_best_blind=best_blind)
        assert robot.promoted and "closed-loop" not in robot.reason and "blind" not in robot.reason


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    folder = root / "episodes"
    paths = [
        write_episode_file(folder / f"episode_20250614_10150{i}_1box_hori_{side}_core_medium.h5",
                           actions=scripted_actions(side), seed=i)
        for i, side in enumerate(["left", "right", "left", "right"])
    ]
    strafing = scripted_actions("right")
    strafing[1:, :] = [0.0, -1.15, 0.0]  # an episode that strafes right all the way
    paths.append(write_episode_file(folder / "episode_20250614_101509_1box_hori_right_core_far.h5",
                                    actions=strafing, seed=9))
    store_path = root / "store.zarr"
    ingest_episodes(paths, store_path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        yield {"root": root, "store": store_path, "paths": paths, "ids": [p.stem for p in paths]}


def _policy_dir(env, name, tiny_backbone_path, constant=None):
    """A saved policy: constant (x, y) head output, or the untrained head when constant is None."""
    policy = build_policy(PolicyConfig.tiny(backbone=str(tiny_backbone_path)))
    if constant is not None:
        set_constant_output(policy, *constant)
    directory = save_policy(policy, env["root"] / name / "policy")
    (directory / ACTION_STATS_FILE).write_text(json.dumps({"mean": [0.8, 0.0]}))
    with mlflow.start_run(experiment_id=experiment_id()) as run:  # as lora_adapter records it
        (directory.parent / RUN_ID_FILE).write_text(run.info.run_id)
    return str(directory)


def _register(env, policy_dir, val_ids, min_margin, model_name=NAME, instance=None, closed_loop=None):
    """Materialize evaluation and registration; `closed_loop`, a closed_loop_metrics output to stand in
    for the asset's (whose world these robot-like episodes do not have)."""
    split = {"train": [i for i in env["ids"] if i not in val_ids], "val": list(val_ids), "val_fraction": 0.4}

    @dg.asset(name="lora_adapter")
    def given_adapter():
        return policy_dir

    @dg.asset(name="train_val_split")
    def given_split():
        return split

    @dg.asset(name="closed_loop_metrics")
    def given_closed_loop():
        return closed_loop

    result = dg.materialize(
        [given_adapter, given_split, evaluation_metrics,
         closed_loop_metrics if closed_loop is None else given_closed_loop, robustness, registered_model],
        resources={"window_store": WindowStoreResource(path=str(env["store"])), "compute": ComputeResource()},
        run_config={"ops": {"registered_model": {"config": {"model_name": model_name, "min_accuracy_margin": min_margin}}}},
        instance=instance,
    )
    assert result.success
    env.setdefault("evaluation_metadata", []).append(result.asset_materializations_for_node("evaluation_metrics")[0].metadata)
    return (result.output_for_node("evaluation_metrics"), result.output_for_node("registered_model"),
            result.asset_materializations_for_node("registered_model")[0].metadata)


@pytest.fixture(scope="module")
def registered(env, tiny_backbone_path):
    """v1: a constant always-forward policy, let through with a negative margin, becomes champion.
    v2: an untrained head, gated at the default margin on a larger validation set."""
    forward = _policy_dir(env, "forward", tiny_backbone_path, constant=(20.0, 0.0))
    _, first, first_meta = _register(env, forward, env["ids"][:2], min_margin=-0.01)
    untrained = _policy_dir(env, "untrained", tiny_backbone_path)
    evaluation, second, second_meta = _register(env, untrained, env["ids"][:2] + env["ids"][4:], min_margin=0.05)
    return {"first": (first, first_meta), "second": (second, second_meta, evaluation), "untrained": untrained,
            "forward": forward}


def test_first_model_becomes_champion_and_is_logged_with_its_tags(registered):
    first, metadata = registered["first"]
    assert first["version"] == "1" and first["alias"] == "champion"
    assert metadata["champion_before"].value == "none"
    version = registry.client().get_model_version_by_alias(NAME, "champion")
    assert str(version.version) == "1"
    tags = version.tags
    assert tags["promotion"] == "champion" and "no champion" in tags["promotion_reason"]
    assert len(tags["git_commit"]) >= 7 and tags["data_snapshot"]
    assert json.loads(tags["split"])["val_episodes"] == 2
    assert float(tags["metric.direction_accuracy_first"]) == float(tags["metric.baseline_always_forward_direction_accuracy_first"])


def test_robot_data_gets_offline_robustness_and_no_closed_loop_one(registered):
    tags = registry.client().get_model_version(NAME, "1").tags
    assert tags["robustness_worst"].startswith("skipped: ") and "robot episodes" in tags["robustness_worst"]
    # A constant always-forward policy: no image perturbation can move its accuracy.
    assert tags["metric.offline_robustness_worst_drop"] == "0.0000"
    assert tags["metric.offline_robustness_darker_accuracy"] == tags["metric.offline_robustness_unperturbed_accuracy"]
    assert not any(key.startswith("metric.robustness_") for key in tags)
    robust = registry.version_summary(registry.client().get_model_version(NAME, "1"))["robustness"]
    assert robust["worst"] == tags["robustness_worst"] and robust["mean_success"] is None
    assert robust["offline_worst_drop"] == 0.0


def test_evaluation_is_shown_in_the_ui_and_logged_to_the_training_run(env, registered):
    metadata = env["evaluation_metadata"][0]
    # Tables are Dagster tables (rendered as tables on the asset page, whatever their size).
    predictors = [record.data["predictor"] for record in metadata["model_vs_baselines_first_step"].value.records]
    assert predictors[0] == "model" and "baseline: always_forward" in predictors
    assert [c.name for c in metadata["confusion_matrix"].value.schema.columns][:3] == ["recorded \\ predicted", "STOP", "F"]
    assert "linear_y sign flips" in [c.name for c in metadata["instruction_sensitivity"].value.schema.columns]
    # This run's instance keeps no compute logs for the webserver to serve the plots from: embedded.
    for plot in ("predictions_plot", "confusion_plot"):
        assert metadata[plot].value.startswith("![") and "(data:image/png;base64,iVBOR" in metadata[plot].value
    version = registry.client().get_model_version(NAME, "1")
    run = mlflow.get_run(version.run_id)  # the training run holds the evaluation and the model
    tagged = float(version.tags["metric.direction_accuracy_first"])
    assert run.data.metrics["eval_direction_accuracy_first"] == pytest.approx(tagged, abs=1e-4)
    assert "eval_baseline_always_forward_direction_accuracy_first" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/report.md", "evaluation/metrics.json", "evaluation/confusion.png",
            "evaluation/predictions.png"} <= artifacts


def test_a_worse_model_never_becomes_champion(env, registered):
    second, metadata, evaluation = registered["second"]
    assert second["alias"] == "challenger"
    assert metadata["reason"].value.endswith("required more than +0.050: not met")
    # The champion was re-evaluated on the current (larger) validation set, not read from its tags.
    forward_now = evaluation["metrics"]["baselines"]["always_forward"]["first"]["direction_accuracy"]
    assert metadata["champion_before_accuracy_on_current_val"].value == pytest.approx(forward_now)
    champion_tag = float(registry.client().get_model_version(NAME, "1").tags["metric.direction_accuracy_first"])
    assert forward_now != pytest.approx(champion_tag)
    # Even with the baseline gate switched off, it cannot displace a better champion.
    _, again, again_meta = _register(env, registered["untrained"], env["ids"][:2] + env["ids"][4:], min_margin=-1.0)
    assert again["alias"] == "challenger" and again["version"] == second["version"]  # same weights, same version
    assert "met; but below champion v1's" in again_meta["reason"].value
    client = registry.client()
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == second["version"]


def test_sight_ablations_are_logged_tagged_and_summarised(env, registered):
    metadata = env["evaluation_metadata"][0]  # v1: always forward, on 2 validation episodes
    assert metadata["sight_reliance"].value == 0.0  # a constant policy does not look
    assert metadata["direction_accuracy_other_episode"].value == metadata["direction_accuracy_first"].value
    shown = [record.data["frames shown"] for record in metadata["sight_ablations"].value.records]
    assert shown == ["real frames", "first frame only", "another episode's frames", "sight reliance (smaller drop)"]
    version = registry.client().get_model_version(NAME, "1")
    run = mlflow.get_run(version.run_id)
    assert run.data.metrics["eval_sight_reliance"] == 0.0
    assert "eval_direction_accuracy_first_frame" in run.data.metrics
    assert "eval_direction_accuracy_other_episode" in run.data.metrics
    real = float(version.tags["metric.direction_accuracy_first"])
    assert registry.version_summary(version)["sight_reliance"] == {
        "real": real, "first_frame": real, "other_episodes": real, "drop": 0.0, "other_episodes_skipped": None}


def test_one_validation_episode_tags_the_other_episode_ablation_skipped(env, registered):
    name = f"{NAME}-one-val"
    _, one, _ = _register(env, registered["forward"], env["ids"][:1], min_margin=-0.01, model_name=name)
    version = registry.client().get_model_version(name, one["version"])
    assert "metric.direction_accuracy_other_episode" not in version.tags
    sight = registry.version_summary(version)["sight_reliance"]
    assert sight["other_episodes"] is None and "one validation episode" in sight["other_episodes_skipped"]
    assert sight["drop"] == 0.0 and sight["first_frame"] == sight["real"]


def _world(success: float, best_blind: float | None = 0.5, rollouts: float = 48.0) -> dict:
    """A closed_loop_metrics output as the closed-loop asset gives it for a simulated world."""
    headline = {"closed_loop_rollouts": rollouts, "closed_loop_success_rate": success, "closed_loop_spl": 0.6,
                "closed_loop_collision_rate": 0.1, "closed_loop_scripted_guide_success_rate": 1.0,
                "closed_loop_blind_side_script_success_rate": best_blind or 0.0,
                "closed_loop_always_forward_success_rate": 0.0,
                "closed_loop_frozen_success": 0.25, "closed_loop_blank_success": 0.125}
    if best_blind is not None:
        headline["closed_loop_best_blind_success_rate"] = best_blind
    return {"env": "vla_pipeline/BoxNav-v0", "skipped": None, "headline": headline}


def test_the_gate_weighs_closed_loop_success_against_the_best_blind_driver(env, registered):
    name = f"{NAME}-world"
    _, passed, passed_meta = _register(env, registered["forward"], env["ids"][:2], min_margin=-0.01, model_name=name,
                                       closed_loop=_world(0.80))
    assert passed["alias"] == "champion", passed_meta["reason"].value
    assert "over the best blind driver's 0.50 in the same scenes: margin +0.30" in passed_meta["reason"].value
    assert passed_meta["closed_loop_best_blind"].value == 0.5
    version = registry.client().get_model_version(name, passed["version"])
    assert version.tags["metric.closed_loop_best_blind_success_rate"] == "0.5000"
    assert version.tags["metric.closed_loop_frozen_success"] == "0.2500"
    assert version.tags["metric.closed_loop_blank_success"] == "0.1250"
    closed = registry.version_summary(version)["closed_loop"]
    assert (closed["success_rate"], closed["best_blind"], closed["frozen_success"], closed["blank_success"]) == (
        0.8, 0.5, 0.25, 0.125)
    assert list(closed["baselines"]) == ["scripted_guide", "best_blind", "blind_side_script", "always_forward"]
    # The same weights re-gated: too little over the blind driver, then no blind driver recorded at all.
    _, held, held_meta = _register(env, registered["forward"], env["ids"][:2], min_margin=-0.01, model_name=name,
                                   closed_loop=_world(0.70))
    assert held["alias"] == "challenger" and held["version"] == passed["version"]
    assert held_meta["reason"].value.endswith("margin +0.20, required at least +0.25: not met")
    _, blind, blind_meta = _register(env, registered["forward"], env["ids"][:2], min_margin=-0.01, model_name=name,
                                     closed_loop=_world(0.90, best_blind=None))
    assert blind["alias"] == "challenger" and "success was not recorded" in blind_meta["reason"].value
    again = registry.version_summary(registry.client().get_model_version(name, blind["version"]))["closed_loop"]
    assert again["best_blind"] is None and again["success_rate"] == 0.9  # not the earlier gating's 0.50


def _gate_state(name: str) -> dict[str, tuple[str, ...]]:
    """Each version's gate: (promotion tag, gate aliases it holds), by version number."""
    client = registry.client()
    holders = {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}
    return {str(v.version): (v.tags["promotion"], *sorted(a for a, held in holders.items() if held == str(v.version)))
            for v in client.search_model_versions(f"name = '{name}'")}


def test_a_regated_champion_that_fails_loses_champion(env, registered):
    name = f"{NAME}-regated"  # its own model: the other tests rely on NAME's aliases
    _, passed, _ = _register(env, registered["forward"], env["ids"][:2], min_margin=-0.01, model_name=name)
    assert passed["alias"] == "champion" and _gate_state(name) == {"1": ("champion", "champion")}
    instance = dg.DagsterInstance.ephemeral()
    _, failed, failed_meta = _register(env, registered["forward"], env["ids"][:2], min_margin=0.5, model_name=name,
                                       instance=instance)
    assert failed["alias"] == "challenger" and failed["version"] == "1"  # the same weights: re-gated, not duplicated
    assert "required more than +0.500: not met" in failed_meta["reason"].value
    assert _gate_state(name) == {"1": ("challenger", "challenger")}  # no longer @champion as well
    assert registry.version_by_alias(name, "champion") is None
    run_id = instance.get_runs(limit=1)[0].run_id
    warnings = [entry.user_message for entry in instance.all_logs(run_id) if entry.level >= logging.WARNING]
    assert any("v1 lost @champion" in w and "no version holds @champion now" in w for w in warnings), warnings
    # Passing again (the plain function, as the asset calls it), it takes @champion back and drops @challenger.
    tags = dict(registry.client().get_model_version(name, "1").tags)
    registry.register_gated_version(name, registered["forward"], tags, PromotionDecision("champion", "passes again"),
                                    run_id=None, experiment_id=experiment_id())
    assert _gate_state(name) == {"1": ("champion", "champion")}


def test_load_policy_by_alias_streams_robot_units(env, registered):
    policy = registry.load_policy(f"models:/{NAME}@champion")
    assert str(policy.metadata["version"]) == "1"
    frame = np.random.default_rng(0).integers(0, 256, (72, 128, 3), dtype=np.uint8)
    policy.reset()
    actions = policy.step(frame, "Navigate around the obstacle on the left side and reach the cup")
    np.testing.assert_allclose(actions, [[1.15, 0.0]] * policy.config.chunk, rtol=1e-6)


def test_registry_and_folder_policies_go_to_the_gpu_where_there_is_one(env, registered, monkeypatch):
    from vla_pipeline.policy.model import MobileVLAPolicy

    moved = []
    monkeypatch.setattr(registry.serving, "default_device", lambda: "cuda")
    monkeypatch.setattr(MobileVLAPolicy, "to", lambda self, device: moved.append(str(device)) or self)
    policy = registry.load_policy(f"models:/{NAME}@champion", device=None)
    registry.load_policy(registry.policy_directory(f"models:/{NAME}@champion")[0])
    assert moved == ["cuda", "cuda"]


def test_pyfunc_predict_streams_encoded_frames(env, registered):
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    frames = np.random.default_rng(1).integers(0, 256, (4, 72, 128, 3), dtype=np.uint8)
    rows = pd.DataFrame({
        "image": [cv2.imencode(".png", f)[1].tobytes() for f in frames],
        "instruction": ["Navigate around the obstacle on the right side and reach the cup"] * 4,
        "episode_id": ["a", "a", "b", "b"],
    })
    out = model.predict(rows)
    assert out.shape == (4, 2, 2)
    np.testing.assert_allclose(out[:, 0], [[1.15, 0.0]] * 4, rtol=1e-6)


def test_cli_model_and_predict(env, registered, capsys):
    assert cli.main(["model", "--model-uri", f"models:/{NAME}@champion"]) == 0
    shown = capsys.readouterr().out
    assert "version 1" in shown and "always_forward" in shown
    assert re.search(r"direction accuracy \(first step, validation on [1-9]\d* predictions\)", shown), shown
    episode = env["paths"][0]
    assert cli.main(["predict", "--model-uri", f"models:/{NAME}@champion", str(episode)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["frame"] for line in lines] == list(range(18))
    assert lines[0]["actions"] == [[1.15, 0.0], [1.15, 0.0]] and lines[0]["direction"] == "F"
    assert lines[1]["recorded"] == [1.15, 0.0]


@pytest.mark.parametrize("uri, message", [
    ("models:/no-such-model@champion", "no registered model 'no-such-model'"),
    (f"models:/{NAME}@gold", "has no alias 'gold' (aliases: @challenger → v2, @champion → v1)"),
    (f"models:/{NAME}/99", "has no version 99"),
    ("models:/", "expected models:/<name>@<alias>"),
    (f"models:/{NAME}/newest", "models:/<name>/<version> or models:/<name>/latest"),
])
def test_predict_names_an_unknown_model_or_alias(env, registered, capsys, uri, message):
    assert cli.main(["predict", "--model-uri", uri, str(env["paths"][0])]) == 2
    assert message in capsys.readouterr().err


def test_latest_is_the_highest_version_whatever_the_gate_decided(env, registered, capsys):
    numbers = [int(v.version) for v in registry.client().search_model_versions(f"name = '{NAME}'")]
    latest = registry.resolve_version(f"models:/{NAME}/latest")
    assert str(latest.version) == str(max(numbers)) and len(numbers) > 1
    assert str(latest.version) != str(registry.resolve_version(f"models:/{NAME}@champion").version)  # @challenger
    assert cli.main(["model", "--model-uri", f"models:/{NAME}/latest"]) == 0
    assert f"version {latest.version}" in capsys.readouterr().out


def test_predict_rejects_a_bad_file_before_loading_anything(env, registered, capsys, tmp_path):
    broken = tmp_path / "episode_20250614_101502_1box_hori_left_core_medium.h5"
    broken.write_bytes(b"not an hdf5 file at all")
    assert cli.main(["predict", "--model-uri", f"models:/{NAME}@champion", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {broken}") and "HDF5" in err
    assert cli.main(["predict", str(tmp_path / "missing.h5")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_predict_and_model_take_an_exported_bundle(env, registered, capsys, tmp_path):
    from vla_pipeline.policy.bundle import export_bundle

    champion = f"models:/{NAME}@champion"
    bundle = export_bundle(registry.policy_directory(champion)[0], tmp_path / "bundle", dtype="fp32")
    episode = str(env["paths"][1])
    predicted = {}
    for uri in (champion, str(bundle)):
        assert cli.main(["predict", "--model-uri", uri, episode]) == 0
        predicted[uri] = [json.loads(line)["actions"] for line in capsys.readouterr().out.splitlines()]
    np.testing.assert_allclose(predicted[str(bundle)], predicted[champion], atol=1e-5)
    assert cli.main(["model", "--model-uri", str(bundle)]) == 0
    assert "deploy bundle (fp32" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    for command in (["predict", "--model-uri", str(tmp_path / "empty"), episode],
                    ["model", "--model-uri", str(tmp_path / "empty")]):
        assert cli.main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "neither a policy directory" in err and "nor a deploy bundle" in err


def test_reading_commands_create_no_registry_where_there_is_none(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    environment = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DAGSTER_HOME")}
    cli_path = Path(sys.executable).parent / "vla-pipeline"
    for command in (["model"], ["model", "--model-uri", "models:/mobile-vla/1"]):
        done = subprocess.run([str(cli_path), *command], cwd=tmp_path, env=environment, capture_output=True, text=True)
        assert done.returncode == 2 and "no model registry at" in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []
