"""An OpenAI-compatible HTTP front for our Triton models, so OpenAI clients work unchanged.

    GET  /v1/models             the served model
    POST /v1/completions        prompt (a string or a list of strings) -> text; `stream` as SSE
    POST /v1/chat/completions   messages -> the chat template of the exported tokenizer -> text

Each request is forwarded to Triton's generate extension over HTTP (`<model>/generate`,
and `<model>_stream/generate_stream` when streaming), with the TensorRT-LLM ensemble
names (text_input, max_tokens, temperature, top_p, top_k, random_seed, stop_words).
Sampling follows OpenAI's defaults (temperature 1, top_p 1; temperature 0 is greedy);
`seed` makes a sample reproducible. Token counts in `usage` come from re-tokenizing the
texts; `finish_reason` is "length" where the answer used all of max_tokens, else "stop".
Bad requests get a 4xx with OpenAI's error body {"error": {"message", "type", "param",
"code"}}; the server keeps serving.

Bounded (ServingLimits, `aigc serve --max-...`): a body over max_body_bytes gets 413;
more than max_prompts prompts, a prompt over max_prompt_tokens tokens or max_tokens over
the repository's limit get 400; at most max_concurrent requests are answered at once
(a stream holds its slot until its last event), max_queued more wait up to
queue_timeout_s (then 503), and beyond those a request gets 429 at once, with
Retry-After. Each error names its limit. Tokenization runs on one worker thread,
never on the event loop. stop() drains: new requests get 503 while those in flight
finish (up to drain_timeout_s).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from deploy.repository import STREAM_SUFFIX


class OpenAIError(Exception):
    """An error answered to the client as OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        """Return the JSON error response."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


@dataclasses.dataclass(frozen=True)
class ServingLimits:
    """What one request, and all of them together, may ask of the OpenAI front."""

    max_body_bytes: int = 1 << 20  # request body (1 MiB): beyond, 413
    max_prompts: int = 32  # prompts in one /v1/completions request: beyond, 400
    max_prompt_tokens: int = 0  # tokens of one prompt; 0: the model's context less one new token. Beyond, 400
    max_concurrent: int = 64  # requests answered at once (a stream until its last event)
    max_queued: int = 256  # requests waiting for one of those slots; beyond, 429 at once
    queue_timeout_s: float = 60.0  # a queued request waits this long for a slot, then 503
    drain_timeout_s: float = 30.0  # at stop(): how long requests in flight may take to finish

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 0 or (field.name != "max_prompt_tokens" and not getattr(self, field.name)):
                raise ValueError(f"{field.name} must be positive, got {getattr(self, field.name)}")


class Admission:
    """The front's gate: body size, concurrency and queue limits, draining (`gate` of an AdmissionMiddleware)."""

    LIMITED = ("/v1/completions", "/v1/chat/completions")

    def __init__(self, limits: ServingLimits):
        self.limits = limits
        self.active = self.waiting = 0
        self.draining = False
        self._slots: asyncio.Semaphore | None = None

    async def handle(self, app, scope, receive, send) -> None:
        """Run `app` on the request within the limits, or answer it with the error of the limit it is over.

        It wraps the whole exchange, so a streamed answer holds its slot until
        its last byte is sent (or the client goes away).
        """
        limits = self.limits
        if self.draining:
            return await _refuse(scope, receive, send, 503, "the server is shutting down: retry on another replica "
                                 "or after it restarts", "shutting_down")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            return await _refuse(scope, receive, send, 413, f"the request body of {int(declared)} bytes is over "
                                 f"the limit of {limits.max_body_bytes} bytes (max_body_bytes)", "body_too_large")
        body = b""
        while True:  # read the body, counting: a chunked one declares no length
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limits.max_body_bytes:
                return await _refuse(scope, receive, send, 413, f"the request body is over the limit of "
                                     f"{limits.max_body_bytes} bytes (max_body_bytes)", "body_too_large")
            if not message.get("more_body", False):
                break
        if self._slots is None:
            self._slots = asyncio.Semaphore(limits.max_concurrent)
        if self._slots.locked():
            if self.waiting >= limits.max_queued:
                return await _refuse(
                    scope, receive, send, 429,
                    f"the server is busy: {self.active} requests in flight (max_concurrent {limits.max_concurrent}) "
                    f"and {self.waiting} queued (max_queued {limits.max_queued}); retry later",
                    "rate_limit_exceeded", {"retry-after": "1"})
            self.waiting += 1
            try:
                await asyncio.wait_for(self._slots.acquire(), limits.queue_timeout_s)
            except TimeoutError:
                return await _refuse(scope, receive, send, 503, f"no free slot within {limits.queue_timeout_s:g} s "
                                     f"(queue_timeout_s; {self.active} requests in flight)", "queue_timeout",
                                     {"retry-after": "1"})
            finally:
                self.waiting -= 1
        else:
            await self._slots.acquire()
        self.active += 1
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await app(scope, replay, send)
        finally:
            self.active -= 1
            self._slots.release()


