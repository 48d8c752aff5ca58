"""Training windows read from the store: indexing, offsets, augmentation, loaders, reference loader."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from conftest import GOOD_NAME, write_episode_file

from vla_pipeline.data.ingest import ingest_episode
from vla_pipeline.data.schema import training_starts, window_starts
from vla_pipeline.data.store import WindowStore
from vla_pipeline.data.instructions import TEMPLATES, TRAINING_PARAPHRASES, fill, paraphrase, parse_instruction
from vla_pipeline.data.schema import OTHER_SIDE, commanded, mirror_instruction
from vla_pipeline.training.train_config import TrainConfig
from vla_pipeline.training.windows import (
    Augmentation,
    HDF5WindowDataset,
    WindowDataset,
    action_chunks,
    collate_windows,
    make_loader,
)

RIGHT_NAME = "episode_20250614_101600_1box_vert_right_core_far"
FRAMES = {GOOD_NAME: 20, RIGHT_NAME: 23}
W, C = 8, 10  # the store's window and chunk (ValidationRules defaults)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A store with a legacy (BGR) episode and an observations/images (RGB) one."""
    root = tmp_path_factory.mktemp("windows")
    store = WindowStore(root / "store.zarr").create(224)
    paths = [
        write_episode_file(root / f"{GOOD_NAME}.h5", frames=20, height=48, width=64, seed=1),
        write_episode_file(root / f"{RIGHT_NAME}.h5", frames=23, height=48, width=64, seed=2,
                           layout="observations"),
    ]
    for path in paths:
        assert ingest_episode(path, store.path).status == "stored"
    return store, paths


@pytest.fixture(scope="module")
def store(built):
    return built[0]


def dataset(store, **kwargs) -> WindowDataset:
    kwargs = {"window": W, "chunk": C, **kwargs}
    return WindowDataset(store.path, store.episode_ids(), **kwargs)


def test_length_and_item_format(store):
    data = dataset(store)
    assert len(data) == sum(len(training_starts(t, W, C)) for t in FRAMES.values()) == 13 + 16
    item = data[0]
    assert item["images"].shape == (W, 224, 224, 3) and item["images"].dtype == torch.uint8
    assert item["actions"].shape == (W, C, 2) and item["actions"].dtype == torch.float32
    assert item["action_mask"].shape == (W, C) and item["action_mask"].dtype == torch.bool
    # Every step is a command but frame 0's: the episode_start frame's zero action is no key press.
    assert not item["action_mask"][0, 0] and item["action_mask"].sum() == W * C - 1
    assert data[1]["action_mask"].all()
    assert (item["episode_id"], item["start"], item["side"]) == (GOOD_NAME, 0, "left")
    assert isinstance(item["instruction"], str) and "left" in item["instruction"]
    assert data[len(data) - 1]["side"] == "right"


def test_actions_are_normalised_chunks_at_the_right_offsets(store):
    data = dataset(store)
    index = data.index.index((RIGHT_NAME, 4))
    item = data[index]
    group = store.open_episode(RIGHT_NAME)
    stored = group["actions"][:]
    for t in range(W):  # frame start+t predicts actions[start+t : start+t+C]
        expected = stored[4 + t : 4 + t + C] / np.float32(1.15)
        np.testing.assert_array_equal(item["actions"][t].numpy(), expected)
    assert set(np.unique(item["actions"].numpy())) <= {-1.0, 0.0, 1.0}
    assert np.abs(item["actions"].numpy()).max() == 1.0
    np.testing.assert_array_equal(item["images"].numpy(), group["images"][4 : 4 + W])


def test_window_and_chunk_other_than_the_store_attrs(store):
    data = dataset(store, window=4, chunk=1)
    assert len(data) == (20 - 4 + 1) + (23 - 4 + 1)
    item = data[data.index.index((GOOD_NAME, 15))]
    stored = store.open_episode(GOOD_NAME)["actions"][:]
    assert item["images"].shape == (4, 224, 224, 3) and item["actions"].shape == (4, 1, 2)
    np.testing.assert_array_equal(item["actions"][:, 0].numpy(), stored[15:19] / np.float32(1.15))


def test_tail_windows_train_the_last_frame_on_the_last_action(store):
    """An episode's last frame is an input and its last action (a recorded stop, say) a target:
    the windows past the last complete one are kept, their missing steps masked."""
    assert training_starts(20, W, C) == list(range(13)) and window_starts(20, W, C) == [0, 1, 2]
    assert training_starts(17, W, C) == [] == window_starts(17, W, C)  # too short for any window
    data = dataset(store)
    item = data[data.index.index((GOOD_NAME, 20 - W))]
    stored = store.open_episode(GOOD_NAME)["actions"][:]
    np.testing.assert_array_equal(item["images"].numpy(), store.open_episode(GOOD_NAME)["images"][20 - W :])
    assert item["action_mask"][-1].tolist() == [True] + [False] * (C - 1)
    np.testing.assert_array_equal(item["actions"][-1, 0].numpy(), stored[-1] / np.float32(1.15))
    assert item["action_mask"].sum() == sum(min(C, W - t) for t in range(W))


