"""The `vllm` backend: vLLM's engine (paged KV cache, continuous batching) decodes the HF checkpoint.

Isolated here: nothing imports vllm unless a repository was exported with backend vllm. It
offers the BatchDecoder interface our model.py uses (complete, submit, start, stop). One
thread owns a `vllm.LLMEngine` whose engine core runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0: no engine process to spawn from Triton's python stub):
it adds submitted requests and calls `step()`, which schedules every unfinished request
together, and hands each request's new text to its callbacks. Triton's dynamic batches
(complete) and the streaming model's requests (submit) both go through that thread.

Greedy decoding is temperature 0; prompts go in as our tokenizer's ids, so vLLM sees the
same tokens as the pytorch and onnx backends. Seeded sampling is reproducible per seed but
draws vLLM's own random numbers, not transformers'.
"""

from __future__ import annotations

import collections
import itertools
import locale
import os
import threading
from pathlib import Path

from .batch_decoder import Overloaded, Request


def engine_args(checkpoint: Path, max_rows: int, context: int, threads: int, kv_cache_mib: int) -> dict:
    """Return the vllm.EngineArgs settings for serving `checkpoint` on CPU in fp32."""
    return {
        "model": str(checkpoint),
        "dtype": "float32",  # the checkpoint's own precision; bf16 is slow on CPUs without AMX
        "max_model_len": context,
        "max_num_seqs": max_rows,
        "enforce_eager": True,  # no torch.compile: the compile would take minutes per start on 2 cores
        "kv_cache_memory_bytes": kv_cache_mib * 2**20,
        "seed": 0,
    }


def set_cpu_environment(threads: int) -> None:
    """Set vLLM's CPU settings before it is imported: engine core in process, `threads` OpenMP
    threads, no pinning of them to cores (the machine is shared), hub offline, and UTF-8 as the
    locale's encoding (Triton's stub starts in the C locale, where torch's inductor templates,
    which vllm imports, fail to read as ASCII)."""
    if locale.getpreferredencoding(False).lower().replace("-", "") != "utf8":
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