class AdmissionMiddleware:
    """ASGI middleware: the generation routes pass through `gate` (Admission); the others go straight through."""

    def __init__(self, app, gate: Admission):
        self.app, self.gate = app, gate

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] in Admission.LIMITED:
            return await self.gate.handle(self.app, scope, receive, send)
        return await self.app(scope, receive, send)


async def _refuse(scope, receive, send, status: int, message: str, code: str, headers: dict | None = None) -> None:
    """Answer the request with OpenAI's error body."""
    response = OpenAIError(status, message, code=code).response()
    response.headers.update(headers or {})
    await response(scope, receive, send)


class GenerationFields(BaseModel):
    """Fields shared by completions and chat completions (unknown OpenAI fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's; vLLM and TensorRT-LLM's servers accept it
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    logprobs: Any = None
    echo: bool = False


class CompletionRequest(GenerationFields):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict] | None = None


class ChatRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


def _max_tokens_limit(repo: Path, model: str) -> int:
    """Return the `max_tokens_limit` parameter of the model's config.pbtxt."""
    config = (Path(repo) / model / "config.pbtxt").read_text()
    return int(re.search(r'key: "max_tokens_limit" value: \{ string_value: "(\d+)"', config).group(1))


def create_app(triton_http_url: str, repo: Path, model: str = "ensemble",
               limits: ServingLimits = ServingLimits()) -> FastAPI:
    """Return the FastAPI app that forwards to Triton at `triton_http_url` ("host:port"), serving
    `model` of the Triton repository `repo` (whose hf/ holds the tokenizer and chat template),
    within `limits` (its gate is `app.state.admission`)."""
    from transformers import AutoTokenizer

    hf_dir = Path(repo) / model / "1" / "hf"
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    limit = _max_tokens_limit(repo, model)
    context = json.loads((hf_dir / "config.json").read_text())["max_position_embeddings"]
    prompt_limit = min(limits.max_prompt_tokens or context - 1, context - 1)
    base = f"http://{triton_http_url}/v2/models"
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app):
        pool = httpx.Limits(max_connections=limits.max_concurrent + 8, max_keepalive_connections=limits.max_concurrent)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as tokenizing:
            async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0), limits=pool) as client:
                state["client"], state["tokenizing"] = client, tokenizing
                yield

    app = FastAPI(title="aigc OpenAI-compatible API", lifespan=lifespan)
    app.state.admission = Admission(limits)
    app.add_middleware(AdmissionMiddleware, gate=app.state.admission)

    async def off_loop(function, *args):
        """Return function(*args), run on the tokenizer's thread (HF tokenizers are not for concurrent use)."""
        return await asyncio.get_running_loop().run_in_executor(state["tokenizing"], function, *args)

    def prompt_lengths(prompts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(prompts)["input_ids"]]

    def text_lengths(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(HTTPException)  # unknown paths, wrong methods, bodies that are not UTF-8
    async def _http_error(request: Request, exc: HTTPException):
        return OpenAIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return OpenAIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}").response()
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        return OpenAIError(400, message, param=param).response()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "aigc"}]}

    def check_request(req: GenerationFields, max_tokens: int | None) -> None:
        """Raise OpenAIError for what we do not serve, or what is over a limit."""
        if req.model != model:
            raise OpenAIError(404, f"The model '{req.model}' does not exist; this server serves '{model}'",
                              param="model", code="model_not_found")
        if req.n != 1:
            raise OpenAIError(400, "only n=1 is supported", param="n")
        if req.logprobs not in (None, False, 0):
            raise OpenAIError(400, "logprobs are not supported", param="logprobs")
        if req.echo:
            raise OpenAIError(400, "echo is not supported", param="echo")
        if max_tokens is not None and not 1 <= max_tokens <= limit:
            raise OpenAIError(400, f"max_tokens must be between 1 and {limit} (the repository's max_tokens_limit), "
                              f"got {max_tokens}", param="max_tokens")

    async def triton_bodies(prompts: list[str], req: GenerationFields, max_tokens: int | None) -> list[dict]:
        """Return the generate-extension body of each prompt; raise OpenAIError for a prompt over the limit."""
        check_request(req, max_tokens)
        lengths = await off_loop(prompt_lengths, prompts)
        bodies = []
        for i, (prompt, length) in enumerate(zip(prompts, lengths)):
            if length > prompt_limit:
                raise OpenAIError(400, f"prompt{f' {i}' if len(prompts) > 1 else ''} has {length} tokens, over the "
                                  f"limit of {prompt_limit} (max_prompt_tokens; the model's context is {context})",
                                  param="prompt", code="context_length_exceeded")
            tokens = max_tokens or max(1, min(limit, context - length))  # what the context leaves, up to the limit
            body = {"text_input": prompt, "max_tokens": tokens, "temperature": req.temperature, "top_p": req.top_p}
            if req.top_k is not None:
                body["top_k"] = req.top_k
            if req.seed is not None:
                body["random_seed"] = req.seed
            stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
            if stop:
                body["stop_words"] = stop
            bodies.append(body)
        return bodies

    async def finish_reasons(texts: list[str], bodies: list[dict]) -> list[str]:
        """Return "length" for each text that used all its max_tokens, else "stop"."""
        return ["length" if n >= b["max_tokens"] else "stop"
                for n, b in zip(await off_loop(text_lengths, texts), bodies)]

    async def usage(prompts: list[str], texts: list[str]) -> dict:
        prompt_tokens = sum(await off_loop(prompt_lengths, prompts))
        completion_tokens = sum(await off_loop(text_lengths, texts))
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def generate(body: dict) -> str:
        """Return Triton's text_output for `body`; raise OpenAIError with Triton's message."""
        try:
            response = await state["client"].post(f"{base}/{model}/generate", json=body)
        except httpx.HTTPError as exc:
            raise OpenAIError(503, f"Triton is not reachable: {exc}") from None
        if response.status_code != 200:
            raise triton_error(response.status_code, response.text)
        return response.json()["text_output"]

    def triton_error(status: int, text: str) -> OpenAIError:
        """Return the OpenAIError of a Triton error response: its message, 503 where Triton is full or down."""
        try:
            message = json.loads(text).get("error") or text
        except (ValueError, AttributeError):
            message = text
        message = message or f"Triton answered HTTP {status} without a message"
        if status in (429, 503) or "queue size" in message or "max_queue_size" in message:
            return OpenAIError(503, f"the model is overloaded: {message}", code="overloaded")
        return OpenAIError(400 if status < 500 else 502, message)

    async def open_stream(body: dict) -> AsyncIterator[str]:
        """Return an iterator of Triton's text pieces for `body`, after its first piece has come
        (so a refused request raises OpenAIError here, before any HTTP 200 is sent)."""
        client = state["client"]
        request = client.build_request("POST", f"{base}/{model}{STREAM_SUFFIX}/generate_stream", json=body)
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise OpenAIError(503, f"Triton is not reachable: {exc}") from None
        events = _sse_data(response)
        try:
            first = await anext(events, None)
        except BaseException:
            await response.aclose()
            raise
        if first is None and response.status_code == 200:
            first = {"text_output": ""}  # an empty answer: the stream ended without a piece
        if first is None or "error" in first:
            await response.aclose()
            message = first["error"] if first else f"Triton answered HTTP {response.status_code} without an event"
            raise triton_error(response.status_code, json.dumps({"error": message}))

        async def pieces():
            try:
                yield first.get("text_output", "")
                async for event in events:
                    if "error" in event:
                        raise RuntimeError(event["error"])
                    yield event.get("text_output", "")
            finally:
                await response.aclose()

        return pieces()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise OpenAIError(400, "prompt is empty", param="prompt")
        if len(prompts) > limits.max_prompts:
            raise OpenAIError(400, f"{len(prompts)} prompts in one request, over the limit of {limits.max_prompts} "
                              "(max_prompts): send them in several requests", param="prompt")
        if req.stream and len(prompts) != 1:
            raise OpenAIError(400, "stream takes one prompt", param="prompt")
        bodies = await triton_bodies(prompts, req, req.max_tokens)
        created, ident = int(time.time()), f"cmpl-{uuid.uuid4().hex}"

        def chunk(index: int, text: str, finish: str | None) -> dict:
            return {"id": ident, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": None}]}

        if req.stream:
            pieces = await open_stream(bodies[0])

            async def events():
                text = ""
                async for piece in pieces:
                    text += piece
                    yield chunk(0, piece, None)
                yield chunk(0, "", (await finish_reasons([text], bodies))[0])

            return _sse(events())
        texts = list(await asyncio.gather(*(generate(b) for b in bodies)))
        choices = [chunk(i, t, f)["choices"][0]
                   for i, (t, f) in enumerate(zip(texts, await finish_reasons(texts, bodies)))]
        return {"id": ident, "object": "text_completion", "created": created, "model": model,
                "choices": choices, "usage": await usage(prompts, texts)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        if tokenizer.chat_template is None:
            raise OpenAIError(400, "this model's tokenizer has no chat template: use /v1/completions")
        messages = [{"role": m.role, "content": _message_text(m.content, i)} for i, m in enumerate(req.messages)]
        prompt = await off_loop(lambda: tokenizer.apply_chat_template(messages, tokenize=False,
                                                                      add_generation_prompt=True))
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        (body,) = await triton_bodies([prompt], req, max_tokens)
        created, ident = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"

        def chunk(delta: dict, finish: str | None) -> dict:
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

        if req.stream:
            pieces = await open_stream(body)

            async def events():
                text = ""
                yield chunk({"role": "assistant", "content": ""}, None)
                async for piece in pieces:
                    text += piece
                    yield chunk({"content": piece}, None)
                yield chunk({}, (await finish_reasons([text], [body]))[0])

            return _sse(events())
        text = await generate(body)
        return {
            "id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": (await finish_reasons([text], [body]))[0], "logprobs": None}],
            "usage": await usage([prompt], [text]),
        }

    return app


