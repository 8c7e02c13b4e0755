"""What a run folder is, who may write to it, and which files illume may replace.

Assumptions, up front:
- A run folder (output_dir/name) is illume's when it holds `illume-run.json`, the first file a command writes
  into it, or, for a run made before that file existed, the config.yaml illume wrote (every section of a
  run's config, as `save_config` writes it, and loading as one). A command refuses a non-empty folder that
  is neither, naming what it found, and writes nothing there (`claim`).
- One writer per run: every command that writes a run's rounds, store or models (`illume run`, `pretrain`,
  `baseline`, `reward`, `dpo`, `kto`) holds the run's lock while it works (`hold`): an exclusive `flock` on
  RUN_DIR/run.lock, whose content names the holder (command, pid, host, start). The kernel releases it when
  the process ends, however it ends, so a lock left by a crash is stale by construction: the next command
  takes it and says whose it was. A second writer refuses in one line naming the holder.
- The ranks of one launch (torchrun, accelerate) share the lock: rank 0 takes it and tells the others
  whether it got it, so every rank goes on or every rank stops with the same message.
- The annotation page and `illume status`/`export` only read the store and write judgments to it (one
  transaction each); they take no lock and work beside a run.
- Nothing is replaced that illume did not write, and nothing of a run's own without `--force`
  (`check_new_path`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger(__name__)

MARKER = "illume-run.json"
"""Written first into every run folder illume makes; says which illume made it and when."""
LOCK_FILE = "run.lock"
"""The run's writer lock (`hold`); empty while nobody holds it."""
SAVED_SECTIONS = frozenset({"name", "output_dir", "seed", "data", "model", "sample", "critic", "train", "loop"})
"""Top-level keys of every config.yaml illume has written (`save_config` writes all of them), by which a run
from before `MARKER` existed is told from a hand-written or another tool's config.yaml."""


class RunFolderError(ValueError):
    """A folder illume may not write a run into, or a path it may not replace; the message says why."""


class RunInUse(RuntimeError):
    """Another command holds the run's lock (or its store's); the message names it."""


# -------------------------------------------------------------------- whose folder


def is_run_folder(run_dir: Path) -> bool:
    """Whether illume made `run_dir` (its marker, or the files of a run made before the marker existed)."""
    if (run_dir / MARKER).is_file():
        return True
    config = run_dir / "config.yaml"
    if not config.is_file():
        return False
    from omegaconf import OmegaConf

    from illume.config import ConfigError, load_run_config

    try:
        saved = OmegaConf.load(config)
        if not hasattr(saved, "keys") or not SAVED_SECTIONS <= set(saved.keys()):
            return False
        load_run_config(config)
    except ConfigError:  # every section there, but not a config this illume reads
        return False
    except Exception:  # YAML that does not parse (OmegaConf raises yaml's own errors): someone else's file
        return False
    return True


def claim(run_dir: Path, command: str) -> None:
    """Make `run_dir` an illume run folder, or check that it is one, before anything is written into it.

    A missing or empty folder is created and marked; an illume run folder is used as it is (one from before
    the marker gets it). Only rank 0 writes.

    Raises:
        RunFolderError: The folder holds files illume did not write; the message lists some of them.
    """
    from illume import distributed  # here, not at the top: the store's readers (the page) need no torch

    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} is a file, not a run folder: choose another output_dir/name")
    if is_run_folder(run_dir):
        if not (run_dir / MARKER).is_file() and distributed.is_main():
            _write_marker(run_dir, command)
        return
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if found:
        shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        raise RunFolderError(f"{run_dir} is not an illume run folder and is not empty (it holds {shown}): "
                             "illume writes nothing there; choose another output_dir/name, or empty the folder")
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_marker(run_dir, command)


