"""How the feedback store talks to its database: the URL, the engine, SQLite's settings, write sessions, retries.

Assumptions, up front:
- One SQLAlchemy URL; a plain path means a SQLite file (the run directory's `feedback.db`). Any other URL
  (PostgreSQL for teams) works through the same code; only the SQLite connection settings below are special.
- Every public write of the store is ONE transaction (`WriteSessions.begin`): after kill -9 at any point the store
  holds either all of a call's rows or none of them.
- Many processes and threads may write at once. On SQLite, writes start with `BEGIN IMMEDIATE` (one writer at a
  time, waiting up to the busy timeout instead of failing with "database is locked"), and WAL lets readers run
  beside them; threads of one process queue for that lock on a lock of their own first (`process_write_lock`).
  On PostgreSQL (READ COMMITTED) writers run at once: the unique constraints decide which of two equal writes is
  stored, and a write that loses a race (serialization failure, deadlock) is run again, up to `MAX_ATTEMPTS` times
  with a jittered back-off (`retry_on_conflict`), instead of failing its caller.
- Whatever goes wrong while a store is opened (nothing reachable, no driver, not a store, a newer store) is one
  `StoreError` line naming the store (`opening`).
"""

from __future__ import annotations

import contextlib
import functools
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

T = TypeVar("T")
SQLITE_BUSY_TIMEOUT_MS = 60_000
"""How long a SQLite writer waits for another one before "database is locked"."""


RETRIED_SQLSTATES = {"40001": "serialization failure", "40P01": "deadlock"}
"""PostgreSQL errors that mean "this transaction lost a race, run it again" (its docs, chapter 13.4)."""
MAX_ATTEMPTS = 5


def retry_on_conflict(method: Callable[..., T]) -> Callable[..., T]:
    """Run a write method (ONE transaction, rolled back on failure) again when the database aborted it for a
    serialization failure or a deadlock, up to `MAX_ATTEMPTS` times with a jittered back-off, instead of
    failing the request; any other error, and the last attempt's, propagates."""

    @functools.wraps(method)
    def retried(*args: Any, **kwargs: Any) -> T:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return method(*args, **kwargs)
            except DBAPIError as error:
                if attempt == MAX_ATTEMPTS or _sqlstate(error) not in RETRIED_SQLSTATES:
                    raise
                # Jitter keeps the two losers of a deadlock from meeting again at the same moment.
                time.sleep(random.uniform(0, 0.01 * 2 ** attempt))
        raise AssertionError("unreachable")

    return retried


def _sqlstate(error: DBAPIError) -> str | None:
    """The SQLSTATE code of a driver error (psycopg 3: `sqlstate`, psycopg2: `pgcode`), None off PostgreSQL."""
    return getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)


class StoreError(RuntimeError):
    """A feedback store that cannot be opened or used: the message says which, why, and what to do."""


@contextlib.contextmanager
def opening(url: str) -> Iterator[None]:
    """Turn what goes wrong while a store is opened into one `StoreError` line naming the store."""
    try:
        yield
    except StoreError:
        raise
    except DBAPIError as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig is not None else str(error)
        if error.connection_invalidated or isinstance(error, OperationalError):
            raise StoreError(f"cannot open the feedback store {url}: {reason}") from error
        raise StoreError(f"{url} is not a feedback store ({reason})") from error


def to_url(url_or_path: str | Path, create: bool = True) -> URL:
    if isinstance(url_or_path, Path) or "://" not in url_or_path:
        path = Path(url_or_path).expanduser().resolve()
        if not create and not path.is_file():
            raise StoreError(f"no feedback store at {path}: start the run first (`illume run ...`)")
        path.parent.mkdir(parents=True, exist_ok=True)
        return URL.create("sqlite", database=str(path))
    try:
        url = make_url(url_or_path)
    except ArgumentError as error:
        raise StoreError(f"store_url {url_or_path!r} is not a database URL ({error}); e.g. "
                         "postgresql+psycopg://USER@HOST/DB or a path to a SQLite file") from error
    if not create and url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") and not (
            Path(url.database).expanduser().is_file()):
        raise StoreError(f"no feedback store at {url.database}: start the run first (`illume run ...`)")
    return url


