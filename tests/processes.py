"""Runs a multi-process scenario in a process session of its own, so that a hang fails the test instead of CI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nobody listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_isolated(arguments: list[str], log_file: Path, timeout_s: float, env: dict | None = None) -> str:
    """Runs ``python <arguments>`` from the repository root; returns its output, or fails the test.

    Args:
        arguments: the interpreter's arguments (``["-m", "tests.sharded_fits", ...]``).
        log_file: where its output goes.
        timeout_s: past this, the run is hung: its whole process group is killed and the test fails.
        env: variables to add to the environment.

    Returns:
        Its output (stdout and stderr together).
    """
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "PYTHONPATH": path, **(env or {})}
    with open(log_file, "wb") as log:
        # its own session, so that on a hang the spawned workers go down with it
        process = subprocess.Popen(
            [sys.executable, *arguments], cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        returncode = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(f"the run did not finish in {timeout_s} s (deadlock?):\n{log_file.read_text()[-6000:]}")
    output = log_file.read_text(errors="replace")
    assert returncode == 0, f"the run failed with exit code {returncode}:\n{output[-6000:]}"
    return output
