"""Closed-loop evaluation: a policy drives the simulated robot through the asset, the gate and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import pytest
from test_serving import set_constant_output

from assets.closed_loop import closed_loop_metrics
from assets.evaluation import evaluation_metrics, registered_model
from assets.robustness import robustness
from resources import ComputeResource, WindowStoreResource
from vla_pipeline import cli
from vla_pipeline.data.ingest import ingest_episodes
from vla_pipeline.data.store import WindowStore
from vla_pipeline.evaluation import registry
from vla_pipeline.evaluation.closed_loop import PolicyDriver, world_of_episodes
from vla_pipeline.policy.model import build_policy, save_policy
from vla_pipeline.policy.policy_config import ACTION_STATS_FILE, PolicyConfig
from vla_pipeline.policy.serving import StreamingPolicy
from vla_pipeline.sim.env import ENV_ID, SIGHT_ENV_ID
from vla_pipeline.sim.operator import write_sample_episodes
from vla_pipeline.tracking import RUN_ID_FILE, experiment_id

NAME = "mobile-vla-closed-loop"
SMALL_CAMERA = {"episodes": 12, "envs": 2, "camera": "small"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_backbone_path):
    """Sample episodes (rendered in the sim world) in a store, and an always-forward policy."""
    root = tmp_path_factory.mktemp("closed_loop")
    paths = write_sample_episodes(root / "episodes", 8, seed=0, height=90, width=160)
    store_path = root / "store.zarr"
    ingest_episodes(paths, store_path)
    ids = WindowStore(store_path).episode_ids()
    policy = build_policy(PolicyConfig.tiny(backbone=str(tiny_backbone_path)))
    set_constant_output(policy, 20.0, 0.0)  # W on every press: offline it is the always-forward baseline
    directory = save_policy(policy, root / "forward" / "policy")
    (directory / ACTION_STATS_FILE).write_text(json.dumps({"mean": [0.8, 0.0]}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        with mlflow.start_run(experiment_id=experiment_id()) as run:
            (directory.parent / RUN_ID_FILE).write_text(run.info.run_id)
        yield {"root": root, "store": store_path, "ids": ids, "policy_dir": str(directory), "run_id": run.info.run_id}


def test_sample_episodes_name_their_world_and_robot_episodes_none():
    assert world_of_episodes([{"simulator": ENV_ID}] * 3)[0] == ENV_ID
    assert world_of_episodes([{"simulator": SIGHT_ENV_ID}] * 3)[0] == SIGHT_ENV_ID
    world, why = world_of_episodes([{"simulator": None}] * 3)
    assert world is None and "robot episodes" in why
    world, why = world_of_episodes([{"simulator": ENV_ID}, {}])
    assert world is None and "1 of 2 episodes" in why
    world, why = world_of_episodes([{"simulator": ENV_ID}, {"simulator": SIGHT_ENV_ID}])
    assert world is None and "2 simulated worlds" in why and "name one in the config" in why


def test_driver_feeds_the_start_frame_twice_like_the_recordings(tiny_backbone_path):
    policy = build_policy(PolicyConfig.tiny(backbone=str(tiny_backbone_path))).eval()
    driver = PolicyDriver(StreamingPolicy(policy))
    frame = np.zeros((90, 160, 3), np.uint8)
    driver.reset("Navigate around the obstacle on the left side and reach the cup", {})
    action = driver.act(frame, "Navigate around the obstacle on the left side and reach the cup")
    assert action.shape == (2,) and driver.stream.frames_in_window == 2
    driver.act(frame, "Navigate around the obstacle on the left side and reach the cup")
    assert driver.stream.frames_in_window == 3


def test_the_sight_ablations_show_the_policy_the_first_frame_or_grey(tiny_backbone_path, monkeypatch):
    from vla_pipeline.evaluation.closed_loop import BLANK_GREY, BlankCameraDriver, FrozenCameraDriver

    shown = []
    monkeypatch.setattr(StreamingPolicy, "step", lambda self, image, instruction: shown.append(image.copy())
                        or np.zeros((1, 2), np.float32))
    policy = StreamingPolicy(build_policy(PolicyConfig.tiny(backbone=str(tiny_backbone_path))))
    frames = [np.full((9, 16, 3), value, np.uint8) for value in (10, 20, 30)]
    for driver_class, expected in ((FrozenCameraDriver, [10] * 4 + [20] * 3), (BlankCameraDriver, [BLANK_GREY] * 7)):
        shown.clear()
        driver = driver_class(policy)
        for rollout in range(2):  # a new rollout freezes on its own first frame
            driver.reset("Navigate around the obstacle on the left side and reach the cup", {})
            for frame in (frames if rollout == 0 else frames[1:]):
                driver.act(frame, "Navigate around the obstacle on the left side and reach the cup")
        assert [int(image.mean()) for image in shown] == expected, driver_class.__name__
        assert all(image.shape == (9, 16, 3) for image in shown)


def test_the_drivers_of_every_rollout_share_one_compiled_backbone(tiny_backbone_path, monkeypatch):
    import torch

    from vla_pipeline.sim.rollout import plan, run_rollouts

    compiles = []
    monkeypatch.setattr(torch, "compile", lambda module, **options: compiles.append(1) or module)
    policy = StreamingPolicy(build_policy(PolicyConfig.tiny(backbone=str(tiny_backbone_path))), compiled=True)
    results = run_rollouts(lambda: PolicyDriver(policy), plan(3, 0), env_kwargs={"height": 90, "width": 160})
    assert len(results) == 3 and len(compiles) == 1


ROBUSTNESS_OFF = {"env": "none"}
SMALL_ROBUSTNESS = {"episodes": 2, "envs": 1, "camera": "small", "conditions": "dim,paraphrase"}


def _materialize(world, closed_loop_config, robustness_config=ROBUSTNESS_OFF, **options):
    split = {"train": world["ids"][:-2], "val": world["ids"][-2:], "val_fraction": 0.25}

    @dg.asset(name="lora_adapter")
    def given_adapter():
        return world["policy_dir"]

    @dg.asset(name="train_val_split")
    def given_split():
        return split

    return dg.materialize(
        [given_adapter, given_split, evaluation_metrics, closed_loop_metrics, robustness, registered_model],
        resources={"window_store": WindowStoreResource(path=str(world["store"])), "compute": ComputeResource()},
        run_config={"ops": {"registered_model": {"config": {"model_name": NAME, "min_accuracy_margin": -1.0,
                                                            "min_closed_loop_rollouts": 12}},
                            "closed_loop_metrics": {"config": closed_loop_config},
                            "robustness": {"config": robustness_config}}},
        **options,
    )


@pytest.mark.timeout(300)
def test_a_policy_that_drives_into_the_box_stays_challenger(world, capsys):
    training_dir = Path(world["policy_dir"]).parent
    (training_dir / "closed_loop").mkdir(exist_ok=True)
    (training_dir / "closed_loop" / "success.mp4").write_bytes(b"an earlier run's video")
    result = _materialize(world, SMALL_CAMERA, SMALL_ROBUSTNESS)
    assert result.success
    closed = result.output_for_node("closed_loop_metrics")
    assert closed["env"] == SIGHT_ENV_ID and closed["episodes"] == 12  # the sample episodes' world
    policy, baselines = closed["summary"]["policy"], closed["summary"]["baselines"]
    assert policy["success_rate"] == 0.0 and policy["collision_rate"] == 1.0
    assert baselines["scripted_guide"]["success_rate"] == 1.0 and baselines["always_forward"]["success_rate"] == 0.0
    assert list(baselines) == ["scripted_guide", "best_blind", "blind_side_script", "always_forward"]
    ablations = closed["summary"]["ablations"]  # W whatever it sees: blinding changes nothing
    assert {name: rates["collision_rate"] for name, rates in ablations.items()} == {"frozen": 1.0, "blank": 1.0}
    assert closed["headline"]["closed_loop_frozen_success"] == closed["headline"]["closed_loop_blank_success"] == 0.0
    assert len(policy["per_cell"]) == 12
    metadata = result.asset_materializations_for_node("closed_loop_metrics")[0].metadata
    assert metadata["success_rate"].value == 0.0 and "![" in metadata["paths"].value
    assert metadata["frozen_camera_success"].value == 0.0 and metadata["best_blind_success"].value == 0.0
    assert "best_blind success" in [column.name for column in metadata["per_cell"].value.schema.columns]
    drivers = [record.data["driver"] for record in metadata["policy_vs_baselines"].value.records]
    assert drivers == ["policy", "scripted_guide", "best_blind", "blind_side_script", "always_forward",
                       "policy, frozen camera", "policy, blank camera"]
    assert "video_failure" in metadata and "video_success" not in metadata

    registered = result.output_for_node("registered_model")
    assert registered["alias"] == "challenger"  # offline it passed (margin -1): closed loop held it back
    reason = result.asset_materializations_for_node("registered_model")[0].metadata["reason"].value
    assert "closed-loop success 0.00 in 12 rollouts, required at least 0.50 in at least 12: not met" in reason
    version = registry.client().get_model_version(NAME, registered["version"])
    assert version.tags["closed_loop"] == SIGHT_ENV_ID and version.tags["metric.closed_loop_success_rate"] == "0.0000"
    assert version.tags["metric.closed_loop_scripted_guide_success_rate"] == "1.0000"
    assert version.tags["metric.closed_loop_best_blind_success_rate"] == "0.0000"
    assert cli.main(["model", "--model-uri", f"models:/{NAME}/{registered['version']}"]) == 0
    shown = capsys.readouterr().out
    assert (f"closed loop in {SIGHT_ENV_ID} (12 rollouts): success 0.00, SPL 0.00, collisions 1.00 | same scenes: "
            "scripted_guide 1.00 | best_blind 0.00 | blind_side_script 0.08 | always_forward 0.00") in shown
    assert "closed loop, sight ablations: frozen camera 0.00, blank camera 0.00; the best blind driver 0.00" in shown
    assert "sight reliance (first step, validation): real frames" in shown

    run = mlflow.get_run(world["run_id"])
    assert run.data.metrics["closed_loop_success_rate"] == 0.0
    folder = f"closed_loop/{result.run_id}"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(world["run_id"], folder)}
    assert artifacts == {f"{folder}/paths.png", f"{folder}/failure.mp4", f"{folder}/closed_loop.json"}
    record = json.loads((training_dir / folder / "closed_loop.json").read_text())
    assert {key: record[key] for key in ("env", "env_version", "camera", "envs", "seed", "episodes")} == {
        "env": SIGHT_ENV_ID, "env_version": 1, "camera": {"name": "small", "height": 180, "width": 320}, "envs": 2,
        "seed": 0, "episodes": 12}
    assert len(record["rollouts"]) == 12 and set(record["baseline_rollouts"]) == set(closed["summary"]["baselines"])
    assert {name: len(found) for name, found in record["ablation_rollouts"].items()} == {"frozen": 12, "blank": 12}

    # Robustness: as trained and under each condition asked for, in the same world; offline on the val episodes.
    robust = result.output_for_node("robustness")
    assert robust["env"] == SIGHT_ENV_ID and list(robust["closed_loop"]["robustness"]) == ["nominal", "dim", "paraphrase"]
    assert all(rates["collision_rate"] == 1.0 and rates["rollouts"] == 2
               for rates in robust["closed_loop"]["robustness"].values())
    assert robust["closed_loop"]["worst"] == {"condition": "dim", "success_rate": 0.0}  # the first of a tie
    assert set(robust["offline"]["perturbations"]) == {"brighter", "darker", "colour_cast", "blur", "shift", "crop",
                                                       "rotation"}
    assert robust["offline"]["paraphrase"]["skipped"] is None  # the sample episodes' instructions are known wordings
    meta = result.asset_materializations_for_node("robustness")[0].metadata
    assert meta["worst_condition"].value == "dim" and "![" in meta["chart"].value and "![" in meta["condition_frames"].value
    assert [r.data["condition"] for r in meta["per_condition"].value.records] == ["nominal", "dim", "paraphrase"]
    assert [r.data["perturbation"] for r in meta["offline_per_perturbation"].value.records][-1] == "paraphrase"
    assert version.tags["robustness_worst"] == "dim 0.00"
    assert version.tags["metric.robustness_paraphrase_success"] == "0.0000"
    assert "metric.offline_robustness_blur_accuracy" in version.tags
    assert run.data.metrics["robustness_worst_success"] == 0.0 and "offline_robustness_worst_drop" in run.data.metrics
    folder = f"robustness/{result.run_id}"
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(world["run_id"], folder)} == {
        f"{folder}/conditions.png", f"{folder}/robustness.png", f"{folder}/robustness.json"}
    assert "robustness: worst closed-loop condition dim 0.00, mean over the conditions 0.00 | offline accuracy" in shown


def test_the_closed_loop_can_be_turned_off_and_never_blocks_robot_data(world):
    result = _materialize(world, {"env": "none"})
    assert result.success
    assert result.output_for_node("closed_loop_metrics") == {"env": None, "skipped": "closed loop off in config (env: none)"}
    assert result.output_for_node("registered_model")["alias"] == "champion"
    version = registry.client().get_model_version(NAME, result.output_for_node("registered_model")["version"])
    assert version.tags["closed_loop"].startswith("skipped: closed loop off")


@pytest.mark.timeout(300)
def test_an_error_of_the_machine_fails_the_asset_with_its_message(world, monkeypatch):
    class OutOfMemoryError(RuntimeError):
        pass

    def out_of_memory(self, image, instruction):
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(PolicyDriver, "act", out_of_memory)
    result = _materialize(world, {**SMALL_CAMERA, "episodes": 4}, raise_on_error=False)
    assert not result.success
    failure = next(event for event in result.all_events if event.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "closed_loop_metrics"
    assert "CUDA out of memory" in str(failure.event_specific_data.error) and "the machine failed" in str(
        failure.event_specific_data.error)


@pytest.mark.timeout(300)
def test_rollout_command(world, capsys, tiny_backbone_path, tmp_path):
    uri = world["policy_dir"]
    assert cli.main(["rollout", uri, "--episodes", "2", "--camera", "small", "--json", "--envs", "1",
                     "--video", str(tmp_path / "videos")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["driver"] for line in lines[:2]] == ["policy", "policy"] and lines[0]["outcome"] == "collision"
    assert [line["driver"] for line in lines[2:-1]] == [name for name in (
        "scripted_guide", "best_blind", "blind_side_script", "always_forward", "frozen", "blank") for _ in range(2)]
    assert [line["outcome"] for line in lines[2:4]] == ["success"] * 2
    assert lines[-1]["conditions"] == {"env": SIGHT_ENV_ID, "env_version": 1,
                                       "camera": {"name": "small", "height": 180, "width": 320},
                                       "envs": 1, "seed": 0, "episodes": 2}
    summary = lines[-1]["summary"]
    assert set(summary["policy"]) >= {"success_rate", "spl", "collision_rate", "wrong_side_rate", "stopped_away_rate"}
    assert list(summary["baselines"]) == ["scripted_guide", "best_blind", "blind_side_script", "always_forward"]
    assert summary["baselines"]["scripted_guide"]["success_rate"] == 1.0
    assert set(summary["ablations"]) == {"frozen", "blank"}
    assert len(list((tmp_path / "videos").glob("rollout_*_collision.mp4"))) == 2

    # A policy whose actions are NaN fails each rollout with the reason; the run goes on.
    broken = build_policy(PolicyConfig.tiny(backbone=str(tiny_backbone_path)))
    set_constant_output(broken, math.nan, 0.0)
    directory = save_policy(broken, tmp_path / "nan" / "policy")
    assert cli.main(["rollout", str(directory), "--episodes", "2", "--camera", "small", "--json",
                     "--no-baselines"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["outcome"] for line in lines[:2]] == ["invalid_action"] * 2
    assert "not finite" in lines[0]["reason"] and lines[-1]["summary"]["policy"]["invalid_action_rate"] == 1.0

    # An error of the machine ends the command with its message, not a table of failures.
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as patch:
        patch.setattr(PolicyDriver, "act", lambda *_: (_ for _ in ()).throw(RuntimeError("CUDA error: unknown")))
        assert cli.main(["rollout", uri, "--episodes", "2", "--camera", "small", "--no-baselines"]) == 1
    assert "CUDA error: unknown" in capsys.readouterr().err


def test_rollout_drives_in_the_env_it_is_given(world, capsys, monkeypatch):
    import gymnasium

    import vla_pipeline.evaluation.closed_loop as closed_loop_module

    other = "vla_pipeline/BoxNavTest-v3"
    if other not in gymnasium.registry:
        gymnasium.register(id=other, entry_point="vla_pipeline.sim.env:BoxNavEnv", max_episode_steps=30)
    monkeypatch.setattr(closed_loop_module, "WORLDS", (ENV_ID, SIGHT_ENV_ID, other))
    assert cli.main(["rollout", world["policy_dir"], "--env", other, "--episodes", "1", "--camera", "small",
                     "--json", "--no-baselines"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["conditions"]["env"] == other


@pytest.mark.parametrize("arguments, message", [
    (["models:/no-such-model@champion"], "no registered model 'no-such-model'"),
    (["{policy}", "--scenario", "3box_hori_left_core_far"], "--scenario: options['scenario'] = '3box_hori_left_core_far'"),
    (["{policy}", "--env", "CartPole-v1"], "--env 'CartPole-v1': no such simulated world"),
])
def test_rollout_says_what_is_wrong_in_one_line(world, capsys, arguments, message):
    arguments = [a.format(policy=world["policy_dir"]) for a in arguments]
    assert cli.main(["rollout", *arguments]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
