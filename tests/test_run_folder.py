"""Nothing overwritten that illume did not write, and one writer per run (illume.run_folder; issue 24).

The lock is tested with real processes: a real `illume run` whose critic waits for people (so it holds its run
for as long as the test needs) and second commands started beside it; then the holder is killed with SIGKILL
and the next command takes the lock it left. Each subprocess has a timeout, so a hang fails instead of blocking.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from illume import run_folder
from illume.cli import main
from illume.config import load_config, save_config
from tests.conftest import REPO, tiny_overrides

DEMO = str(REPO / "configs" / "demo.yaml")
TIMEOUT = 240
# A run that holds its folder: round 0 is sampled, then the human critic waits for people (nobody comes).
WAITING = ["critic.kind=person", "critic.wait=true", "critic.poll_seconds=0.2", "sample.samples_per_temperature=2",
           "sample.max_new_tokens=6", "loop.num_rounds=1"]


# ------------------------------------------------------------------ whose folder


def _foreign_folder(path: Path) -> dict[Path, bytes]:
    """Another tool's run folder: its own config.yaml and results.json. Returns its files' bytes."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("lr: 0.1\nepochs: 3\n")
    (path / "results.json").write_text('{"accuracy": 0.9}\n')
    return _files(path)


def _files(path: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["run", "pretrain", "baseline"])
def test_a_folder_illume_did_not_write_is_refused_and_left_as_it_was(tmp_path, capsys, command):
    """Issue 24: `illume run ... output_dir=X name=N` overwrote another tool's config.yaml and results.json."""
    folder = tmp_path / "runs" / "theirs"
    before = _foreign_folder(folder)
    assert main([command, DEMO, *tiny_overrides(tmp_path, own_cache=True), "name=theirs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"refused: {folder} is not an illume run folder and is not empty (it holds config.yaml, "
                          "results.json)") and err.count("\n") == 1
    assert _files(folder) == before  # nothing written, nothing added
    assert not (tmp_path / "cache").exists()  # and nothing pre-trained


def test_claim_marks_new_folders_and_adopts_runs_made_before_the_marker(tmp_path):
    new = tmp_path / "new"
    run_folder.claim(new, "run")
    marker = json.loads((new / run_folder.MARKER).read_text())
    assert marker["command"] == "run" and marker["made_by"].startswith("illume")
    older = tmp_path / "older"  # a run from before illume-run.json: the config.yaml illume wrote
    save_config(load_config(DEMO), older / "config.yaml")
    (older / "feedback.db").write_bytes(b"")
    assert run_folder.is_run_folder(older)
    run_folder.claim(older, "run")
    assert (older / run_folder.MARKER).is_file()
    hand_written = tmp_path / "hand"  # a config.yaml that loads, but not one illume wrote
    hand_written.mkdir()
    (hand_written / "config.yaml").write_text("loop:\n  num_rounds: 2\n")
    assert not run_folder.is_run_folder(hand_written)
    with pytest.raises(run_folder.RunFolderError, match="not an illume run folder"):
        run_folder.claim(hand_written, "run")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(run_folder.RunFolderError, match="is a file"):
        run_folder.claim(tmp_path / "a_file", "run")


def test_output_folders_are_replaced_only_with_force_and_never_what_another_step_wrote(tmp_path):
    out = tmp_path / "dpo"
    run_folder.check_output_folder(out, "metrics.json", False, "illume dpo", kind="dpo")  # new: fine
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"kind": "dpo"}))
    with pytest.raises(run_folder.RunFolderError, match="earlier `illume dpo`.*pass --force"):
        run_folder.check_output_folder(out, "metrics.json", False, "illume dpo", kind="dpo")
    run_folder.check_output_folder(out, "metrics.json", True, "illume dpo", kind="dpo")
    round_dir = tmp_path / "round_01"  # a round's folder also has a metrics.json: never replaced
    round_dir.mkdir()
    (round_dir / "metrics.json").write_text(json.dumps({"round": 1, "trained": True}))
    (round_dir / "adapters.safetensors").write_bytes(b"weights")
    with pytest.raises(run_folder.RunFolderError, match="did not write .adapters.safetensors, metrics.json"):
        run_folder.check_output_folder(round_dir, "metrics.json", True, "illume dpo", kind="dpo")
    reward = tmp_path / "reward"  # the loop's reward/round_NN/ stay beside `illume reward train`'s files
    (reward / "round_00").mkdir(parents=True)
    run_folder.check_output_folder(reward, "reward_model.json", False, "illume reward train", alongside=("round_*",))


