"""The annotation page's hand-out protocol over the feedback store: leases, submissions, revisions, progress.

`AnnotationQueue(store)` hands the items of a round to people so that each item gets `annotations_per_item`
judgments, each by a different annotator: an item given to a page is leased to its annotator for
`lease_seconds` (renewed while the page shows it) and goes back to the pool when the lease expires. A
submission stores the judgment with the order the candidates were shown and releases the lease; a revision
(the page's "go back") replaces the annotator's own judgment and keeps the earlier version in
`judgment_revisions` (`FeedbackStore.judgment_history`).

A judgment is written by the store's one judgment-write path (`illume.feedback.writes.write_judgments`, which
the critics' `FeedbackStore.add_judgment(s)` end in too; a revision by `writes.revise_judgment`); what is the
page's own is decided here first: leases and free slots, client tokens, a resubmission that differs.

Everything is in the store (`leases`, `judgments`, `decisions`, ...), so the server holding a queue can be
killed and restarted at any time; every method that writes is one transaction, as every store write is, run
again when PostgreSQL aborts it for a serialization failure or a deadlock (`retry_on_conflict`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from illume.feedback.engine import retry_on_conflict
from illume.feedback.schema import (
    CandidateRow,
    DecisionRow,
    ItemRow,
    JudgmentRow,
    LeaseRow,
    RoundRow,
    is_row_id,
    utc_now,
)
from illume.feedback.store import FeedbackStore
from illume.feedback.writes import (
    ResolvedJudgment,
    check_annotator_kind,
    check_correction,
    revise_judgment,
    write_judgments,
)


class Lease(NamedTuple):
    """An item held for one annotator (`AnnotationQueue.lease_item`)."""

    item_id: int
    annotator: str
    expires_at: datetime
    shown_order: list[int]
    """The item's candidate ids in the order to show them."""


