"""A small text-completion client for our Triton repository (and TensorRT-LLM's ensemble).

It sends `text_input` / `max_tokens` and the optional sampling inputs, and reads
`text_output`, over HTTP or gRPC with tritonclient. `stream()` reads the decoupled
`<model>_stream` model over a gRPC stream, one piece of text per response.
"""

from __future__ import annotations

import queue
from typing import Iterator

import numpy as np

from deploy.repository import STREAM_SUFFIX

DEFAULT_PORTS = {"http": 8000, "grpc": 8001}


class ServerError(RuntimeError):
    """The server rejected or failed a request; the message is the server's."""


def _server_error(exc) -> Exception:
    """Return the exception for a tritonclient InferenceServerException: ConnectionError where
    gRPC could not reach the server, else ServerError carrying the server's message."""
    message = exc.message() or f"the server answered {exc.status()} without a message"
    if "UNAVAILABLE" in str(exc.status()):
        return ConnectionError(message)
    return ServerError(message)


class TextClient:
    """Completes prompts through a Triton model named `model` at `url` ("host:port")."""

    def __init__(self, url: str, model: str = "ensemble", protocol: str = "http", timeout_s: float = 300.0):
        if protocol not in DEFAULT_PORTS:
            raise ValueError(f"protocol must be http or grpc, got {protocol!r}")
        self.url, self.model, self.protocol, self.timeout_s = url, model, protocol, timeout_s
        if protocol == "http":
            import tritonclient.http as api

            self._client = api.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        else:
            import tritonclient.grpc as api

            self._client = api.InferenceServerClient(url)
        self._api = api

    def __enter__(self) -> "TextClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self._client.close()

    def inputs(
        self,
        prompt: str | bytes,
        max_tokens: int,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: list[str] | tuple[str, ...] | None = None,
    ) -> list:
        """Return the tritonclient InferInputs of one request (batch of one row)."""
        text = prompt.encode("utf-8") if isinstance(prompt, str) else prompt
        stop_words = np.array([[s.encode("utf-8") for s in stop]], dtype=np.object_) if stop else None  # (1, n)
        values = [
            ("text_input", "BYTES", np.array([[text]], dtype=np.object_)),
            ("max_tokens", "INT32", np.array([[max_tokens]], dtype=np.int32)),
            ("temperature", "FP32", None if temperature is None else np.array([[temperature]], dtype=np.float32)),
            ("top_k", "INT32", None if top_k is None else np.array([[top_k]], dtype=np.int32)),
            ("top_p", "FP32", None if top_p is None else np.array([[top_p]], dtype=np.float32)),
            ("random_seed", "UINT64", None if seed is None else np.array([[seed]], dtype=np.uint64)),
            ("stop_words", "BYTES", stop_words),
        ]
        inputs = []
        for name, dtype, array in values:
            if array is not None:
                tensor = self._api.InferInput(name, list(array.shape), dtype)
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
        return inputs

    def generate(self, prompt: str | bytes, max_tokens: int = 32, **sampling) -> str:
        """Return the generated continuation of `prompt`; raise ServerError with the server's message
        (ConnectionError where the server cannot be reached).

        `sampling`: temperature, top_k, top_p, seed, stop (a list of stop strings; the text ends
        before the first one); all optional, greedy without them.
        """
        from tritonclient.utils import InferenceServerException

        inputs = self.inputs(prompt, max_tokens, **sampling)
        try:
            if self.protocol == "http":
                result = self._client.infer(self.model, inputs)
            else:
                result = self._client.infer(self.model, inputs, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise _server_error(exc) from None
        return result.as_numpy("text_output").reshape(-1)[0].decode("utf-8")

    def stream(self, prompt: str | bytes, max_tokens: int = 32, **sampling) -> Iterator[str]:
        """Yield the continuation of `prompt` piece by piece from `<model>_stream` (gRPC only)."""
        if self.protocol != "grpc":
            raise ValueError("streaming needs the gRPC protocol (Triton's HTTP infer refuses decoupled models)")
        responses: queue.Queue = queue.Queue()
        self._client.start_stream(callback=lambda result, error: responses.put((result, error)))
        try:
            self._client.async_stream_infer(
                self.model + STREAM_SUFFIX, self.inputs(prompt, max_tokens, **sampling), enable_empty_final_response=True
            )
            while True:
                try:
                    result, error = responses.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise ServerError(f"no response from the stream within {self.timeout_s:.0f}s") from None
                if error is not None:
                    raise _server_error(error)
                piece = result.as_numpy("text_output")
                if piece is not None and piece.size:
                    yield piece.reshape(-1)[0].decode("utf-8")
                if result.get_response().parameters["triton_final_response"].bool_param:
                    return
        finally:
            self._client.stop_stream()
