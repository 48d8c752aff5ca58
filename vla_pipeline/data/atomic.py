"""Publishing a file or a directory whole: readers see the old one or the new one, never a half-written one."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def replace_directory(staging: Path, final: Path, trash: Path | None = None) -> None:
    """Move the fully written `staging` to `final`, replacing what was there.

    A directory cannot be renamed over a non-empty one, so an existing `final` is first moved
    aside (into `trash`, default its parent) and deleted once the new one is in place: for that
    instant `final` is absent, never partial."""
    staging, final = Path(staging), Path(final)
    if final.exists():
        retired = Path(trash or final.parent) / f".{final.name}.retired.{uuid.uuid4().hex}"
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final)


def write_text(path: Path | str, text: str) -> None:
    """Write `path` through a uniquely named temporary beside it, renamed over it: also with
    several writers at once, every reader sees one whole version."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
