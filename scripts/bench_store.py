"""Benchmark: the feedback store and the annotation page at the scale of a real study (VQA-X).

    python scripts/bench_store.py                                  # SQLite and PostgreSQL, 30 k items/round
    python scripts/bench_store.py --backend sqlite --keep-db runs/bench_store.db   # keep (and reuse) the store
    python scripts/bench_store.py --items 3000 --requests-per-annotator 10          # a quick look

Per backend:
1. `scripts/store_history.py`'s `fill_history` writes a study's history: `--rounds` rounds of `--items` train
   items x 10 candidates, every round but the last judged by 5 people (a tenth of the items by more than
   one); the last round is sampled and open for the page.
2. `measure_bookkeeping` times the loop's per-round bookkeeping, `illume status` and the admin summary on it.
3. The annotation page, for real: the app (`illume.annotate.server.create_app`, accounts on, the page's
   default `annotate` config unless told otherwise) served by uvicorn in a separate process on 127.0.0.1,
   and `--annotators-concurrent` people, each a thread with its own keep-alive HTTP client and account
   token (`Authorization: Bearer`, as the page's script sends it), doing the page's loop: POST /api/next,
   wait `--think-seconds`, POST /api/judgment (0-3 of the shown candidates accepted, none_fit for 0, a fresh
   client_token and the shown order, as the page's script sends them), again; each person's first call at a
   random moment within one think time (`--lockstep-start`: all at once). Each call's latency is timed
   by the client (the round trip) and by the server (`x-server-ms`: first byte in to response out, added
   by a thin ASGI wrapper around the app); p50/p95/p99/max per call, and items/s.
   It runs twice per think time: at the start of the open round (nothing judged) and near its end (the
   first `--prejudged` of the round judged beforehand through the store's API), since the hand-out must
   find the open items among the judged ones.
   Afterwards the store is checked: every acknowledged judgment stored once, no item over its judgments.
4. The admin page's summary (GET /api/admin/summary) at full size: first call (recomputed) and a repeat.
5. The query plans of what one `next` and one judgment run (EXPLAIN QUERY PLAN on SQLite, EXPLAIN ANALYZE
   on PostgreSQL, rolled back), each statement flagged if it scans a table instead of using an index.

Assumptions, up front:
- Client and server share this machine's cores (2 in CI): the client threads' own CPU time and the
  server's are reported next to the latencies, and the server's own time per call (x-server-ms) shows
  what the page costs without the client's share. Figures taken while other work runs are contended:
  say so when quoting them.
- SQLite is the run's `feedback.db` as the loop makes it (WAL, writes serialised with BEGIN IMMEDIATE,
  durable commits); PostgreSQL is tests/postgres.py's throw-away cluster (fsync off, Unix socket),
  VACUUMed and ANALYZEd after the fill.
- Think time 0 saturates the server (a closed loop: the latency then includes queueing behind the other
  annotators); real people take ~15 s per item, so `--think-seconds 0.5` with 20 annotators is still
  ~30x a real team's pace.
- No timing is asserted anywhere; the figures are printed and written to --out as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/bench_store.py` from anywhere: scripts/ and tests/ importable
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from sqlalchemy import event, func, select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from illume.config import AnnotateConfig  # noqa: E402
from illume.feedback.schema import ItemRow, JudgmentRow
from illume.feedback.store import FeedbackStore  # noqa: E402

SPLIT = "train"
PEOPLE = 5
"""People in the history (`fill_history`'s annotator-0..); the page's accounts reuse their names first."""


# -------------------------------------------------------------------- the server (a child process)


def serve(url: str, port: int, annotations_per_item: int, lease_seconds: float) -> None:
    """Serve the annotation app over the store at `url` on 127.0.0.1:`port` (the child process's job)."""
    from illume.annotate import server

    store = FeedbackStore(url)
    app = server.create_app(store, None, AnnotateConfig(annotations_per_item=annotations_per_item,
                                                        lease_seconds=lease_seconds))
    server.serve(_ServerTiming(app), "127.0.0.1", port)  # as `illume annotate` serves it (gc.freeze included)


class _ServerTiming:
    """ASGI wrapper: adds `x-server-ms` (request received to response headers sent) to each HTTP response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def timed_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                elapsed = f"{(time.perf_counter() - start) * 1000:.3f}".encode()
                message = {**message, "headers": [*message.get("headers", []), (b"x-server-ms", elapsed)]}
            await send(message)

        await self.app(scope, receive, timed_send)


@contextlib.contextmanager
def server_process(url: str, annotations_per_item: int, lease_seconds: float):
    """The app served by uvicorn in a child process; yields (base URL, pid). Stopped on exit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, __file__, "--serve", url, "--port", str(port),
                                "--annotations-per-item", str(annotations_per_item),
                                "--lease-seconds", str(lease_seconds)], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the annotation server exited with {process.returncode}")
            try:
                httpx.get(base + "/static/app.js", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the annotation server did not start within 120 s") from None
                time.sleep(0.2)
        yield base, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -------------------------------------------------------------------- the annotators (client threads)


def annotate(base: str, tokens: Sequence[str], items_each: int, think_seconds: float, seed: int,
             lockstep_start: bool = False) -> dict:
    """`len(tokens)` people doing the page's loop at once; returns their calls' latencies and outcomes.

    Each person's first timed `next` comes at a random moment within one think time after the clock starts:
    people don't press "next" in the same millisecond. `lockstep_start`: all at once, as up to issue 24; those
    20 calls (3 % of 25 x 20) wait for each other's ~10 ms of server CPU, 40-200 ms, and made the p99 of `next`.
    """
    calls: dict[str, list[tuple[float, float]]] = {"next": [], "judgment": []}  # (round trip ms, server ms)
    outcome = {"stored": 0, "duplicate": 0, "no_item": 0, "errors": []}
    lock = threading.Lock()
    barrier = threading.Barrier(len(tokens))

    def person(index: int, token: str) -> None:
        rng = random.Random(seed * 1000 + index)
        mine: dict[str, list] = {"next": [], "judgment": []}
        stored = duplicate = no_item = 0
        errors = []
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=120) as client:
            client.post("/api/next", json={})  # connect and hold the first item before the clock starts
            barrier.wait()
            if not lockstep_start:
                time.sleep(rng.uniform(0, think_seconds))
            for _ in range(items_each):
                response, ms = _timed_call(client, "/api/next", {})
                if response.status_code != 200:
                    errors.append(f"next {response.status_code}: {response.text[:200]}")
                    break
                mine["next"].append((ms, float(response.headers.get("x-server-ms", "nan"))))
                item = response.json()["item"]
                if item is None:
                    no_item += 1
                    break
                if think_seconds:
                    time.sleep(think_seconds * rng.uniform(0.5, 1.5))
                shown = [c["id"] for c in item["candidates"]]
                accepted = rng.sample(shown, rng.choice((0, 1, 1, 2, 2, 3)))
                body = {"item_id": item["item_id"], "accepted": accepted, "none_fit": not accepted,
                        "seconds": round(rng.uniform(5, 30), 1), "client_token": str(uuid.uuid4()),
                        "shown_order": shown}
                response, ms = _timed_call(client, "/api/judgment", body)
                if response.status_code != 200:
                    errors.append(f"judgment {response.status_code}: {response.text[:200]}")
                    continue
                mine["judgment"].append((ms, float(response.headers.get("x-server-ms", "nan"))))
                if response.json()["duplicate"]:
                    duplicate += 1
                else:
                    stored += 1
        with lock:
            for name in calls:
                calls[name] += mine[name]
            outcome["stored"] += stored
            outcome["duplicate"] += duplicate
            outcome["no_item"] += no_item
            outcome["errors"] += errors

    threads = [threading.Thread(target=person, args=(i, token)) for i, token in enumerate(tokens)]
    cpu_start, start = time.process_time(), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"calls": calls, "outcome": outcome, "wall_seconds": time.perf_counter() - start,
            "client_cpu_seconds": time.process_time() - cpu_start}


