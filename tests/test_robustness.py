"""The robustness suite: conditions that change what the camera sees or how the instruction is
worded and nothing else, the offline image perturbations, and `vla-pipeline rollout --perturb`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_serving import set_constant_output

from vla_pipeline import cli
from vla_pipeline.data.instructions import HELD_OUT_PARAPHRASES, TRAINING_PARAPHRASES, fill, parse_instruction
from vla_pipeline.data.ingest import ingest_episodes
from vla_pipeline.data.schema import INSTRUCTION_TEMPLATE
from vla_pipeline.data.store import WindowStore
from vla_pipeline.evaluation import robustness as robustness_module
from vla_pipeline.evaluation.robustness import IMAGE_PERTURBATIONS, offline_robustness, perturb_images
from vla_pipeline.policy.model import build_policy, save_policy
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.sim.controllers import ScriptedGuide
from vla_pipeline.sim.env import SIGHT_ENV_ID, BoxNavEnv
from vla_pipeline.sim.geometry import ROBOT_RADIUS
from vla_pipeline.sim.operator import write_sample_episodes
from vla_pipeline.sim.perturb import CONDITIONS, NOMINAL, PERTURBED, parse_conditions
from vla_pipeline.sim.rollout import plan, run_rollouts

SMALL = {"height": 180, "width": 320}
SCENES = plan(6, 11)


def _start(name: str, seed: int, scenario: str):
    env = BoxNavEnv(world=SIGHT_ENV_ID, perturbation=name, **SMALL)
    observation, info = env.reset(seed=seed, options={"scenario": scenario})
    return env, observation, info


GEOMETRY = ("obstacles", "target_xy", "shortest_path", "side", "target", "scenario")


@pytest.mark.parametrize("name", PERTURBED)
def test_a_condition_changes_the_pixels_or_the_words_and_never_the_geometry(name):
    for seed, scenario in SCENES[:3]:
        _, plain, plain_info = _start(NOMINAL, seed, scenario)
        env, changed, info = _start(name, seed, scenario)
        assert {key: info[key] for key in GEOMETRY} == {key: plain_info[key] for key in GEOMETRY}
        assert info["perturbation"] == name
        if name == "paraphrase":
            assert np.array_equal(changed["image"], plain["image"])
            assert changed["instruction"] != plain["instruction"]
            assert changed["instruction"] in {fill(t, info["side"], info["target"]) for t in HELD_OUT_PARAPHRASES}
            assert parse_instruction(changed["instruction"]) == (info["side"], info["target"])
        else:
            assert changed["instruction"] == plain["instruction"]
            difference = np.abs(changed["image"].astype(int) - plain["image"]).mean()
            assert difference > 1.0, f"{name} barely changes the frame ({difference:.2f} grey levels on average)"
        # A step moves the robot exactly as in the plain room.
        step = env.step(np.array([1.15, 0.0], np.float32))[4]
        assert step["pose"] == pytest.approx((0.46, 0.0))


def test_the_guide_drives_every_condition_exactly_as_the_plain_room():
    plain = run_rollouts(ScriptedGuide, SCENES, env_kwargs=SMALL, env_id=SIGHT_ENV_ID)
    assert all(result.outcome == "success" for result in plain)
    for name in PERTURBED:
        changed = run_rollouts(ScriptedGuide, SCENES, env_kwargs={**SMALL, "perturbation": name}, env_id=SIGHT_ENV_ID)
        assert [(r.outcome, r.path) for r in changed] == [(r.outcome, r.path) for r in plain], name


def test_distractors_stand_off_every_path_the_operator_drives():
    env = BoxNavEnv(world=SIGHT_ENV_ID, perturbation="distractors", **SMALL)
    for (seed, scenario), result in zip(plan(48, 3), run_rollouts(ScriptedGuide, plan(48, 3), env_id=SIGHT_ENV_ID,
                                                                   env_kwargs={**SMALL, "camera": False})):
        env.reset(seed=seed, options={"scenario": scenario})
        distractors = env.episode.renderer.distractors
        assert len(distractors) == 2 and not any(box in env.episode.scene.boxes for box in distractors)
        widest = max(abs(y) for _, y in result.path)
        assert min(min(abs(b.y0), abs(b.y1)) for b in distractors) > widest + ROBOT_RADIUS + 0.1


def test_the_held_out_wordings_are_never_training_wordings():
    assert not set(HELD_OUT_PARAPHRASES) & {INSTRUCTION_TEMPLATE, *TRAINING_PARAPHRASES}
    for template in HELD_OUT_PARAPHRASES:
        assert parse_instruction(fill(template, "left", "basket")) == ("left", "basket")
    # "Keep the box on your right" passes it on the left: the meaning, not the word, is kept.
    assert parse_instruction("Keep the box on your right and reach the cup") == ("left", "cup")


def test_conditions_by_name():
    assert parse_conditions("all") == list(PERTURBED) and NOMINAL not in PERTURBED
    assert parse_conditions("paraphrase, dim") == ["dim", "paraphrase"]  # suite order
    for bad in ("dark", "", "all,dim"):
        with pytest.raises(ValueError, match="expected 'all' or a comma-separated list"):
            parse_conditions(bad)
    with pytest.raises(ValueError, match="perturbation 'fog'"):
        BoxNavEnv(world=SIGHT_ENV_ID, perturbation="fog")
    assert all(condition.description for condition in CONDITIONS.values())


@pytest.mark.parametrize("name", IMAGE_PERTURBATIONS)
def test_each_image_perturbation_changes_the_frames_and_keeps_their_format(name):
    frames = np.random.default_rng(0).integers(40, 200, (3, 224, 224, 3)).astype(np.uint8)
    frames[:, 100:140, 60:120] = (200, 30, 30)  # an edge for the blur and the warps to move
    changed = perturb_images(frames, name)
    assert changed.shape == frames.shape and changed.dtype == np.uint8
    assert np.abs(changed.astype(int) - frames).mean() > 2.0


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("robustness")
    ingest_episodes(write_sample_episodes(root / "episodes", 3, seed=4, height=90, width=160), root / "store.zarr")
    return root / "store.zarr"


def _brightness_driven(monkeypatch, threshold: float):
    """predict_frames replaced by a 'policy' that strafes left in frames darker than `threshold` and
    drives forward otherwise: the offline score must see what darkness does to it."""
    def predict(policy, images, instruction, repeat=1):
        bright = images.reshape(len(images), -1).mean(axis=1) > threshold
        actions = np.where(bright[:, None], [[1.15, 0.0]], [[0.0, 1.15]]).astype(np.float32)
        return actions[:, None, :].repeat(policy.config.chunk, axis=1)

    monkeypatch.setattr(robustness_module, "predict_frames", predict)


def test_offline_robustness_sees_a_policy_that_darkness_breaks(sample_store, tiny_backbone_path, monkeypatch):
    policy = build_policy(PolicyConfig.tiny(backbone=str(tiny_backbone_path)))
    ids = WindowStore(sample_store).episode_ids()
    _brightness_driven(monkeypatch, threshold=0.0)  # every frame counts as bright: nothing can move it
    steady = offline_robustness(policy, sample_store, ids)
    assert all(entry["drop"] == 0.0 for entry in steady["perturbations"].values())
    means = [WindowStore(sample_store).open_episode(i)["images"][:].mean() for i in ids]
    _brightness_driven(monkeypatch, threshold=0.8 * min(means))  # the recorded frames are bright, darker ones not
    broken = offline_robustness(policy, sample_store, ids)
    assert broken["unperturbed"] == steady["unperturbed"]
    assert broken["perturbations"]["darker"]["drop"] > 0.3 and broken["worst"] == "darker"
    assert "darker" not in broken["within_goal"] and "brighter" in broken["within_goal"]
    assert broken["paraphrase"]["skipped"] is None and broken["paraphrase"]["drop"] == 0.0


def test_offline_robustness_leaves_free_form_instructions_alone(sample_store, tiny_backbone_path, monkeypatch):
    ids = WindowStore(sample_store).episode_ids()
    policy = build_policy(PolicyConfig.tiny(backbone=str(tiny_backbone_path)))
    _brightness_driven(monkeypatch, threshold=0.0)
    monkeypatch.setattr(robustness_module, "parse_instruction", lambda text: None)  # as a robot's own wording
    result = offline_robustness(policy, sample_store, ids)
    assert "free-form" in result["paraphrase"]["skipped"]
    assert "offline_robustness_paraphrase_accuracy" not in robustness_module.offline_headline(result)


@pytest.mark.timeout(300)
def test_rollout_perturb(tmp_path, tiny_backbone_path, capsys):
    policy = build_policy(PolicyConfig.tiny(backbone=str(tiny_backbone_path)))
    set_constant_output(policy, 20.0, 0.0)  # W on every press
    directory = save_policy(policy, tmp_path / "forward" / "policy")
    arguments = ["rollout", str(directory), "--episodes", "2", "--camera", "small", "--envs", "1"]
    assert cli.main([*arguments, "--perturb", "dim,paraphrase", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["driver"] for line in lines[:-1]] == ["nominal"] * 2 + ["dim"] * 2 + ["paraphrase"] * 2
    summary = lines[-1]["summary"]
    assert list(summary["robustness"]) == ["nominal", "dim", "paraphrase"]
    assert {name: rates["collision_rate"] for name, rates in summary["robustness"].items()} == {
        "nominal": 1.0, "dim": 1.0, "paraphrase": 1.0}
    assert summary["worst"] == {"condition": "dim", "success_rate": 0.0} and summary["mean_success"] == 0.0
    assert lines[-1]["conditions"]["episodes"] == 2

    assert cli.main([*arguments, "--perturb", "blur"]) == 0
    shown = capsys.readouterr().out
    assert "nominal" in shown and "blur" in shown and "worst: blur 0.00" in shown

    for bad, message in ((["--perturb", "fog"], "--perturb: perturbations fog"),
                         (["--perturb", "all", "--scenario", "1box_hori_left_core_far"], "it takes no --scenario")):
        assert cli.main([*arguments, *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
