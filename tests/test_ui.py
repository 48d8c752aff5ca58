"""The real Dagster UI, started by `make ui` exactly as a user types it, driven by a headless Chromium.

Proves that `make ui` serves within a time limit — also from a shell where an older activated
venv exported DAGSTER_MODULE_NAME, which used to make `dagster dev` hang — that the global asset
lineage graph shows all six assets, that the evaluation page shows both plots and its tables
rendered as tables, and that a run of `ingest_job` launched through the webserver's GraphQL API
(as the UI's launchpad does) is executed by the daemon and shows up as a materialized partition
of `episode_windows`. Everything lives in a temporary DAGSTER_HOME, data folders and MLflow
store; screenshots land in a temporary folder printed by the test.

Skipped when Playwright or Debian's `chromium` is missing (`.ci/run` installs chromium).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from conftest import GOOD_NAME, scripted_actions, write_episode_file
from postgres_server import free_port

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install '.[dev]')")
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
ASSETS = ["raw_episode", "episode_windows", "train_val_split", "lora_adapter", "evaluation_metrics", "closed_loop_metrics",
          "robustness", "registered_model"]
SERVE_TIMEOUT_S = 300  # `make ui` must answer with the code location loaded within this (12–17 s idle;
# beside a second test process on 2 cores, more than 90 s was seen)
RUN_TIMEOUT_S = 180
UI_TIMEOUT_MS = 30_000


class MakeUI:
    """`make ui` in its own process group (make, dagster dev, webserver, daemon, code servers)."""

    def __init__(self, home: Path, port: int):
        self.home, self.url, self.log = home, f"http://127.0.0.1:{port}", home / "make-ui.log"
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "VLA_EPISODES_DIR": str(home / "episodes"),
            "VLA_STORE": str(home / "store.zarr"),
            "VLA_MODELS": str(home / "models"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
            # What the activate script of earlier releases exported; `make ui` must not pass it on.
            "DAGSTER_MODULE_NAME": "vla_pipeline.definitions",
        }
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(["make", "--no-print-directory", "ui", f"UI_PORT={port}"], cwd=REPO,
                                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def fail(self, message: str):
        pytest.fail(f"{message}\n--- make ui log (tail) ---\n{self.log_tail()}", pytrace=False)

    def graphql(self, query: str, **variables) -> dict:
        body = json.dumps({"query": query, "variables": variables}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.load(response)
        if answer.get("errors"):
            self.fail(f"GraphQL errors: {answer['errors']}")
        return answer["data"]

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.process.pid, sig)
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


def wait_until_served(server: MakeUI) -> str:
    """Poll until the UI answers with its one code location loaded; its name."""
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            server.fail(f"make ui exited with code {server.process.returncode}")
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
    server.fail(f"make ui did not serve the code location within {SERVE_TIMEOUT_S} s")


def shows(scope, text: str) -> None:
    """`text` is visible within `scope` (hidden measuring copies of labels do not count)."""
    sync_api.expect(scope.get_by_text(text, exact=True).filter(visible=True).first).to_be_visible()


def shows_node(graph, name: str) -> None:
    """An asset's node is drawn: its name, or the graph's shortened label of a long one
    ("closed_lo…_metrics": the start and the end kept, the middle cut)."""
    label = re.compile(rf"^({re.escape(name)}|{re.escape(name[:6])}[^ ]*…[^ ]*{re.escape(name[-6:])})$")
    sync_api.expect(graph.get_by_text(label).filter(visible=True).first).to_be_visible()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ui-screenshots")


def save_screenshot(page, folder: Path, name: str, capsys) -> Path:
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    with capsys.disabled():
        print(f"\nscreenshot: {path}")
    return path


def evaluate_into(home: Path) -> None:
    """Store, split, a 1-epoch tiny policy and its evaluation, materialized in the UI's instance."""
    from assets.evaluation import evaluation_metrics
    from assets.training import lora_adapter, train_val_split
    from resources import ComputeResource, WindowStoreResource
    from vla_pipeline.data.ingest import ingest_episodes

    paths = [write_episode_file(home / "ingested" / f"episode_20250614_10150{i}_1box_hori_{side}_core_medium.h5",
                                actions=scripted_actions(side), seed=i)
             for i, side in enumerate(["left", "right"] * 3)]
    ingest_episodes(paths, home / "store.zarr")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"DAGSTER_HOME": home, "VLA_MODELS": home / "models",
                            "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}.items():
            patch.setenv(name, str(value))
        with dg.DagsterInstance.from_config(str(home)) as instance:
            result = dg.materialize(
                [train_val_split, lora_adapter, evaluation_metrics], instance=instance,
                resources={"window_store": WindowStoreResource(path=str(home / "store.zarr")), "compute": ComputeResource()},
                run_config={"ops": {"train_val_split": {"config": {"val_fraction": 0.34}},
                                    "lora_adapter": {"config": {"model": "cpu", "train": {"epochs": 1}}}}},
            )
    assert result.success


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("dagster-ui")
    shutil.copy(REPO / ".dagster" / "dagster.yaml", home / "dagster.yaml")
    evaluate_into(home)
    server = MakeUI(home, free_port())
    try:
        server.location = wait_until_served(server)
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

    Launched before the browser tests so that the run's start overlaps them.
    """
    write_episode_file(server.home / "episodes" / f"{GOOD_NAME}.h5")
    repo = {"repositoryLocationName": server.location, "repositoryName": "__repository__"}
    added = server.graphql(ADD_PARTITION, repo=repo, name="episodes", key=GOOD_NAME)["addDynamicPartition"]
    if added["__typename"] != "AddDynamicPartitionSuccess":
        server.fail(f"addDynamicPartition answered {added}")
    params = {
        "selector": {**repo, "pipelineName": "ingest_job"},
        "runConfigData": {},
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": GOOD_NAME}]},
    }
    launched = server.graphql(LAUNCH, params=params)["launchPipelineExecution"]
    if launched["__typename"] != "LaunchRunSuccess":
        server.fail(f"launchPipelineExecution answered {launched}")
    return launched["run"]["runId"]


def wait_for_run(server: MakeUI, run_id: str) -> str:
    deadline, status = time.monotonic() + RUN_TIMEOUT_S, "unknown"
    while time.monotonic() < deadline:
        status = server.graphql(RUN_STATUS, id=run_id)["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(1)
    server.fail(f"run {run_id} not finished within {RUN_TIMEOUT_S} s (last status {status})")


def test_asset_graph_shows_all_assets(server, page, ingest_run, screenshots, capsys):
    page.goto(f"{server.url}/asset-groups")  # "Lineage" in the side bar: the global asset graph
    graph = page.locator("svg foreignObject")
    shows(graph, "ingest")  # a group box, collapsed or not: the layout is drawn
    if not graph.get_by_text(ASSETS[0], exact=True).filter(visible=True).count():
        page.keyboard.press("Alt+KeyE")  # groups start collapsed: the UI's "Expand all groups"
    try:
        for name in ASSETS:
            shows_node(graph, name)
    finally:
        save_screenshot(page, screenshots, "ui-asset-graph.png", capsys)
    for group in ("ingest", "training", "evaluation"):
        shows(graph, group)


def test_evaluation_page_shows_plots_and_tables(server, page, screenshots, capsys):
    page.set_viewport_size({"width": 1600, "height": 4200})  # the page scrolls inside: a tall window shows it all
    page.goto(f"{server.url}/assets/evaluation_metrics")
    try:
        plots = {alt: page.get_by_role("img", name=alt) for alt in ("predicted vs recorded", "confusion matrix")}
        for alt, plot in plots.items():
            sync_api.expect(plot).to_be_visible()
            # Loaded, not a broken-image icon: the webserver served the PNG.
            page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=plot.element_handle())
        # Text that exists only as cells of rendered tables, never as raw markdown.
        tables = page.locator("table")
        shows(tables, "baseline: always_forward")
        shows(tables, "linear_y sign flips")
        shows(tables, "recorded \\ predicted")
        assert not page.get_by_text("| predictor |").count(), "a table was left as raw markdown"
    finally:
        save_screenshot(page, screenshots, "ui-evaluation.png", capsys)
        page.set_viewport_size({"width": 1600, "height": 1000})


def test_launched_ingest_run_materializes_the_partition(server, page, ingest_run, screenshots, capsys):
    status = wait_for_run(server, ingest_run)
    if status != "SUCCESS":
        server.fail(f"run {ingest_run} ended {status}; see {server.url}/runs/{ingest_run}")
    page.goto(f"{server.url}/assets/episode_windows?view=partitions&partition={GOOD_NAME}")
    try:
        shows(page, GOOD_NAME)
        shows(page, "Materialized")
        sync_api.expect(page.get_by_role("link", name=ingest_run[:8])).to_be_visible()
    finally:
        save_screenshot(page, screenshots, "ui-run.png", capsys)
