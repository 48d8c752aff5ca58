"""The MLflow model registry: log a trained policy as a pyfunc model, register it with its gate
decision (tags and alias), look versions up by alias or number, and load a policy back by
registry URI (`models:/mobile-vla@champion`). The promotion rule itself is `gate.py`.

The pyfunc model holds no pickled torch module: its only artifact is the policy directory
(`policy_config.json`, `policy.safetensors`, `adapter/`, `action_stats.json`), rebuilt with
`load_policy_dir`, i.e. the backbone through `from_pretrained` plus the saved adapter.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from .gate import BEST_BLIND_SUCCESS, CHAMPION, CLOSED_LOOP_SUCCESS, GATE_ALIASES, PromotionDecision
from ..policy.model import load_policy_dir
from ..policy.policy_config import CONFIG_FILE, read_policy_config
from ..policy.bundle import BUNDLE_FILE
from ..policy import serving
from ..policy.serving import StreamingPolicy, load_bundle
from ..tracking import mlflow_client, tracking_uri

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

POLICY_ARTIFACT = "policy"
# Closed-loop sight ablations (the policy driven on a frozen first frame, on blank frames): tagged and
# shown, not gated on.
FROZEN_SUCCESS = "closed_loop_frozen_success"
BLANK_SUCCESS = "closed_loop_blank_success"
# Shown first, in the closed-loop report's order; any other `closed_loop_<name>_success_rate` after them.
KNOWN_BASELINES = ("scripted_guide", "best_blind", "blind_side_script", "always_forward")
_LOG = logging.getLogger(__name__)
_REQUIREMENTS = ("torch", "transformers", "peft", "safetensors", "tokenizers", "numpy", "opencv-python-headless",
                 "pandas", "h5py", "zarr", "xxhash", "isal", "accelerate", "mlflow")


class ModelLookupError(LookupError):
    """A registry URI or directory that does not lead to a policy; the message says why."""


def _signature(chunk: int):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("binary", "image"), ColSpec("string", "instruction"),
                     ColSpec("string", "episode_id", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype("float32"), (-1, chunk, 2))]))


def _requirements() -> list[str]:
    pinned = []
    for name in _REQUIREMENTS:
        try:
            pinned.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pinned.append(name)
    return pinned


def log_policy_model(policy_dir: Path | str, tags: dict | None = None):
    """Log the policy as a pyfunc model in the active MLflow run; returns its ModelInfo."""
    config = read_policy_config(policy_dir)
    with warnings.catch_warnings():
        # An input example would make MLflow load the whole policy while logging it.
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        return mlflow.pyfunc.log_model(
            name=POLICY_ARTIFACT,
            python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
            artifacts={POLICY_ARTIFACT: str(policy_dir)},
            signature=_signature(config.chunk),
            # Listed, not inferred: inference would load the model in a subprocess.
            pip_requirements=_requirements(),
            tags=tags,
        )


def register_version(info, name: str, tags: dict[str, str]):
    """A new version of `name` (created if missing) for a logged model; its ModelVersion.

    The client API, not `mlflow.register_model`, which prints its progress to stderr."""
    registry = client()
    try:
        registry.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return registry.create_model_version(name, source=info.model_uri, run_id=info.run_id, tags=tags,
                                         model_id=info.model_id)


def register_gated_version(name: str, policy_dir: Path | str, tags: dict[str, str], decision: PromotionDecision,
                           run_id: str | None, experiment_id: str, log=_LOG):
    """Register the policy in `policy_dir` under `name` with `tags` plus the gate decision
    (tags `promotion`, `promotion_reason`; alias `decision.alias`); returns its ModelVersion.

    The same trained weights again (`tags["training_fingerprint"]` already on a version) re-tag
    that version instead of duplicating it; its `metric.*` tags that `tags` lacks are removed. Either way the version ends holding its decision's
    alias and no other gate alias, so its aliases agree with its `promotion` tag. `log` takes
    `.info` and `.warning` (a logging.Logger, Dagster's context.log)."""
    tags = {**tags, "promotion": decision.alias, "promotion_reason": decision.reason}
    registry = client()
    version = version_with_tag(name, "training_fingerprint", tags["training_fingerprint"])
    if version is None:
        with mlflow.start_run(run_id=run_id, experiment_id=experiment_id):
            info = log_policy_model(policy_dir)
        version = register_version(info, name, tags)
    else:
        log.info(f"{name} v{version.version} already holds this training; updating its gate")
        for key, value in tags.items():
            registry.set_model_version_tag(name, version.version, key, value)
        # A metric this gating did not measure (another validation set, no blind driver) is not recorded,
        # rather than an earlier gating's number shown beside this decision.
        for key in version.tags:
            if key.startswith("metric.") and key not in tags:
                registry.delete_model_version_tag(name, version.version, key)
    # The version as a string: the sqlite store gives an int, a tracking server a string.
    held = {alias: str(number) for alias, number in registry.get_registered_model(name).aliases.items()}
    # Dropped before the new alias is set, so that no reader ever sees one version holding both.
    for other in GATE_ALIASES:
        if other != decision.alias and held.get(other) == str(version.version):
            registry.delete_registered_model_alias(name, other)
            if other == CHAMPION:
                log.warning(f"{name} v{version.version} lost @{CHAMPION}: re-gated, it no longer passes; no version "
                            f"holds @{CHAMPION} now, so models:/{name}@{CHAMPION} leads nowhere until a version "
                            "passes the gate (or the alias is set by hand)")
    registry.set_registered_model_alias(name, decision.alias, version.version)
    return registry.get_model_version(name, version.version)


# ---------------------------------------------------------------- lookup


def client():
    return mlflow_client()


def _not_found(error: MlflowException) -> bool:
    # Only this code means "does not exist"; any other (a database or network error, a bad name)
    # must reach the caller, or a lookup that failed reads as "none" and a duplicate gets registered.
    return error.error_code == "RESOURCE_DOES_NOT_EXIST"


def version_by_alias(name: str, alias: str):
    """The ModelVersion holding `alias`, or None (also when the model does not exist yet).

    Read from the model's aliases: MLflow reports a missing alias as INVALID_PARAMETER_VALUE,
    the code of a malformed request too."""
    registry = client()
    try:
        holder = registry.get_registered_model(name).aliases.get(alias)
    except MlflowException as error:
        if _not_found(error):
            return None
        raise
    return None if holder is None else registry.get_model_version(name, holder)


def version_with_tag(name: str, key: str, value: str):
    """The newest version of `name` whose tag `key` equals `value`, or None."""
    try:
        versions = client().search_model_versions(f"name = '{name}'")
    except MlflowException as error:
        if _not_found(error):
            return None
        raise
    matching = [v for v in versions if v.tags.get(key) == value]
    return max(matching, key=lambda v: int(v.version)) if matching else None


def resolve_version(uri: str):
    """models:/<name>@<alias>, models:/<name>/<version> or models:/<name>/latest (the highest version,
    whatever the gate decided) -> ModelVersion; ModelLookupError if unknown, any other registry error
    (MlflowException) as raised. Only reads: a sqlite registry that does not exist yet is reported,
    not created."""
    registry_file = sqlite_registry_file()
    if registry_file is not None and not registry_file.is_file():
        raise ModelLookupError(f"{uri}: no model registry at {registry_file}: nothing is registered there yet "
                               "(run from the repository root, or set MLFLOW_TRACKING_URI)")
    reference = uri.removeprefix("models:/")
    registry = client()
    name, _, alias = reference.partition("@")
    version = None if alias else reference.rpartition("/")[2]
    if not alias:
        name = reference.rpartition("/")[0]
    if not name or (version is not None and not (version.isdigit() or version == "latest")):
        raise ModelLookupError(f"{uri}: expected models:/<name>@<alias>, models:/<name>/<version> "
                               "or models:/<name>/latest")
    try:
        registered = registry.get_registered_model(name)
    except MlflowException as error:
        if not _not_found(error):
            raise
        known = sorted(m.name for m in registry.search_registered_models())
        raise ModelLookupError(f"{uri}: no registered model {name!r} in {tracking_uri()} "
                               f"(registered: {', '.join(known) or 'none'})") from error
    if alias:
        if alias not in registered.aliases:
            have = ", ".join(f"@{a} → v{v}" for a, v in sorted(registered.aliases.items())) or "none"
            raise ModelLookupError(f"{uri}: model {name!r} has no alias {alias!r} (aliases: {have})")
        version = registered.aliases[alias]
    if version == "latest":
        numbers = [int(found.version) for found in registry.search_model_versions(f"name = '{name}'")]
        if not numbers:
            raise ModelLookupError(f"{uri}: model {name!r} has no versions")
        version = str(max(numbers))
    try:
        return registry.get_model_version(name, version)
    except MlflowException as error:
        if not _not_found(error):
            raise
        raise ModelLookupError(f"{uri}: model {name!r} has no version {version}") from error


def sqlite_registry_file() -> Path | None:
    """The database file of a sqlite tracking URI; None for a tracking server."""
    uri = tracking_uri()
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def policy_dir_of(version, destination: Path | str | None = None) -> Path:
    """Download a registered version's policy directory; returns its local path."""
    destination = Path(destination or tempfile.mkdtemp(prefix=f"{version.name}-v{version.version}-"))
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(destination)))
    found = [path.parent for path in local.rglob(CONFIG_FILE)]
    if not found:
        raise ModelLookupError(f"models:/{version.name}/{version.version}: no {CONFIG_FILE} in its artifacts")
    return found[0]


