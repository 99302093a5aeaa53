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
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
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


def create_app(triton_http_url: str, repo: Path, model: str = "ensemble") -> FastAPI:
    """Return the FastAPI app that forwards to Triton at `triton_http_url` ("host:port"), serving
    `model` of the Triton repository `repo` (whose hf/ holds the tokenizer and chat template)."""
    from transformers import AutoTokenizer

    hf_dir = Path(repo) / model / "1" / "hf"
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    limit = _max_tokens_limit(repo, model)
    context = json.loads((hf_dir / "config.json").read_text())["max_position_embeddings"]
    base = f"http://{triton_http_url}/v2/models"
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app):
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=128)
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0), limits=limits) as client:
            state["client"] = client
            yield

    app = FastAPI(title="aigc OpenAI-compatible API", lifespan=lifespan)

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

    def triton_body(prompt: str, req: GenerationFields, max_tokens: int | None) -> dict:
        """Return the generate-extension body of one prompt; raise OpenAIError for what we do not serve."""
        if req.model != model:
            raise OpenAIError(404, f"The model '{req.model}' does not exist; this server serves '{model}'",
                              param="model", code="model_not_found")
        if req.n != 1:
            raise OpenAIError(400, "only n=1 is supported", param="n")
        if req.logprobs not in (None, False, 0):
            raise OpenAIError(400, "logprobs are not supported", param="logprobs")
        if req.echo:
            raise OpenAIError(400, "echo is not supported", param="echo")
        if max_tokens is None:  # as much as the model's context leaves, up to the server's limit
            max_tokens = max(1, min(limit, context - len(tokenizer(prompt)["input_ids"])))
        body = {"text_input": prompt, "max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p}
        if req.top_k is not None:
            body["top_k"] = req.top_k
        if req.seed is not None:
            body["random_seed"] = req.seed
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if stop:
            body["stop_words"] = stop
        return body

    def finish_reason(text: str, max_tokens: int) -> str:
        return "length" if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= max_tokens else "stop"

    def usage(prompts: list[str], texts: list[str]) -> dict:
        prompt_tokens = sum(len(tokenizer(p)["input_ids"]) for p in prompts)
        completion_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def generate(body: dict) -> str:
        """Return Triton's text_output for `body`; raise OpenAIError with Triton's message."""
        try:
            response = await state["client"].post(f"{base}/{model}/generate", json=body)
        except httpx.HTTPError as exc:
            raise OpenAIError(503, f"Triton is not reachable: {exc}") from None
        payload = response.json()
        if response.status_code != 200:
            raise OpenAIError(400 if response.status_code < 500 else 502, payload.get("error", response.text))
        return payload["text_output"]

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
        if first is None or "error" in first:
            await response.aclose()
            message = first["error"] if first else "Triton closed the stream without an answer"
            raise OpenAIError(400 if response.status_code < 500 else 502, message)

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
        bodies = [triton_body(p, req, req.max_tokens) for p in prompts]
        created, ident = int(time.time()), f"cmpl-{uuid.uuid4().hex}"

        def chunk(index: int, text: str, finish: str | None) -> dict:
            return {"id": ident, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": None}]}

        if req.stream:
            if len(prompts) != 1:
                raise OpenAIError(400, "stream takes one prompt", param="prompt")
            pieces = await open_stream(bodies[0])

            async def events():
                text = ""
                async for piece in pieces:
                    text += piece
                    yield chunk(0, piece, None)
                yield chunk(0, "", finish_reason(text, bodies[0]["max_tokens"]))

            return _sse(events())
        texts = list(await asyncio.gather(*(generate(b) for b in bodies)))
        choices = [chunk(i, t, finish_reason(t, b["max_tokens"]))["choices"][0]
                   for i, (t, b) in enumerate(zip(texts, bodies))]
        return {"id": ident, "object": "text_completion", "created": created, "model": model,
                "choices": choices, "usage": usage(prompts, texts)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        if tokenizer.chat_template is None:
            raise OpenAIError(400, "this model's tokenizer has no chat template: use /v1/completions")
        messages = [{"role": m.role, "content": _message_text(m.content, i)} for i, m in enumerate(req.messages)]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        body = triton_body(prompt, req, max_tokens)
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
                yield chunk({}, finish_reason(text, body["max_tokens"]))

            return _sse(events())
        text = await generate(body)
        return {
            "id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason(text, body["max_tokens"]), "logprobs": None}],
            "usage": usage([prompt], [text]),
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
    """The OpenAI front (uvicorn) in a background thread of this process: start() ... stop()."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        if port == 0:
            from deploy.server import free_port

            port = free_port(host)
        self.host, self.port = host, port
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
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

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=30)
            self._thread = None
