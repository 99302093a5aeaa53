"""The `tensorrt_llm` backend: TensorRT-LLM's LLM API decodes a saved engine (GPU only).

Isolated here: nothing imports tensorrt_llm unless a repository was exported with
backend tensorrt_llm. It offers the BatchDecoder interface our model.py uses
(complete, submit, start, stop); TensorRT-LLM batches in flight by itself. Written against
the LLM API of TensorRT-LLM 0.1x-1.x; it cannot run on the CPU machines aigc is tested on.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from .batch_decoder import Request


def engine_llm_class():
    """Return the LLM class that builds and loads TensorRT engines: TensorRT-LLM >= 1.0 keeps it
    in tensorrt_llm._tensorrt_engine (its tensorrt_llm.LLM runs the PyTorch flow); 0.x exports it
    as tensorrt_llm.LLM."""
    try:
        from tensorrt_llm._tensorrt_engine import LLM
    except ImportError:
        from tensorrt_llm import LLM
    return LLM


class TensorRTLLMRunner:
    """Completes Requests with a TensorRT-LLM engine directory and the checkpoint's tokenizer."""

    def __init__(self, engine_dir: Path, hf_dir: Path, eos_id: int | None, pad_id: int):
        self.llm = engine_llm_class()(model=str(engine_dir), tokenizer=str(hf_dir))
        self.eos_id, self.pad_id = eos_id, pad_id
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None

    def sampling_params(self, request: Request):
        """Return TensorRT-LLM SamplingParams for `request` (greedy: top_k 1)."""
        from tensorrt_llm import SamplingParams

        sampling = request.sampling
        settings = {"top_k": 1} if sampling is None else {
            "temperature": sampling.temperature,
            "top_k": sampling.top_k or None,
            "top_p": sampling.top_p,
            "seed": request.seed,
        }
        return SamplingParams(
            max_tokens=request.max_tokens, end_id=self.eos_id, pad_id=self.pad_id,
            stop=list(request.stop) or None, **settings,
        )

    def complete(self, requests: list[Request]) -> list[str]:
        """Return the texts of `requests`, decoded together."""
        outputs = self.llm.generate([r.prompt_ids for r in requests], [self.sampling_params(r) for r in requests])
        return [output.outputs[0].text for output in outputs]

    def start(self) -> None:
        """Start the event loop that streams submitted requests."""
        self._thread = threading.Thread(target=self._loop.run_forever, name="trtllm-stream", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Stream `request` through its callbacks."""
        asyncio.run_coroutine_threadsafe(self._stream(request), self._loop)

    async def _stream(self, request: Request) -> None:
        text = ""
        try:
            async for output in self.llm.generate_async(request.prompt_ids, self.sampling_params(request), streaming=True):
                piece = output.outputs[0].text[len(text):]
                text = output.outputs[0].text
                if piece and request.on_piece is not None:
                    request.on_piece(piece)
        except Exception as exc:
            if request.on_error is not None:
                request.on_error(exc)
            return
        if request.on_done is not None:
            request.on_done(text)

    def stop(self) -> None:
        """Stop streaming and release the engine."""
        if self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self.llm.shutdown()