def policy_directory(uri: str | Path) -> tuple[Path, dict]:
    """(local policy directory, what it is) for a registry URI (`models:/mobile-vla@champion`,
    `models:/mobile-vla/3`) or a policy directory; ModelLookupError when it leads to none."""
    meta = {"uri": str(uri)}
    if str(uri).startswith("models:/"):
        version = resolve_version(str(uri))
        meta.update(name=version.name, version=version.version, run_id=version.run_id, tags=dict(version.tags))
        return policy_dir_of(version), meta
    directory = Path(uri)
    if not (directory / CONFIG_FILE).is_file():
        what = "no such folder" if not directory.exists() else f"neither a policy directory (no {CONFIG_FILE}) " \
                                                              f"nor a deploy bundle (no {BUNDLE_FILE})"
        raise ModelLookupError(f"{directory}: {what}; give models:/<name>@<alias>, a lora_adapter output's "
                               "policy folder or a folder written by `vla-pipeline export`")
    if (directory / BUNDLE_FILE).is_file():
        meta["bundle"] = json.loads((directory / BUNDLE_FILE).read_text())
    return directory, meta


def load_policy(uri: str | Path, colour_order: str = "BGR", backbone: str | None = None, dtype=None,
                device: str | None = None) -> StreamingPolicy:
    """A StreamingPolicy from a registry URI (`models:/mobile-vla@champion`), a policy directory
    or a deploy bundle (`vla-pipeline export`; loaded as the robot loads it, `load_bundle`), on
    `device` (default: the GPU where there is one, as a bundle).

    `backbone` overrides where the Kosmos-2 weights come from (a hub id or a local directory).
    """
    directory, meta = policy_directory(uri)
    device = device or serving.default_device()
    if "bundle" in meta and backbone is None and dtype is None:
        return load_bundle(directory, colour_order, device=device)
    policy = load_policy_dir(directory, backbone_override=backbone, dtype=dtype).to(device)
    return StreamingPolicy(policy, colour_order, meta)