_DRIVER_EXTRAS = {"postgresql": "postgres"}
"""The illume extra that installs each database's driver (pyproject.toml's optional dependencies)."""


def make_engine(url: URL) -> Engine:
    if url.get_backend_name() != "sqlite":
        try:
            return create_engine(url, pool_pre_ping=True)
        except (ImportError, NoSuchModuleError) as error:  # the driver (DBAPI) is imported here
            extra = _DRIVER_EXTRAS.get(url.get_backend_name())
            remedy = f"pip install 'illume[{extra}]'" if extra else "install its driver"
            shown = url.render_as_string(hide_password=True)
            raise StoreError(f"store_url {shown} needs a database driver that is not installed ({error}): "
                             f"{remedy}") from error
    if url.database in (None, "", ":memory:"):
        # One shared connection, or every connection would see its own empty in-memory database.
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        engine = create_engine(url)
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


class WriteSessions:
    """The store's write transactions: `with store.write_sessions.begin() as session:` (one transaction, committed at
    the end), on SQLite behind this process's lock for the database file (`process_write_lock`)."""

    def __init__(self, maker: sessionmaker[Session], lock: threading.RLock | None) -> None:
        self._maker = maker
        self._lock = lock

    @contextlib.contextmanager
    def begin(self) -> Iterator[Session]:
        with self._lock or contextlib.nullcontext(), self._maker.begin() as session:
            yield session


_WRITE_LOCKS: dict[str, threading.RLock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def process_write_lock(url: URL) -> threading.RLock | None:
    """One lock per SQLite database in this process, taken around each write transaction; None off SQLite.

    SQLite lets one writer in at a time, and a writer that finds the write lock taken does not queue: it
    sleeps and retries (1, 2, 5, ... up to 100 ms apart) until the busy timeout. With the annotation server's
    threads all writing (a lease per `next`, a judgment per submission), that polling made calls wait tens to
    hundreds of ms for a lock that was free again after a few. Threads of one process queue here instead
    and go in as soon as the previous writer committed; other processes (the loop, a CLI command) still meet
    at SQLite's own lock. Re-entrant, so that a nested write fails as before (busy timeout), not hangs.
    """
    if url.get_backend_name() != "sqlite":
        return None
    with _WRITE_LOCKS_GUARD:
        return _WRITE_LOCKS.setdefault(str(url.database or ":memory:"), threading.RLock())


def _sqlite_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # sqlite3's own transaction handling starts transactions lazily (not for SELECT); we emit BEGIN
    # ourselves in _sqlite_begin (SQLAlchemy's documented recipe).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    _switch_to_wal(cursor)  # readers don't block the writer, nor it them
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _switch_to_wal(cursor: Any) -> None:
    """Put the database in WAL mode (a setting of the file: once done, every later connection finds it so).

    Switching needs the database to itself, and SQLite answers "database is locked" at once when another
    connection holds a write lock on the file, without calling the busy handler: several processes or threads
    opening one new store together (ranks starting, the annotation server beside the loop) would fail. Try
    again, with a jittered back-off, for as long as a writer would wait (`SQLITE_BUSY_TIMEOUT_MS`).
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    delay = 0.001
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
        time.sleep(random.uniform(0, delay))
        delay = min(delay * 2, 0.1)


def _sqlite_begin(connection: Any) -> None:
    # A write transaction that starts DEFERRED reads first and must then upgrade to the write lock; in
    # WAL mode that upgrade fails at once with "database is locked" (no waiting) if another connection
    # wrote meanwhile. IMMEDIATE takes the lock at BEGIN, waiting up to the busy timeout.
    mode = connection.get_execution_options().get("illume_begin", "DEFERRED")
    connection.exec_driver_sql(f"BEGIN {mode}")
