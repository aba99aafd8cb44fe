"""Process supervision shared by ``dsv32-serve up`` and the Ray Serve application.

A role process is ``python -m dsv32_serve.cli ROLE ...`` in its own session
(so that its whole process group can be signalled), with ``DSV32_PARENT_PID``
set so that it asks for SIGTERM when its supervisor dies, even by SIGKILL
(see :mod:`.parent`). Stopping is SIGTERM to the group, then SIGKILL to
whatever is left after a grace period.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from . import parent

WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (callers retry if they lose the race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child leads its own session, so pgid == pid
    except (ProcessLookupError, PermissionError):
        pass


def cli_argv(*args: str) -> list[str]:
    """The command line of one ``dsv32-serve`` process, run with this interpreter."""
    return [sys.executable, "-m", "dsv32_serve.cli", *args]


class RoleProcess:
    """One ``dsv32-serve`` child process in its own session, its output appended to ``log``."""

    def __init__(self, name: str, argv: list[str], log: Path | None, env: dict[str, str] | None = None):
        """``log=None``: the child writes to this process's own stdout/stderr."""
        self.name, self.log = name, Path(log) if log is not None else None
        env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1", parent.ENV: str(os.getpid())}
        if self.log is None:
            self.proc = subprocess.Popen(cli_argv(*argv), stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            return
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(cli_argv(*argv), stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> int | None:
        return self.proc.poll()

    def tail(self, n: int = 3000) -> str:
        if self.log is None:
            return ""
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def died(self, what: str) -> "ChildDied":
        return ChildDied(self, what)

    def terminate(self) -> None:
        signal_group(self.proc, signal.SIGTERM)

    def stop(self, grace_s: float, *, terminated: bool = False, deadline: float | None = None) -> None:
        """SIGTERM to the process group (unless already sent), SIGKILL to whatever is left
        after ``grace_s`` (the group's grandchildren too)."""
        if not terminated:
            self.terminate()
        try:
            self.proc.wait(max(0.1, grace_s))
        except subprocess.TimeoutExpired:
            pass
        signal_group(self.proc, signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def stop_all(groups: list[list[RoleProcess]], grace_s: float) -> None:
    """Stop group after group (e.g. the router first, then the workers): SIGTERM to a whole
    group at once, then one shared grace period, then SIGKILL."""
    import time

    for group in groups:
        for p in group:
            p.terminate()
        deadline = time.monotonic() + grace_s
        for p in group:
            p.stop(deadline - time.monotonic(), terminated=True)


class ChildDied(RuntimeError):
    """A supervised process is gone (or never got ready); the message carries its log's tail."""

    def __init__(self, child: RoleProcess, what: str = "exited"):
        super().__init__(f"{child.name} {what} (exit status {child.proc.poll()}); "
                         f"last lines of {child.log}:\n{child.tail()}")
        self.child = child