def version_summary(version) -> dict:
    """What a registered version's tags say: its provenance, gate decision, offline metrics
    against the baselines, instruction flip, sight ablations and closed-loop scores (None where
    not recorded, never 0).

    `sight_reliance`: first-step direction accuracy on the real frames (`real`), on the episode's
    first frame alone (`first_frame`), on another validation episode's frames (`other_episodes`;
    None with `other_episodes_skipped` saying why) and the smaller drop (`drop`,
    `metrics.sight_reliance`). `closed_loop` adds `best_blind` (the best success of a driver blind to
    the image, also among `baselines`), `frozen_success` and `blank_success`. `robustness`: the
    worst closed-loop condition (`worst`, its tag text), the mean success over the conditions, the
    unperturbed offline accuracy and the largest drop under an image perturbation."""
    tags = version.tags

    def number(key: str) -> float | None:
        return float(tags[key]) if key in tags else None

    other_tag = tags.get("sight_other_episode", "")
    other_skipped = other_tag.removeprefix("skipped: ") if other_tag.startswith("skipped") else None
    sight = {"real": number("metric.direction_accuracy_first"),
             "first_frame": number("metric.direction_accuracy_first_frame"),
             "other_episodes": None if other_skipped else number("metric.direction_accuracy_other_episode"),
             "drop": number("metric.sight_reliance"), "other_episodes_skipped": other_skipped}

    def against_baselines(metric: str) -> dict:
        suffix = f"_{metric}_first"
        return {"model": tags.get(f"metric.{metric}_first", "?"),
                "baselines": {key.removeprefix("metric.baseline_").removesuffix(suffix): tags[key]
                              for key in sorted(tags) if key.startswith("metric.baseline_") and key.endswith(suffix)}}

    world = tags.get("closed_loop")
    closed = None
    if world and world.startswith("skipped"):
        closed = {"skipped": world.removeprefix("skipped: ")}
    elif world:
        recorded = [key.removeprefix("metric.closed_loop_").removesuffix("_success_rate") for key in sorted(tags)
                    if key.startswith("metric.closed_loop_") and key.endswith("_success_rate")
                    and key != f"metric.{CLOSED_LOOP_SUCCESS}"]  # the policy's own
        names = [name for name in KNOWN_BASELINES if name in recorded] + [
            name for name in recorded if name not in KNOWN_BASELINES]
        closed = {"env": world, **{key: number(f"metric.closed_loop_{key}")
                                   for key in ("rollouts", "success_rate", "spl", "collision_rate")},
                  "baselines": {name: number(f"metric.closed_loop_{name}_success_rate") for name in names},
                  "best_blind": number(f"metric.{BEST_BLIND_SUCCESS}"),
                  "frozen_success": number(f"metric.{FROZEN_SUCCESS}"),
                  "blank_success": number(f"metric.{BLANK_SUCCESS}")}
    return {
        "name": version.name, "version": version.version, "run_id": version.run_id,
        "data_snapshot": tags.get("data_snapshot", "?"), "train_episodes": tags.get("train_episodes", "?"),
        "val_episodes": tags.get("val_episodes", "?"), "git_commit": tags.get("git_commit", "?"),
        "promotion": tags.get("promotion", "?"), "promotion_reason": tags.get("promotion_reason", ""),
        "direction_accuracy": against_baselines("direction_accuracy"), "mse": against_baselines("mse"),
        # versions registered before the rename carry metric.eval_predictions
        "predictions": number("metric.predictions") if "metric.predictions" in tags else number("metric.eval_predictions"),
        "margin": number("metric.direction_accuracy_margin_first"),
        "flip": tags.get("metric.instruction_flip_fraction_first"),
        "strafing_predictions": number("metric.instruction_lateral_predictions_first"),
        "sight_reliance": sight,
        "closed_loop": closed,
        "robustness": {"worst": tags.get("robustness_worst"), "mean_success": number("metric.robustness_mean_success"),
                       "offline_unperturbed": number("metric.offline_robustness_unperturbed_accuracy"),
                       "offline_worst_drop": number("metric.offline_robustness_worst_drop")},
    }
