"""Shared fixtures: a real ``redis-server`` on a free loopback port, the tiny checkpoint,
and the one place that finds the official DeepSeek-V3.2 fixtures.

``redis_server`` lives for the whole session; ``redis_url`` hands each test a
flushed database 1 (database 0 is left to clusters started by the e2e tests,
whose workers keep heartbeating while unit tests run).

Official fixtures: the model's configuration files are facts and are vendored in
``tests/data/deepseek_v32_hf_config`` (:data:`HF_CONFIG`). The chat-encoding golden
conversations published with the model are not copied into the repo: they are read
from ``../shared/fixtures/deepseek_v32/encoding`` beside the checkout
(``DSV32_FIXTURES`` overrides the ``deepseek_v32`` folder); without them the tests
that need them skip and say where the files come from.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

HF_CONFIG = Path(__file__).resolve().parent / "data" / "deepseek_v32_hf_config"
OFFICIAL = Path(os.environ.get("DSV32_FIXTURES")
                or Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "deepseek_v32")


@pytest.fixture(scope="session")
def hf_config_dir() -> Path:
    """The official DeepSeek-V3.2 config.json, generation_config.json and tokenizer_config.json."""
    return HF_CONFIG


@pytest.fixture(scope="session")
def golden_encoding_dir() -> Path:
    """The official chat-encoding golden files (test_input*.json -> test_output*.txt)."""
    path = OFFICIAL / "encoding"
    if not (path / "test_input.json").is_file():
        pytest.skip(f"the official DeepSeek-V3.2 encoding golden files are not at {path}: they are published with "
                    "the model (the encoding/ folder of deepseek-ai/DeepSeek-V3.2) and laid beside the checkout in "
                    "../shared/fixtures/deepseek_v32 (or set DSV32_FIXTURES)")
    return path


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server; ./run installs it)")
    from dsv32_cluster.redis_server import RedisServer

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