def _timed_call(client: httpx.Client, path: str, body: dict) -> tuple[httpx.Response, float]:
    start = time.perf_counter()
    response = client.post(path, json=body)
    return response, (time.perf_counter() - start) * 1000


def percentiles(values: Sequence[float]) -> dict:
    """p50/p95/p99/max (ms) of latencies; nearest-rank percentiles."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, int(round(p / 100 * len(ordered))) - 1))], 2)

    return {"n": len(ordered), "p50": rank(50), "p95": rank(95), "p99": rank(99), "max": round(ordered[-1], 2),
            "mean": round(statistics.fmean(ordered), 2)}


# -------------------------------------------------------------------- the store around the page


def open_round(store: FeedbackStore) -> int:
    return max(store.rounds())


def prejudge(store: FeedbackStore, round_idx: int, fraction: float, per_item: int, seed: int) -> int:
    """Judge the open round's first items (hand-out order) through the store's API until `fraction` of them
    have their `per_item` judgments, by the history's people; returns how many judgments were added."""
    with Session(store.engine) as session:
        total = session.scalar(select(func.count()).select_from(ItemRow).where(
            ItemRow.round_idx == round_idx, ItemRow.split == SPLIT))
        open_items = session.execute(
            select(ItemRow.id, ItemRow.example_id, ItemRow.num_judgments)
            .where(ItemRow.round_idx == round_idx, ItemRow.split == SPLIT, ItemRow.num_judgments < per_item)
            .order_by(ItemRow.priority.is_(None), ItemRow.priority, ItemRow.id)).all()
    wanted = int(fraction * total) - (total - len(open_items))
    if wanted <= 0:
        return 0
    ids = store.candidate_ids(round_idx, SPLIT)
    rng = random.Random(seed)
    rows: dict[str, list] = {}
    for index, (_, example_id, count) in enumerate(open_items[:wanted]):
        for k in range(count, per_item):
            accepted = rng.sample(ids[example_id], rng.choice((0, 1, 1, 2, 2, 3)))
            name = f"annotator-{(index + k) % PEOPLE}"
            rows.setdefault(name, []).append((example_id, accepted, not accepted, round(rng.uniform(5, 30), 1)))
    return sum(store.add_judgments(round_idx, judged, name, SPLIT) for name, judged in rows.items())