def _message_text(content, index: int) -> str:
    """Return the text of a chat message's content (a string or a list of text parts)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise OpenAIError(400, "only text content parts are supported", param=f"messages.{index}.content")
        parts.append(part["text"])
    return "".join(parts)


async def _sse_data(response: httpx.Response) -> AsyncIterator[dict]:
    """Yield the JSON of each `data:` event of a server-sent-events response."""
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            yield json.loads(line[len("data:"):])


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    """Return an SSE response of `chunks`, then `data: [DONE]` (OpenAI's stream end)."""

    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except Exception as exc:  # the headers are out: report in the stream, as OpenAI does
            error = {"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}}
            yield f"data: {json.dumps(error)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


class OpenAIServer:
    """The OpenAI front (uvicorn) in a background thread of this process: start() ... stop() (draining)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        if port == 0:
            from deploy.server import free_port

            port = free_port(host)
        self.host, self.port, self.app = host, port, app
        self.gate: Admission = app.state.admission
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=int(self.gate.limits.drain_timeout_s) + 1)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """Return the base URL OpenAI clients take (…/v1)."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout_s: float = 60.0) -> None:
        """Start serving; return once the socket accepts connections (raise RuntimeError otherwise)."""
        self._thread = threading.Thread(target=self._server.run, name="openai-front", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the OpenAI front did not start on {self.host}:{self.port}")
            time.sleep(0.05)

    def stop(self) -> int:
        """Drain, then stop serving and wait for the thread; return how many requests were still in flight
        after drain_timeout_s (0: every request in flight finished). New requests get 503 meanwhile."""
        if self._thread is None:
            return 0
        self.gate.draining = True
        deadline = time.monotonic() + self.gate.limits.drain_timeout_s
        while (self.gate.active or self.gate.waiting) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self.gate.active + self.gate.waiting
        self._server.should_exit = True
        self._thread.join(timeout=self.gate.limits.drain_timeout_s + 30)
        self._thread = None
        return left
