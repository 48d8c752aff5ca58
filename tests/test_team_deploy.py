"""The team deployment (deploy/): Dagster's instance and MLflow's tracking server on PostgreSQL.

Each test runs against the session's throwaway PostgreSQL server (the `postgres` fixture) and
skips, saying why, where PostgreSQL is not installed. The sensor and split automation on the
same instance are tests/test_automation.py's tests, run once per backend.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import yaml
from postgres_server import DEPLOY_DAGSTER_YAML, deploy_home, deploy_instance, free_port
from test_dagster_ingest import VLA, episodes_json
from test_reliability import assert_complete, small_episodes

from vla_pipeline.data.store import WindowStore

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MLFLOW, DAGSTER_DAEMON = str(BIN / "mlflow"), str(BIN / "dagster-daemon")
NAME = "mobile-vla-team"
INSTRUCTION = "Navigate around the obstacle on the left side and reach the cup"


def team_env(pg_env: dict[str, str]) -> dict[str, str]:
    """This process's environment without its VLA_* and DAGSTER_* settings, plus deploy_home's."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("VLA_", "DAGSTER_"))}, **pg_env}


def test_deploy_dagster_yaml_takes_its_connection_from_the_environment():
    storage = yaml.safe_load(DEPLOY_DAGSTER_YAML.read_text())["storage"]["postgres"]["postgres_db"]
    secrets = {key: value for key, value in storage.items() if key != "scheme"}
    assert all(set(value) == {"env"} for value in secrets.values()), storage
    assert storage["scheme"] == "postgresql+psycopg2"


