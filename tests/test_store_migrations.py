"""The store's schema through Alembic (illume.feedback.migrations): a store made by illume before the migrations
opens and is upgraded with its content read back unchanged, an upgraded store has the layout of a new one, and a
store with a revision this code does not know is refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
from sqlalchemy import create_engine, inspect, text

from illume.feedback.engine import StoreError
from illume.feedback.migrations import VERSION_TABLE
from illume.feedback.queue import AnnotationQueue
from illume.feedback.store import FeedbackStore
from tests.conftest import REPO
from tests.postgres import is_postgres, sqlalchemy_url
from tests.test_store import make_sets

OLD_STORE = REPO / "tests" / "assets" / "store-68697c1.db"
"""Made by illume 68697c1 (before the migrations) with scripts/make_old_store.py; beside it, what that code read
back from it (.json; its reprs name the read classes as they are called today: `Judgment`, once `JudgmentInfo`)."""
HEAD = "r0004"


def _read_back(store: FeedbackStore) -> dict:
    """What scripts/make_old_store.py saved of the store, as it saved it (JSON, datetimes as str)."""
    [item_id] = {j["item_id"] for j in AnnotationQueue(store).judgments_by(0, "bob") if j["updated_at"]}
    read = {
        "judgments_table": store.judgments_table(),
        "judged_items": [repr(item) for item in store.judged_items(split=None)],
        "annotator_kinds": store.annotator_kinds(),
        "history": store.judgment_history(item_id, "bob"),
        "candidate_sets": [repr(s) for r in store.rounds() for s in store.candidate_sets(r)],
    }
    return json.loads(json.dumps(read, default=str))


def _revision(url) -> str | None:
    engine = create_engine(sqlalchemy_url(str(url)))
    with engine.connect() as connection:
        revision = (connection.scalar(text(f"SELECT version_num FROM {VERSION_TABLE}"))
                    if VERSION_TABLE in inspect(connection).get_table_names() else None)
    engine.dispose()
    return revision


def _layout(url) -> dict:
    """Every table's columns (name, type, nullable, default), primary key, indexes, unique constraints and foreign
    keys, and the triggers, as the database reports them; column order aside (added columns come last)."""
    engine = create_engine(sqlalchemy_url(str(url)))
    with engine.connect() as connection:
        inspector = inspect(connection)
        layout = {
            table: {
                "columns": sorted((c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                                  for c in inspector.get_columns(table)),
                "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
                "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                                  for i in inspector.get_indexes(table)),
                "unique": sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)),
                "foreign_keys": sorted((tuple(f["constrained_columns"]), f["referred_table"])
                                       for f in inspector.get_foreign_keys(table)),
            }
            for table in inspector.get_table_names()
        }
        if connection.dialect.name == "sqlite":
            layout["triggers"] = sorted(connection.scalars(text(
                "SELECT sql FROM sqlite_master WHERE type = 'trigger'")))
        else:
            layout["triggers"] = sorted(connection.scalars(text(
                "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal")))
    engine.dispose()
    return layout


def test_a_store_made_before_the_migrations_opens_upgraded_with_its_content_unchanged(tmp_path):
    path = tmp_path / "feedback.db"
    shutil.copy(OLD_STORE, path)
    assert _revision(path) is None  # no version table: made before the migrations
    with FeedbackStore(path, create=False) as store:  # a reader opens it too
        assert _read_back(store) == json.loads(OLD_STORE.with_suffix(".json").read_text())
    assert _revision(path) == HEAD
    new = tmp_path / "new.db"
    FeedbackStore(new).close()
    assert _layout(path) == _layout(new)
    with FeedbackStore(path) as store:  # opening again changes nothing; the upgraded store takes writes
        assert _read_back(store) == json.loads(OLD_STORE.with_suffix(".json").read_text())
        queue = AnnotationQueue(store)
        lease = queue.lease_item(0, "carol", 2, 600)
        assert queue.submit_judgment(lease.item_id, "carol", [], none_fit=True)
        assert store.num_judgments(kinds="person") == 4
        assert queue.annotation_progress(0, 2)["judgments"] == 8  # the judgment-count triggers are there


def test_a_store_without_a_version_table_runs_every_revision_on_each_backend(store_url, tmp_path):
    """A store in the layout of illume before the migrations (this code's tables, no version table: what that
    code made, tests/assets/store-68697c1.db on SQLite) is upgraded from the first revision, each a no-op here,
    and stamped; nothing it holds changes."""
    with FeedbackStore(store_url) as store:
        store.add_candidate_sets(0, "train", make_sets(["a", "b"]))
        store.add_judgment(0, "a", "alice", [store.candidate_ids(0)["a"][1]], seconds=2.0)
        store.add_judgments(0, [("b", [], True, None)], "simulated:rouge_l>=0.7", kind="simulated")
        before = store.judgments_table(), store.annotator_kinds()
    layout = _layout(store_url)
    engine = create_engine(sqlalchemy_url(store_url))
    with engine.begin() as connection:
        connection.execute(text(f"DROP TABLE {VERSION_TABLE}"))
    engine.dispose()
    assert _revision(store_url) is None
    with FeedbackStore(store_url) as store:
        assert (store.judgments_table(), store.annotator_kinds()) == before
    assert _revision(store_url) == HEAD
    assert _layout(store_url) == layout


def test_the_tables_added_after_the_first_release_are_created_as_declared_on_each_backend(store_url):
    """A store of the first release's tables only (the later ones and the version table dropped) gets them from
    the first revision, with the layout a new store has."""
    with FeedbackStore(store_url) as store:
        store.add_candidate_sets(0, "train", make_sets(["a"]))
        store.add_judgment(0, "a", "alice", [])
        before = store.judgments_table()
    layout = _layout(store_url)
    engine = create_engine(sqlalchemy_url(store_url))
    with engine.begin() as connection:
        for table in (VERSION_TABLE, "annotators", "judgment_revisions", "leases", "accounts", "illume_meta"):
            connection.execute(text(f"DROP TABLE {table}"))
    engine.dispose()
    with FeedbackStore(store_url) as store:
        assert store.judgments_table() == before and store.annotator_kinds() == {"alice": "person"}
    assert _layout(store_url) == layout


def test_a_store_with_a_newer_revision_is_refused_before_anything_is_written(store_url):
    FeedbackStore(store_url).close()
    engine = create_engine(sqlalchemy_url(store_url))
    with engine.begin() as connection:
        connection.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = 'r9999'"))
    engine.dispose()
    layout = _layout(store_url)
    with pytest.raises(StoreError) as refused:
        FeedbackStore(store_url)
    message = str(refused.value)
    assert "\n" not in message and "was written by a newer illume (store revision r9999, unknown to this illume, " \
        f"which reads up to {HEAD}): upgrade illume to open it" in message
    assert _revision(store_url) == "r9999" and _layout(store_url) == layout


def test_a_new_store_is_stamped_with_the_newest_revision(store_url):
    FeedbackStore(store_url).close()
    assert _revision(store_url) == HEAD
    if is_postgres(store_url):
        assert any("judgments_count" in trigger for trigger in _layout(store_url)["triggers"])
    else:
        assert len(_layout(store_url)["triggers"]) == 3


def test_a_database_holding_only_another_applications_version_table_is_not_a_store(store_url):
    engine = create_engine(sqlalchemy_url(store_url))
    with engine.begin() as connection:
        connection.execute(text(f"CREATE TABLE {VERSION_TABLE} (version_num VARCHAR(32) NOT NULL)"))
        connection.execute(text(f"INSERT INTO {VERSION_TABLE} VALUES ('abc123')"))
    engine.dispose()
    with pytest.raises(StoreError, match=f"is not a feedback store: it holds other tables \\({VERSION_TABLE}\\)"):
        FeedbackStore(store_url)
