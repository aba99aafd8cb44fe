"""Start a private ``redis-server`` (used by ``dsv32-serve up`` and the tests).

Persistence is off (``--save "" --appendonly no``): cluster state is soft
state that workers rebuild with their next heartbeat.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from . import parent
from .procs import free_port


class RedisServer:
    """A ``redis-server`` child process on a free loopback port, in a temp dir."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, workdir: str | None = None,
                 start_new_session: bool = True, die_with_parent: bool = False, password: str = ""):
        """``password``: clients must AUTH (it goes in a 0600 config file, not on the command line)."""
        self.host, self.port = host, port
        self.password = password
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="dsv32-redis-"))
        self.proc: subprocess.Popen | None = None
        self._start_new_session = start_new_session
        self._die_with_parent = die_with_parent

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 10.0, attempts: int = 3) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server not found on PATH (apt-get install -y redis-server; ./run does it)")
        fixed = self.port is not None
        for attempt in range(attempts):
            if not fixed:
                self.port = free_port(self.host)
            log = open(self.workdir / "redis.log", "ab")
            argv = [exe, *self._config(), "--daemonize", "no", "--bind", self.host, "--port", str(self.port), "--save", "",
                    "--appendonly", "no", "--dir", str(self.workdir),
                    "--protected-mode", "yes" if self.password else "no"]
            if self._die_with_parent:
                argv = parent.wrap(argv)
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=self._start_new_session)
            log.close()
            if self._wait_ready(timeout_s):
                return self
            self.stop()
            if fixed:
                break
        tail = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server did not start on {self.host}:{self.port}:\n{tail}")

    def _config(self) -> list[str]:
        if not self.password:
            return []
        path = self.workdir / "redis.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"requirepass {self.password}\n")
        return [str(path)]

    def _wait_ready(self, timeout_s: float) -> bool:
        client = redis.Redis(host=self.host, port=self.port, socket_connect_timeout=0.5,
                             password=self.password or None)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.ConnectionError:
                    time.sleep(0.05)
            return False
        finally:
            client.close()

    def stop(self, timeout_s: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:  # pragma: no cover - manual use
    with RedisServer() as srv:
        print(srv.url, flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