class JudgmentConflict(Exception):
    """A valid judgment that cannot be stored: the item has all its judgments, a client token was used
    for another item or annotator, or the annotator already judged the item differently. The message says
    which.

    Args:
        message: What conflicts, in one sentence.
        stored: For a differing resubmission, the annotator's stored judgment of the item.
    """

    def __init__(self, message: str, stored: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.stored = stored
        """The stored judgment a resubmission differs from (`accepted` candidate ids, sorted; `none_fit`;
        `correction`), so that the page can show it and offer a revision; None for other conflicts."""


class AnnotationQueue:
    """The annotation page's operations on a feedback store (the page's server holds one).

    Part of the feedback package: it reads and writes the store's tables through the store's session
    factories (`store.read_sessions`, `store.write_sessions`: the SQLite write lock taken at BEGIN, one
    transaction per call), like the store's own methods. Outside illume/feedback/ only the store's reads and
    writes are used (`FeedbackStore.judged_items`, ...; tests/test_imports.py checks that the store's private
    names are used nowhere else).

    Args:
        store: The feedback store whose items are handed out and where leases and judgments are written.
    """

    def __init__(self, store: FeedbackStore) -> None:
        self.store = store
        self._read = store.read_sessions
        self._write = store.write_sessions

    def item(self, item_id: int) -> dict[str, Any] | None:
        """One item as the annotation page shows it, or None if no item has this id.

        Returns:
            `item_id`, `round_idx`, `split`, `example_id`, `question` (as stored; None for an item stored
            without one), `prompt`, `answer`, `image_ref` and `candidates` ((candidate id, text) pairs in
            drawn order).
        """
        if not is_row_id(item_id):
            return None
        with self._read() as session:
            row = session.execute(
                select(ItemRow.round_idx, ItemRow.split, ItemRow.example_id, ItemRow.question, ItemRow.prompt,
                       ItemRow.answer, ItemRow.image_ref).where(ItemRow.id == item_id)
            ).first()
            if row is None:
                return None
            candidates = session.execute(
                select(CandidateRow.id, CandidateRow.text).where(CandidateRow.item_id == item_id)
                .order_by(CandidateRow.position)
            ).all()
        return {"item_id": item_id, **row._asdict(), "candidates": [tuple(c) for c in candidates]}

    def open_round(self, annotations_per_item: int, split: str = "train") -> int | None:
        """The round people should judge now: the latest one with an item that has fewer than
        `annotations_per_item` judgments; else the latest round with items (all judged); None if no items."""
        latest = None
        with self._read() as session:
            # Two index lookups per round (`ix_items_handout`), never a scan of a round's items.
            for round_idx in session.scalars(select(RoundRow.round_idx).order_by(RoundRow.round_idx.desc())):
                in_round = (ItemRow.round_idx == round_idx, ItemRow.split == split)
                if session.scalar(select(ItemRow.id).where(
                        *in_round, ItemRow.num_judgments < annotations_per_item).limit(1)) is not None:
                    return round_idx
                if latest is None and session.scalar(select(ItemRow.id).where(*in_round).limit(1)) is not None:
                    latest = round_idx
        return latest

    @retry_on_conflict
    def lease_item(
        self,
        round_idx: int,
        annotator: str,
        annotations_per_item: int,
        lease_seconds: float,
        split: str = "train",
        now: datetime | None = None,
        rng: random.Random | None = None,
    ) -> Lease | None:
        """Hand `annotator` the next item of the round that still needs judgments, and hold it for them.

        One transaction: the annotator's own live lease (a reloaded page) comes back renewed with the same
        order; otherwise the first item (by `items.priority`, lower first, then in the order added) that this
        annotator has not judged and whose judgments plus live leases are fewer than `annotations_per_item` is
        leased to them until now + `lease_seconds`, its candidates shuffled. Expired leases of the round are dropped (their slots
        went back to the pool when they expired).

        Args:
            round_idx: The round to hand out.
            annotator: Who asks.
            annotations_per_item: Judgments wanted per item, each by a different annotator.
            lease_seconds: How long the item is held for the annotator.
            split: The items' split.
            now: The current time (tests); default: the clock.
            rng: Shuffles the candidates; default: the system's random source.

        Returns:
            The lease, or None when no item is free for this annotator now.
        """
        _check_annotator(annotator)
        now = now or utc_now()
        expires_at = now + timedelta(seconds=lease_seconds)
        in_round = (ItemRow.round_idx == round_idx, ItemRow.split == split)
        judged_by_me = select(JudgmentRow.id).where(
            JudgmentRow.item_id == ItemRow.id, JudgmentRow.annotator == annotator
        ).exists()
        with self._write.begin() as session:
            # From the person's own leases (`ix_leases_annotator`: a few rows), each item looked up by id.
            own = session.scalars(
                select(LeaseRow)
                .where(LeaseRow.annotator == annotator, LeaseRow.expires_at > now,
                       select(ItemRow.id).where(ItemRow.id == LeaseRow.item_id, *in_round,
                                                ItemRow.num_judgments < annotations_per_item).exists(),
                       ~select(JudgmentRow.id).where(JudgmentRow.item_id == LeaseRow.item_id,
                                                     JudgmentRow.annotator == annotator).exists())
                .order_by(LeaseRow.created_at, LeaseRow.item_id).limit(1).with_for_update(of=LeaseRow)
            ).first()
            if own is not None:
                own.expires_at = expires_at
                return Lease(own.item_id, annotator, expires_at, list(own.shown_order or []))
            session.execute(delete(LeaseRow).where(
                LeaseRow.expires_at <= now,
                select(ItemRow.id).where(ItemRow.id == LeaseRow.item_id, *in_round).exists(),
            ))
            while True:
                free = _free_items(session, in_round, judged_by_me, annotations_per_item, now)
                if not free:
                    return None
                for item_id in free:
                    # On SQLite this transaction holds the write lock since BEGIN, so the first is free. Other
                    # databases don't serialise writers: lock the item's row, then count again (and look
                    # again whether this annotator's judgment of it committed meanwhile, from another tab).
                    session.execute(select(ItemRow.id).where(ItemRow.id == item_id).with_for_update())
                    if (_slots_taken(session, item_id, annotator, now) >= annotations_per_item
                            or session.scalar(select(JudgmentRow.id).where(
                                JudgmentRow.item_id == item_id, JudgmentRow.annotator == annotator))):
                        continue
                    order = _candidate_ids(session, item_id)
                    (rng or _SYSTEM_RANDOM).shuffle(order)
                    session.execute(delete(LeaseRow).where(LeaseRow.item_id == item_id,
                                                           LeaseRow.annotator == annotator))
                    session.add(LeaseRow(item_id=item_id, annotator=annotator, expires_at=expires_at,
                                         shown_order=order, created_at=now))
                    return Lease(item_id, annotator, expires_at, order)
                # Every item found free was taken by writers that committed before we locked it (PostgreSQL
                # under load): look again. The next look sees their commits, so it ends.

    @retry_on_conflict
    def renew_lease(
        self,
        item_id: int,
        annotator: str,
        annotations_per_item: int,
        lease_seconds: float,
        now: datetime | None = None,
    ) -> Lease | None:
        """Extend `annotator`'s hold on an item their page still shows (a heartbeat).

        A lease that expired is taken again if the item still has a free slot for them.

        Returns:
            The renewed lease, or None: unknown item, already judged by them, or its slots are taken.
        """
        _check_annotator(annotator)
        now = now or utc_now()
        if not is_row_id(item_id):
            return None
        with self._write.begin() as session:
            # Off SQLite: the lease row, then the item's, the order every method here locks them in.
            row = session.get(LeaseRow, (item_id, annotator), with_for_update=True)
            session.execute(select(ItemRow.id).where(ItemRow.id == item_id).with_for_update())
            if row is None or row.expires_at <= now:
                exists = session.scalar(select(ItemRow.id).where(ItemRow.id == item_id))
                judged = session.scalar(select(JudgmentRow.id).where(
                    JudgmentRow.item_id == item_id, JudgmentRow.annotator == annotator))
                if exists is None or judged is not None or (
                        _slots_taken(session, item_id, annotator, now) >= annotations_per_item):
                    return None
                if row is None:
                    order = _candidate_ids(session, item_id)
                    _SYSTEM_RANDOM.shuffle(order)
                    row = LeaseRow(item_id=item_id, annotator=annotator, shown_order=order, created_at=now)
                    session.add(row)
            row.expires_at = now + timedelta(seconds=lease_seconds)
            return Lease(item_id, annotator, row.expires_at, list(row.shown_order or []))

    @retry_on_conflict
    def submit_judgment(
        self,
        item_id: int,
        annotator: str,
        accepted: Sequence[int],
        none_fit: bool = False,
        seconds: float | None = None,
        client_token: str | None = None,
        shown_order: Sequence[int] | None = None,
        annotations_per_item: int | None = None,
        now: datetime | None = None,
        *,
        kind: str = "person",
        correction: str | None = None,
    ) -> bool:
        """Store a judgment from the annotation page in one transaction, and release the annotator's lease.

        Like `FeedbackStore.add_judgment`, but the item and the accepted candidates are given by id, the
        order the page showed the candidates is recorded (`decisions.position_shown`; default: the lease's
        order), and with `annotations_per_item` the item never gets more judgments than that: a judgment is
        taken while the annotator's lease is live, or without one while a slot is free.

        Args:
            item_id: The item (`lease_item`'s `item_id`).
            annotator: Who judged.
            accepted: Ids of the accepted candidates; the item's other candidates are rejected.
            none_fit: The explicit "none of them fits" (then `accepted` must be empty).
            seconds: Time spent on the item.
            client_token: The page's id for this submission: a repeat is not stored twice.
            shown_order: The item's candidate ids in the order shown (a permutation of them).
            annotations_per_item: The most judgments the item may get (None: no limit).
            now: The current time (tests); default: the clock.
            kind: What the annotator is (`illume.data.records.ANNOTATOR_KINDS`); their first judgment
                registers it.
            correction: The rationale the annotator wrote because none fit (`none_fit` must be True).

        Returns:
            True if stored; False (nothing written) for a repeat of what is stored: an item this annotator
            already judged with the same choices (accepted ids, `none_fit`, `correction`), whatever the
            `client_token`.

        Raises:
            KeyError: No item has this id.
            ValueError: Empty annotator, a candidate not of this item, `none_fit` with accepts, a
                `shown_order` that is not a permutation of the item's candidates, an unknown `kind`, or a
                `kind` other than the one the annotator is registered with.
            JudgmentConflict: The item already has `annotations_per_item` judgments (or live leases of
                others), `client_token` was used for another item or annotator, or this annotator already
                judged the item with other choices (`stored` holds them; `replace_judgment` changes them).
        """
        _check_annotator(annotator)
        check_correction(correction, none_fit, f"item {item_id}")
        now = now or utc_now()
        try:
            with self._write.begin() as session:
                candidate_ids = _check_item_decision(session, item_id, accepted, none_fit, shown_order)
                check_annotator_kind(session, annotator, kind)
                if client_token is not None:
                    used = session.execute(select(JudgmentRow.item_id, JudgmentRow.annotator)
                                           .where(JudgmentRow.client_token == client_token)).first()
                    if used is not None and tuple(used) != (item_id, annotator):
                        raise JudgmentConflict(
                            f"client_token {client_token!r} was used for another submission")
                stored = _stored_judgment(session, item_id, annotator)
                if stored is not None:
                    _check_same_as_stored(item_id, stored, accepted, none_fit, correction)
                    return False
                # Off SQLite: locked (lease, then item) so that no concurrent clean-up deletes it under us.
                lease = session.get(LeaseRow, (item_id, annotator), with_for_update=True)
                if annotations_per_item is not None:
                    session.execute(select(ItemRow.id).where(ItemRow.id == item_id).with_for_update())
                    num_judgments = session.scalar(
                        select(func.count()).select_from(JudgmentRow).where(JudgmentRow.item_id == item_id))
                    holds_slot = lease is not None and lease.expires_at > now
                    if num_judgments >= annotations_per_item or (not holds_slot and _slots_taken(
                            session, item_id, annotator, now) >= annotations_per_item):
                        raise JudgmentConflict(
                            f"item {item_id} already has its {annotations_per_item} judgment(s) or is held "
                            "by other annotators (your hold on it expired)")
                if shown_order is None and lease is not None and lease.shown_order:
                    shown_order = lease.shown_order
                write_judgments(session, annotator, kind, [ResolvedJudgment(
                    item_id=item_id, candidate_ids=candidate_ids, accepted=set(accepted), none_fit=none_fit,
                    seconds=seconds, client_token=client_token, correction=correction, shown_order=shown_order,
                )], created_at=now)
                if lease is not None:
                    session.delete(lease)
                return True
        except IntegrityError:
            # Another writer stored the same (item, annotator) or token between our check and our insert
            # (possible off SQLite, where writes are not serialised at BEGIN).
            with self._read() as session:
                stored = _stored_judgment(session, item_id, annotator)
            if stored is not None:
                _check_same_as_stored(item_id, stored, accepted, none_fit, correction)
                return False
            raise

    @retry_on_conflict
    def replace_judgment(
        self,
        item_id: int,
        annotator: str,
        accepted: Sequence[int],
        none_fit: bool = False,
        seconds: float | None = None,
        client_token: str | None = None,
        shown_order: Sequence[int] | None = None,
        now: datetime | None = None,
        *,
        correction: str | None = None,
    ) -> bool:
        """Replace `annotator`'s own judgment of an item (they went back to change it), in one transaction.

        The judgment keeps its id and `created_at`; its decisions are replaced by exactly the new ones,
        `updated_at` is set, and `seconds` (the time spent revising) is added to the time already recorded.
        The shown order is the new one if given, else the one recorded before. The version replaced is
        first copied into `judgment_revisions` (`FeedbackStore.judgment_history`); every reader of feedback
        sees only the current version.

        Returns:
            True if replaced; False (nothing written) for a repeated request (`client_token` equal to the
            judgment's current token).

        Raises:
            KeyError: No item has this id, or `annotator` has not judged it.
            ValueError, JudgmentConflict: As in `submit_judgment`.
        """
        _check_annotator(annotator)
        check_correction(correction, none_fit, f"item {item_id}")
        now = now or utc_now()
        with self._write.begin() as session:
            candidate_ids = _check_item_decision(session, item_id, accepted, none_fit, shown_order)
            row = session.scalars(select(JudgmentRow).where(  # locked: two tabs revising at once, off SQLite
                JudgmentRow.item_id == item_id, JudgmentRow.annotator == annotator).with_for_update()).first()
            if row is None:
                raise KeyError(f"{annotator!r} has not judged item {item_id}; nothing to replace")
            if client_token is not None:
                if row.client_token == client_token:
                    return False
                if session.scalar(select(JudgmentRow.id).where(JudgmentRow.client_token == client_token)):
                    raise JudgmentConflict(f"client_token {client_token!r} was used for another submission")
                row.client_token = client_token
            revise_judgment(session, row, ResolvedJudgment(
                item_id=item_id, candidate_ids=candidate_ids, accepted=set(accepted), none_fit=none_fit,
                seconds=seconds, correction=correction, shown_order=shown_order,
            ), revised_at=now)
            return True

    def judgments_by(
        self, round_idx: int, annotator: str, split: str = "train", limit: int | None = None
    ) -> list[dict[str, Any]]:
        """`annotator`'s judgments of the round's items, newest first (the page's "go back"); with `limit`, the
        newest `limit` of them (only theirs are read).

        Returns:
            Dicts with `judgment_id`, `item_id`, `accepted` (candidate ids), `none_fit`, `correction`, `seconds`,
            `created_at`, `updated_at` and `shown_order` (candidate ids in the order shown; None if not
            recorded).
        """
        mine = (ItemRow.round_idx == round_idx, ItemRow.split == split, JudgmentRow.annotator == annotator)
        with self._read() as session:
            judgments = session.execute(
                select(JudgmentRow.id, JudgmentRow.item_id, JudgmentRow.none_fit, JudgmentRow.seconds,
                       JudgmentRow.created_at, JudgmentRow.updated_at, JudgmentRow.correction)
                .join(ItemRow, ItemRow.id == JudgmentRow.item_id)
                .where(*mine)
                .order_by(JudgmentRow.id.desc()).limit(limit)
            ).all()
            decisions: dict[int, list[tuple[int, bool, int | None]]] = {}
            their_decisions = (
                select(DecisionRow.judgment_id, DecisionRow.candidate_id, DecisionRow.accepted,
                       DecisionRow.position_shown)
                .join(JudgmentRow, JudgmentRow.id == DecisionRow.judgment_id)
                .join(ItemRow, ItemRow.id == JudgmentRow.item_id)
                .where(*mine)
                .order_by(DecisionRow.candidate_id)
            )
            if limit is not None:
                their_decisions = their_decisions.where(DecisionRow.judgment_id.in_([row.id for row in judgments]))
            for judgment_id, candidate_id, accepted, position in session.execute(their_decisions):
                decisions.setdefault(judgment_id, []).append((candidate_id, accepted, position))
        rows = []
        for judgment_id, item_id, none_fit, seconds, created_at, updated_at, correction in judgments:
            mine = decisions.get(judgment_id, [])
            shown = None
            if mine and all(position is not None for _, _, position in mine):
                shown = [candidate_id for candidate_id, _, _ in sorted(mine, key=lambda d: d[2])]
            rows.append({
                "judgment_id": judgment_id, "item_id": item_id,
                "accepted": [candidate_id for candidate_id, accepted, _ in mine if accepted],
                "none_fit": none_fit, "seconds": seconds, "created_at": created_at, "updated_at": updated_at,
                "shown_order": shown, "correction": correction,
            })
        return rows

    def annotation_progress(
        self, round_idx: int, annotations_per_item: int, annotator: str | None = None, split: str = "train"
    ) -> dict[str, int]:
        """How far people are with a round.

        Returns:
            `items`; `complete_items` (with >= `annotations_per_item` judgments: the round is judged when
            this equals `items`); `judgments` (all); `counted_judgments` (at most `annotations_per_item` per
            item) out of `needed_judgments` (items x annotations_per_item); `mine` (by `annotator`).
        """
        in_round = (ItemRow.round_idx == round_idx, ItemRow.split == split)
        with self._read() as session:
            # Items per number of judgments, from the counts the database keeps (`items.num_judgments`), one
            # index range per distinct number (`ix_items_handout`): no judgment is counted here.
            by_count = []  # (judgments, items with that many)
            count = -1
            while (count := session.scalar(select(func.min(ItemRow.num_judgments)).where(
                    *in_round, ItemRow.num_judgments > count))) is not None:
                by_count.append((count, session.scalar(select(func.count()).select_from(ItemRow).where(
                    *in_round, ItemRow.num_judgments == count))))
            items = sum(n for _, n in by_count)
            mine = 0
            if annotator is not None and items:
                # Their judgments of items in the round's id range (`ix_judgments_annotator`); only if other
                # items' ids lie in that range (it holds more ids than the round has items) also checked item by
                # item. (Apart: SQLite reads a lone min or max from the index's end, both at once by a scan.)
                first = session.scalar(select(func.min(ItemRow.id)).where(*in_round))
                last = session.scalar(select(func.max(ItemRow.id)).where(*in_round))
                mine_in_range = (select(func.count()).select_from(JudgmentRow)
                                 .where(JudgmentRow.annotator == annotator, JudgmentRow.item_id.between(first, last)))
                if last - first + 1 != items:
                    mine_in_range = mine_in_range.join(ItemRow, ItemRow.id == JudgmentRow.item_id).where(*in_round)
                mine = session.scalar(mine_in_range)
        return {
            "items": items,
            "complete_items": sum(n for count, n in by_count if count >= annotations_per_item),
            "judgments": sum(count * n for count, n in by_count),
            "counted_judgments": sum(min(count, annotations_per_item) * n for count, n in by_count),
            "needed_judgments": items * annotations_per_item,
            "mine": mine,
        }


# -------------------------------------------------------------------- helpers


_LEASE_TRIES = 20  # items tried per look of `lease_item` when other writers took the first free ones
_SYSTEM_RANDOM = random.SystemRandom()


def _check_annotator(annotator: str) -> None:
    if not isinstance(annotator, str) or not annotator.strip():
        raise ValueError("annotator must be a non-empty name")


def _free_items(
    session: Session, in_round: tuple[Any, ...], judged_by_me: Any, annotations_per_item: int, now: datetime
) -> list[int]:
    """Up to `_LEASE_TRIES` items of the round, in hand-out order, that the annotator has not judged and whose
    judgments plus live leases are fewer than `annotations_per_item`.

    Hand-out order: by `items.priority` (annotate.order; lower first), unranked items after, each in the
    order added. Read from `ix_items_handout` one judgment count at a time (0, 1, .. annotations_per_item - 1;
    ranked and unranked apart), each in index order, so a call reads the first few open items of the round
    and never the items that already have their judgments; the (at most 2 x annotations_per_item) short
    lists are merged here.
    """
    live_leases = (select(func.count()).select_from(LeaseRow)
                   .where(LeaseRow.item_id == ItemRow.id, LeaseRow.expires_at > now).scalar_subquery())
    found = []
    for count in range(annotations_per_item):
        for ranked in (ItemRow.priority.is_not(None), ItemRow.priority.is_(None)):
            found += session.execute(
                select(ItemRow.priority, ItemRow.id)
                .where(*in_round, ItemRow.num_judgments == count, ranked, ~judged_by_me,
                       count + live_leases < annotations_per_item)
                .order_by(ItemRow.priority, ItemRow.id).limit(_LEASE_TRIES)
            ).all()
    found.sort(key=lambda row: (row.priority is None, row.priority or 0.0, row.id))
    return [row.id for row in found[:_LEASE_TRIES]]


def _slots_taken(session: Session, item_id: int, annotator: str, now: datetime) -> int:
    """Judgments of the item plus live leases of annotators other than `annotator`."""
    num_judgments = session.scalar(
        select(func.count()).select_from(JudgmentRow).where(JudgmentRow.item_id == item_id))
    num_leases = session.scalar(select(func.count()).select_from(LeaseRow).where(
        LeaseRow.item_id == item_id, LeaseRow.annotator != annotator, LeaseRow.expires_at > now))
    return num_judgments + num_leases


def _candidate_ids(session: Session, item_id: int) -> list[int]:
    return list(session.scalars(
        select(CandidateRow.id).where(CandidateRow.item_id == item_id).order_by(CandidateRow.position)))


def _check_item_decision(
    session: Session, item_id: int, accepted: Sequence[int], none_fit: bool, shown_order: Sequence[int] | None
) -> list[int]:
    """Validate a page's decision on an item; returns the item's candidate ids (drawn order)."""
    if not is_row_id(item_id) or session.scalar(select(ItemRow.id).where(ItemRow.id == item_id)) is None:
        raise KeyError(f"item {item_id!r} is not in the feedback store")
    if isinstance(accepted, (str, bytes)):
        raise ValueError(f"item {item_id}: accepted must be a list of candidate ids, not {accepted!r}")
    if none_fit and accepted:
        raise ValueError(f"item {item_id}: none_fit=True but {len(accepted)} candidate(s) accepted")
    candidate_ids = _candidate_ids(session, item_id)
    for candidate_id in accepted:
        if not is_row_id(candidate_id) or candidate_id not in candidate_ids:
            raise ValueError(f"item {item_id}: accepted candidate {candidate_id!r} is not one of this item's "
                             "candidates")
    if shown_order is not None and (len(shown_order) != len(candidate_ids)
                                    or sorted(shown_order) != sorted(candidate_ids)):
        raise ValueError(f"item {item_id}: shown_order must list each of the item's candidates once")
    return candidate_ids


def _stored_judgment(session: Session, item_id: int, annotator: str) -> dict[str, Any] | None:
    """`annotator`'s current judgment of the item as `JudgmentConflict.stored` holds it; None if none."""
    row = session.execute(select(JudgmentRow.id, JudgmentRow.none_fit, JudgmentRow.correction).where(
        JudgmentRow.item_id == item_id, JudgmentRow.annotator == annotator)).first()
    if row is None:
        return None
    accepted = session.scalars(select(DecisionRow.candidate_id).where(
        DecisionRow.judgment_id == row.id, DecisionRow.accepted.is_(True)).order_by(DecisionRow.candidate_id))
    return {"accepted": list(accepted), "none_fit": bool(row.none_fit), "correction": row.correction}


def _check_same_as_stored(
    item_id: int, stored: dict[str, Any], accepted: Sequence[int], none_fit: bool, correction: str | None
) -> None:
    """A resubmission of a judged item: fine if it chooses what is stored (a retry, a second tab that agrees);
    otherwise a conflict carrying the stored judgment, since silently keeping the first choice would tell the
    person their new one was saved."""
    if (sorted(accepted), bool(none_fit), correction) == (stored["accepted"], stored["none_fit"],
                                                          stored["correction"]):
        return
    saved = ("none fits, with a written rationale" if stored["correction"] is not None
             else "none fits" if stored["none_fit"] else f"accepted candidates {stored['accepted']}")
    raise JudgmentConflict(f"you already judged item {item_id} differently ({saved}): revise that judgment "
                           "to change it", stored=stored)