def check_store(store: FeedbackStore, round_idx: int, per_item: int, judged_before: int, stored: int) -> dict:
    """No acknowledged judgment lost or duplicated, no item over its judgments, counts kept right."""
    with Session(store.engine) as session:
        in_round = (ItemRow.round_idx == round_idx, ItemRow.split == SPLIT)
        judgments = session.scalar(select(func.count()).select_from(JudgmentRow).join(ItemRow).where(*in_round))
        over = session.scalar(select(func.count()).select_from(ItemRow).where(
            *in_round, ItemRow.num_judgments > per_item))
        counted = select(JudgmentRow.item_id, func.count().label("n")).group_by(JudgmentRow.item_id).subquery()
        miscounted = session.scalar(
            select(func.count()).select_from(ItemRow).outerjoin(counted, counted.c.item_id == ItemRow.id)
            .where(*in_round, ItemRow.num_judgments != func.coalesce(counted.c.n, 0)))
    return {"judgments_added": judgments - judged_before, "acknowledged": stored,
            "items_over_limit": over, "miscounted_items": miscounted,
            "ok": judgments - judged_before == stored and over == 0 and miscounted == 0}


def judgments_in(store: FeedbackStore, round_idx: int) -> int:
    return store.round_counts(round_idx, SPLIT)["judgments"]


# -------------------------------------------------------------------- query plans


