"""The Zarr window store: resized RGB frames and actions, one group per episode.

Layout (Zarr v3):

    store.zarr/
      zarr.json                     root group, attrs: layout_version, image_size
      episodes/<episode_id>/        one group per stored episode (attrs: see EpisodeRecord)
        images       (T,224,224,3) uint8, one chunk per frame, one shard file per episode, uncompressed
        actions      (T,2) float32, (linear_x, linear_y) in raw robot units
        event_types  (T,) string
      quarantine/<episode_id>.json  rejected episodes: reason and source hash
      .staging/                     episodes being written; never read
      .writer.lock                  held by the process writing into the store, and who it is
      .create.lock                  held for a moment by whoever creates or opens the store

An episode is written whole under .staging/ and renamed into episodes/, so a crash
mid-write leaves nothing half-visible. Writers take the store's lock (`writer_lock`), so
ingests that overlap run one after the other; the lock goes with its process, also when
that process is killed. Processes that open a new store path at once create it once.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import zarr

from .atomic import replace_directory, write_text
from .locks import exclusive
from .stats import ActionStats

LAYOUT_VERSION = 1
# Frames per image chunk inside an episode's one shard file. A training window reads the chunks it
# touches; one frame a chunk made an 8-frame window 8 partial reads, and zarr's per-read cost, not
# the bytes, dominated (4 frames: 1.6x the window reads a second of 1 frame, 8 frames no faster
# than 4 while reading more; benchmarks/train_throughput.py). Readers take any chunking, so stores
# written with 1-frame chunks read as before.
FRAMES_PER_CHUNK = 4
STAGING_MAX_AGE_S = 3600


class StoreError(Exception):
    pass


def is_url(location: Path | str) -> bool:
    """A URL (s3://bucket/store.zarr, gs://…, file:///…) rather than a local path."""
    return "://" in str(location)


class WindowStore:
    """The store in a local folder: read and written (ingest holds its writer lock). A URL
    location gives a `RemoteWindowStore` instead: read through fsspec, never written."""

    def __new__(cls, path: Path | str, **kwargs):
        if cls is WindowStore and is_url(path):
            return super().__new__(RemoteWindowStore)
        return super().__new__(cls)

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.episodes_dir = self.path / "episodes"
        self.quarantine_dir = self.path / "quarantine"
        self.staging_dir = self.path / ".staging"

    @property
    def location(self) -> str:
        return str(self.path)

    def read_text(self, name: str) -> str | None:
        """A small file at the store's top level (`split.json`), or None."""
        try:
            return (self.path / name).read_text()
        except FileNotFoundError:
            return None

    def write_text(self, name: str, text: str) -> None:
        """Atomically: a reader sees the old content or the new one, also with two writers."""
        write_text(self.path / name, text)

    def create(self, image_size: int) -> WindowStore:
        """Create the store if missing (idempotent, also when processes race to create it) and
        clear stale staging leftovers."""
        with exclusive(self.path / ".create.lock", f"creating {self.path}"):
            if (self.path / "zarr.json").exists():
                layout = zarr.open_group(self.path, mode="r").attrs.get("layout_version")
                if layout != LAYOUT_VERSION:
                    raise StoreError(
                        f"{self.path}: store layout {layout}, this version reads {LAYOUT_VERSION}; "
                        "point VLA_STORE at a new path to rebuild it"
                    )
            else:  # the attributes go into the group's first zarr.json: no reader sees it without them
                root = zarr.create_group(self.path, attributes={"layout_version": LAYOUT_VERSION,
                                                                 "image_size": image_size})
                root.require_group("episodes")
        for folder in (self.episodes_dir, self.quarantine_dir, self.staging_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._clear_stale_staging()
        return self

    def writer_lock(self, waiting: Callable[[str], None] | None = None):
        """Hold the store's write lock: other writers wait (`waiting` hears who they wait for)."""
        return exclusive(self.path / ".writer.lock", f"writing into {self.path}", waiting)

    def _clear_stale_staging(self, max_age_s: float = STAGING_MAX_AGE_S) -> None:
        now = time.time()
        for leftover in self.staging_dir.iterdir():
            try:
                age = now - leftover.stat().st_mtime
            except FileNotFoundError:  # another process cleared or published it meanwhile
                continue
            if age > max_age_s:
                shutil.rmtree(leftover, ignore_errors=True)

    def clear_staging(self) -> None:
        """Remove every leftover of interrupted writes; call with the writer lock held."""
        self._clear_stale_staging(max_age_s=-1)

    # --- reading -----------------------------------------------------------------

    def episode_ids(self) -> list[str]:
        if not self.episodes_dir.is_dir():
            return []
        return sorted(p.name for p in self.episodes_dir.iterdir() if (p / "zarr.json").is_file())

    def quarantined_ids(self) -> list[str]:
        if not self.quarantine_dir.is_dir():
            return []
        return sorted(p.stem for p in self.quarantine_dir.glob("*.json"))

    def has_episode(self, episode_id: str) -> bool:
        return (self.episodes_dir / episode_id / "zarr.json").is_file()

    def open_episode(self, episode_id: str) -> zarr.Group:
        if not self.has_episode(episode_id):
            raise StoreError(f"{self.path}: no stored episode {episode_id!r}")
        return zarr.open_group(self.episodes_dir / episode_id, mode="r")

    def episode_attrs(self, episode_id: str) -> dict | None:
        """The episode group's attributes, read from its zarr.json (Zarr v3 group metadata)
        directly: ~30× faster than opening the group, and the split reads every episode's."""
        try:
            return json.loads((self.episodes_dir / episode_id / "zarr.json").read_text())["attributes"]
        except FileNotFoundError:
            return None

    def quarantine_record(self, episode_id: str) -> dict | None:
        path = self.quarantine_dir / f"{episode_id}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def action_stats(self, episode_ids) -> ActionStats:
        """Dataset-wide action statistics merged from the per-episode ones, without a rescan."""
        return ActionStats.merge(
            ActionStats.from_dict(self.episode_attrs(episode_id)["action_stats"])
            for episode_id in episode_ids
        )

    # --- writing -----------------------------------------------------------------

    def write_episode(
        self,
        episode_id: str,
        images: np.ndarray,
        actions: np.ndarray,
        event_types: list[str],
        attrs: dict,
    ) -> None:
        """Atomically write (or replace) one episode; clears any quarantine record for it."""
        num_frames = images.shape[0]
        staging = self.staging_dir / f"{episode_id}.{uuid.uuid4().hex}"
        group = zarr.open_group(staging, mode="w")
        group.create_array(
            "images",
            data=images,
            chunks=(FRAMES_PER_CHUNK, *images.shape[1:]),
            shards=(-(-num_frames // FRAMES_PER_CHUNK) * FRAMES_PER_CHUNK, *images.shape[1:]),  # whole chunks
            # Camera frames barely compress losslessly (benchmarks/store_codecs.py: -19% size
            # for lz4, at 0.6x the window read speed), so frames are stored raw.
            compressors=None,
        )
        group.create_array("actions", data=actions.astype(np.float32), chunks=actions.shape)
        events = group.create_array("event_types", shape=(num_frames,), dtype=str)
        events[:] = np.asarray(event_types, dtype=object)
        group.attrs.update(
            {
                **attrs,
                "action_stats": ActionStats.of(actions).to_dict(),
                "ingested_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
        )
        replace_directory(staging, self.episodes_dir / episode_id, trash=self.staging_dir)
        self._remove_file(self.quarantine_dir / f"{episode_id}.json")

    def quarantine(self, episode_id: str, record: dict) -> None:
        """Record a rejected episode and withdraw any earlier stored version of it."""
        record = {**record, "quarantined_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_text(self.quarantine_dir / f"{episode_id}.json", json.dumps(record, indent=1))
        self.remove_episode(episode_id)

    def remove_episode(self, episode_id: str) -> None:
        final = self.episodes_dir / episode_id
        if final.exists():
            retired = self.staging_dir / f"{episode_id}.retired.{uuid.uuid4().hex}"
            os.replace(final, retired)
            shutil.rmtree(retired, ignore_errors=True)

    @staticmethod
    def _remove_file(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


class RemoteWindowStore(WindowStore):
    """A store at an fsspec URL — s3://bucket/store.zarr (with `s3fs` installed), gs://, az://,
    or file:///… — for training and evaluation on another machine than the ingest's. Read only:
    episodes are written into a local store (atomic renames and OS locks need a local
    filesystem) and copied to the bucket whole (`aws s3 sync`, `rclone`), with no ingest
    running meanwhile. Top-level files (`split.json`) are written, one object each.
    Credentials and endpoints come from the filesystem's own settings (AWS_* variables, …)."""

    def __init__(self, path: Path | str, storage_options: dict | None = None):
        import fsspec

        self.url = str(path).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.path = self.url  # what readers re-open the store by (WindowDataset, train processes)

    @property
    def location(self) -> str:
        return self.url

    def _read_json(self, key: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(f"{self.root}/{key}"))
        except FileNotFoundError:
            return None

    def create(self, image_size: int) -> RemoteWindowStore:
        """Check the store is there with this version's layout (nothing is created)."""
        root = self._read_json("zarr.json")
        if root is None:
            raise StoreError(f"{self.url}: no window store there (ingest into a local store and copy it)")
        layout = root.get("attributes", {}).get("layout_version")
        if layout != LAYOUT_VERSION:
            raise StoreError(f"{self.url}: store layout {layout}, this version reads {LAYOUT_VERSION}")
        return self

    def _read_only(self, *args, **kwargs):
        raise StoreError(f"{self.url}: a store at a URL is read only; ingest into a local store "
                         "(VLA_STORE=path) and copy it there")

    writer_lock = write_episode = quarantine = remove_episode = clear_staging = _read_only

    def episode_ids(self) -> list[str]:
        found = self.fs.glob(f"{self.root}/episodes/*/zarr.json")
        return sorted(key.rstrip("/").split("/")[-2] for key in found)

    def quarantined_ids(self) -> list[str]:
        return sorted(key.rsplit("/", 1)[-1].removesuffix(".json")
                      for key in self.fs.glob(f"{self.root}/quarantine/*.json"))

    def has_episode(self, episode_id: str) -> bool:
        return self.fs.exists(f"{self.root}/episodes/{episode_id}/zarr.json")

    def open_episode(self, episode_id: str) -> zarr.Group:
        if not self.has_episode(episode_id):
            raise StoreError(f"{self.url}: no stored episode {episode_id!r}")
        from zarr.storage import FsspecStore

        store = FsspecStore.from_url(f"{self.url}/episodes/{episode_id}", storage_options=self.storage_options,
                                     read_only=True)
        return zarr.open_group(store, mode="r")

    def episode_attrs(self, episode_id: str) -> dict | None:
        group = self._read_json(f"episodes/{episode_id}/zarr.json")
        return None if group is None else group["attributes"]

    def quarantine_record(self, episode_id: str) -> dict | None:
        return self._read_json(f"quarantine/{episode_id}.json")

    def read_text(self, name: str) -> str | None:
        try:
            return self.fs.cat_file(f"{self.root}/{name}").decode()
        except FileNotFoundError:
            return None

    def write_text(self, name: str, text: str) -> None:
        self.fs.pipe_file(f"{self.root}/{name}", text.encode())  # one PUT: whole or not there
