"""Triton python-backend model: text completion with an HF causal LM (copied into each repository).

Runs inside Triton's python backend stub, not inside aigc: it imports only
torch, transformers, numpy and triton_python_backend_utils. Parameters come from
config.pbtxt: `checkpoint` (HF checkpoint dir, relative to the model's directory),
`max_tokens_limit`, `torch_threads`.

Contract (TensorRT-LLM ensemble names), one prompt per batch row:
  text_input (BYTES, UTF-8), max_tokens (INT32), optional temperature (FP32),
  top_k (INT32), top_p (FP32), random_seed (UINT64) -> text_output (BYTES): the
  generated continuation only, without the prompt.
Greedy decoding unless sampling is asked for: temperature > 0, or, without a
temperature, top_k > 1 or top_p < 1. Greedy rows of one Triton batch are decoded
together (left padding, KV cache); sampled rows one by one, seeded by random_seed.
A decoupled model (model_transaction_policy decoupled) streams one response per
new piece of text, then an empty final response.
A bad request gets its own TritonError; the other requests of the batch are served.
"""

import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402


class BadRequest(ValueError):
    """A request the model refuses; its message goes back to the client."""


@dataclasses.dataclass
class Job:
    """One prompt to complete."""

    input_ids: list[int]
    max_tokens: int
    sampling: dict | None  # generate() sampling kwargs; None = greedy
    seed: int | None


