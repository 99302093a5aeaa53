"""Triton python-backend model: text completion with an LLM (copied into each repository).

Runs inside Triton's python backend stub, not inside aigc: it imports torch,
transformers, numpy, triton_python_backend_utils and the `llm_runtime` package copied
next to it. Parameters come from config.pbtxt: `backend` (pytorch | onnx |
tensorrt_llm | vllm), `checkpoint` (HF checkpoint dir: tokenizer, config, and the weights for
pytorch and vllm), `weights` (model.onnx or the TensorRT-LLM engine dir), `max_tokens_limit`,
`torch_threads`, and for vllm `kv_cache_mib` and `python_path` (put first on sys.path at
import); paths are relative to the model's directory.

Contract (TensorRT-LLM ensemble names), one prompt per batch row:
  text_input (BYTES, UTF-8), max_tokens (INT32), optional temperature (FP32), top_k
  (INT32), top_p (FP32), random_seed (UINT64), stop_words (BYTES, any number per row)
  -> text_output (BYTES): the generated continuation only, without the prompt, cut
  before the first stop word.
Greedy decoding unless sampling is asked for: temperature > 0, or, without a
temperature, top_k > 1 or top_p < 1; a seeded request samples what transformers'
generate() samples after torch.manual_seed(seed).

The requests of a Triton batch are decoded together (llm_runtime.batch_decoder: one
forward per token for the whole batch). The decoupled model (model_transaction_policy
decoupled) hands requests to a decoding thread that batches continuously, sends one
response per new piece of text, then an empty final response.
A bad request gets its own TritonError; the other requests are served. Custom metrics
on Triton's metrics port: aigc_decode_steps_total, aigc_decode_rows_total (rows summed
over steps: their ratio is the mean batch size of decoding).
"""

import json
import os
import re
import sys
from pathlib import Path


def _python_path():
    """Return the `python_path` parameter of this model's config.pbtxt ('' without one): where the
    vllm backend's virtualenv keeps vllm and the transformers it pins. Read before anything
    imports transformers; Triton's stub ignores PYTHONPATH, so the model puts it on sys.path."""
    config = Path(__file__).resolve().parent.parent / "config.pbtxt"
    found = config.is_file() and re.search(r'key: "python_path" value: \{ string_value: "([^"]*)" \}',
                                           config.read_text())
    return found.group(1) if found else ""


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
if _python_path():
    sys.path.insert(0, _python_path())
sys.path.insert(0, str(Path(__file__).resolve().parent))  # llm_runtime lies next to this file

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from llm_runtime.batch_decoder import BatchDecoder, Overloaded, Request  # noqa: E402
from llm_runtime.kv_lm import load_step  # noqa: E402
from llm_runtime.sampling import sampling_for  # noqa: E402
from transformers import AutoConfig, AutoTokenizer  # noqa: E402


class BadRequest(ValueError):
    """A request the model refuses; its message goes back to the client."""


