"""`illume run` end to end with its feedback store in PostgreSQL (`store_url`), on the tiny demo model."""

import json

import pytest

from illume.cli import main
from illume.feedback.store import FeedbackStore
from tests.test_loop import _config


@pytest.mark.slow
def test_a_run_keeps_its_feedback_in_postgresql(tmp_path, postgres_url):
    """Two rounds with `store_url` a fresh PostgreSQL database (tests/postgres.py): every round's candidates,
    judgments and metrics are there, no SQLite file is made, and running again changes nothing."""
    config = [*_config(tmp_path, "pg", 2), f"store_url={postgres_url}"]
    assert main(["run", *config]) == 0
    run_dir = tmp_path / "runs" / "pg"
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["round"] for r in results] == ["base", 0, 1]
    assert all(r["trained"] for r in results[1:])
    assert not (run_dir / "feedback.db").exists()

    with FeedbackStore(postgres_url) as store:
        assert store.rounds() == [0, 1]
        for round_idx in (0, 1):
            status = store.round_status(round_idx)
            assert status["sampled_at"] and status["trained_at"] and status["metrics"]["trained"]
            assert status["num_items"]["train"] == 12
            assert store.num_judgments(round_idx=round_idx, kinds=["simulated"]) == 12  # one per question
        assert results[2]["judgments"] == store.num_judgments() == 2 * 12
        table = store.judgments_table()
        assert {row["round_idx"] for row in table} == {0, 1}
        assert all(row["created_at"].utcoffset().total_seconds() == 0 for row in table)

    main(["run", *config])
    with FeedbackStore(postgres_url) as store:
        assert store.judgments_table() == table