class TritonPythonModel:
    def initialize(self, args):
        """Load the tokenizer and the model named by the config's `checkpoint` parameter."""
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        torch.set_num_threads(int(params.get("torch_threads", "1")))
        checkpoint = (Path(args["model_repository"]) / params["checkpoint"]).resolve()
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        self.max_tokens_limit = int(params.get("max_tokens_limit", "512"))
        self.context = int(self.model.config.max_position_embeddings)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)

    def execute(self, requests):
        """Return one response per request (decoupled: send them through each request's sender)."""
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
            texts = self._complete(jobs)
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

    # -- requests -------------------------------------------------------------------------

    def _parse(self, request):
        """Return the Jobs of one request (one per batch row); raise BadRequest."""
        prompts = _read(request, "text_input")
        rows = len(prompts)
        max_tokens = _per_row(_read(request, "max_tokens"), rows, "max_tokens")
        temperature = _per_row(_read(request, "temperature"), rows, "temperature")
        top_k = _per_row(_read(request, "top_k"), rows, "top_k")
        top_p = _per_row(_read(request, "top_p"), rows, "top_p")
        seed = _per_row(_read(request, "random_seed"), rows, "random_seed")
        return [
            self._job(prompts[i], max_tokens[i], temperature[i], top_k[i], top_p[i], seed[i])
            for i in range(rows)
        ]

    def _job(self, raw, max_tokens, temperature, top_k, top_p, seed):
        """Return the Job for one batch row after checking every field; raise BadRequest."""
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as exc:
            raise BadRequest(f"text_input is not valid UTF-8: {exc}") from None
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
        sampling = _sampling(temperature, top_k, top_p)
        return Job(input_ids, max_tokens, sampling, None if seed is None else int(seed))

    # -- generation -----------------------------------------------------------------------

    def _complete(self, jobs):
        """Return id(job) -> generated text for every job."""
        texts = {}
        greedy = [job for job in jobs if job.sampling is None]
        if greedy:
            for job, ids in zip(greedy, self._generate_batch(greedy, None)):
                texts[id(job)] = self._decode(ids)
        for job in jobs:
            if job.sampling is not None:
                if job.seed is not None:
                    torch.manual_seed(job.seed)
                texts[id(job)] = self._decode(self._generate_batch([job], job.sampling)[0])
        return texts

    def _generate_batch(self, jobs, sampling, streamer=None):
        """Return the new token ids of each job (cut at eos and at its max_tokens)."""
        width = max(len(job.input_ids) for job in jobs)
        input_ids = torch.tensor(
            [[self.pad_id] * (width - len(j.input_ids)) + j.input_ids for j in jobs]
        )  # (B, T), left padded
        attention_mask = torch.tensor(
            [[0] * (width - len(j.input_ids)) + [1] * len(j.input_ids) for j in jobs]
        )  # (B, T)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max(j.max_tokens for j in jobs),
                do_sample=sampling is not None,
                pad_token_id=self.pad_id,
                use_cache=True,
                streamer=streamer,
                **(sampling or {}),
            )  # (B, T + new)
        results = []
        for row, job in zip(out[:, width:].tolist(), jobs):
            row = row[: job.max_tokens]
            if self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            results.append(row)
        return results

    def _decode(self, ids):
        """Return the text of generated token ids, special tokens dropped."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- streaming (decoupled model) ------------------------------------------------------

    def _stream_request(self, request):
        """Send one response per new piece of text of one request, then the final flag."""
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            jobs = self._parse(request)
            if len(jobs) != 1:
                raise BadRequest(f"the streaming model takes one prompt per request, got {len(jobs)}")
            job = jobs[0]
            if job.sampling is not None and job.seed is not None:
                torch.manual_seed(job.seed)
            streamer = _TextSender(self.tokenizer, sender, self.eos_id, job.max_tokens)
            self._generate_batch([job], job.sampling, streamer=streamer)
        except BadRequest as exc:
            sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))), flags=final)
            return
        except Exception as exc:
            error = pb_utils.TritonError(f"generation failed: {type(exc).__name__}: {exc}")
            sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error), flags=final)
            return
        sender.send(flags=final)


class _TextSender(BaseStreamer):
    """generate() streamer that sends each new piece of decoded text as a response.

    Text is decoded from all new ids so far and only the new suffix is sent, holding
    back a trailing incomplete UTF-8 character (byte-level BPE splits characters).
    """

    def __init__(self, tokenizer, sender, eos_id, max_tokens):
        self.tokenizer, self.sender, self.eos_id, self.max_tokens = tokenizer, sender, eos_id, max_tokens
        self.ids, self.sent, self.seen_prompt, self.done = [], "", False, False

    def put(self, value):
        if not self.seen_prompt:  # generate() first passes the prompt
            self.seen_prompt = True
            return
        for token in value.reshape(-1).tolist():
            if self.done or token == self.eos_id or len(self.ids) >= self.max_tokens:
                self.done = True
                return
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._send(text)

    def end(self):
        self._send(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _send(self, text):
        piece = text[len(self.sent):] if text.startswith(self.sent) else text
        if piece:
            self.sent = text
            out = np.array([[piece.encode("utf-8")]], dtype=np.object_)  # (1, 1)
            self.sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", out)]))


def _read(request, name):
    """Return the flat numpy values of input `name`, or None where the request omits it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)


def _per_row(values, rows, name):
    """Return one value per batch row: the row's own, a single value broadcast, or None."""
    if values is None:
        return [None] * rows
    if len(values) == rows:
        return list(values)
    if len(values) == 1:
        return [values[0]] * rows
    raise BadRequest(f"{name} has {len(values)} values for {rows} prompts")


def _sampling(temperature, top_k, top_p):
    """Return generate() sampling kwargs, or None for greedy decoding; raise BadRequest."""
    if temperature is not None and float(temperature) < 0:
        raise BadRequest(f"temperature must be >= 0, got {float(temperature)}")
    if top_k is not None and int(top_k) < 0:
        raise BadRequest(f"top_k must be >= 0, got {int(top_k)}")
    if top_p is not None and not 0 < float(top_p) <= 1:
        raise BadRequest(f"top_p must be in (0, 1], got {float(top_p)}")
    if temperature is not None:
        sample = float(temperature) > 0
    else:
        sample = (top_k is not None and int(top_k) > 1) or (top_p is not None and float(top_p) < 1)
    if not sample:
        return None
    return {
        "temperature": 1.0 if temperature is None else float(temperature),
        "top_k": 0 if top_k is None else int(top_k),
        "top_p": 1.0 if top_p is None else float(top_p),
    }