class VLLMRunner:
    """Completes Requests with vLLM's engine on `checkpoint` (at most `max_rows` decoded together,
    at most `max_pending` waiting beyond those: submit() refuses more with Overloaded)."""

    def __init__(self, checkpoint: Path, max_rows: int, context: int, threads: int = 1,
                 max_pending: int = 256, kv_cache_mib: int = 256):
        set_cpu_environment(threads)
        from vllm import EngineArgs, LLMEngine

        self.engine = LLMEngine.from_engine_args(EngineArgs(**engine_args(checkpoint, max_rows, context, threads,
                                                                          kv_cache_mib)))
        self.max_rows, self.max_pending, self.threads = max_rows, max_pending, threads
        self.tokenizer = self.engine.get_tokenizer()
        self._incoming: collections.deque[Request] = collections.deque()
        self._active: dict[str, tuple[Request, list[str]]] = {}  # request id -> (request, [text sent])
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def sampling_params(self, request: Request):
        """Return vLLM SamplingParams for `request` (greedy: temperature 0)."""
        from vllm import SamplingParams

        sampling = request.sampling
        settings = {"temperature": 0.0} if sampling is None else {
            "temperature": sampling.temperature,
            "top_k": sampling.top_k if sampling.top_k > 0 else -1,
            "top_p": sampling.top_p,
            "seed": request.seed,
        }
        return SamplingParams(max_tokens=request.max_tokens, stop=list(request.stop) or None,
                              skip_special_tokens=True, **settings)

    # -- the BatchDecoder interface -------------------------------------------------------

    def start(self) -> None:
        """Start the thread that owns the engine."""
        self._thread = threading.Thread(target=self._loop, name="vllm-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue `request`; its callbacks get its pieces, then its text. Raises Overloaded where
        `max_pending` requests already wait beyond the `max_rows` being decoded."""
        with self._wake:
            if self._stopping:
                raise RuntimeError("the vLLM engine thread has stopped")
            waiting = len(self._incoming) + max(0, len(self._active) - self.max_rows)
            if waiting >= self.max_pending:
                raise Overloaded(f"the model's queue is full: {waiting} requests wait for one of "
                                 f"{self.max_rows} rows (max_queue_size {self.max_pending}); retry later")
            self._incoming.append(request)
            self._wake.notify()

    def complete(self, requests: list[Request]) -> list[str]:
        """Return the texts of `requests`, decoded by the engine thread together with whatever
        else it decodes; their on_done/on_error are replaced; raises the first request's error."""
        done = threading.Semaphore(0)
        texts: dict[int, str] = {}
        errors: list[Exception] = []
        for i, request in enumerate(requests):
            request.on_done = lambda text, i=i: (texts.__setitem__(i, text), done.release())
            request.on_error = lambda exc: (errors.append(exc), done.release())
            with self._wake:  # a Triton batch is admitted whole (Triton's own queue bounds it)
                if self._stopping:
                    raise RuntimeError("the vLLM engine thread has stopped")
                self._incoming.append(request)
                self._wake.notify()
        for _ in requests:
            done.acquire()
        if errors:
            raise errors[0]
        return [texts[i] for i in range(len(requests))]

    def stop(self) -> None:
        """Stop the engine thread (requests still running get an error), then shut the engine core down."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        self.engine.engine_core.shutdown()

    # -- the engine thread ----------------------------------------------------------------

    def _loop(self) -> None:
        import torch

        # OpenMP's thread count is per thread, and vLLM's CPU attention checks that its kernels run with
        # the count it planned for; vLLM replaces torch.set_num_threads with a no-op: call torch's own
        torch._C.set_num_threads(self.threads)
        try:
            self._serve()
        except BaseException as exc:  # the thread is gone: nobody may wait for it
            with self._wake:
                self._stopping = True
                incoming = list(self._incoming)
                self._incoming.clear()
            for request in incoming:
                if request.on_error is not None:
                    request.on_error(exc)
            for request_id in list(self._active):
                self._fail(request_id, exc)
            raise

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._incoming and not self._active:
                    self._wake.wait()
                if self._stopping:
                    break
                incoming = list(self._incoming)
                self._incoming.clear()
            for request in incoming:
                self._add(request)
            if self._active:
                try:
                    outputs = self.engine.step()
                except Exception as exc:  # the engine failed: every running request hears it
                    for request_id in list(self._active):
                        self._fail(request_id, exc)
                    continue
                for output in outputs:
                    self._deliver(output)
        for request_id in list(self._active):
            self._fail(request_id, RuntimeError("the model is shutting down"))

    def _add(self, request: Request) -> None:
        request_id = str(next(self._ids))
        try:
            self.engine.add_request(request_id, {"prompt_token_ids": list(request.prompt_ids)},
                                    self.sampling_params(request))
        except Exception as exc:
            if request.on_error is not None:
                request.on_error(exc)
            return
        self._active[request_id] = (request, [""])

    def _deliver(self, output) -> None:
        entry = self._active.get(output.request_id)
        if entry is None:
            return
        request, sent = entry
        completion = output.outputs[0]
        text = completion.text
        if output.finished and not isinstance(completion.stop_reason, str):
            # not cut by a stop string: the whole decode, as our decoder's final text, with the trailing
            # bytes of an incomplete character ("\ufffd") that vLLM's incremental detokenizer holds back
            whole = self.tokenizer.decode(list(completion.token_ids), skip_special_tokens=True)
            text = whole if whole.startswith(text) else text
        piece = text[len(sent[0]):]
        if piece and request.on_piece is not None:
            request.on_piece(piece)
        sent[0] = text
        if output.finished:
            del self._active[output.request_id]
            if request.on_done is not None:
                request.on_done(text)

    def _fail(self, request_id: str, exc: Exception) -> None:
        request, _ = self._active.pop(request_id)
        try:
            self.engine.abort_request([request_id])
        except Exception:  # noqa: BLE001 - the engine may be the one that failed
            pass
        if request.on_error is not None:
            request.on_error(exc)
