"""``dsv32-serve up`` as a subprocess, for tests that need the whole cluster with its printed lines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager


class UpProcess:
    def __init__(self, proc: subprocess.Popen):
        self.proc, self.out, self.err = proc, [], []
        threading.Thread(target=lambda: self.out.extend(proc.stdout), daemon=True).start()
        threading.Thread(target=lambda: self.err.extend(proc.stderr), daemon=True).start()

    def wait_ready(self, timeout_s: float = 150) -> str:
        deadline = time.monotonic() + timeout_s
        while not any(line.startswith("ready ") for line in self.out):
            assert self.proc.poll() is None and time.monotonic() < deadline, "".join(self.err)
            time.sleep(0.1)
        return next(line.split()[1] for line in self.out if line.startswith("ready "))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)


@contextmanager
def up(model: str, *flags: str, env: dict | None = None):
    """Yields (target, UpProcess) once ``up`` printed ``ready``; SIGTERM on exit."""
    proc = subprocess.Popen([sys.executable, "-m", "dsv32_serve.cli", "up", "--model", model, "--port", "0",
                             "--num-pages", "32", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, start_new_session=True)
    up_proc = UpProcess(proc)
    try:
        yield up_proc.wait_ready(), up_proc
    finally:
        up_proc.stop()
