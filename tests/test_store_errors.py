"""Store failures as one line, before anything is written; PostgreSQL's lost races run again (issue 24).

Unreachable databases, missing drivers, files that are not stores and stores a newer illume wrote each fail as
one `store error:` line of the CLI (illume.feedback.engine.StoreError), and `illume run` fails with it before the run
folder is touched. Serialization failures and deadlocks are raised by the real server (a trigger that raises
SQLSTATE 40001 / 40P01 for the first attempts) and the write is retried instead of failing.
"""

from __future__ import annotations

import sqlite3
import sys

import pytest
from sqlalchemy import create_engine, text

from illume.cli import main
from illume.config import load_config, save_config
from illume.data.records import Candidate, CandidateSet
from illume.feedback.engine import MAX_ATTEMPTS, StoreError
from illume.feedback.schema import SCHEMA_VERSION
from illume.feedback.store import FeedbackStore
from tests.conftest import REPO, tiny_overrides

DEMO = str(REPO / "configs" / "demo.yaml")


def _one_line(err: str, start: str) -> str:
    assert err.startswith(start), err[-3000:]
    assert err.count("\n") == 1 and "Traceback" not in err, err[-3000:]
    return err


def _store(path) -> FeedbackStore:
    store = FeedbackStore(path)
    store.add_candidate_sets(0, "train", [CandidateSet(
        example_id="e1", answer="yes", predicted_answer="yes", prompt="Q: why? A: yes, seeing that", seed=7,
        candidates=[Candidate(text="a reason", temperature=0.3, seed=7, sample_idx=0, logprob=-1.0)])])
    return store


def test_status_on_a_file_that_is_not_a_store_is_one_line(tmp_path, capsys):
    notes = tmp_path / "notes.db"
    notes.write_text("my notes, not a database\n")
    assert main(["status", str(notes)]) == 2
    _one_line(capsys.readouterr().err, f"store error: sqlite:///{notes} is not a feedback store (file is not a "
                                       "database)")
    assert notes.read_text() == "my notes, not a database\n"


def test_a_database_of_something_else_is_left_alone(tmp_path, capsys):
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, total REAL)")
    for command in (["status", str(other)], ["annotators", "list", str(other)]):
        assert main(command) == 2
        _one_line(capsys.readouterr().err, f"store error: sqlite:///{other} is not a feedback store: it holds "
                                           "other tables (orders)")
    with sqlite3.connect(other) as connection:  # no table of ours was added to it
        assert [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")] == [
            "orders"]
    with pytest.raises(StoreError, match="not a feedback store"):
        FeedbackStore(other)  # not made into one by a writer either


