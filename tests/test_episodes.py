"""Validation: every rejection names its problem; unusual but valid files pass."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
from conftest import GOOD_NAME, write_episode_file

from vla_pipeline.data.episodes import (
    EpisodeRejected,
    ValidationRules,
    frame_ranges,
    inspect_episode,
    read_frames,
)
from vla_pipeline.data.schema import parse_scenario, side_of_instruction, window_starts


def rejection(path, rules=ValidationRules()) -> str:
    with pytest.raises(EpisodeRejected) as caught:
        header = inspect_episode(path, rules)
        read_frames(header, rules=rules)
    assert caught.value.path == path
    return caught.value.reason


def test_valid_legacy_episode(episode_dir):
    path = write_episode_file(episode_dir / f"{GOOD_NAME}.h5")
    header = inspect_episode(path)
    assert (header.num_frames, header.height, header.width) == (18, 72, 128)
    assert header.colour_order == "BGR"
    assert header.scenario.side == "left" and header.side == "left"
    assert header.instruction == "Navigate around the obstacle on the left side and reach the cup"
    assert header.instruction_source == "scenario"
    assert header.event_types[0] == "episode_start"
    assert read_frames(header).shape == (18, 224, 224, 3)


def test_later_layout_is_rgb_and_uses_scenario_attr(episode_dir):
    path = write_episode_file(
        episode_dir / "episode_20250820_141003_recording.h5", layout="observations", instruction="Go right of the pot"
    )
    header = inspect_episode(path)
    assert header.image_dataset == "observations/images" and header.colour_order == "RGB"
    assert header.scenario.name == "1box_hori_left_core_medium"
    assert header.instruction == "Go right of the pot" and header.instruction_source == "file"
    assert header.event_types == ["episode_start"] + ["start_action"] * 17


def test_bgr_source_becomes_rgb_and_rgb_source_is_kept(episode_dir):
    blue_bgr = np.zeros((18, 48, 64, 3), np.uint8)
    blue_bgr[..., 0] = 255  # pure blue in OpenCV's BGR order
    blue_bgr[:, :4] = 7  # a border so the frame is not blank
    legacy = write_episode_file(episode_dir / f"{GOOD_NAME}.h5", images=blue_bgr)
    centre = read_frames(inspect_episode(legacy))[0, 112, 112]
    assert centre.tolist() == [0, 0, 255]  # blue in RGB

    blue_rgb = blue_bgr[..., ::-1].copy()
    later = write_episode_file(episode_dir / "episode_20250820_141003_basket_1box_hori_left_core_far.h5",
                               images=blue_rgb, layout="observations")
    assert read_frames(inspect_episode(later))[0, 112, 112].tolist() == [0, 0, 255]


def test_other_resolution_and_extra_content_are_valid(episode_dir):
    def extras(h5):
        h5.create_dataset("odometry", data=np.zeros((18, 6)))
        h5.attrs["operator"] = "alice"

    path = write_episode_file(episode_dir / f"{GOOD_NAME}.h5", height=480, width=640, extra=extras)
    header = inspect_episode(path)
    assert (header.height, header.width) == (480, 640)
    assert read_frames(header).shape == (18, 224, 224, 3)


def test_instruction_in_file_wins_and_gives_side(episode_dir):
    path = write_episode_file(
        episode_dir / "episode_20250614_101502_custom.h5",
        instruction="Navigate around the obstacle on the right side and reach the bottle",
    )
    header = inspect_episode(path)
    assert header.scenario is None and header.side == "right"


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "empty (0 bytes)"),
        (b"this is a text file, not an episode\n" * 20, "not an HDF5 file"),
    ],
)
def test_unreadable_files(episode_dir, content, expected):
    path = episode_dir / f"{GOOD_NAME}.h5"
    path.write_bytes(content)
    assert expected in rejection(path)


def test_truncated_file(episode_dir):
    good = write_episode_file(episode_dir / "good.h5", height=240, width=320)
    path = episode_dir / f"{GOOD_NAME}.h5"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    reason = rejection(path)
    assert "truncated" in reason or "damaged" in reason


def test_truncated_tail_of_image_data(episode_dir):
    good = write_episode_file(episode_dir / "good.h5", height=240, width=320)
    path = episode_dir / f"{GOOD_NAME}.h5"
    shutil.copy(good, path)
    with open(path, "r+b") as handle:
        handle.truncate(int(good.stat().st_size * 0.9))
    reason = rejection(path)
    assert "truncated" in reason or "damaged" in reason


def test_missing_file(episode_dir):
    assert "not found" in rejection(episode_dir / f"{GOOD_NAME}.h5")


def _without(name):
    def damage(h5):
        del h5[name]

    return damage


def _replace(name, data):
    def damage(h5):
        del h5[name]
        h5.create_dataset(name, data=data)

    return damage


@pytest.mark.parametrize(
    "damage, expected",
    [
        (_without("images"), "missing images"),
        (_without("actions"), "missing actions"),
        (_replace("images", np.zeros((18, 8, 8, 3), np.float32)), "dtype float32; expected uint8"),
        (_replace("images", np.zeros((18, 8, 8), np.uint8)), "expected rank 4"),
        (_replace("actions", np.zeros(18, np.float32)), "actions has shape (18,)"),
        (_replace("actions", np.array([[b"w"] * 3] * 18)), "actions has dtype"),
        (_replace("actions", np.zeros((17, 3), np.float32)), "frame count mismatch"),
    ],
)
def test_schema_problems(episode_dir, damage, expected):
    path = write_episode_file(episode_dir / f"{GOOD_NAME}.h5", extra=damage)
    assert expected in rejection(path)


def test_nan_and_inf_actions_name_the_frames(episode_dir):
    actions = np.zeros((18, 3), np.float32)
    actions[3:5, 0] = np.nan
    path = write_episode_file(episode_dir / f"{GOOD_NAME}.h5", actions=actions)
    assert "actions has NaN at frames 3–4" in rejection(path)
    actions = np.zeros((18, 3), np.float32)
    actions[9, 1] = -np.inf
    path = write_episode_file(episode_dir / f"{GOOD_NAME}.h5", actions=actions)
    assert "actions has inf at frames 9" in rejection(path)


def test_action_bound_is_configurable(episode_dir):
    actions = np.zeros((18, 3), np.float32)
    actions[5, 0] = 11.5
    path = write_episode_file(episode_dir / f"{GOOD_NAME}.h5", actions=actions)
    assert "actions exceed ±1.2 at frames 5" in rejection(path)
    assert inspect_episode(path, ValidationRules(max_abs_action=20)).num_frames == 18


def test_too_few_frames_for_window_and_chunk(episode_dir):
    path = write_episode_file(episode_dir / f"{GOOD_NAME}.h5", frames=12)
    assert "only 12 frames; a training window needs 18" in rejection(path)
    assert inspect_episode(path, ValidationRules(window=8, chunk=1)).num_frames == 12
    assert inspect_episode(path, ValidationRules(min_frames=5)).num_frames == 12


def test_blank_frames(episode_dir):
    images = np.random.default_rng(1).integers(0, 256, (18, 72, 128, 3), dtype=np.uint8)
    images[6:8] = 0
    path = write_episode_file(episode_dir / f"{GOOD_NAME}.h5", images=images)
    assert "blank (constant) frames 6–7" in rejection(path)
    path = write_episode_file(episode_dir / f"{GOOD_NAME}.h5", images=np.full((18, 72, 128, 3), 128, np.uint8))
    assert "blank (constant) frames 0–17" in rejection(path)


def test_no_scenario_and_no_instruction(episode_dir):
    path = write_episode_file(episode_dir / "episode_20250614_101502_test_run.h5")
    assert "no language_instruction and no scenario" in rejection(path)


def test_frame_count_mismatch_in_event_types(episode_dir):
    events = ["episode_start"] + ["start_action"] * 10
    path = write_episode_file(
        episode_dir / f"{GOOD_NAME}.h5",
        extra=_replace("action_event_types", np.array([e.encode() for e in events])),
    )
    assert "action_event_types has 11" in rejection(path)


def test_resize_matches_opencv_area(episode_dir):
    path = write_episode_file(episode_dir / f"{GOOD_NAME}.h5", height=480, width=640)
    header = inspect_episode(path)
    import h5py

    with h5py.File(path) as h5:
        source = h5["images"][4]
    expected = cv2.cvtColor(cv2.resize(source, (224, 224), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
    assert np.array_equal(read_frames(header)[4], expected)


def test_scenario_parsing_and_helpers():
    scenario = parse_scenario("episode_20250820_141003_basket_2box_vert_right_variant_far")
    assert (scenario.boxes, scenario.layout, scenario.side, scenario.pattern, scenario.distance) == (
        "2box", "vert", "right", "variant", "far"
    )
    assert scenario.basket and scenario.target == "basket"
    assert parse_scenario("episode_20250614_101502_unknown") is None
    assert side_of_instruction("go around it on the Left side") == "left"
    assert side_of_instruction("not left but right") is None
    assert window_starts(18, 8, 10) == [0]
    assert window_starts(20, 8, 1) == list(range(12))
    assert window_starts(17, 8, 10) == []
    assert frame_ranges([9, 3, 4, 5, 11]) == "3–5, 9, 11"