def test_cli_outputs_refuse_to_replace_without_force(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "demo"
    save_config(load_config(DEMO, tiny_overrides(tmp_path)), run_dir / "config.yaml")
    (run_dir / "baseline.json").write_text("{}")
    assert main(["baseline", DEMO, *tiny_overrides(tmp_path)]) == 2
    assert "baseline.json holds an earlier baseline: pass --force" in capsys.readouterr().err
    (run_dir / "dpo").mkdir()
    (run_dir / "dpo" / "metrics.json").write_text(json.dumps({"kind": "dpo"}))
    assert main(["dpo", str(run_dir)]) == 2
    assert "holds the output of an earlier `illume dpo` (metrics.json): pass --force" in capsys.readouterr().err
    (run_dir / "reward").mkdir()
    (run_dir / "reward" / "reward_model.json").write_text("{}")
    assert main(["reward", "train", str(run_dir)]) == 2
    assert "earlier `illume reward train` (reward_model.json): pass --force" in capsys.readouterr().err
    (tmp_path / "converted").mkdir()
    (tmp_path / "converted" / "notes.txt").write_text("mine")
    assert main(["convert-magma", str(tmp_path / "x.pt"), str(tmp_path / "converted"), "--version", "v1",
                 "--force"]) == 2
    assert "did not write (notes.txt)" in capsys.readouterr().err


# ------------------------------------------------------------------ one writer per run


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _illume(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "illume.cli", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _start_waiting_run(tmp_path: Path, name: str, *extra: str) -> subprocess.Popen:
    """A real `illume run` that holds its run folder: started, then left waiting for people."""
    with open(tmp_path / f"{name}.log", "w") as log:  # the child writes to its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "illume.cli", "run", DEMO, *tiny_overrides(tmp_path),
                                 *WAITING, f"name={name}", *extra], cwd=REPO, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT)


