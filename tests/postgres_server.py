"""A throwaway PostgreSQL server for the team-deployment tests, and Dagster instances on it
configured by `deploy/dagster.yaml` itself.

The server is Debian's `postgresql` (initdb + pg_ctl) in a temporary folder: TCP on 127.0.0.1
only, trust authentication, no durability (fsync off), stopped with `pg_ctl stop -m immediate`.
initdb refuses to run as root, so as root the server runs as the package's `postgres` user.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEPLOY_DAGSTER_YAML = REPO / "deploy" / "dagster.yaml"
SERVER_USER = "postgres"  # the system user Debian's package creates, and the database superuser here
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",  # no socket in /var/run/postgresql, which a normal user cannot write
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl: from PATH, else the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    candidates += sorted((Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
                         key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    return next((c for c in candidates if (c / "initdb").is_file() and (c / "pg_ctl").is_file()), None)


def unavailable_reason() -> str | None:
    """Why no throwaway server can start here, or None."""
    if postgres_bin() is None:
        return ("PostgreSQL is not installed (no initdb/pg_ctl on PATH or under /usr/lib/postgresql/*/bin): "
                "install Debian's postgresql package (`apt-get install postgresql`; .ci/run does) to run this test")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return (f"running as root, the test server must run as the '{SERVER_USER}' user (initdb refuses root), "
                    "and there is none: install Debian's postgresql package, which creates it")
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path
    port: int = 0
    host: str = "127.0.0.1"
    user: str = SERVER_USER
    _names = itertools.count(1)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        runner = ["runuser", "-u", SERVER_USER, "--"] if os.geteuid() == 0 else []
        return subprocess.run([*runner, str(self.bin_dir / args[0]), *args[1:]], cwd=self.root,
                              capture_output=True, text=True, timeout=60)

    def start(self) -> None:
        initdb = self._run("initdb", "-D", str(self.data), "-U", self.user, "-A", "trust", "-E", "UTF8",
                           "--locale=C", "--no-sync")
        if initdb.returncode:
            raise RuntimeError(f"initdb failed in {self.data}:\n{initdb.stdout}{initdb.stderr}")
        conf = self.data / "postgresql.conf"
        base = conf.read_text()
        for _ in range(3):  # another process may take the free port before the server binds it
            self.port = free_port()
            settings = {**SETTINGS, "port": str(self.port)}
            conf.write_text(base + "".join(f"{key} = {value}\n" for key, value in settings.items()))
            started = self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.root / "server.log"),
                                "-w", "-t", "30")
            if started.returncode == 0:
                return
        log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
        raise RuntimeError(f"pg_ctl start failed in {self.data}:\n{started.stdout}{started.stderr}\n{log[-2000:]}")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate")

    def url(self, database: str, scheme: str = "postgresql") -> str:
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database; its name."""
        import psycopg2

        name = f"{prefix}_{next(self._names)}"
        connection = psycopg2.connect(self.url("postgres"))
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return name

    def dagster_env(self, database: str) -> dict[str, str]:
        """The variables deploy/dagster.yaml reads, for `database` on this server."""
        return {"DAGSTER_PG_HOST": self.host, "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USER": self.user,
                "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_DB": database}


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started server in a fresh temporary folder, stopped and removed on exit whatever happened.

    The folder is made by tempfile, not pytest: pytest's are private to the user running the tests,
    and the server may run as another one."""
    root = Path(tempfile.mkdtemp(prefix="vla-postgres-"))
    if os.geteuid() == 0:
        shutil.chown(root, SERVER_USER, SERVER_USER)
    server = PostgresServer(postgres_bin(), root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def deploy_home(server: PostgresServer, parent: Path, database: str | None = None) -> tuple[Path, dict[str, str]]:
    """A DAGSTER_HOME whose dagster.yaml is deploy/dagster.yaml (linked, not copied) and the
    environment that points it at `database` of `server` (a new one by default)."""
    home = parent / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").symlink_to(DEPLOY_DAGSTER_YAML)
    return home, {"DAGSTER_HOME": str(home), **server.dagster_env(database or server.create_database("dagster"))}


@contextlib.contextmanager
def deploy_instance(server: PostgresServer, parent: Path, database: str | None = None):
    """A DagsterInstance loaded from deploy/dagster.yaml, on `database` of `server` (a new one by default)."""
    import dagster as dg

    home, env = deploy_home(server, parent, database)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            yield instance
