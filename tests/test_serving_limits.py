"""The OpenAI front's gate (deploy.openai_server.Admission) and the decoder's bounded queue, in process.

The gate is our code, so it is tested here against a slow ASGI app standing in for
generation time (a request that takes `hold` seconds); the same limits against the real
Triton server are in tests/test_deploy.py.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from deploy.llm_runtime.batch_decoder import BatchDecoder, Overloaded, Request
from deploy.openai_server import Admission, AdmissionMiddleware, ServingLimits


def slow_app(hold: float, seen: dict):
    """Return an ASGI app answering {"body": <bytes read>} after `hold` seconds; it records the peak concurrency."""

    async def app(scope, receive, send):
        seen["now"] = seen.get("now", 0) + 1
        seen["peak"] = max(seen.get("peak", 0), seen["now"])
        message = await receive()
        await asyncio.sleep(hold)
        seen["now"] -= 1
        payload = json.dumps({"body": len(message["body"])}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})

    return app


def client(limits: ServingLimits, hold: float = 0.2, seen: dict | None = None) -> tuple[httpx.AsyncClient, Admission]:
    gate = Admission(limits)
    app = AdmissionMiddleware(slow_app(hold, {} if seen is None else seen), gate)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://front"), gate


def error_of(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="max_concurrent must be positive"):
        ServingLimits(max_concurrent=0)
    assert ServingLimits(max_prompt_tokens=0).max_prompt_tokens == 0  # 0: the model's context


def test_body_over_the_limit_is_413_declared_or_chunked():
    async def go():
        http, _ = client(ServingLimits(max_body_bytes=100), hold=0)
        async with http:
            assert (await http.post("/v1/completions", content=b"x" * 100)).json() == {"body": 100}
            declared = await http.post("/v1/completions", content=b"x" * 101)

            async def chunks():
                for _ in range(5):
                    yield b"y" * 30

            chunked = await http.post("/v1/chat/completions", content=chunks())
            unlimited = await http.post("/v1/models", content=b"x" * 1000)  # only the generation routes are gated
        return declared, chunked, unlimited

    declared, chunked, unlimited = asyncio.run(go())
    assert declared.status_code == 413 and "101 bytes is over the limit of 100" in error_of(declared)["message"]
    assert chunked.status_code == 413 and "max_body_bytes" in error_of(chunked)["message"]
    assert error_of(chunked)["code"] == "body_too_large"
    assert unlimited.status_code == 200


def test_concurrency_is_capped_the_queue_waits_and_beyond_it_429():
    seen: dict = {}

    async def go():
        http, gate = client(ServingLimits(max_concurrent=2, max_queued=3), hold=0.3, seen=seen)
        async with http:
            responses = await asyncio.gather(*(http.post("/v1/completions", content=b"{}") for _ in range(8)))
            after = await http.post("/v1/completions", content=b"{}")  # the burst is over: served again
        return responses, after, gate

    responses, after, gate = asyncio.run(go())
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 5 + [429] * 3  # 2 answered at once + 3 queued; the other 3 refused at once
    refused = [r for r in responses if r.status_code == 429]
    assert all(r.headers["retry-after"] == "1" for r in refused)
    message = error_of(refused[0])["message"]
    assert "max_concurrent 2" in message and "max_queued 3" in message
    assert error_of(refused[0])["code"] == "rate_limit_exceeded"
    assert seen["peak"] == 2 and after.status_code == 200
    assert gate.active == gate.waiting == 0


def test_a_queued_request_that_waits_too_long_gets_503():
    async def go():
        http, _ = client(ServingLimits(max_concurrent=1, max_queued=5, queue_timeout_s=0.1), hold=0.5)
        async with http:
            return await asyncio.gather(*(http.post("/v1/completions", content=b"{}") for _ in range(2)))

    first, second = sorted(asyncio.run(go()), key=lambda r: r.status_code)
    assert first.status_code == 200 and second.status_code == 503
    assert "queue_timeout_s" in error_of(second)["message"] and second.headers["retry-after"] == "1"


def test_draining_refuses_new_requests_and_lets_those_in_flight_finish():
    async def go():
        http, gate = client(ServingLimits(max_concurrent=4), hold=0.3)
        async with http:
            in_flight = asyncio.ensure_future(http.post("/v1/completions", content=b"{}"))
            await asyncio.sleep(0.1)
            gate.draining = True
            refused = await http.post("/v1/completions", content=b"{}")
            return await in_flight, refused, gate

    finished, refused, gate = asyncio.run(go())
    assert finished.status_code == 200
    assert refused.status_code == 503 and error_of(refused)["code"] == "shutting_down"
    assert gate.active == 0


def test_the_decoder_queue_is_bounded():
    decoder = BatchDecoder(step=None, tokenizer=None, eos_id=None, pad_id=0, max_rows=4, max_pending=3)
    for _ in range(3):
        decoder.submit(Request([1, 2], 4))
    with pytest.raises(Overloaded, match="queue is full: 3 requests wait for one of 4 rows"):
        decoder.submit(Request([1, 2], 4))
