"""The feedback store: every sampled candidate and every judgment of a run, in a real database.

It is the single source of truth of an ILLUME run: a resumed run re-reads what was sampled
(`candidate_sets`), which items still wait for a critic (`unjudged_items`) and every judgment
(`judged_items`, from which `illume.feedback.verdicts` decides what was accepted); reward-model pairs, DPO
pairs and exports read it too.

`FeedbackStore` is the package's front: each method opens one session (or one write transaction) and calls the
module that does the job. The assumptions are stated in the module each concerns:
- `illume.feedback.schema`: the tables and what each row means; an annotator's kind is data.
- `illume.feedback.engine`: the URL (a path means a SQLite file), SQLite's settings (BEGIN IMMEDIATE, WAL, a
  process-wide write lock per file), one transaction per write, retries of a write that lost a race on
  PostgreSQL (`retry_on_conflict`), and `StoreError` for whatever fails while a store is opened.
- `illume.feedback.migrations`: the opening checks (a feedback store or empty; no newer illume wrote it) and the
  schema's Alembic revisions (`alembic_version`), which upgrade older stores when opened, openers taking turns
  on PostgreSQL.
- `illume.feedback.reads`, `illume.feedback.writes`, `illume.feedback.accounts`: the queries, the idempotent
  writes (one judgment-write path for the critics and the annotation page), people's accounts.

Assumptions of the front itself:
- A `FeedbackStore` may be shared across threads (each call opens its own session).
- Readers (`create=False`: status, exports, the annotation page) never make a store where there is none.
- One writer per run: `writer_lock` (a PostgreSQL advisory lock held by the command that writes the run's
  rounds) beside the run folder's own lock (`illume.run_folder`).

Public reads for every consumer (trainers, reward model, exports, status): `judged_items` (items with their
candidates and judgments), `num_judgments`, `annotator_kinds`, `judgment_history`, `judgments_table`. The
annotation page's hand-out protocol (leases, submissions, revisions, progress) is
`illume.feedback.queue.AnnotationQueue`, over this store's tables.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy import text as sql_text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from illume.data.records import CandidateSet
from illume.feedback import accounts, migrations, reads, writes
from illume.feedback.accounts import Account
from illume.feedback.engine import (
    WriteSessions,
    make_engine,
    opening,
    process_write_lock,
    retry_on_conflict,
    to_url,
)
from illume.feedback.reads import JudgedItem
from illume.feedback.writes import NewJudgment
from illume.run_folder import RunInUse

_WRITER_LOCK = 0x696C6C756D77  # "illumw": the advisory lock key of `FeedbackStore.writer_lock`


class FeedbackStore:
    """Candidates and judgments of an ILLUME run over SQLAlchemy (SQLite file by default).

    Args:
        url_or_path: A SQLAlchemy URL (`sqlite:///runs/x/feedback.db`, `postgresql+psycopg://...`) or a
            path to a SQLite file (its folder is created). An empty database gets the tables; an older store is
            upgraded (`illume.feedback.migrations`).
        create: Make a new store where there is none (the loop). False: only open an existing store (status,
            export, the annotation page), so that a wrong path fails instead of leaving an empty database.

    Raises:
        StoreError: Nothing reachable at the URL, its driver is not installed, the file or database is not a
            feedback store (or, with create=False, there is none), or a newer illume wrote it.
    """

    def __init__(self, url_or_path: str | Path, *, create: bool = True) -> None:
        url = to_url(url_or_path, create)
        self._engine = make_engine(url)
        self._read = sessionmaker(self._engine, expire_on_commit=False)
        # Same pool; the option makes `_sqlite_begin` take the write lock at BEGIN (ignored off SQLite).
        write_engine = self._engine.execution_options(illume_begin="IMMEDIATE")
        self._write = WriteSessions(sessionmaker(write_engine, expire_on_commit=False), process_write_lock(
            self._engine.url))
        # Under the write lock: concurrent openers don't race. Whatever fails here (nothing reachable, not a
        # store, a newer store) fails as one `StoreError` before this opener wrote anything.
        with opening(self.url), write_engine.begin() as connection:
            migrations.upgrade(connection, self.url, create)

    @property
    def url(self) -> str:
        """The database URL, password masked."""
        return self._engine.url.render_as_string(hide_password=True)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine: for tools that fill or time the store at scale (scripts/store_history.py,
        scripts/bench_store.py), not for reading or writing feedback (the methods here do that)."""
        return self._engine

    @property
    def read_sessions(self) -> sessionmaker[Session]:
        """`with store.read_sessions() as session:` a session for the feedback package's own queries
        (illume.feedback.queue, illume.feedback.figures), as the store's reads use."""
        return self._read

    @property
    def write_sessions(self) -> WriteSessions:
        """`with store.write_sessions.begin() as session:` one write transaction under the store's write lock
        (SQLite: taken at BEGIN), as the store's writes use; for the annotation queue's leases and judgments."""
        return self._write

    def close(self) -> None:
        """Close the pooled connections (the store can still be used; it reconnects)."""
        self._engine.dispose()

    @contextlib.contextmanager
    def writer_lock(self, holder: str) -> Iterator[None]:
        """Hold the store's one-writer lock for the block: a second command that writes the run's rounds to this
        store refuses (`illume.run_folder` locks the run folder; this covers a store that several folders or
        machines share).

        On PostgreSQL, a session-level advisory lock on a connection of its own, named `holder`
        (application_name), so a refused command can say who holds it; the server releases it when that
        connection ends, also when the process is killed. On SQLite nothing: the database is a file of its run
        folder, whose lock covers it.

        Raises:
            RunInUse: Another session holds it; the message names that session's `holder`.
        """
        if self._engine.dialect.name != "postgresql":
            yield
            return
        with opening(self.url):
            connection = self._engine.connect()
        connection.detach()  # its own session, closed at the end (never back to the pool with the lock held)
        try:
            with opening(self.url):
                connection.execute(select(func.set_config("application_name", holder[:63], False)))
                held = connection.scalar(select(func.pg_try_advisory_lock(_WRITER_LOCK)))
                other = None if held else connection.scalar(sql_text(
                    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :high AND l.objid = :low "
                    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"),
                    {"high": _WRITER_LOCK >> 32, "low": _WRITER_LOCK & 0xFFFFFFFF})
                connection.commit()
            if not held:
                raise RunInUse(f"the feedback store {self.url} is in use by {other or 'another session'}: wait "
                               "for it to finish or stop it (one command writes to a run at a time)")
            yield
        finally:
            connection.close()  # ends the session, and with it the lock

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------------- rounds

    def rounds(self) -> list[int]:
        """Indices of the rounds in the store, ascending."""
        return reads.rounds(self._read)

    @retry_on_conflict
    def mark_sampled(self, round_idx: int) -> None:
        """Record that every candidate of the round is stored (the first call's time is kept)."""
        writes.mark_sampled(self._write, round_idx)

    def is_sampled(self, round_idx: int) -> bool:
        """Whether `mark_sampled(round_idx)` was called."""
        return reads.is_sampled(self._read, round_idx)

    @retry_on_conflict
    def mark_trained(self, round_idx: int) -> None:
        """Record that the round's fine-tuning finished (the first call's time is kept)."""
        writes.mark_trained(self._write, round_idx)

    @retry_on_conflict
    def set_round_metrics(self, round_idx: int, metrics: Mapping[str, Any]) -> None:
        """Store (replace) the round's val metrics / summary; values must be JSON-serialisable."""
        writes.set_round_metrics(self._write, round_idx, metrics)

    def round_status(self, round_idx: int) -> dict[str, Any]:
        """What the store knows about a round.

        Returns:
            `round_idx`, `created_at`, `sampled_at`, `trained_at` (None until marked), `metrics`,
            `num_items` (per split) and `num_judgments`.

        Raises:
            KeyError: The round is not in the store.
        """
        status = reads.round_status(self._read, round_idx)
        if status is None:
            raise KeyError(f"round {round_idx} is not in the feedback store {self.url}")
        return status

    # ---------------------------------------------------------------- candidates

    @retry_on_conflict
    def add_candidate_sets(
        self,
        round_idx: int,
        split: str,
        candidate_sets: Iterable[CandidateSet],
        image_refs: Mapping[str, str] | None = None,
        questions: Mapping[str, str] | None = None,
    ) -> int:
        """Store the items and candidates of a round in one transaction.

        Items already stored for (round, example, split) are skipped, whatever their content, so
        re-running after a crash never duplicates. A text repeated within one set is stored once.

        Args:
            round_idx: The round the candidates were sampled in.
            split: "train", "val" or "test".
            candidate_sets: The sampler's output.
            image_refs: Optional example id -> image path (or URL) for the annotation page.
            questions: Optional example id -> the question as asked (the annotation page shows it, and
                readers get it as `question`); an example missing here is stored without one.

        Returns:
            How many items were added.
        """
        return writes.add_candidate_sets(self._write, round_idx, split, candidate_sets, image_refs, questions)

    def candidate_sets(self, round_idx: int, split: str = "train") -> list[CandidateSet]:
        """The round's candidate sets as stored, in the order they were added, candidates in drawn order."""
        return reads.candidate_sets(self._read, round_idx, split)

    def candidate_ids(self, round_idx: int, split: str = "train") -> dict[str, list[int]]:
        """Example id -> its candidates' ids, parallel to `candidate_sets(round_idx, split)[i].candidates`."""
        return reads.candidate_ids(self._read, round_idx, split)

    # ---------------------------------------------------------------- accounts

    @retry_on_conflict
    def add_account(self, name: str, role: str = "annotator") -> str:
        """Create a person's account (or give a revoked one a new link) and return their new token.

        The token is shown once; only its hash is stored (`token_hash`).

        Raises:
            ValueError: An empty name, an unknown role, a name already active, or a name that has judged as
                something other than a person (a simulated critic, the reward model, ...).
        """
        return accounts.add_account(self._write, name, role)

    @retry_on_conflict
    def revoke_account(self, name: str) -> bool:
        """Revoke a person's link at once; False if there is no active account by that name."""
        return accounts.revoke_account(self._write, name)

    def accounts(self) -> list[Account]:
        """Every account, revoked ones too, by name."""
        return accounts.accounts(self._read)

    def has_accounts(self) -> bool:
        """Whether any account was ever created (a revoked one counts: revoking everyone locks the page)."""
        return accounts.has_accounts(self._read)

    def account_for_token(self, token: str) -> Account | None:
        """The active account whose token this is; None for an unknown or revoked token."""
        return accounts.account_for_token(self._read, token)

    # ---------------------------------------------------------------- judgments

    @retry_on_conflict
    def set_priorities(self, round_idx: int, priorities: Mapping[str, float | None], split: str = "train") -> None:
        """Set the hand-out rank (`items.priority`, lower first) of the round's items named by example id, in one
        transaction; items not named keep theirs. The annotation page hands items out in this order."""
        writes.set_priorities(self._write, round_idx, priorities, split)

    def unjudged_items(self, round_idx: int, annotator: str, split: str = "train") -> list[str]:
        """Example ids of the round's items that `annotator` has not judged yet, in the order added."""
        return reads.unjudged_items(self._read, round_idx, annotator, split)

    @retry_on_conflict
    def add_judgment(
        self,
        round_idx: int,
        example_id: str,
        annotator: str,
        accepted: Sequence[int | str],
        none_fit: bool = False,
        seconds: float | None = None,
        split: str = "train",
        client_token: str | None = None,
        *,
        kind: str = "person",
        correction: str | None = None,
    ) -> bool:
        """Store one annotator's judgment of one item, with a decision for every candidate of the item.

        Args:
            round_idx: The item's round.
            example_id: The item's example.
            annotator: Who judged ("simulated:rouge_l>=0.7", a person's name, "reward", ...).
            accepted: The accepted candidates, by id (`candidate_ids`) or by text; the others are rejected.
            none_fit: The annotator's explicit "none of them fits" (then `accepted` must be empty).
            seconds: Time spent on the item, when known.
            split: The item's split.
            client_token: A client's id for this submission; a second submission with it is refused.
            kind: What the annotator is (`ANNOTATOR_KINDS`); the annotator's first judgment registers it.
            correction: A rationale the annotator wrote because none fit (requires `none_fit`).

        Returns:
            True if stored; False (nothing written) if `annotator` already judged the item or
            `client_token` was used before.

        Raises:
            ValueError: Unknown item, a candidate that is not the item's, `none_fit` with accepts, an
                unknown `kind`, or a `kind` other than the one the annotator is registered with.
        """
        judgment = NewJudgment(example_id, accepted, none_fit, seconds)
        try:
            with self._write.begin() as session:
                stored = writes.insert_judgments(session, round_idx, split, annotator, [judgment], [client_token],
                                                 kind, [correction])
                return stored == 1
        except IntegrityError:
            # Another writer stored the same (item, annotator) or token between our check and our
            # insert (possible off SQLite, where writes are not serialised at BEGIN).
            if reads.is_duplicate(self._read, round_idx, split, example_id, annotator, client_token):
                return False
            raise

    @retry_on_conflict
    def add_judgments(
        self, round_idx: int, judgments: Iterable[NewJudgment], annotator: str, split: str = "train",
        *, kind: str = "person",
    ) -> int:
        """Store many judgments by one annotator in one transaction (the simulated and reward critics).

        Items the annotator already judged are skipped (so a resumed critic can resend everything);
        an example repeated in `judgments` is stored once, the first time. If any judgment is invalid
        nothing is written.

        Args:
            round_idx: The items' round.
            judgments: `NewJudgment`s (example_id, accepted candidate ids or texts, none_fit, seconds); plain
                tuples of those four are taken as they are.
            annotator: Who judged.
            split: The items' split.
            kind: What the annotator is (`ANNOTATOR_KINDS`): "simulated" for the simulated critic,
                "reward" for the reward model, ...

        Returns:
            How many judgments were stored.

        Raises:
            ValueError: As in `add_judgment`, for any judgment.
        """
        judgments = list(judgments)
        with self._write.begin() as session:
            return writes.insert_judgments(session, round_idx, split, annotator, judgments, [None] * len(judgments),
                                           kind)

    # ---------------------------------------------------------------- reading feedback

    def round_counts(self, round_idx: int, split: str = "train") -> dict[str, int]:
        """How much of a round is judged, counted by the database (what was accepted is decided by
        illume.feedback.verdicts, not here).

        Returns:
            `items`, `judged_items` (>= 1 judgment) and `judgments` (current ones, every annotator).
        """
        return reads.round_counts(self._read, round_idx, split)

    def num_judgments(
        self,
        upto_round: int | None = None,
        kinds: Collection[str] | None = None,
        round_idx: int | None = None,
    ) -> int:
        """How many (current) judgments are stored, all splits, counted by the database.

        Args:
            upto_round: Only rounds <= upto_round.
            kinds: Only judgments by annotators of these kinds (`ANNOTATOR_KINDS`; a single kind may be
                given as a string); None: every annotator.
            round_idx: Only this round.

        Raises:
            ValueError: A kind that is not one of `ANNOTATOR_KINDS`.
        """
        return reads.num_judgments(self._read, upto_round, kinds, round_idx)

    def judgments_version(self) -> tuple:
        """Changes whenever a judgment is added, revised or removed (count, latest id, latest revision, leases
        aside): readers that summarise every judgment (the admin page) recompute only when it moves."""
        return reads.judgments_version(self._read)

    def annotator_kinds(self) -> dict[str, str]:
        """Every annotator that has judged -> its kind (`ANNOTATOR_KINDS`), by name."""
        return reads.annotator_kinds(self._read)

    def judgment_history(self, item_id: int, annotator: str) -> list[dict[str, Any]]:
        """Every version of `annotator`'s judgment of an item, oldest first, ending with the current one.

        A judgment that was never revised has one version; `AnnotationQueue.replace_judgment` adds one per
        revision. Readers of feedback (`judged_items`, ...) see only the current version.

        Returns:
            Dicts with `accepted` (candidate ids, ascending), `none_fit`, `correction` (the text written, or
            None), `seconds` (time spent up to that version), `judged_at` (when the version was written) and
            `revised_at` (when it was replaced; None for the current version); [] if the annotator has not
            judged the item.
        """
        return reads.judgment_history(self._read, item_id, annotator)

    def judged_items(
        self,
        split: str | None = "train",
        round_idx: int | None = None,
        upto_round: int | None = None,
        from_round: int | None = None,
    ) -> list[JudgedItem]:
        """Every judged item (>= 1 judgment; unjudged items are left out) with its candidates and judgments.

        The one read of feedback for trainers, the reward model, exports and reports; what was accepted is
        decided from it by `illume.feedback.verdicts`.

        Args:
            split: Only this split's items; None: all splits.
            round_idx: Only this round.
            upto_round: Only rounds <= upto_round.
            from_round: Only rounds >= from_round.

        Returns:
            Items in (round, item id) order; each item's candidates in drawn order and its (current)
            judgments in the order stored, each with its annotator's kind.
        """
        return reads.judged_items(self._read, split, round_idx, upto_round, from_round)

    def judgments_table(self, upto_round: int | None = None) -> list[dict[str, Any]]:
        """Flat rows for exports and debugging: one per (judgment, candidate shown).

        A judgment of an item without candidates gives one row with `candidate_id`, `text` and
        `accepted` None. Keys: round_idx, split, example_id, annotator, annotator_kind, candidate_id, text,
        accepted, none_fit, correction, seconds, created_at (UTC), client_token.
        """
        return reads.judgments_table(self._read, upto_round)