def query_plans(url: str, per_item: int) -> list[dict]:
    """The statements one `next` and one judgment run (in process, through AnnotationQueue) with their plans."""
    from illume.feedback.queue import AnnotationQueue

    store = FeedbackStore(url)
    queue = AnnotationQueue(store)
    captured: list[tuple[str, Any]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if not executemany and statement.lstrip().split(None, 1)[0].upper() in ("SELECT", "DELETE", "UPDATE"):
            captured.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", capture)
    annotator = f"plan-probe-{uuid.uuid4().hex[:6]}"
    current = queue.open_round(per_item, SPLIT)
    lease = queue.lease_item(current, annotator, per_item, 300, SPLIT)
    queue.annotation_progress(current, per_item, annotator, SPLIT)
    if lease is not None:
        queue.item(lease.item_id)
        queue.submit_judgment(lease.item_id, annotator, lease.shown_order[:1], False, 1.0, str(uuid.uuid4()),
                              lease.shown_order, per_item)
    event.remove(store.engine, "before_cursor_execute", capture)
    plans, seen = [], set()
    postgres = store.engine.dialect.name == "postgresql"
    with store.engine.connect() as connection:
        raw = connection.connection.driver_connection
        for statement, parameters in captured:
            if statement in seen:
                continue
            seen.add(statement)
            if postgres:
                with raw.cursor() as cursor:
                    cursor.execute("EXPLAIN (ANALYZE, COSTS OFF) " + statement, parameters)
                    lines = [row[0] for row in cursor.fetchall()]
                raw.rollback()
                scans = [line.strip() for line in lines if "Seq Scan" in line
                         and any(f" on {t}" in line for t in ("items", "candidates", "judgments", "decisions"))]
            else:
                lines = [row[3] for row in raw.execute("EXPLAIN QUERY PLAN " + statement, parameters).fetchall()]
                scans = [line for line in lines if line.startswith("SCAN ") and not line.startswith(
                    ("SCAN rounds", "SCAN leases", "SCAN CONSTANT"))]
            plans.append({"statement": " ".join(statement.split()), "plan": lines, "scans_a_table": scans})
    store.close()
    return plans


# -------------------------------------------------------------------- one backend


def bench_backend(backend: str, url: str, args: argparse.Namespace, fill: bool) -> dict:
    from scripts.store_history import fill_history, measure_bookkeeping

    out: dict[str, Any] = {"backend": backend}
    per_item = args.annotations_per_item
    if fill:
        print(f"[{backend}] filling: {args.items} items x 10 candidates x {args.rounds} rounds", flush=True)
        out["fill"] = fill_history(url, items_per_round=args.items, rounds=args.rounds, progress=True)
        out["fill"].pop("people", None)
    if not args.skip_bookkeeping:
        print(f"[{backend}] bookkeeping", flush=True)
        out["bookkeeping"] = measure_bookkeeping(url, steps=args.bookkeeping_steps)
    store = FeedbackStore(url)
    round_idx = open_round(store)
    names = [f"annotator-{k}" for k in range(args.annotators_concurrent)]
    existing = {account.name for account in store.accounts()}
    for name in names + ["bench-admin"]:
        if name in existing:
            store.revoke_account(name)
    tokens = [store.add_account(name) for name in names]
    admin_token = store.add_account("bench-admin", role="admin")
    out["page"] = []
    lease_seconds = AnnotateConfig.lease_seconds
    for state in ("start", "end"):
        if state == "end":
            added = prejudge(store, round_idx, args.prejudged, per_item, seed=1)
            print(f"[{backend}] judged {added} items of round {round_idx} through the store first "
                  f"(up to {args.prejudged:.0%})", flush=True)
            if not args.skip_plans:
                out["plans"] = query_plans(url, per_item)
                flagged = [p for p in out["plans"] if p["scans_a_table"]]
                print(f"[{backend}] query plans of one next + judgment: {len(out['plans'])} statements, "
                      f"{len(flagged)} scanning a table" + "".join(
                          f"\n    {p['statement'][:150]}\n      {p['scans_a_table']}" for p in flagged), flush=True)
        for think in args.think_seconds:
            counts = store.round_counts(round_idx, SPLIT)
            before = counts["judgments"]
            with server_process(url, per_item, lease_seconds) as (base, pid):
                server_cpu = _cpu_seconds(pid)
                result = annotate(base, tokens, args.requests_per_annotator, think, seed=len(out["page"]),
                                  lockstep_start=args.lockstep_start)
                server_cpu = _cpu_seconds(pid) - server_cpu
                if state == "end" and think == args.think_seconds[-1]:
                    out["admin_summary"] = admin_summary(base, admin_token)
            stored = result["outcome"]["stored"]
            run = {
                "state": state, "think_seconds": think, "judged_items_before": counts["judged_items"],
                "items": counts["items"],
                "next_ms": percentiles([ms for ms, _ in result["calls"]["next"]]),
                "judgment_ms": percentiles([ms for ms, _ in result["calls"]["judgment"]]),
                "next_server_ms": percentiles([ms for _, ms in result["calls"]["next"]]),
                "judgment_server_ms": percentiles([ms for _, ms in result["calls"]["judgment"]]),
                "items_per_second": round(stored / result["wall_seconds"], 1),
                "wall_seconds": round(result["wall_seconds"], 1),
                "client_cpu_seconds": round(result["client_cpu_seconds"], 1),
                "server_cpu_seconds": round(server_cpu, 1),
                "outcome": {k: v for k, v in result["outcome"].items() if k != "errors"},
                "errors": result["outcome"]["errors"][:5],
                "check": check_store(store, round_idx, per_item, before, stored),
            }
            out["page"].append(run)
            print_page_run(backend, run)
    store.close()
    return out


def admin_summary(base: str, token: str) -> dict:
    """GET /api/admin/summary twice: recomputed (first call of the server) and cached."""
    timings = []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=600) as client:
        for _ in range(2):
            start = time.perf_counter()
            response = client.get("/api/admin/summary")
            timings.append(round(time.perf_counter() - start, 3))
            response.raise_for_status()
    return {"first_seconds": timings[0], "repeat_seconds": timings[1]}