def _wait_for(condition, process: subprocess.Popen, log: Path, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the holder exited ({process.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """The tiny base model pre-trained once (in this process), so the holder and the others start fast."""
    tmp_path = tmp_path_factory.mktemp("lock")
    assert main(["pretrain", DEMO, *tiny_overrides(tmp_path), "name=pretrain"]) == 0
    return tmp_path


@pytest.mark.slow
def test_a_second_writer_refuses_naming_the_holder_and_a_killed_holders_lock_is_taken_over(pretrained):
    tmp_path = pretrained
    run_dir = tmp_path / "runs" / "held"
    holder = _start_waiting_run(tmp_path, "held", "critic.threshold=0.7")
    try:
        # Held once round 0 is sampled and the critic waits (the lock is taken before anything else is written).
        _wait_for(lambda: "waiting for judgments" in (tmp_path / "held.log").read_text(), holder,
                  tmp_path / "held.log", "the run to wait for people")
        lock = json.loads((run_dir / run_folder.LOCK_FILE).read_text())
        assert lock["pid"] == holder.pid and lock["command"] == "run"
        config_before = (run_dir / "config.yaml").read_bytes()

        # Issue 24: the same run with another critic threshold ran beside it, and rewrote config.yaml.
        second = _illume("run", DEMO, *tiny_overrides(tmp_path), *WAITING, "name=held", "critic.threshold=0.3")
        assert second.returncode == 2
        assert second.stderr.splitlines()[-1] == (
            f"busy: {run_dir} is in use by `illume run` (pid {holder.pid} on {os.uname().nodename}, since "
            f"{lock['since']}): wait for it to finish or stop it (one command writes to a run at a time)")
        assert (run_dir / "config.yaml").read_bytes() == config_before
        for command in (["reward", "train", str(run_dir)], ["dpo", str(run_dir)], ["kto", str(run_dir)],
                        ["pretrain", DEMO, *tiny_overrides(tmp_path), "name=held"],
                        ["baseline", DEMO, *tiny_overrides(tmp_path), "name=held"]):
            refused = _illume(*command)
            assert refused.returncode == 2 and f"busy: {run_dir} is in use by `illume run` (pid {holder.pid}" in (
                refused.stderr), (command, refused.stderr[-2000:])
        # Readers work beside the run: the status of its store (the annotation page too: test_server_limits).
        status = _illume("status", str(run_dir))
        assert status.returncode == 0, status.stderr[-2000:]
    finally:
        _kill(holder)
    # A crash (SIGKILL: no clean-up ran) leaves the file naming the dead holder; the kernel freed the lock.
    assert json.loads((run_dir / run_folder.LOCK_FILE).read_text())["pid"] == holder.pid
    resumed = _illume("run", DEMO, *tiny_overrides(tmp_path), *WAITING, "name=held", "critic.threshold=0.7",
                      "critic.wait=false")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"taking over the lock left by `illume run` (pid {holder.pid}" in resumed.stderr
    assert (run_dir / run_folder.LOCK_FILE).read_text() == ""  # released on exit


@pytest.mark.slow
def test_the_ranks_of_one_launch_share_the_lock_and_stop_together(pretrained):
    """A 2-process launch of a writer on a held run: rank 0 is refused and tells rank 1, so both stop with the
    same line (rank 1 would otherwise wait at the next meeting point until the barrier timeout)."""
    from tests.test_deepspeed import _free_port

    tmp_path = pretrained
    run_dir = tmp_path / "runs" / "ranks"
    holder = _start_waiting_run(tmp_path, "ranks")
    try:
        _wait_for(lambda: (run_dir / run_folder.LOCK_FILE).is_file() and (run_dir / run_folder.LOCK_FILE).read_text(),
                  holder, tmp_path / "ranks.log", "the run to take its lock")
        start = time.monotonic()
        launch = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", str(_free_port()), "-m", "illume.cli", "run", DEMO, *tiny_overrides(tmp_path),
             *WAITING, "name=ranks"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
        output = launch.stdout + launch.stderr
        assert launch.returncode != 0
        assert output.count(f"busy: {run_dir} is in use by `illume run` (pid {holder.pid}") == 2, output[-4000:]
        assert time.monotonic() - start < 120  # no rank waited for a barrier's timeout
    finally:
        _kill(holder)


@pytest.mark.slow
def test_runs_sharing_a_postgresql_store_take_turns(pretrained, postgres_url):
    """Two run folders (two machines, say) pointed at one PostgreSQL store: the database's own lock refuses the
    second, naming the first; when the first dies, the server frees its lock with its connection."""
    tmp_path = pretrained
    holder = _start_waiting_run(tmp_path, "pg_a", f"store_url={postgres_url}")
    try:
        _wait_for(lambda: "waiting for judgments" in (tmp_path / "pg_a.log").read_text(), holder,
                  tmp_path / "pg_a.log", "the run to wait for people")
        second = _illume("run", DEMO, *tiny_overrides(tmp_path), *WAITING, "name=pg_b", f"store_url={postgres_url}")
        assert second.returncode == 2
        last = second.stderr.splitlines()[-1]
        assert last.startswith("busy: the feedback store postgresql") and (
            f"is in use by illume run (pid {holder.pid} on {os.uname().nodename})" in last), second.stderr[-3000:]
        assert not (tmp_path / "runs" / "pg_b" / "config.yaml").exists()
    finally:
        _kill(holder)
    deadline = time.monotonic() + 30
    while True:  # the server notices the dead client's closed socket (at once over a Unix socket)
        after = _illume("run", DEMO, *tiny_overrides(tmp_path), *WAITING, "name=pg_b", f"store_url={postgres_url}",
                        "critic.wait=false")
        if after.returncode == 0 or time.monotonic() > deadline or "busy:" not in after.stderr:
            break
        time.sleep(1)
    assert after.returncode == 0, after.stderr[-4000:]


def test_a_store_lock_that_fails_releases_the_folders_lock(tmp_path):
    """The folder's lock is taken first; when the store's lock then fails, the folder's is released again."""
    import contextlib

    @contextlib.contextmanager
    def unreachable(holder):
        raise RuntimeError(f"no database for {holder}")
        yield  # pragma: no cover

    run_folder.claim(tmp_path / "run", "run")
    with pytest.raises(RuntimeError, match=r"no database for illume run \(pid"):
        with run_folder.hold(tmp_path / "run", "run", database=unreachable):
            pass
    assert (tmp_path / "run" / run_folder.LOCK_FILE).read_text() == ""
    with run_folder.hold(tmp_path / "run", "dpo"):  # free again
        assert json.loads((tmp_path / "run" / run_folder.LOCK_FILE).read_text())["command"] == "dpo"
