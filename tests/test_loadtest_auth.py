"""Issue 10: the load tester sends the public API token (``--api-token`` / ``DSV32_API_TOKEN``) as
``authorization: Bearer`` on gRPC and ``Authorization: Bearer`` over HTTP, against servers that require
it; without it the requests are refused UNAUTHENTICATED. The token never reaches the report."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading

import pytest

from dsv32_loadtest import Arrival, SyntheticWorkload, TargetError, arun_load
from dsv32_loadtest._api import serving_pb2 as pb
from dsv32_loadtest.client import GenerationClient
from dsv32_loadtest.fake_server import FakeGeneration, start_fake_server
from dsv32_loadtest.metrics import OK, RequestResult
from dsv32_loadtest.openai_client import OpenAIClient
from dsv32_serve.cli import main

TOKEN = "lt-secret-1"


@pytest.fixture(autouse=True)
def no_token_in_env(monkeypatch):
    monkeypatch.delenv("DSV32_API_TOKEN", raising=False)
    monkeypatch.delenv("DSV32_API_TOKEN_FILE", raising=False)


def _request(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), request_id=f"r{i}",
                              sampling=pb.SamplingParams(max_tokens=3, ignore_eos=True))


async def _one(client, i: int = 0) -> RequestResult:
    result = RequestResult(index=i, input_tokens=3, requested_output_tokens=3)
    await client.generate(_request(i), result, 0.0, 10.0)
    return result


def test_grpc_requests_need_the_token_and_carry_it(monkeypatch):
    async def go():
        server, target = await start_fake_server(FakeGeneration(ttft_s=0.001, itl_s=0.001), api_token=TOKEN)
        try:
            out = {}
            for name, token in (("none", None), ("wrong", "nope"), ("flag", TOKEN)):
                async with GenerationClient(target, 1, api_token=token) as c:
                    out[name] = await _one(c)
            monkeypatch.setenv("DSV32_API_TOKEN", TOKEN)
            async with GenerationClient(target, 1) as c:
                out["env"] = await _one(c)
            monkeypatch.delenv("DSV32_API_TOKEN")
            with pytest.raises(TargetError, match="refused the API token"):
                await arun_load(target, SyntheticWorkload(input_len=4, output_len=2), Arrival("burst"),
                                num_prompts=3)
            report = await arun_load(target, SyntheticWorkload(input_len=4, output_len=2), Arrival("burst"),
                                     num_prompts=5, api_token=TOKEN)
            return out, report
        finally:
            await server.stop(None)

    out, report = asyncio.run(go())
    assert out["none"].status == out["wrong"].status == "UNAUTHENTICATED"
    assert out["flag"].status == out["env"].status == OK and out["flag"].reply_ids == [3, 4, 5]
    s = report.runs[0].summary(None)
    assert (s["completed"], s["failed"]) == (5, 0)


@contextlib.contextmanager
def serving_with_token(servicer):
    """The fake server, requiring ``TOKEN``, on its own event loop in a thread (the CLI runs its own loop)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server, target = asyncio.run_coroutine_threadsafe(start_fake_server(servicer, api_token=TOKEN), loop).result(10)
    try:
        yield target
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_cli_flag_and_env_and_the_report_keeps_no_secret(tmp_path, capsys, monkeypatch):
    servicer = FakeGeneration(ttft_s=0.001, itl_s=0.001)
    common = ["--input-len", "4", "--output-len", "2", "--num-prompts", "4", "--request-rate", "inf",
              "--no-progress", "--no-plots"]
    with serving_with_token(servicer) as target:
        rc = main(["loadtest", "--target", target, "--output-dir", str(tmp_path / "none"), *common])
        assert rc == 2 and "refused the API token" in capsys.readouterr().err
        monkeypatch.setattr("sys.argv", ["dsv32-serve", "loadtest", "--api-token", TOKEN])
        rc = main(["loadtest", "--target", target, "--api-token", TOKEN, "--output-dir", str(tmp_path / "flag"),
                   *common])
        assert rc == 0
        monkeypatch.setenv("DSV32_API_TOKEN", TOKEN)
        rc = main(["loadtest", "--target", target, "--output-dir", str(tmp_path / "env"), *common])
        assert rc == 0
    for d in ("flag", "env"):
        text = (tmp_path / d / "report.json").read_text()
        assert json.loads(text)["runs"][0]["summary"]["completed"] == 4
        assert TOKEN not in text and TOKEN not in (tmp_path / d / "requests.csv").read_text()
    assert "***" in json.loads((tmp_path / "flag" / "report.json").read_text())["command"]


def test_openai_backend_sends_the_authorization_header():
    from aiohttp import web

    seen: list[str] = []

    def authorized(request) -> bool:
        seen.append(request.headers.get("Authorization", ""))
        return request.headers.get("Authorization") == f"Bearer {TOKEN}"

    async def models(request):
        if not authorized(request):
            return web.json_response({"error": {"message": "bad token"}}, status=401)
        return web.json_response({"data": [{"id": "fake", "max_model_len": 64, "vocab_size": 100}]})

    async def completions(request):
        if not authorized(request):
            return web.json_response({"error": {"message": "bad token"}}, status=401)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, last in ((7, False), (8, True)):
            chunk = {"choices": [{"token_ids": [i], "finish_reason": "length" if last else None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def go():
        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        target = f"127.0.0.1:{runner.addresses[0][1]}"
        try:
            out = {}
            async with OpenAIClient(target) as c:
                out["none"] = await _one(c)
                with pytest.raises(TargetError, match="refused the API token"):
                    await c.probe(timeout_s=5)
            async with OpenAIClient(target, api_token=TOKEN) as c:
                assert (await c.probe(timeout_s=5))[0]["id"] == "fake"
                out["token"] = await _one(c)
            return out
        finally:
            await runner.cleanup()

    out = asyncio.run(go())
    assert out["none"].status == "UNAUTHENTICATED"
    assert out["token"].status == OK and out["token"].reply_ids == [7, 8]
    assert seen[0] == "" and seen[-1] == f"Bearer {TOKEN}"
