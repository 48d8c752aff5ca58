"""The real Dagster UI, driven by a headless Chromium: what a person sees in `make ui`.

Proves that the code location loads in a webserver started from the repository root
(temporary DAGSTER_HOME, data folders and MLflow store, so nothing touches the repo's
data), that the global asset lineage graph shows all six assets, and that a run of
`ingest_job` launched through the webserver's GraphQL API (as the UI's launchpad does)
is executed by the instance's run launcher and shows up as a materialized partition of
`episode_windows`. Screenshots land in test-artifacts/.

Skipped when Playwright or Debian's `chromium` is missing (`.ci/run` installs chromium).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import GOOD_NAME, write_episode_file

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install '.[dev]')")
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
ASSETS = ["raw_episode", "episode_windows", "train_val_split", "lora_adapter", "evaluation_metrics", "registered_model"]
READY_TIMEOUT_S = 120
RUN_TIMEOUT_S = 180
UI_TIMEOUT_MS = 30_000
# Runs start at once without a daemon. The repo's dagster.yaml leaves the default
# QueuedRunCoordinator, which needs `dagster-daemon` (as `dagster dev` starts).
RUN_COORDINATOR = "run_coordinator:\n  module: dagster._core.run_coordinator\n  class: DefaultRunCoordinator\n"


class Webserver:
    """A `dagster-webserver` subprocess in its own process group, with its log file."""

    def __init__(self, home: Path, port: int):
        self.home, self.url, self.log = home, f"http://127.0.0.1:{port}", home / "webserver.log"
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "VLA_EPISODES_DIR": str(home / "episodes"),
            "VLA_STORE": str(home / "store.zarr"),
            "VLA_MODELS": str(home / "models"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
            "PYTHONUNBUFFERED": "1",
        }
        command = [sys.executable, "-m", "dagster_webserver", "-h", "127.0.0.1", "-p", str(port)]
        command += ["-m", "vla_pipeline.definitions"]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def fail(self, message: str):
        pytest.fail(f"{message}\n--- webserver log (tail) ---\n{self.log_tail()}", pytrace=False)

    def graphql(self, query: str, **variables) -> dict:
        body = json.dumps({"query": query, "variables": variables}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.load(response)
        if answer.get("errors"):
            self.fail(f"GraphQL errors: {answer['errors']}")
        return answer["data"]

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.process.pid, sig)  # the webserver, its code server and run workers
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue


LOCATIONS = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
ADD_PARTITION = """mutation($repo: RepositorySelector!, $name: String!, $key: String!) {
  addDynamicPartition(repositorySelector: $repo, partitionsDefName: $name, partitionKey: $key) {
    __typename ... on AddDynamicPartitionSuccess { partitionKey } ... on Error { message } } }"""
LAUNCH = """mutation($params: ExecutionParams!) { launchPipelineExecution(executionParams: $params) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on Error { message }
  ... on RunConfigValidationInvalid { errors { message } } } }"""
RUN_STATUS = """query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_loaded(server: Webserver) -> str:
    """Poll until the webserver answers and its one code location is loaded; its name."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            server.fail(f"dagster-webserver exited with code {server.process.returncode}")
        try:
            entries = server.graphql(LOCATIONS)["workspaceOrError"]["locationEntries"]
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            entries = []
        for entry in entries:
            if entry["locationOrLoadError"]["__typename"] == "PythonError":
                server.fail(f"code location {entry['name']} failed to load: {entry['locationOrLoadError']['message']}")
            if entry["loadStatus"] == "LOADED":
                return entry["name"]
        time.sleep(0.5)
    server.fail(f"code location not loaded within {READY_TIMEOUT_S} s")


def shows(scope, text: str) -> None:
    """`text` is visible within `scope` (hidden measuring copies of labels do not count)."""
    sync_api.expect(scope.get_by_text(text, exact=True).filter(visible=True).first).to_be_visible()


def save_screenshot(page, name: str, capsys) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    with capsys.disabled():
        print(f"\nscreenshot: {path}")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("dagster-ui")
    config = (REPO / ".dagster" / "dagster.yaml").read_text()
    (home / "dagster.yaml").write_text(config.rstrip("\n") + "\n" + RUN_COORDINATOR)
    server = Webserver(home, free_port())
    try:
        server.location = wait_until_loaded(server)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(UI_TIMEOUT_MS)
        sync_api.expect.set_options(timeout=UI_TIMEOUT_MS)
        yield page
        browser.close()


@pytest.fixture(scope="module")
def ingest_run(server) -> str:
    """Register one episode file as a partition and launch `ingest_job` for it; the run id.

    Launched before the browser tests so that the run worker's start overlaps them.
    """
    write_episode_file(server.home / "episodes" / f"{GOOD_NAME}.h5")
    repo = {"repositoryLocationName": server.location, "repositoryName": "__repository__"}
    added = server.graphql(ADD_PARTITION, repo=repo, name="episodes", key=GOOD_NAME)["addDynamicPartition"]
    if added["__typename"] != "AddDynamicPartitionSuccess":
        server.fail(f"addDynamicPartition answered {added}")
    params = {
        "selector": {**repo, "pipelineName": "ingest_job"},
        # Steps in the run's own process: two fewer imports of torch & co. per run.
        "runConfigData": {"execution": {"config": {"in_process": {}}}},
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": GOOD_NAME}]},
    }
    launched = server.graphql(LAUNCH, params=params)["launchPipelineExecution"]
    if launched["__typename"] != "LaunchRunSuccess":
        server.fail(f"launchPipelineExecution answered {launched}")
    return launched["run"]["runId"]


def wait_for_run(server: Webserver, run_id: str) -> str:
    deadline, status = time.monotonic() + RUN_TIMEOUT_S, "unknown"
    while time.monotonic() < deadline:
        status = server.graphql(RUN_STATUS, id=run_id)["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(1)
    server.fail(f"run {run_id} not finished within {RUN_TIMEOUT_S} s (last status {status})")


def test_asset_graph_shows_all_assets(server, page, ingest_run, capsys):
    page.goto(f"{server.url}/asset-groups")  # "Lineage" in the side bar: the global asset graph
    graph = page.locator("svg foreignObject")
    shows(graph, "ingest")  # a group box, collapsed or not: the layout is drawn
    if not graph.get_by_text(ASSETS[0], exact=True).filter(visible=True).count():
        page.keyboard.press("Alt+KeyE")  # groups start collapsed: the UI's "Expand all groups"
    try:
        for name in ASSETS:
            shows(graph, name)
    finally:
        save_screenshot(page, "ui-asset-graph.png", capsys)
    for group in ("ingest", "training", "evaluation"):
        shows(graph, group)


def test_launched_ingest_run_materializes_the_partition(server, page, ingest_run, capsys):
    status = wait_for_run(server, ingest_run)
    if status != "SUCCESS":
        server.fail(f"run {ingest_run} ended {status}; see {server.url}/runs/{ingest_run}")
    page.goto(f"{server.url}/assets/episode_windows?view=partitions&partition={GOOD_NAME}")
    try:
        shows(page, GOOD_NAME)
        shows(page, "Materialized")
        sync_api.expect(page.get_by_role("link", name=ingest_run[:8])).to_be_visible()
    finally:
        save_screenshot(page, "ui-run.png", capsys)