def test_mask_marks_missing_steps_at_an_episode_end():
    raw = np.full((5, 2), 1.15, np.float32)  # W + C - 1 = 6 rows wanted, 5 left
    actions, mask = action_chunks(raw, window=3, chunk=4, scale=1.15)
    assert mask.tolist() == [[True] * 4, [True] * 4, [True, True, True, False]]
    assert actions[2, 3].tolist() == [0.0, 0.0] and (actions[mask] == 1.0).all()
    clipped, _ = action_chunks(np.full((6, 2), -2.0, np.float32), 3, 4, 1.15)
    assert clipped.min() == -1.0


def test_mask_leaves_out_the_episode_start_frame():
    raw = np.full((6, 2), 1.15, np.float32)
    _, mask = action_chunks(raw, window=3, chunk=4, scale=1.15, is_command=commanded(
        ["episode_start", "start_action", "start_action", "stop_action", "start_action", "start_action"]))
    assert mask.tolist() == [[False, True, True, True], [True] * 4, [True] * 4]  # a manual stop is a command


def test_mirror_instruction():
    text = "Go around on the Left side, not the right"
    assert mirror_instruction(text) == "Go around on the Right side, not the left"
    assert mirror_instruction("LEFT then right; leftover stays") == "RIGHT then left; leftover stays"


def test_mirror_flips_images_actions_instruction_and_side(store):
    plain = dataset(store)
    mirrored = dataset(store, train=True, augmentation=Augmentation(mirror_prob=1.0))
    untouched = dataset(store, train=False, augmentation=Augmentation.of(TrainConfig(mirror_prob=1.0)))
    checked_y = False
    for index in range(len(plain)):
        base, flip, same = plain[index], mirrored[index], untouched[index]
        assert torch.equal(flip["images"], base["images"].flip(2))
        assert torch.equal(flip["actions"][..., 0], base["actions"][..., 0])
        assert torch.equal(flip["actions"][..., 1], -base["actions"][..., 1])
        checked_y |= bool(base["actions"][..., 1].any())
        assert flip["instruction"] == mirror_instruction(base["instruction"]) != base["instruction"]
        assert {flip["side"], base["side"]} == {"left", "right"}
        for key in base:
            assert (torch.equal(same[key], base[key]) if isinstance(base[key], torch.Tensor)
                    else same[key] == base[key])
    assert checked_y


@pytest.mark.parametrize("change", [dict(brightness=0.4), dict(contrast=0.3), dict(saturation=0.3), dict(hue=0.05),
                                    dict(crop_scale=0.8), dict(blur_prob=1.0)])
def test_each_image_augmentation_changes_every_frame_alike_and_is_off_at_zero(store, change):
    plain = dataset(store)
    changed = dataset(store, train=True, augmentation=Augmentation(**change))
    off = dataset(store, train=True, augmentation=Augmentation())
    moved = 0
    for index in range(6):
        base, item = plain[index]["images"].numpy(), changed[index]["images"]
        assert item.dtype == torch.uint8 and item.shape == plain[index]["images"].shape
        moved += not np.array_equal(item.numpy(), base)
        assert np.array_equal(off[index]["images"].numpy(), base)
        # The same change for every frame: a frame that repeats its predecessor still does.
        for t in range(1, len(base)):
            if np.array_equal(base[t], base[t - 1]):
                assert np.array_equal(item[t].numpy(), item[t - 1].numpy())
    assert moved >= 5  # a draw may leave one window as it was (a 1.0 factor), not most


def test_paraphrase_rewords_known_instructions_and_keeps_their_meaning(store):
    plain = dataset(store)
    reworded = dataset(store, train=True, augmentation=Augmentation(paraphrase_prob=1.0))
    for index in range(len(plain)):
        base, item = plain[index], reworded[index]
        assert item["instruction"] != base["instruction"]
        assert item["instruction"] in {fill(t, *parse_instruction(base["instruction"])) for t in TRAINING_PARAPHRASES}
        assert parse_instruction(item["instruction"]) == parse_instruction(base["instruction"])
        assert item["side"] == base["side"] and torch.equal(item["images"], base["images"])
    both = dataset(store, train=True, augmentation=Augmentation(paraphrase_prob=1.0, mirror_prob=1.0))
    for index in range(len(plain)):
        side, target = parse_instruction(plain[index]["instruction"])
        assert parse_instruction(both[index]["instruction"]) == (OTHER_SIDE[side], target)