def test_two_people_ingest_at_once_into_the_postgres_instance(postgres, tmp_path):
    """Two `vla-pipeline ingest` processes on one folder, one store and deploy/dagster.yaml."""
    folder, store_path = tmp_path / "drop", tmp_path / "store.zarr"
    ids = [path.stem for path in small_episodes(folder, 4)]
    home, pg_env = deploy_home(postgres, tmp_path)
    env = {**team_env(pg_env), "VLA_EPISODES_DIR": str(folder), "VLA_STORE": str(store_path)}
    people = [subprocess.Popen([VLA, "ingest"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [person.communicate(timeout=300)[0] for person in people]
    for person, output in zip(people, outputs):
        assert person.returncode == 0 and "Traceback" not in output, output
    assert_complete(WindowStore(store_path), ids)
    listed = episodes_json(env, tmp_path)  # a third process reads the same instance and store
    assert sorted(listed) == sorted(ids) and {row["status"] for row in listed.values()} == {"stored"}

    assert not [path.name for path in home.rglob("*.db")]  # the records are in PostgreSQL, none in DAGSTER_HOME
    with deploy_instance(postgres, tmp_path / "reader", pg_env["DAGSTER_PG_DB"]) as instance:
        assert sorted(instance.get_dynamic_partitions("episodes")) == sorted(ids)
        runs = instance.get_runs()
        assert runs and all(run.is_success for run in runs), [(run.run_id, run.status) for run in runs]


@contextlib.contextmanager
def background(args: list[str], env: dict, log: Path):
    """A long-running command in its own process group, its output in `log`; the whole group
    is stopped on exit (SIGTERM, then SIGKILL after 20 s), whatever happened meanwhile."""
    with open(log, "w") as out:
        process = subprocess.Popen(args, env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for(ready, process: subprocess.Popen, log: Path, what: str, timeout: float):
    """Poll `ready()` until it returns something true; fail with the log if the process ends or time runs out."""
    deadline = time.monotonic() + timeout
    while not (result := ready()):
        assert process.poll() is None, f"{what}: exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    return result


def test_the_daemon_ingests_dropped_episodes_through_the_run_queue(postgres, tmp_path):
    """`dagster-daemon run -w deploy/workspace.yaml`, as deploy/systemd starts it: the sensor sees the
    drop folder, its run goes through deploy/dagster.yaml's queue and the daemon launches it."""
    folder, store_path = tmp_path / "drop", tmp_path / "store.zarr"
    ids = [path.stem for path in small_episodes(folder, 2)]
    _, pg_env = deploy_home(postgres, tmp_path)
    env = {**team_env(pg_env), "VLA_EPISODES_DIR": str(folder), "VLA_STORE": str(store_path)}
    daemon_cmd = [DAGSTER_DAEMON, "run", "-w", str(REPO / "deploy" / "workspace.yaml")]
    with deploy_instance(postgres, tmp_path / "reader", pg_env["DAGSTER_PG_DB"]) as instance:
        def ingested():  # the ingest runs, once all are over and the episodes stored
            runs = instance.get_runs(dg.RunsFilter(job_name="ingest_job"))
            over = runs and all(run.is_finished for run in runs)
            return runs if over and sorted(WindowStore(store_path).episode_ids()) == sorted(ids) else None

        with background(daemon_cmd, env, tmp_path / "daemon.log") as daemon:
            ingests = wait_for(ingested, daemon, tmp_path / "daemon.log", "the daemon ingesting 2 dropped episodes",
                               timeout=240)
        assert all(run.is_success for run in ingests), [(run.run_id, run.status) for run in ingests]
        assert {run.tags.get("dagster/sensor_name") for run in ingests} == {"new_episodes_sensor"}
        assert all(instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_ENQUEUED) for run in ingests)


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, artifacts: Path, log: Path):
    """`mlflow server` started the way deploy/systemd/vla-mlflow.service starts it (backend store and
    artifact folder from the environment), on a free local port; yields its URI once /health answers."""
    port = free_port()
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": backend_store_uri,
           "MLFLOW_ARTIFACTS_DESTINATION": artifacts.as_uri()}
    args = [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                return response.status == 200
        return False

    with background(args, env, log) as server:
        wait_for(healthy, server, log, f"mlflow server answering {uri}/health", timeout=120)
        yield uri


@pytest.fixture
def tracking_server(postgres, tmp_path):
    """An MLflow tracking server on a new PostgreSQL database, artifacts in a shared folder, and
    MLFLOW_TRACKING_URI pointing at it for this test only."""
    import mlflow

    database = postgres.create_database("mlflow")
    artifacts = tmp_path / "mlflow-artifacts"
    with mlflow_server(postgres.url(database, scheme="postgresql+psycopg2"), artifacts, tmp_path / "mlflow.log") as uri:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_URI", uri)
            try:
                yield {"uri": uri, "database": database, "artifacts": artifacts}
            finally:
                mlflow.set_tracking_uri(None)  # forget the server; the patch then restores the variable


def test_registry_round_trip_through_an_mlflow_server_on_postgres(tracking_server, postgres, tiny_backbone_path,
                                                                   tmp_path):
    """Register, alias and load a policy by alias through the server, as a teammate's process would."""
    import mlflow
    import psycopg2

    from vla_pipeline.evaluation import registry
    from vla_pipeline.policy.model import build_policy, save_policy
    from vla_pipeline.policy.policy_config import PolicyConfig
    from vla_pipeline.tracking import experiment_id

    policy_dir = save_policy(build_policy(PolicyConfig.tiny(backbone=str(tiny_backbone_path))), tmp_path / "policy")
    with mlflow.start_run(experiment_id=experiment_id()):
        info = registry.log_policy_model(policy_dir)
    version = registry.register_version(info, NAME, {"deployment": "team"})
    registry.client().set_registered_model_alias(NAME, "champion", version.version)

    served = registry.load_policy(f"models:/{NAME}@champion")
    assert served.metadata["version"] == version.version and served.metadata["tags"]["deployment"] == "team"
    frame = np.random.default_rng(0).integers(0, 256, (72, 128, 3), dtype=np.uint8)
    actions = served.step(frame, INSTRUCTION)
    assert actions.shape == (served.config.chunk, 2) and np.isfinite(actions).all()
    np.testing.assert_array_equal(actions, registry.load_policy(policy_dir).step(frame, INSTRUCTION))

    # The registry is in PostgreSQL, the files in the shared artifact folder (uploaded through the server).
    with contextlib.closing(psycopg2.connect(postgres.url(tracking_server["database"]))) as connection:
        with connection.cursor() as cursor:
            cursor.execute("SELECT name, alias, version FROM registered_model_aliases")
            assert cursor.fetchall() == [(NAME, "champion", int(version.version))]
    assert list(tracking_server["artifacts"].rglob("policy.safetensors"))