def _write_marker(run_dir: Path, command: str) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        made_by = f"illume {version('illume')}"
    except PackageNotFoundError:
        made_by = "illume"
    marker = {"made_by": made_by, "command": command, "created": _now()}
    (run_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


# -------------------------------------------------------------------- one writer per run


@contextlib.contextmanager
def hold(run_dir: Path, command: str, database: Callable[[str], ContextManager] | None = None) -> Iterator[None]:
    """Hold the run's writer lock for the block (every rank of a launch enters and leaves it together).

    Call `claim` first: the lock file lives in the run folder.

    Args:
        run_dir: The run folder.
        command: What holds it (`run`, `reward train`, ...), for the message a second writer gets.
        database: The store's own lock (`FeedbackStore.writer_lock`, given the holder's name), taken after the
            folder's, for a store other folders or machines may share (PostgreSQL).

    Raises:
        RunInUse: Another process holds either; the message names it (command, pid, host, start time).
    """
    from illume import distributed

    with contextlib.ExitStack() as held:
        if distributed.is_main():
            try:
                lock = _FileLock(run_dir / LOCK_FILE, command)
                lock.acquire()
                held.callback(lock.release)
                if database is not None:
                    held.enter_context(database(holder_name(command)))
            except Exception as error:  # the others must stop too, not wait for rank 0 at the next meeting
                distributed.broadcast_object((isinstance(error, RunInUse), str(error)))
                raise
        failure = distributed.broadcast_object(None)  # (busy?, message) if rank 0 failed
        if failure is not None:  # ranks > 0: rank 0 raised its own error
            busy, message = failure
            raise RunInUse(message) if busy else RuntimeError(f"rank 0 could not lock the run: {message}")
        yield


@contextlib.contextmanager
def writing(run_dir: Path, command: str, database: Callable[[str], ContextManager] | None = None) -> Iterator[Path]:
    """`claim` the run folder and `hold` its lock (and the store's, `database`) for the block: how every command
    that writes a run starts.

    Yields:
        The run folder.

    Raises:
        RunFolderError, RunInUse: as `claim` and `hold`, before anything is written.
    """
    claim(run_dir, command)
    with hold(run_dir, command, database):
        yield run_dir


def holder_name(command: str) -> str:
    """`illume COMMAND (pid P on HOST)`: how a lock names its holder (also the store's lock, on PostgreSQL)."""
    return f"illume {command} (pid {os.getpid()} on {socket.gethostname()})"


class _FileLock:
    """An exclusive `flock` on a file whose content describes the holder; released by the kernel when the
    process ends, so a crashed holder's lock is free again (and recognised as left by a crash)."""

    def __init__(self, path: Path, command: str) -> None:
        self.path = path
        self.command = command
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunInUse(f"{self.path.parent} is in use by {holder}: wait for it to finish or stop it "
                           "(one command writes to a run at a time)") from None
        left = os.pread(fd, 4096, 0)
        if left.strip():  # the holder ended without releasing: killed, or its machine went down
            logger.warning("%s: taking over the lock left by %s, which is no longer running", self.path.parent,
                           _describe(left))
        record = {"command": self.command, "pid": os.getpid(), "host": socket.gethostname(), "since": _now(),
                  "argv": sys.argv[1:]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        # Emptied, not deleted: a process that opened the file just before would otherwise lock a file no
        # longer in the folder while the next one locks a new one.
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing releases the flock
        self.fd = None


def _describe(content: bytes) -> str:
    try:
        holder = json.loads(content)
        return f"`illume {holder['command']}` (pid {holder['pid']} on {holder['host']}, since {holder['since']})"
    except (ValueError, KeyError, TypeError):
        return "another illume command"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -------------------------------------------------------------------- what may be replaced


def check_new_path(path: Path, force: bool, option: str = "--out") -> None:
    """Refuse to write `path` over something that exists, unless `force`; never over a run's own files.

    Args:
        path: A file or folder a command is about to write (replacing it whole).
        force: The user's `--force`: an existing file or folder outside a run's own files may be replaced.
        option: The option that named `path`, for the message.

    Raises:
        RunFolderError: `path` exists and `force` is not given, or it is (inside) a run folder's own files.
    """
    if not path.exists() and not path.is_symlink():
        return
    owner = next((parent for parent in path.resolve().parents if is_run_folder(parent)), None)
    if owner is not None and path.resolve().relative_to(owner).parts[0] != "exports":
        raise RunFolderError(f"{option} {path} is one of the run {owner}'s own files: illume never replaces it; "
                             f"choose a path outside the run (or under {owner / 'exports'})")
    if is_run_folder(path.resolve()):
        raise RunFolderError(f"{option} {path} is a run folder: illume never replaces it; choose another path")
    if not force:
        kind = "folder" if path.is_dir() else "file"
        raise RunFolderError(f"{option} {path} exists ({kind}): choose another path, or pass --force to replace it")


def check_output_folder(out_dir: Path, own_file: str, force: bool, command: str,
                        alongside: tuple[str, ...] = (), kind: str | None = None) -> None:
    """Refuse to write a command's output folder over anything but that command's own earlier output.

    Args:
        out_dir: The folder the command writes its files into.
        own_file: A file only this command writes there (e.g. reward_model.json), by which its earlier output
            is recognised.
        force: The user's `--force`: replace the command's own earlier output.
        command: The command, for the message (`illume reward train`).
        alongside: Name patterns of what other illume steps keep in the same folder (left as they are, e.g.
            the loop's reward/round_NN/ beside `illume reward train`'s files).
        kind: When `own_file` is a JSON file that other steps write too (metrics.json), its "kind" must be
            this for the folder to count as the command's own (a round's metrics.json has none).

    Raises:
        RunFolderError: `out_dir` holds the command's earlier output and `force` is not given, or it holds
            anything else (never replaced, whatever `force` says).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise RunFolderError(f"{out_dir} is a file: {command} writes a folder there; choose another --out")
    found = sorted(p.name for p in out_dir.iterdir()
                   if not any(p.match(pattern) for pattern in alongside)) if out_dir.is_dir() else []
    if not found:
        return
    if own_file not in found or is_run_folder(out_dir) or (kind is not None and _kind(out_dir / own_file) != kind):
        shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        raise RunFolderError(f"{out_dir} holds files that {command} did not write ({shown}): illume replaces "
                             "nothing there; choose another --out")
    if not force:
        raise RunFolderError(f"{out_dir} holds the output of an earlier `{command}` ({own_file}): pass --force to "
                             "replace it, or --out for another folder")


def _kind(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