class TritonPythonModel:
    def initialize(self, args):
        """Load the tokenizer and the decoder of the configured backend."""
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        model_dir = Path(args["model_repository"])
        threads = int(params.get("torch_threads", "1"))
        torch.set_num_threads(threads)
        checkpoint = (model_dir / params["checkpoint"]).resolve()
        weights = (model_dir / params["weights"]).resolve() if params.get("weights") else None
        backend = self.backend = params.get("backend", "pytorch")
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.max_tokens_limit = int(params.get("max_tokens_limit", "512"))
        self.context = int(AutoConfig.from_pretrained(checkpoint).max_position_embeddings)
        eos_id = self.tokenizer.eos_token_id
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos_id
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        if backend == "tensorrt_llm":
            from llm_runtime.trtllm_runner import TensorRTLLMRunner

            self.decoder = TensorRTLLMRunner(weights, checkpoint, eos_id, pad_id)
        elif backend == "vllm":  # vllm from `python_path` (see _python_path)
            from llm_runtime.vllm_runner import VLLMRunner

            self.decoder = VLLMRunner(checkpoint, int(config["max_batch_size"]), self.context, threads,
                                      max_pending=int(params.get("max_queue_size", "256")),
                                      kv_cache_mib=int(params.get("kv_cache_mib", "256")))
            self.decoder.start()  # its engine thread serves complete() as well as submit()
        else:
            step = load_step(backend, checkpoint, weights, threads)
            self.decoder = BatchDecoder(step, self.tokenizer, eos_id, pad_id, max_rows=int(config["max_batch_size"]),
                                        on_step=self._step_metrics(args["model_name"]),
                                        max_pending=int(params.get("max_queue_size", "256")))
        if self.decoupled and backend != "vllm":
            self.decoder.start()

    def _step_metrics(self, model_name):
        """Return on_step(rows) counting decode steps and rows on Triton's metrics port."""
        labels = {"model": model_name}
        self.metric_families = [  # kept alive as long as their metrics
            pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.COUNTER)
            for name, description in (("aigc_decode_steps_total", "decode forward steps"),
                                      ("aigc_decode_rows_total", "batch rows summed over decode steps"))
        ]
        steps, rows = (family.Metric(labels=labels) for family in self.metric_families)

        def on_step(batch_rows):
            steps.increment(1)
            rows.increment(batch_rows)

        return on_step

    def execute(self, requests):
        """Return one response per request (decoupled: hand them to the decoding thread)."""
        if self.decoupled:
            for request in requests:
                self._stream_request(request)
            return None
        parsed = []
        for request in requests:
            try:
                parsed.append(self._parse(request))
            except BadRequest as exc:
                parsed.append(exc)
        jobs = [job for p in parsed if isinstance(p, list) for job in p]
        try:
            texts = dict(zip(map(id, jobs), self.decoder.complete(jobs))) if jobs else {}
        except Exception as exc:  # a failure while generating fails the whole batch, loudly
            error = pb_utils.TritonError(f"generation failed: {type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses = []
        for p in parsed:
            if isinstance(p, BadRequest):
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(p))))
                continue
            rows = np.array([[texts[id(job)].encode("utf-8")] for job in p], dtype=np.object_)  # (B, 1)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", rows)]))
        return responses

    def finalize(self):
        """Stop the decoding thread (of the decoupled model; vLLM's engine thread always)."""
        if self.decoupled or self.backend == "vllm":
            self.decoder.stop()

    # -- requests -------------------------------------------------------------------------

    def _parse(self, request):
        """Return the decoder Requests of one Triton request (one per batch row); raise BadRequest."""
        prompts = _read(request, "text_input")
        rows = len(prompts)
        max_tokens = _per_row(_read(request, "max_tokens"), rows, "max_tokens")
        temperature = _per_row(_read(request, "temperature"), rows, "temperature")
        top_k = _per_row(_read(request, "top_k"), rows, "top_k")
        top_p = _per_row(_read(request, "top_p"), rows, "top_p")
        seed = _per_row(_read(request, "random_seed"), rows, "random_seed")
        stop = _stop_words(request, rows)
        return [
            self._job(prompts[i], max_tokens[i], temperature[i], top_k[i], top_p[i], seed[i], stop[i])
            for i in range(rows)
        ]

    def _job(self, raw, max_tokens, temperature, top_k, top_p, seed, stop):
        """Return the decoder Request for one batch row after checking every field; raise BadRequest."""
        text = _text(raw, "text_input")
        if not text:
            raise BadRequest("text_input is empty: send a prompt of at least one character")
        max_tokens = int(max_tokens)
        if not 1 <= max_tokens <= self.max_tokens_limit:
            raise BadRequest(f"max_tokens must be between 1 and {self.max_tokens_limit}, got {max_tokens}")
        input_ids = self.tokenizer(text)["input_ids"]
        if len(input_ids) + max_tokens > self.context:
            raise BadRequest(
                f"prompt of {len(input_ids)} tokens + max_tokens {max_tokens} exceeds the model's "
                f"context of {self.context} tokens"
            )
        try:
            sampling = sampling_for(temperature, top_k, top_p)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return Request(input_ids, max_tokens, sampling, None if seed is None else int(seed), stop)

    # -- streaming (decoupled model) ------------------------------------------------------

    def _stream_request(self, request):
        """Queue one request for the decoding thread, which sends its pieces, then the final flag."""
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

        sent = []  # pieces sent so far: an answer that is empty at once (eos first) still gets one response

        def send_piece(piece, flags=0):
            out = np.array([[piece.encode("utf-8")]], dtype=np.object_)  # (1, 1)
            sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", out)]), flags=flags)
            sent.append(True)

        def send_done(text):
            if sent:
                sender.send(flags=final)
            else:
                send_piece("", final)

        def send_error(exc):
            plain = isinstance(exc, (BadRequest, Overloaded))
            message = str(exc) if plain else f"generation failed: {type(exc).__name__}: {exc}"
            sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)), flags=final)

        try:
            jobs = self._parse(request)
            if len(jobs) != 1:
                shape = list(pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().shape)
                raise BadRequest(f"text_input has shape {shape}, but the streaming model takes one prompt per "
                                 "request: shape [1, 1]")
        except BadRequest as exc:
            send_error(exc)
            return
        job = jobs[0]
        job.on_piece, job.on_done, job.on_error = send_piece, send_done, send_error
        try:
            self.decoder.submit(job)
        except Overloaded as exc:
            send_error(exc)


def _read(request, name):
    """Return the flat numpy values of input `name`, or None where the request omits it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)


def _text(raw, name):
    """Return the str of a BYTES value; raise BadRequest where it is not UTF-8."""
    try:
        return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as exc:
        raise BadRequest(f"{name} is not valid UTF-8: {exc}") from None


def _per_row(values, rows, name):
    """Return one value per batch row: the row's own, a single value broadcast, or None."""
    if values is None:
        return [None] * rows
    if len(values) == rows:
        return list(values)
    if len(values) == 1:
        return [values[0]] * rows
    raise BadRequest(f"{name} has {len(values)} values for {rows} prompts")


def _stop_words(request, rows):
    """Return each row's stop strings (a tuple, empty without stop_words); raise BadRequest."""
    tensor = pb_utils.get_input_tensor_by_name(request, "stop_words")
    if tensor is None:
        return [()] * rows
    values = tensor.as_numpy()  # (rows or 1, n)
    if values.ndim != 2 or values.shape[0] not in (1, rows):
        raise BadRequest(f"stop_words must have shape [{rows}, n], got {list(values.shape)}")
    words = [tuple(w for w in (_text(v, "stop_words") for v in row) if w) for row in values]
    return words * rows if len(words) == 1 else words
