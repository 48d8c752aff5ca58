"""Where a Kosmos-2 backbone comes from, decided before `from_pretrained` runs: a local
folder, the Hugging Face cache, or the hub. A backbone that is in none of them fails at once
with one message saying what to do, instead of minutes of download retries."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

from .policy_config import DEFAULT_BACKBONE

REACH_TIMEOUT_S = 3.0


class BackboneUnavailable(RuntimeError):
    """The backbone can be loaded from nowhere; the message says why and what to do."""


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used now, or None when it can be reached."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as error:
        return f"the hub ({constants.ENDPOINT}) cannot be reached ({error.strerror or error})"
    return None


def _advice(hub_id: str = DEFAULT_BACKBONE) -> str:
    return ("Set VLA_MODEL=cpu for the CPU preset (a small Kosmos-2 built in-process), or set VLA_MODEL (or the lora_adapter "
            "config's `model`) to a folder written by `save_pretrained`, for example one made with "
            f"`hf download {hub_id} --local-dir DIR` on a machine that reaches the hub.")


def resolve_backbone(source: str) -> tuple[str, dict]:
    """(what to give `from_pretrained`, extra keyword arguments) for a hub id or a folder.

    A cached hub checkpoint loads with `local_files_only`, so no request is made at all.
    Raises BackboneUnavailable when the backbone is in no folder, no cache and no reachable hub.
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    folder = Path(source).expanduser()
    if folder.is_dir():
        return str(folder), {}
    try:
        cached = try_to_load_from_cache(source, "config.json")
    except HFValidationError:  # not a hub id, so it was meant as a folder
        raise BackboneUnavailable(f"backbone {source!r}: no such folder. {_advice()}") from None
    if isinstance(cached, str):
        return source, {"local_files_only": True}
    reason = hub_unreachable()
    if reason:
        raise BackboneUnavailable(
            f"backbone {source!r} is neither a local folder nor in the Hugging Face cache, and {reason}. "
            + _advice(source))
    return source, {}
