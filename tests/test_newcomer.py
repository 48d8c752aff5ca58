"""What a new user meets first: a code location that loads in seconds, commands that find it from
an activated venv, a missing backbone that fails at once in one paragraph, and clear CLI errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import scripted_actions, write_episode_file

from vla_pipeline.policy import hub

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAVY = ("torch", "mlflow", "transformers", "peft", "accelerate", "matplotlib")


def test_code_location_loads_without_torch_or_mlflow():
    code = f"import sys, vla_pipeline.definitions; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == [], f"importing the code location imported {loaded.stdout.split()}"


# How long it takes next to `import dagster` is benchmarks/startup.py's figure, not a test's.


# ---------------------------------------------------------------- a missing backbone


def test_a_missing_folder_fails_at_once_with_the_fix():
    with pytest.raises(hub.BackboneUnavailable, match=r"'/no/such/kosmos': no such folder\. Set VLA_MODEL=cpu"):
        hub.resolve_backbone("/no/such/kosmos")


def test_an_unreachable_hub_fails_at_once_instead_of_retrying(monkeypatch):
    attempts = []

    def unreachable(address, timeout=None):
        attempts.append(timeout)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(hub.socket, "create_connection", unreachable)
    with pytest.raises(hub.BackboneUnavailable) as raised:
        hub.resolve_backbone("microsoft/kosmos-2-patch14-224")
    assert attempts == [hub.REACH_TIMEOUT_S], "one short connection attempt, no retries"
    message = str(raised.value)
    assert "\n" not in message, "one paragraph"
    assert "neither a local folder nor in the Hugging Face cache" in message and "Network is unreachable" in message
    assert "VLA_MODEL=cpu" in message and "hf download microsoft/kosmos-2-patch14-224" in message


def test_offline_mode_is_honoured(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub.socket, "create_connection", lambda *a, **k: pytest.fail("offline: no connection"))
    with pytest.raises(hub.BackboneUnavailable, match="HF_HUB_OFFLINE is set"):
        hub.resolve_backbone("microsoft/kosmos-2-patch14-224")


def test_a_cached_hub_checkpoint_loads_without_asking_the_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--microsoft--kosmos-2-patch14-224" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub.socket, "create_connection", lambda *a, **k: pytest.fail("cached: no connection"))
    assert hub.resolve_backbone("microsoft/kosmos-2-patch14-224") == (
        "microsoft/kosmos-2-patch14-224", {"local_files_only": True})


def test_materialize_with_a_missing_backbone_says_why_once(tmp_path):
    """`dagster asset materialize` as a user types it: one paragraph, no stack trace, no retries."""
    from vla_pipeline.data.ingest import ingest_episodes

    paths = [write_episode_file(tmp_path / "episodes" / f"episode_20250614_10150{i}_1box_hori_{side}_core_medium.h5",
                                actions=scripted_actions(side), seed=i) for i, side in enumerate(["left", "right"] * 2)]
    ingest_episodes(paths, tmp_path / "store.zarr")
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / ".dagster" / "dagster.yaml").read_text())
    env = {**os.environ, "DAGSTER_HOME": str(home), "VLA_STORE": str(tmp_path / "store.zarr"),
           "VLA_MODELS": str(tmp_path / "models"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "VLA_MODEL": "microsoft/kosmos-2-patch14-224", "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore::FutureWarning:click.core"}
    result = subprocess.run(
        [str(BIN / "dagster"), "asset", "materialize", "-m", "vla_pipeline.definitions",
         "--select", "train_val_split,lora_adapter", "-c", str(REPO / ".dagster" / "console.yaml")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert output.count("neither a local folder nor in the Hugging Face cache") == 1, output
    assert "Stack Trace" not in output and "Traceback" not in output, output
    assert "lora_adapter  failed: backbone 'microsoft/kosmos-2-patch14-224'" in output, output
    assert "(__ASSET_JOB) failed: Steps failed: ['lora_adapter']." in output, output
    assert "Warning" not in output, output
    assert len(output.splitlines()) < 15, output


# ---------------------------------------------------------------- commands from an activated venv


@pytest.fixture
def fake_dagster(tmp_path) -> Path:
    """A `dagster` executable that prints what it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "dagster"
    script.write_text('#!/bin/sh\necho "module=${DAGSTER_MODULE_NAME-} warnings=${PYTHONWARNINGS-} args=$*"\n')
    script.chmod(0o755)
    return bin_dir


def _in_activated_shell(fake_dagster: Path, command: str, **env) -> str:
    script = f'. "{REPO}/.dagster/shell.sh"; {command}'
    environment = {"PATH": f"{fake_dagster}:/usr/bin:/bin", "VIRTUAL_ENV": str(REPO / ".venv"), **env}
    return subprocess.run(["bash", "-c", script], env=environment, capture_output=True, text=True, check=True).stdout


def test_activated_shell_gives_dagster_asset_the_code_location_and_short_logs(fake_dagster):
    out = _in_activated_shell(fake_dagster, "dagster asset materialize --select lora_adapter; echo home=$DAGSTER_HOME")
    assert "module=vla_pipeline.definitions" in out
    assert f"args=asset materialize --select lora_adapter -c {REPO}/.dagster/console.yaml" in out
    assert "warnings=ignore::FutureWarning:click.core" in out
    assert f"home={REPO}/.dagster" in out
    own_config = _in_activated_shell(fake_dagster, "dagster asset materialize --select x --config-json '{}'")
    assert "console.yaml" not in own_config, "a run config of the user's own is left alone"


def test_activated_shell_never_hands_the_module_to_dagster_dev(fake_dagster):
    # Even where an older activate script exported it: the webserver of `dagster dev` would hang.
    out = _in_activated_shell(fake_dagster, "dagster dev -h 127.0.0.1", DAGSTER_MODULE_NAME="vla_pipeline.definitions")
    assert "module= " in out and "args=dev -h 127.0.0.1" in out


# ---------------------------------------------------------------- the command line


def test_episodes_names_a_missing_folder(tmp_path):
    result = subprocess.run([str(BIN / "vla-pipeline"), "episodes", "--folder", str(tmp_path / "nowhere")],
                            capture_output=True, text=True, env={**os.environ, "VLA_STORE": str(tmp_path / "s.zarr")})
    assert result.returncode == 2
    assert f"{tmp_path / 'nowhere'}: no such folder" in result.stderr


def test_every_cli_option_says_what_it_does():
    import argparse

    from vla_pipeline.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"vla-pipeline {name}: {'/'.join(action.option_strings) or action.dest} has no help"
