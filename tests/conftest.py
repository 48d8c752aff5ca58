"""Small episode files in the collector's layouts, written by the tests themselves; and a test
session that never writes into the repository."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest

GOOD_NAME = "episode_20250614_101502_1box_hori_left_core_medium"
REPO = Path(__file__).resolve().parents[1]
# Where the pipeline writes by default, relative to the repository: a test must never land there.
WATCHED = ["mlruns", "data", ".dagster", "test-artifacts"]

# Defaults for everything that writes, set before any test imports the code location (which reads
# them at import): a test that forgets its own folders still writes into this session's temp dir.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="vla-tests-"))
for _name, _value in {
    "MLFLOW_TRACKING_URI": f"sqlite:///{_SESSION_DIR / 'mlruns' / 'mlflow.db'}",
    "VLA_MODELS": str(_SESSION_DIR / "models"),
    "VLA_STORE": str(_SESSION_DIR / "store.zarr"),
    "VLA_EPISODES_DIR": str(_SESSION_DIR / "episodes"),
    "DAGSTER_HOME": str(_SESSION_DIR / "dagster_home"),
    "VLA_TINY_BACKBONE": str(_SESSION_DIR / "kosmos2-tiny"),
    "VLA_SMALL_BACKBONE": str(_SESSION_DIR / "kosmos2-small"),
}.items():
    os.environ[_name] = _value
(_SESSION_DIR / "mlruns").mkdir()
(_SESSION_DIR / "dagster_home").mkdir()
(_SESSION_DIR / "dagster_home" / "dagster.yaml").write_text((REPO / ".dagster" / "dagster.yaml").read_text())


def repository_footprint() -> dict[str, float]:
    """Every file under the watched folders with its mtime, and the tracked files that differ from HEAD."""
    files = {str(path.relative_to(REPO)): path.stat().st_mtime
             for name in WATCHED for path in (REPO / name).rglob("*") if path.is_file()}
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                             capture_output=True, text=True).stdout
    files.update({f"git: {line}": 0.0 for line in changed.splitlines()})
    return files


@pytest.fixture(scope="session", autouse=True)
def repository_untouched():
    """Fails the session if a test wrote into the repository's own data, runs or models."""
    before = repository_footprint()
    yield
    after = repository_footprint()
    touched = sorted(path for path in after if before.get(path) != after[path])
    assert not touched, f"tests wrote into the repository: {touched[:10]}"


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL server for the session (tests/postgres_server.py), started by the
    first test that asks for it; those tests skip, saying why, where PostgreSQL is not installed."""
    from postgres_server import running_postgres, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with running_postgres() as server:
        yield server


def write_episode_file(
    path: Path,
    *,
    frames: int = 18,
    height: int = 72,
    width: int = 128,
    layout: str = "legacy",
    images: np.ndarray | None = None,
    actions: np.ndarray | None = None,
    instruction: str | None = None,
    seed: int = 0,
    extra=None,
) -> Path:
    """A valid episode unless overridden; `extra(h5)` may add or damage anything."""
    rng = np.random.default_rng(seed)
    if actions is not None:
        frames = len(actions)
    if images is None:
        images = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    if actions is None:
        keys = rng.choice([0, 1, 2], size=frames)
        actions = np.zeros((frames, 3), np.float32)
        actions[keys == 1, 0] = 1.15
        actions[keys == 2, 1] = -1.15
        actions[0] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        name = "images" if layout == "legacy" else "observations/images"
        h5.create_dataset(name, data=images, compression="gzip", chunks=True)
        h5.create_dataset("actions", data=actions)
        if layout == "legacy":
            events = ["episode_start"] + ["start_action"] * (len(actions) - 1)
            h5.create_dataset("action_event_types", data=events, dtype=h5py.string_dtype("utf-8"))
            h5.attrs["num_frames"] = len(actions)
            h5.attrs["action_chunk_size"] = 8
        else:
            h5.attrs["scenario"] = "1box_hori_left_core_medium"
        if instruction is not None:
            h5.create_dataset("language_instruction", data=np.array([instruction.encode()]))
        if extra is not None:
            extra(h5)
    return path


@pytest.fixture
def episode_dir(tmp_path) -> Path:
    folder = tmp_path / "episodes"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """(store, train ids, val ids): 4 small 20-frame episodes ingested, 3 for training, 1 for validation."""
    from vla_pipeline.data.ingest import ingest_episodes

    folder = tmp_path_factory.mktemp("episodes")
    paths = [
        write_episode_file(folder / f"episode_2025061{i}_101502_1box_hori_{('left', 'right')[i % 2]}_core_far.h5",
                           frames=20, height=48, width=64, seed=i)
        for i in range(4)
    ]
    store = tmp_path_factory.mktemp("store") / "store.zarr"
    ingest_episodes(paths, store)
    return store, [p.stem for p in paths[:3]], [paths[3].stem]


@pytest.fixture(scope="session")
def tiny_backbone_path(tmp_path_factory) -> Path:
    """A tiny Kosmos-2 written with save_pretrained, loaded back through from_pretrained."""
    from vla_pipeline.policy.backbone import save_local_backbone

    return save_local_backbone(tmp_path_factory.mktemp("kosmos2-tiny"))


def scripted_actions(side: str = "left", frames: int = 18) -> np.ndarray:
    """The collector's key guide for going around an obstacle on `side`: W W W, A A, W W, D D, then W."""
    x, y = 1.15, 1.15 if side == "left" else -1.15
    keys = [(0, 0), (x, 0), (x, 0), (x, 0), (0, y), (0, y), (x, 0), (x, 0), (0, -y), (0, -y)]
    keys += [(x, 0)] * (frames - len(keys))
    actions = np.zeros((frames, 3), np.float32)
    actions[:, :2] = keys[:frames]
    return actions
