"""The BoxNav env: gymnasium's API, the sample episodes' scenes and frames, and how episodes end."""

from __future__ import annotations

import importlib
import math
import warnings
from datetime import datetime

import gymnasium
import h5py
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import vla_pipeline.sim
from vla_pipeline.data.schema import ACTION_SCALE, KEY_ACTIONS
from vla_pipeline.sim.env import ARENA_HALF_WIDTH, ENV_ID, MAX_PRESSES, SUCCESS_RADIUS, episode_generator
from vla_pipeline.sim.geometry import ROBOT_RADIUS, SWEEP_STEP, shortest_path, taut_path
from vla_pipeline.sim.operator import CORE_PRESSES, guide_keys, press_poses, write_episode

SMALL = {"height": 90, "width": 160}


def small_env(**kwargs):
    return gymnasium.make(ENV_ID, **SMALL, **kwargs).unwrapped


def press(env, keys: str):
    """Step `keys` until the episode ends; the last step's results."""
    for key in keys:
        observation, reward, terminated, truncated, info = env.step(np.array(KEY_ACTIONS[key][:2]))
        if terminated or truncated:
            break
    return observation, reward, terminated, truncated, info


def test_registered_and_passes_gymnasiums_checker():
    importlib.reload(vla_pipeline.sim)  # registering again must not fail
    env = gymnasium.make(ENV_ID, **SMALL, render_mode="rgb_array")
    with warnings.catch_warnings():  # the bounds are the robot's ±1.15 units, not [-1, 1]: by design
        warnings.filterwarnings("ignore", message=".*symmetric and normalized space.*")
        check_env(env.unwrapped)
    observation, info = env.reset(seed=0)
    assert np.array_equal(env.render(), observation["image"][..., ::-1])  # render() is RGB
    assert (env.metadata["observation_colour_order"], env.metadata["render_colour_order"]) == ("BGR", "RGB")


def test_registered_with_its_press_limit():
    assert gymnasium.spec(ENV_ID).max_episode_steps == MAX_PRESSES
    env = gymnasium.make(ENV_ID, **SMALL, camera=False)
    env.reset(seed=0)
    _, _, terminated, truncated, info = press(env, " " * (MAX_PRESSES + 5))
    assert truncated and not terminated and info["presses"] == MAX_PRESSES and info["outcome"] == "timeout"


def test_a_vector_reset_gives_each_sub_env_the_scenario_of_its_seed():
    env = small_env()
    assert not hasattr(env, "queued_options")
    plan = {5: "2box_vert_right_core_far", 6: "basket_1box_hori_left_core_close"}
    for seed, token in plan.items():
        _, info = env.reset(seed=seed, options={"scenario": plan})
        assert info["scenario"] == token and info == env.reset(
            seed=seed, options={"scenario": token})[1]
    assert env.reset(seed=7, options={"scenario": plan})[1] == env.reset(seed=7)[1]  # no entry: from the seed


def test_the_camera_leaves_every_later_reset_unchanged():
    """The renderer draws from the episode's own generator: seeded or not, the next scenes are
    the same with the camera off."""
    scenes = []
    for camera in (True, False):
        env = small_env(camera=camera)
        infos = [env.reset(seed=3)[1]]
        for keys in ("w", "ww", " ", "a"):
            press(env, keys)
            infos.append(env.reset()[1])
        scenes.append([(i["scenario"], i["obstacles"], i["target_xy"], i["target"]) for i in infos])
    assert scenes[0] == scenes[1] and len({repr(scene) for scene in scenes[0]}) == len(scenes[0])


def test_default_observation_is_a_collector_frame():
    env = gymnasium.make(ENV_ID)
    observation, info = env.reset(seed=0, options={"scenario": "2box_vert_right_core_far"})
    assert observation["image"].shape == (720, 1280, 3) and observation["image"].dtype == np.uint8
    assert observation in env.observation_space
    assert observation["instruction"] == "Navigate around the obstacle on the right side and reach the cup"
    assert np.allclose(env.action_space.low, -ACTION_SCALE) and np.allclose(env.action_space.high, ACTION_SCALE)


def test_the_env_draws_the_sample_episodes_scene_and_frames(tmp_path):
    """Same generator, same core scenario: the env's first frame is the recorded episode_start
    frame byte for byte, and the guide's presses walk the recorded poses."""
    keys = guide_keys("left", "close", "core", CORE_PRESSES)
    # reset(seed=11) seeds the env's generator with 11; the episode draws from its own, seeded by it
    path = write_episode(tmp_path / "e.h5", scenario="1box_vert_left_core_close", keys=keys,
                         rng=episode_generator(np.random.default_rng(11)), basket_era=True,
                         when=datetime(2025, 8, 20), **SMALL)
    with h5py.File(path) as h5:
        recorded_start = h5["images"][0]
    env = small_env()
    observation, info = env.reset(seed=11, options={"scenario": "basket_1box_vert_left_core_close"})
    assert info["target"] == "basket" and "basket" in observation["instruction"]
    assert np.array_equal(observation["image"], recorded_start)
    *_, info = press(env, keys)
    _, recorded_poses, goal_x = press_poses(keys)
    # The env's path is the start, then one pose per press; frame i of the file is captured at press i.
    assert np.allclose(info["path"][:-1], recorded_poses[1:], atol=1e-9)
    assert math.isclose(info["pose"][0], goal_x) and info["outcome"] == "success"


