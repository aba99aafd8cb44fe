"""Shared fixtures: a real ``redis-server`` on a free loopback port.

``redis_server`` lives for the whole session; ``redis_url`` hands each test a
flushed database 1 (database 0 is left to clusters started by the e2e tests,
whose workers keep heartbeating while unit tests run).
"""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server; ./run installs it)")
    from dsv32_router.redis_server import RedisServer

    server = RedisServer(workdir=str(tmp_path_factory.mktemp("redis"))).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    import redis

    url = f"redis://{redis_server.host}:{redis_server.port}/1"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """The tiny random checkpoint (``make-checkpoint --preset tiny``), made once per session."""
    from checkpoints import tiny_checkpoint

    return tiny_checkpoint()
