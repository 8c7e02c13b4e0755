"""A server of ours started for real on 127.0.0.1 (uvicorn in a subprocess, or an app in a thread), for the tests
that talk HTTP to it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from tests.conftest import REPO
from tests.test_annotate_server import _free_port


def start_server(argv: list[str], log_path: Path, timeout: float = 60) -> tuple[subprocess.Popen, int]:
    """`python ARGV --port P` with a free port P, returned (process, P) once it serves its static files."""
    port = _free_port()
    with open(log_path, "ab") as log:  # the child writes to its own copy of the descriptor
        process = subprocess.Popen([sys.executable, *argv, "--port", str(port)], cwd=REPO, stdout=log,
                                   stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/static/app.js", timeout=2)
            return process, port
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError(f"server did not start within {timeout:.0f} s")


def wait_in_page(page, script: str, wanted, timeout: float = 15.0):
    """Poll `script` in a Playwright page until `wanted(value)` holds; returns the value. Polled from here, since
    the page's CSP forbids the string eval behind Playwright's `wait_for_function`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = page.evaluate(script)
        if wanted(value):
            return value
        time.sleep(0.05)
    raise AssertionError(f"{script} is {page.evaluate(script)!r}")


class ThreadedServer:
    """uvicorn serving an app on 127.0.0.1 in a thread (its signal handlers are only installed in the main
    thread, so it runs here as it runs under `illume reward serve`); `stop()` when done."""

    def __init__(self, app, timeout: float = 30):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
