"""Cluster state over TLS with a password: an external Redis reached by a ``rediss://`` URL.

A real redis-server with a TLS port only (plain port off) and ``requirepass``; the certificate is
self-signed here and given to the clients with ``?ssl_ca_certs=`` (redis-py's URL options, which
every role's ``--redis-url`` / ``DSV32_REDIS_URL`` passes through unchanged). The sync state (the
workers' heartbeats) and the async one with the router's blocking pool both work; a client that
does not trust the certificate, or that has no password, is refused.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import pytest
import redis

from dsv32_cluster.procs import free_port
from dsv32_cluster.state import AsyncClusterState, ClusterState, WorkerInfo


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate (apt-get install -y openssl)")
    d = tmp_path_factory.mktemp("redis-tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem"), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    port = free_port()
    conf = d / "redis.conf"
    conf.write_text(f"port 0\ntls-port {port}\ntls-cert-file {d / 'cert.pem'}\ntls-key-file {d / 'key.pem'}\n"
                    f"tls-ca-cert-file {d / 'cert.pem'}\ntls-auth-clients no\nrequirepass s3cret\nsave \"\"\n"
                    f"dir {d}\n")
    proc = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"rediss://:s3cret@127.0.0.1:{port}/0?ssl_ca_certs={d / 'cert.pem'}"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    yield url, port, d
    proc.terminate()
    proc.wait(10)


def test_state_over_tls_with_a_password(tls_redis):
    url, _, _ = tls_redis
    st = ClusterState.from_url(url, prefix="tls:")
    st.heartbeat(WorkerInfo("w-tls", "decode", "127.0.0.1:1", total_pages=8, free_pages=8))
    assert [w.worker_id for w in st.workers()] == ["w-tls"]
    assert st.create_request("r-tls", router="x")

    async def router_side():
        ast = AsyncClusterState.from_url(url, prefix="tls:", max_connections=4)
        try:
            await ast.transition("r-tls", "prefilling")
            return [w.worker_id for w in await ast.workers()], (await ast.request("r-tls"))["state"]
        finally:
            await ast.aclose()
    assert asyncio.run(router_side()) == (["w-tls"], "prefilling")
    st.client.close()


def test_untrusted_certificate_or_no_password_is_refused(tls_redis):
    url, port, _ = tls_redis
    with pytest.raises(redis.ConnectionError):  # the default: verify the server against the system CAs
        redis.Redis.from_url(f"rediss://:s3cret@127.0.0.1:{port}/0", socket_timeout=5).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(url.replace(":s3cret@", "")).ping()
    with pytest.raises(redis.ConnectionError):  # plain text to the TLS port
        redis.Redis(host="127.0.0.1", port=port, password="s3cret", socket_timeout=5).ping()