def test_readers_never_make_a_store(tmp_path):
    with pytest.raises(StoreError, match=f"no feedback store at {tmp_path / 'missing.db'}"):
        FeedbackStore(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    with pytest.raises(StoreError, match="holds no feedback store: start the run first"):
        FeedbackStore(empty, create=False)


def test_a_store_written_by_a_newer_illume_is_refused_before_anything_is_written(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "demo"
    save_config(load_config(DEMO, tiny_overrides(tmp_path)), run_dir / "config.yaml")
    _store(run_dir / "feedback.db").close()
    with create_engine(f"sqlite:///{run_dir / 'feedback.db'}").begin() as connection:
        assert connection.scalar(text("SELECT value FROM illume_meta WHERE key = 'schema_version'")) == str(
            SCHEMA_VERSION)
        connection.execute(text("UPDATE illume_meta SET value = '99' WHERE key = 'schema_version'"))
    assert main(["status", str(run_dir)]) == 2
    _one_line(capsys.readouterr().err, "store error: ")
    before, config_before = (run_dir / "feedback.db").read_bytes(), (run_dir / "config.yaml").read_text()
    assert main(["run", DEMO, *tiny_overrides(tmp_path), "sample.seed=3"]) == 2  # would rewrite config.yaml
    err = _one_line(capsys.readouterr().err, "store error: ")
    assert f"{run_dir / 'feedback.db'} was written by a newer illume (store schema 99; this illume reads up to " \
           f"{SCHEMA_VERSION}): upgrade illume to open it" in err
    assert (run_dir / "feedback.db").read_bytes() == before
    assert (run_dir / "config.yaml").read_text() == config_before


def test_a_store_from_before_the_schema_version_opens_and_gets_one(tmp_path):
    path = tmp_path / "old.db"
    _store(path).close()
    with create_engine(f"sqlite:///{path}").begin() as connection:
        connection.execute(text("DROP TABLE illume_meta"))
        connection.execute(text("DROP TABLE alembic_version"))  # written before the migrations too
    with FeedbackStore(path, create=False) as store:
        assert store.rounds() == [0]
    with create_engine(f"sqlite:///{path}").begin() as connection:
        assert connection.scalar(text("SELECT value FROM illume_meta")) == str(SCHEMA_VERSION)


def test_an_unreachable_database_fails_in_one_line_before_the_run_folder_is_touched(tmp_path, capsys):
    url = "postgresql+psycopg://nobody@127.0.0.1:9/illume"  # port 9 (discard): nothing listens
    assert main(["run", DEMO, *tiny_overrides(tmp_path, own_cache=True), f"store_url={url}"]) == 2
    err = _one_line(capsys.readouterr().err, f"store error: cannot open the feedback store {url}: ")
    assert "connection" in err.lower()
    assert not (tmp_path / "runs").exists()  # no config.yaml, no folder
    assert not (tmp_path / "cache").exists()  # and no model


def test_a_missing_driver_names_the_extra_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if illume[postgres] were not installed
    url = "postgresql+psycopg://someone@db.example.org/illume"
    assert main(["run", DEMO, *tiny_overrides(tmp_path), f"store_url={url}"]) == 2
    err = _one_line(capsys.readouterr().err, f"store error: store_url {url} needs a database driver that is not "
                                             "installed")
    assert err.rstrip().endswith("pip install 'illume[postgres]'")
    assert not (tmp_path / "runs").exists()
    assert main(["status", "mysql+notadriver://u@h/db"]) == 2
    _one_line(capsys.readouterr().err, "store error: ")


# ------------------------------------------------------------------ PostgreSQL: lost races run again


def _fail_first_inserts(url: str, sqlstate: str, times: int) -> None:
    """A trigger on `judgments` that raises `sqlstate` for the first `times` inserts (counted in a table, so the
    count survives the aborted transactions' rollbacks only through a separate autonomous write: a sequence)."""
    with create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1)).begin() as connection:
        connection.execute(text("CREATE SEQUENCE illume_test_attempts"))
        connection.execute(text(f"""
            CREATE FUNCTION illume_test_lose_race() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
            IF nextval('illume_test_attempts') <= {times} THEN
                RAISE EXCEPTION 'lost a race (test)' USING ERRCODE = '{sqlstate}';
            END IF;
            RETURN NEW; END $$"""))
        connection.execute(text("CREATE TRIGGER illume_test_lose_race BEFORE INSERT ON judgments FOR EACH ROW "
                                "EXECUTE FUNCTION illume_test_lose_race()"))


def _attempts(url: str) -> int:
    with create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1)).begin() as connection:
        return connection.scalar(text("SELECT last_value FROM illume_test_attempts"))


@pytest.mark.parametrize("sqlstate", ["40001", "40P01"])  # serialization failure, deadlock detected
def test_serialization_failures_and_deadlocks_are_retried(postgres_url, sqlstate):
    store = _store(postgres_url)
    _fail_first_inserts(postgres_url, sqlstate, MAX_ATTEMPTS - 1)
    assert store.add_judgment(0, "e1", "alice", ["a reason"]) is True  # the last attempt gets through
    assert _attempts(postgres_url) == MAX_ATTEMPTS
    assert store.num_judgments() == 1


def test_the_annotation_page_answers_200_after_a_lost_race(postgres_url):
    from fastapi.testclient import TestClient

    from illume.annotate.server import create_app
    from illume.config import AnnotateConfig

    store = _store(postgres_url)
    _fail_first_inserts(postgres_url, "40P01", 2)
    client = TestClient(create_app(store, None, AnnotateConfig()), base_url="http://127.0.0.1")
    item = client.post("/api/next", json={"annotator": "alice"}).json()["item"]
    response = client.post("/api/judgment", json={"annotator": "alice", "item_id": item["item_id"],
                                                   "accepted": [item["candidates"][0]["id"]]})
    assert response.status_code == 200 and response.json()["duplicate"] is False  # not 500
    assert store.num_judgments() == 1


def test_retries_are_bounded(postgres_url):
    from sqlalchemy.exc import DBAPIError

    store = _store(postgres_url)
    _fail_first_inserts(postgres_url, "40001", 100)
    with pytest.raises(DBAPIError, match="lost a race"):
        store.add_judgment(0, "e1", "alice", ["a reason"])
    assert _attempts(postgres_url) == MAX_ATTEMPTS
    assert store.num_judgments() == 0