def test_a_seed_fixes_the_scene_and_the_first_frame():
    env = small_env()
    first, first_info = env.reset(seed=5)
    again, again_info = env.reset(seed=5)
    other, other_info = env.reset(seed=6)
    assert np.array_equal(first["image"], again["image"]) and first_info == again_info
    assert not np.array_equal(first["image"], other["image"])
    assert (first_info["scenario"], first_info["obstacles"]) != (other_info["scenario"], other_info["obstacles"])
    drawn = {env.reset(seed=seed)[1]["scenario"] for seed in range(12)}
    assert len(drawn) > 3 and all(token.split("_")[3] == "core" for token in drawn)


@pytest.mark.parametrize("token", ["1box_hori_up_core_close", "1box_hori_left_core",
                                   "episode_20250614_101502_1box_hori_left_core_medium", 7])
def test_an_unknown_scenario_is_refused_with_the_accepted_form(token):
    with pytest.raises(ValueError, match=r"\{1box\|2box\}_\{hori\|vert\}_\{left\|right\}"):
        small_env().reset(seed=0, options={"scenario": token})


def test_unknown_targets_and_options_are_refused():
    env = small_env()
    with pytest.raises(ValueError, match="cup, bottle, basket"):
        env.reset(options={"scenario": "1box_hori_left_core_close", "target": "plate"})
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"scenaro": "1box_hori_left_core_close"})
    _, info = env.reset(options={"scenario": "1box_hori_left_core_close", "target": "bottle"})
    assert info["target"] == "bottle" and "bottle" in info["instruction"]


@pytest.mark.parametrize("action, reason", [([np.nan, 0.0], "not finite"), ([0.0, np.inf], "not finite"),
                                            ([2.0, 0.0], "outside"), ([1.0, 0.0, 0.0], "shape")])
def test_an_invalid_action_ends_the_episode_with_its_reason(action, reason):
    env = small_env()
    env.reset(seed=0)
    observation, reward, terminated, truncated, info = env.step(np.array(action))
    assert terminated and not truncated and reward == 0.0
    assert info["outcome"] == "invalid_action" and reason in info["reason"]
    assert info["presses"] == 0 and info["pose"] == (0.0, 0.0)
    # A finished episode stays as it ended.
    assert env.step(np.zeros(2))[4]["outcome"] == "invalid_action"


def test_a_full_scale_action_within_float_rounding_is_a_press():
    env = small_env()
    env.reset(seed=0, options={"scenario": "1box_hori_left_core_far"})
    *_, info = env.step(np.array([ACTION_SCALE + 1e-6, 0.0]))
    assert info["outcome"] is None and math.isclose(info["pose"][0], press_poses("w")[2])


def test_a_collision_stops_the_robot_at_the_last_free_position():
    env = small_env()
    env.reset(seed=2, options={"scenario": "1box_vert_right_core_medium"})
    _, _, terminated, _, info = press(env, "w" * 10)
    near_edge = min(x0 for x0, *_ in info["obstacles"])
    assert terminated and info["outcome"] == "collision" and "box" in info["reason"]
    assert near_edge - SWEEP_STEP <= info["pose"][0] + ROBOT_RADIUS <= near_edge
    assert info["presses"] == 4  # three presses free (the box's near edge is 1.83 m +- 0.05 m), the 4th stopped


def test_passing_on_the_other_side_is_wrong_side():
    env = small_env()
    env.reset(seed=3, options={"scenario": "2box_hori_left_core_close"})
    _, _, terminated, _, info = press(env, guide_keys("right", "close", "core", CORE_PRESSES))
    assert terminated and info["outcome"] == "wrong_side" and "on the right, instructed left" in info["reason"]


def test_leaving_the_arena_is_lost_and_idling_times_out():
    env = small_env()
    env.reset(seed=4, options={"scenario": "1box_hori_left_core_far"})
    _, _, terminated, _, info = press(env, "a" * 10)
    assert terminated and info["outcome"] == "lost" and info["pose"][1] > ARENA_HALF_WIDTH
    env = small_env(max_presses=3)
    env.reset(seed=4)
    _, _, terminated, truncated, info = press(env, " " * 5)
    assert truncated and not terminated and info["outcome"] == "timeout" and info["presses"] == 3


def test_the_guide_reaches_the_success_circle_only_on_its_last_press():
    env = small_env()
    env.reset(seed=8, options={"scenario": "2box_vert_right_core_far"})
    keys = guide_keys("right", "far", "core", CORE_PRESSES)
    *_, info = press(env, keys[:-1])
    assert info["outcome"] is None and math.dist(info["pose"], info["target_xy"]) > SUCCESS_RADIUS
    _, reward, terminated, _, info = press(env, keys[-1])
    assert terminated and reward == 1.0 and info["outcome"] == "success"
    assert 0 < info["shortest_path"] < info["path_length"]


def test_the_shortest_path_is_a_taut_string_round_the_grown_corners():
    footprint = (2.0, 2.3, -0.3, 0.3)
    left = taut_path((0.0, 0.0), (6.0, 0.0), footprint, "left", clearance=0.1)
    assert left == [(0.0, 0.0), (1.9, 0.4), (2.4, 0.4), (6.0, 0.0)]
    expected = math.hypot(1.9, 0.4) + 0.5 + math.hypot(3.6, 0.4) - 1.0
    assert math.isclose(shortest_path((0.0, 0.0), (6.0, 0.0), 1.0, footprint, "left", 0.1), expected)
    assert math.isclose(shortest_path((0.0, 0.0), (6.0, 0.0), 1.0, footprint, "right", 0.1), expected)
    # A goal already clear of the obstacle on that side is reached in a straight line.
    assert taut_path((0.0, 0.0), (6.0, 3.0), footprint, "left", 0.1) == [(0.0, 0.0), (6.0, 3.0)]
