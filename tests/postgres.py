"""A throw-away PostgreSQL cluster for the tests, and the `store_url` fixture that runs a test on both backends.

Assumptions, up front:
- The server binaries are Debian's (`apt-get install postgresql`; `.ci/run` installs them) or any install whose
  `initdb` and `pg_ctl` are found by `pg_config --bindir`, in /usr/lib/postgresql/*/bin (the newest) or on
  PATH. Nothing needs a running system server: one cluster is made per test session in a temporary folder
  (`initdb` + `pg_ctl`, our own rather than pytest-postgresql's `postgresql_proc`, because that one runs
  `initdb` as the current user and PostgreSQL refuses to run as root, which is what CI is), it listens only
  on a Unix socket inside that folder (no port to collide on) with trust authentication, and is removed at
  the end of the session.
- As root, the cluster's files belong to the `postgres` user (which Debian's package creates) and `initdb`
  and `pg_ctl` run as that user through `runuser`; the tests themselves stay root and connect over the socket.
- Every test that asks for the PostgreSQL side gets a fresh database (dropped after it, open connections
  and all). The server runs with fsync off: the tests kill clients (kill -9 of a writer or of the
  annotation server), never the database server, so durability of the server's own files is not what
  they test, and a fresh database per test stays cheap on a small machine.
- Without the binaries the PostgreSQL tests SKIP with the reason; with `CI` set (CI=true) they FAIL instead,
  so that CI cannot pass without having run them.
- The server's time zone is deliberately not UTC: the store must hand back UTC datetimes whatever the
  server's zone is.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

SERVER_TIMEZONE = "America/New_York"
"""The cluster's TimeZone setting (not UTC on purpose, see the module docstring)."""
SUPERUSER = "illume"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def unavailable(reason: str) -> None:
    """Skip the test for `reason`, or fail it in CI (CI=true), where PostgreSQL must be tested."""
    if _in_ci():
        pytest.fail(f"{reason}; CI must run the PostgreSQL tests (.ci/run installs Debian's postgresql)",
                    pytrace=False)
    pytest.skip(reason)


def find_bindir() -> Path | None:
    """The folder with PostgreSQL's `initdb` and `pg_ctl`, or None."""
    candidates = []
    if shutil.which("pg_config"):
        result = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if result.returncode == 0:
            candidates.append(Path(result.stdout.strip()))
    # Debian's layout, newest major version first (pg_config may come from libpq-dev without the server).
    candidates += sorted((Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
                         key=lambda p: _version_key(p.parent.name), reverse=True)
    if shutil.which("pg_ctl"):
        candidates.append(Path(shutil.which("pg_ctl")).resolve().parent)
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


class Cluster:
    """One PostgreSQL server in a temporary folder (see the module docstring); `start`, `create_database`, `stop`."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        # /tmp: short (a socket path has ~100 characters) and traversable by the server's user.
        self.root = Path(tempfile.mkdtemp(prefix="illume-pg-", dir="/tmp" if os.path.isdir("/tmp") else None))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_user: list[str] = []
        self._names = itertools.count()

    def start(self) -> None:
        if os.geteuid() == 0:  # initdb and postgres refuse root
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                unavailable("running as root and there is no 'postgres' user to run the PostgreSQL server as")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        os.chmod(self.root, 0o700)
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
                  "--locale=C", "--no-sync")
        options = " ".join([
            "-c listen_addresses=''", f"-c unix_socket_directories={self.root}", "-c max_connections=200",
            "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
            f"-c timezone={SERVER_TIMEZONE}",
        ])
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run([*self._as_user, str(self.bindir / program), *args], capture_output=True,
                                text=True, timeout=120)
        if result.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.is_file() else ""
            raise RuntimeError(f"{program} failed ({result.returncode}): {result.stderr}{result.stdout}{log}")

    def url(self, database: str) -> str:
        """A SQLAlchemy URL for `database` on this cluster (psycopg 3 over the Unix socket)."""
        return f"postgresql+psycopg://{SUPERUSER}@/{database}?host={self.root}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host=str(self.root), user=SUPERUSER, dbname="postgres", autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self) -> str:
        """A new empty database; returns its name."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        self._admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # a killed client may still be connected

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").is_file():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_cluster():
    """A PostgreSQL server for this test session (started on first use); skips (fails in CI) without one."""
    bindir = find_bindir()
    if bindir is None:
        unavailable("no PostgreSQL server binaries (initdb, pg_ctl) found; apt-get install postgresql")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("psycopg is not installed (pip install -e '.[dev]')")
    cluster = Cluster(bindir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster):
    """A fresh PostgreSQL database for one test, as a SQLAlchemy URL."""
    name = postgres_cluster.create_database()
    yield postgres_cluster.url(name)
    postgres_cluster.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """Where a test's feedback store lives: a SQLite file under tmp_path, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "feedback.db")
    return request.getfixturevalue("postgres_url")


def is_postgres(url: str) -> bool:
    return url.startswith("postgresql")


def sqlalchemy_url(store_url: str) -> str:
    """`store_url` as a SQLAlchemy URL (a plain path is a SQLite file, as `FeedbackStore` reads it)."""
    return store_url if "://" in store_url else f"sqlite:///{store_url}"