def test_paraphrase_leaves_free_form_instructions_alone():
    rng = np.random.default_rng(0)
    assert paraphrase("bring me the red mug please", rng) == "bring me the red mug please"
    for template in TEMPLATES:
        for side in ("left", "right"):
            assert parse_instruction(fill(template, side, "cup").upper() + ".") == (side, "cup")


def test_augmentation_is_deterministic_per_seed_index_and_epoch(store):
    def items(seed=0, epoch=0):
        data = dataset(store, train=True, seed=seed, augmentation=Augmentation.of(TrainConfig()))
        data.set_epoch(epoch)
        return [(item["images"], item["instruction"]) for item in map(data.__getitem__, range(len(data)))]

    def same(a, b):
        return all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))

    first = items()
    assert same(first, items())
    assert not same(first, items(epoch=1))
    assert not same(first, items(seed=1))
    assert not same(first, list(reversed(first)))


def test_dataset_pickles_without_open_arrays(store):
    data = dataset(store)
    before = data[2]
    assert data._arrays
    copy = pickle.loads(pickle.dumps(data))
    assert copy._arrays == {}
    assert torch.equal(copy[2]["images"], before["images"])


def test_two_workers_give_the_same_batches_as_none(store):
    plain = list(make_loader(dataset(store), batch_size=4, shuffle=False, workers=0))
    workers = list(make_loader(dataset(store), batch_size=4, shuffle=False, workers=2))
    assert [len(b["start"]) for b in plain] == [4] * 7 + [1]
    assert len(plain) == len(workers)
    for a, b in zip(plain, workers):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
    assert plain[0]["images"].shape == (4, W, 224, 224, 3)


def test_persistent_workers_follow_set_epoch_and_shuffle_follows_seed(store):
    data = dataset(store, train=True)
    loader = make_loader(data, batch_size=3, shuffle=True, workers=2, seed=7)
    for epoch in (0, 1):
        data.set_epoch(epoch)
        batches = list(loader)
        for batch in batches:
            for row, start in enumerate(batch["start"]):
                index = data.index.index((batch["episode_id"][row], start))
                assert torch.equal(batch["images"][row], data[index]["images"])
    orders = [[s for b in make_loader(dataset(store), 3, shuffle=True, seed=7) for s in b["start"]]
              for _ in range(2)]
    assert orders[0] == orders[1]


def test_collate_keeps_strings_and_none_as_lists():
    item = {"actions": torch.zeros(2, 3, 2), "side": None, "instruction": "x", "start": 0}
    batch = collate_windows([item, item])
    assert batch["actions"].shape == (2, 2, 3, 2)
    assert batch["side"] == [None, None] and batch["instruction"] == ["x", "x"] and batch["start"] == [0, 0]


def test_hdf5_reference_loader_matches_the_store(built):
    store, paths = built
    reference = HDF5WindowDataset(paths, W, C)
    data = dataset(store)
    assert reference.index == data.index
    for index in (0, 2, len(data) - 1):  # legacy BGR and observations RGB episodes
        a, b = reference[index], data[index]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]


LOADER_AFTER_OPENCV = """
import sys, cv2, numpy as np
from vla_pipeline.training.windows import Augmentation, WindowDataset, make_loader

store, ids, rounds = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
frames = np.random.default_rng(0).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)
for _ in range(3):  # OpenCV's thread pool has run here (a forked worker would inherit its locks)
    Augmentation(brightness=0.4, hue=0.05, crop_scale=0.8, blur_prob=1.0).pipeline()(images=frames)
    cv2.resize(frames[0], (96, 96), interpolation=cv2.INTER_AREA)
for round_ in range(rounds):
    loader = make_loader(WindowDataset(store, ids, 8, 10), batch_size=4, workers=2)
    assert sum(len(batch["start"]) for batch in loader) == 29
    del loader
    print(round_, flush=True)
"""


@pytest.mark.timeout(180)
def test_loader_workers_never_deadlock_after_the_parent_used_opencv(built):
    """20 loaders of 2 workers each, in a process whose OpenCV thread pool has run (augmentation,
    as training does): a worker forked from it hangs in its first OpenCV call (seen with fork: the
    first round never ends); the hard timeout fails the test instead."""
    import subprocess
    import sys

    store, _ = built
    try:
        done = subprocess.run([sys.executable, "-c", LOADER_AFTER_OPENCV, str(store.path), f"{GOOD_NAME},{RIGHT_NAME}",
                               "20"], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"loader workers hung after rounds {expired.stdout!r}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(i) for i in range(20)]