def print_page_run(backend: str, run: dict) -> None:
    def row(name: str, p: dict, server: dict) -> str:
        return (f"    {name:9s} n={p['n']:5d}  p50 {p.get('p50', 0):7.1f}  p95 {p.get('p95', 0):7.1f}  "
                f"p99 {p.get('p99', 0):7.1f}  max {p.get('max', 0):7.1f} ms   (server p50 {server.get('p50', 0):.1f}, "
                f"p99 {server.get('p99', 0):.1f} ms)")

    print(f"[{backend}] page, round {run['state']} ({run['judged_items_before']}/{run['items']} items judged), "
          f"think {run['think_seconds']} s: {run['items_per_second']} items/s, client CPU "
          f"{run['client_cpu_seconds']} s, server CPU {run['server_cpu_seconds']} s over {run['wall_seconds']} s; "
          f"store check {'ok' if run['check']['ok'] else run['check']}" + (f"; errors {run['errors']}" if run["errors"] else ""))
    print(row("next", run["next_ms"], run["next_server_ms"]))
    print(row("judgment", run["judgment_ms"], run["judgment_server_ms"]), flush=True)


def print_summary(results: dict) -> None:
    print("\nnext / judgment round trip (ms), 20 concurrent annotators" if results["settings"]["annotators_concurrent"] == 20
          else "\nnext / judgment round trip (ms)")
    print(f"{'backend':11s} {'round':6s} {'think':>5s} {'next p50':>9s} {'p99':>7s} {'judg p50':>9s} {'p99':>7s} "
          f"{'items/s':>8s}")
    for backend in results["backends"]:
        for run in backend.get("page", []):
            print(f"{backend['backend']:11s} {run['state']:6s} {run['think_seconds']:5.1f} "
                  f"{run['next_ms'].get('p50', 0):9.1f} {run['next_ms'].get('p99', 0):7.1f} "
                  f"{run['judgment_ms'].get('p50', 0):9.1f} {run['judgment_ms'].get('p99', 0):7.1f} "
                  f"{run['items_per_second']:8.1f}")
        if "admin_summary" in backend:
            summary = backend["admin_summary"]
            print(f"{backend['backend']:11s} admin summary: {summary['first_seconds']} s recomputed, "
                  f"{summary['repeat_seconds']} s cached")
        if "bookkeeping" in backend:
            steps = backend["bookkeeping"]["steps"]
            print(f"{backend['backend']:11s} bookkeeping (s): " + ", ".join(
                f"{name} {step['seconds']}" for name, step in steps.items()))


def postgres_available() -> str | None:
    """None if a throw-away PostgreSQL can be started here, else why not."""
    from tests.postgres import find_bindir

    if find_bindir() is None:
        return "no PostgreSQL server binaries (initdb, pg_ctl) found; apt-get install postgresql"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[dev]')"
    return None


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--items", type=int, default=30_000, help="train items per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--annotators-concurrent", type=int, default=20)
    parser.add_argument("--requests-per-annotator", type=int, default=25,
                        help="items each annotator takes and judges per run (a next and a judgment each)")
    parser.add_argument("--think-seconds", type=float, nargs="+", default=[0.5, 0.0],
                        help="pause between showing an item and submitting it (one run per value)")
    parser.add_argument("--prejudged", type=float, default=0.9,
                        help="share of the open round judged before the 'end of round' runs")
    parser.add_argument("--annotations-per-item", type=int, default=AnnotateConfig.annotations_per_item)
    parser.add_argument("--skip-bookkeeping", action="store_true")
    parser.add_argument("--bookkeeping-steps", nargs="+", default=None,
                        help="only these of scripts/store_history.py's BOOKKEEPING_STEPS (default: all)")
    parser.add_argument("--skip-plans", action="store_true")
    parser.add_argument("--lockstep-start", action="store_true",
                        help="every annotator's first call at the same moment (default: spread over one think time)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_store.json")
    parser.add_argument("--keep-db", type=Path, default=None,
                        help="SQLite: keep the store here (a store already there is reused, not refilled)")
    # The server child process (internal).
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--lease-seconds", type=float, default=AnnotateConfig.lease_seconds, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args.serve, args.port, args.annotations_per_item, args.lease_seconds)
        return {}

    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    if "postgresql" in backends and (why := postgres_available()) is not None:
        print(f"PostgreSQL skipped: {why}", flush=True)
        backends.remove("postgresql")
    results: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                     if k not in ("serve", "port")},
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
        "backends": [],
    }
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="illume-bench-store-")))
        for backend in backends:
            if backend == "sqlite":
                path = args.keep_db or folder / "feedback.db"
                fill = not (args.keep_db and path.exists())
                if not fill:
                    print(f"[sqlite] reusing {path} (not refilled)", flush=True)
                url = str(path)
            else:
                from scripts.store_history import postgres_database

                url = stack.enter_context(postgres_database())
                fill = True
            results["backends"].append(bench_backend(backend, url, args, fill))
    results["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print_summary(results)
    print(f"\nwritten to {args.out}")
    return results


if __name__ == "__main__":
    main()
