"""Tests of deploy/: the Triton repository, the real bundled Triton server, client, CLI and stages.

One `aigc serve` process (the real CLI, in a subprocess, with its OpenAI-compatible
front) serves a repository exported from a tiny random Llama checkpoint for the whole
module; answers are compared with transformers' generate() on the same checkpoint
(greedy, or sampled after torch.manual_seed with the request's seed).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from deploy.client import ServerError, TextClient  # noqa: E402
from deploy.repository import write_repository  # noqa: E402
from deploy.server import free_port  # noqa: E402
from deploy.stages import ExportConfig  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The for statement", "A class", "def f(x):\n    return", "Exceptions are raised when", "import"]


def build_checkpoint(out: Path) -> Path:
    """Write a tiny random LlamaForCausalLM and a byte-level BPE tokenizer trained on pydoc text."""
    import pydoc_data.topics
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(pydoc_data.topics.topics.values()), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        initializer_range=0.5,  # peaked logits: greedy choices are far from ties, batched == single
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def processes_mentioning(text: str) -> dict[int, str]:
    """Return pid -> command line of every live process whose command line contains `text`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().split(")")[-1].split()[0]
            except OSError:
                continue
            if text in cmdline and state != "Z":
                found[int(entry.name)] = cmdline
    return found


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def repo(checkpoint, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("export") / "triton_repo"
    write_repository(checkpoint, repo, ExportConfig())
    return repo


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Return f(prompt, max_tokens, seed=None, **sampling) -> transformers' continuation on the
    checkpoint: greedy, or sampled after torch.manual_seed(seed) (temperature, top_k, top_p)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

    def complete(prompt: str, max_tokens: int, seed: int | None = None, **sampling) -> str:
        enc = tok(prompt, return_tensors="pt")
        if seed is not None:
            torch.manual_seed(seed)
            sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **sampling}
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=seed is not None,
                                 pad_token_id=tok.pad_token_id, **sampling)
        return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    complete.tokenizer = tok
    return complete


class ServeProcess:
    """`aigc serve` (deploy.cli.serve_main) running in a subprocess on free ports."""

    def __init__(self, repo: Path):
        self.repo = repo
        self.http_url = f"127.0.0.1:{free_port()}"
        self.grpc_url = f"127.0.0.1:{free_port()}"
        metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.openai_port = free_port()
        self.openai_url = f"http://127.0.0.1:{self.openai_port}/v1"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from deploy.cli import serve_main; sys.exit(serve_main(sys.argv[1:]))",
             "--repo", str(repo), "--http-port", self.http_url.split(":")[1],
             "--grpc-port", self.grpc_url.split(":")[1], "--metrics-port", str(metrics_port),
             "--openai-port", str(self.openai_port)],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_ready(self, timeout_s: float = 400) -> None:
        while True:
            line = self.lines.get(timeout=timeout_s)
            if line is None:
                raise RuntimeError("aigc serve exited before ready:\n" + "".join(self.output))
            if "ready in" in line:
                return

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


@pytest.fixture(scope="module")
def served(repo):
    serve = ServeProcess(repo)
    try:
        serve.wait_ready()
        triton = processes_mentioning(f"--model-repository={repo}")
        assert len(triton) == 1, triton
        cmdline = next(iter(triton.values()))
        serve.backend_dir = re.search(r"--backend-directory=(\S+)", cmdline).group(1)
        serve.shm_prefix = re.search(r"shm-region-prefix-name=(\S+)", cmdline).group(1)
        yield serve
    finally:
        serve.stop()


def test_config_pbtxt_has_the_tensorrt_llm_contract(repo, checkpoint):
    config = (repo / "ensemble" / "config.pbtxt").read_text()
    for name, dtype in [("text_input", "TYPE_STRING"), ("max_tokens", "TYPE_INT32"), ("temperature", "TYPE_FP32"),
                        ("top_k", "TYPE_INT32"), ("top_p", "TYPE_FP32"), ("random_seed", "TYPE_UINT64")]:
        assert re.search(rf'name: "{name}" data_type: {dtype} ', config), name
    assert re.search(r'name: "stop_words" data_type: TYPE_STRING dims: \[ -1 \] optional: true', config)
    for optional in ("temperature", "top_k", "top_p", "random_seed", "stop_words"):
        assert re.search(rf'name: "{optional}" [^}}]*optional: true', config), optional
    for required in ("text_input", "max_tokens"):
        assert not re.search(rf'name: "{required}" [^}}]*optional', config), required
    assert re.search(r'output \[\s*\{ name: "text_output" data_type: TYPE_STRING ', config)
    assert int(re.search(r"max_batch_size: (\d+)", config).group(1)) > 0
    assert "dynamic_batching" in config and "decoupled" not in config
    assert 'backend: "python"' in config
    stream = (repo / "ensemble_stream" / "config.pbtxt").read_text()
    assert "model_transaction_policy { decoupled: true }" in stream
    assert re.sub(r"\s+", " ", config[config.index("input ["):config.index("instance_group")]) == re.sub(
        r"\s+", " ", stream[stream.index("input ["):stream.index("instance_group")]
    )
    assert 'key: "backend" value: { string_value: "onnx" }' in config  # the default engine
    # self-contained: the checkpoint and the decoding runtime live in the repository, the stream model points at it
    for model in ("ensemble", "ensemble_stream"):
        assert (repo / model / "1" / "model.py").is_file()
        assert (repo / model / "1" / "llm_runtime" / "batch_decoder.py").is_file()
    for f in checkpoint.iterdir():  # ONNX Runtime runs the weights in model.onnx(.data): not copied twice
        copy = repo / "ensemble" / "1" / "hf" / f.name
        assert copy.read_bytes() == f.read_bytes() if f.suffix != ".safetensors" else not copy.exists()
    relative = re.search(r'key: "checkpoint" value: \{ string_value: "([^"]+)"', stream).group(1)
    assert (repo / "ensemble_stream" / relative / "tokenizer.json").is_file()
    weights = re.search(r'key: "weights" value: \{ string_value: "([^"]+)"', stream).group(1)
    assert (repo / "ensemble_stream" / weights).is_file()


@pytest.mark.slow
def test_http_and_grpc_answer_like_transformers_greedy(served, reference):
    with TextClient(served.http_url) as http, TextClient(served.grpc_url, protocol="grpc") as grpc:
        for prompt in PROMPTS:
            expected = reference(prompt, 12)
            assert len(expected) > 0
            assert http.generate(prompt, 12) == expected, prompt
            assert grpc.generate(prompt, 12) == expected, prompt


@pytest.mark.slow
def test_generate_endpoints_answer_like_transformers_greedy(served, reference):
    """Triton's HTTP generate extension, which TensorRT-LLM's docs use with curl."""
    import urllib.request

    body = json.dumps({"text_input": PROMPTS[2], "max_tokens": 10}).encode()

    def post(path: str) -> str:
        request = urllib.request.Request(f"http://{served.http_url}{path}", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read().decode()

    assert json.loads(post("/v2/models/ensemble/generate"))["text_output"] == reference(PROMPTS[2], 10)
    events = [json.loads(line[len("data: "):]) for line in post("/v2/models/ensemble_stream/generate_stream").splitlines()
              if line.startswith("data: ")]
    assert "".join(e["text_output"] for e in events) == reference(PROMPTS[2], 10)


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_answer_the_same(served, reference):
    import tritonclient.http as httpclient

    expected = {(p, n): reference(p, n) for p in PROMPTS for n in (4, 10)}
    stats = httpclient.InferenceServerClient(served.http_url)

    def counts() -> tuple[int, int]:
        s = stats.get_inference_statistics("ensemble")["model_stats"][0]
        return s["inference_count"], s["execution_count"]

    before = counts()

    def ask(key):
        with TextClient(served.http_url) as client:
            return client.generate(*key)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = dict(zip(expected, pool.map(ask, list(expected))))
    assert answers == expected
    deadline = time.monotonic() + 10  # statistics are updated just after the responses go out
    while counts()[0] - before[0] < len(expected) and time.monotonic() < deadline:
        time.sleep(0.1)
    inferences, executions = (a - b for a, b in zip(counts(), before))
    assert inferences == len(expected)
    assert executions < inferences, "dynamic batching never put two requests in one execution"


@pytest.mark.slow
def test_stream_pieces_join_to_the_full_answer(served, reference):
    with TextClient(served.grpc_url, protocol="grpc") as client:
        pieces = list(client.stream(PROMPTS[0], 16))
        with pytest.raises(ServerError, match="max_tokens"):
            list(client.stream(PROMPTS[0], 0))
    assert len(pieces) > 1
    assert "".join(pieces) == reference(PROMPTS[0], 16)


@pytest.mark.slow
def test_bad_requests_get_errors_and_the_server_keeps_serving(served, reference):
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    bad = [
        ("", 8, "text_input is empty"),
        ("hello", 0, "max_tokens must be between 1 and 512, got 0"),
        ("hello", -5, "max_tokens must be between 1 and 512, got -5"),
        ("hello", 10**6, "max_tokens must be between 1 and 512"),
        (b"\xff\xfe bad bytes", 8, "not valid UTF-8"),
        ("word " * 200, 8, "exceeds the model's context of 128 tokens"),
    ]
    with TextClient(served.http_url) as http, TextClient(served.grpc_url, protocol="grpc") as grpc:
        for client in (http, grpc):
            for prompt, max_tokens, message in bad:
                with pytest.raises(ServerError, match=re.escape(message)):
                    client.generate(prompt, max_tokens)
            with pytest.raises(ServerError, match="top_p must be in"):
                client.generate("hello", 4, top_p=1.5)
            with pytest.raises(ServerError, match="temperature must be >= 0"):
                client.generate("hello", 4, temperature=-1.0)
        with pytest.raises(ServerError, match="max_tokens must be between"):
            list(grpc.stream("hello", -1))
        for api, url in ((httpclient, served.http_url), (grpcclient, served.grpc_url)):
            raw = api.InferenceServerClient(url)

            def tensor(name, array, dtype):
                t = api.InferInput(name, list(array.shape), dtype)
                t.set_data_from_numpy(array)
                return t

            text = tensor("text_input", np.array([[b"hello"]], dtype=np.object_), "BYTES")
            cases = [
                ([text], "max_tokens"),  # a required input is missing
                ([text, tensor("max_tokens", np.array([[4.0]], dtype=np.float32), "FP32")], "data-type|datatype"),
                ([tensor("text_input", np.array([[b"a", b"b"]], dtype=np.object_), "BYTES"),  # [1, 2], not [1, 1]
                  tensor("max_tokens", np.array([[4]], dtype=np.int32), "INT32")], "shape"),
                ([text, tensor("max_tokens", np.array([[4]], dtype=np.int32), "INT32"),
                  tensor("unknown_input", np.array([[1]], dtype=np.int32), "INT32")], "unknown_input|unexpected"),
            ]
            for inputs, message in cases:
                with pytest.raises(InferenceServerException, match=message):
                    raw.infer("ensemble", inputs)
            raw.close()
        assert http.generate(PROMPTS[0], 12) == reference(PROMPTS[0], 12)
        assert "".join(grpc.stream(PROMPTS[0], 12)) == reference(PROMPTS[0], 12)


def test_a_stream_request_of_two_rows_is_told_the_shape_and_the_server_keeps_serving(served, reference):
    """The streaming model takes one prompt: a [2, 1] request gets an error naming text_input and the shape it
    needs, over gRPC and HTTP generate_stream; a client error is never empty; then the server still answers."""
    import urllib.error
    import urllib.request

    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from deploy.client import _server_error

    expected = "text_input has shape [2, 1], but the streaming model takes one prompt per request: shape [1, 1]"
    raw = grpcclient.InferenceServerClient(served.grpc_url)
    answers: queue.Queue = queue.Queue()
    raw.start_stream(callback=lambda result, error: answers.put(error))
    inputs = []
    for name, array, dtype in (("text_input", np.array([[b"a"], [b"b"]], dtype=np.object_), "BYTES"),
                               ("max_tokens", np.array([[4], [4]], dtype=np.int32), "INT32")):
        inputs.append(grpcclient.InferInput(name, list(array.shape), dtype))
        inputs[-1].set_data_from_numpy(array)
    try:
        raw.async_stream_infer("ensemble_stream", inputs, enable_empty_final_response=True)
        error = answers.get(timeout=60)
    finally:
        raw.stop_stream()
        raw.close()
    assert str(_server_error(error)) == expected

    request = urllib.request.Request(f"http://{served.http_url}/v2/models/ensemble_stream/generate_stream",
                                     data=json.dumps({"text_input": ["a", "b"], "max_tokens": [4, 4]}).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as http_error:
        urllib.request.urlopen(request, timeout=60)
    assert http_error.value.code == 400
    assert json.loads(http_error.value.read().decode().removeprefix("data: "))["error"] == expected

    assert str(_server_error(InferenceServerException(msg="", status="400"))) == "the server answered 400 without a message"
    with TextClient(served.grpc_url, protocol="grpc") as grpc:
        assert "".join(grpc.stream(PROMPTS[0], 12)) == reference(PROMPTS[0], 12)


@pytest.mark.slow
def test_a_bounded_load_is_served_without_errors(served, reference):
    """500 requests from 32 concurrent clients, every 5th streamed over gRPC, max_tokens 4."""
    expected = {p: reference(p, 4) for p in PROMPTS}
    work = list(range(500))
    lock = threading.Lock()
    answers, errors = [], []

    def client_loop():
        with TextClient(served.http_url) as http, TextClient(served.grpc_url, protocol="grpc") as grpc:
            while True:
                with lock:
                    if not work:
                        return
                    i = work.pop()
                prompt = PROMPTS[i % len(PROMPTS)]
                try:
                    text = "".join(grpc.stream(prompt, 4)) if i % 5 == 0 else http.generate(prompt, 4)
                except Exception as exc:  # any failure counts
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                answers.append((prompt, text))

    threads = [threading.Thread(target=client_loop) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert errors == []
    assert len(answers) == 500
    assert all(text == expected[prompt] for prompt, text in answers)


def metric(text: str, name: str, model: str) -> float:
    """Return the value of Prometheus metric `name` for `model` in a /metrics page (0 where absent)."""
    found = re.search(rf'^{name}{{model="{model}"(?:,version="1")?}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.slow
def test_metrics_port_counts_inferences_and_decoding_batches(served):
    import urllib.request

    def page() -> str:
        with urllib.request.urlopen(served.metrics_url, timeout=10) as response:
            return response.read().decode()

    def figures() -> dict:
        text = page()
        names = ("nv_inference_count", "nv_inference_exec_count", "nv_inference_request_success",
                 "aigc_decode_steps_total", "aigc_decode_rows_total")
        return {(n, m): metric(text, n, m) for n in names for m in ("ensemble", "ensemble_stream")}

    def ask(i: int) -> str:
        if i % 2:
            with TextClient(served.http_url) as client:
                return client.generate(PROMPTS[i % len(PROMPTS)], 8)
        with TextClient(served.grpc_url, protocol="grpc") as client:
            return "".join(client.stream(PROMPTS[i % len(PROMPTS)], 8))

    before = figures()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert all(pool.map(ask, range(32)))
    with TextClient(served.http_url) as client, pytest.raises(ServerError):
        client.generate("", 4)
    deadline = time.monotonic() + 10  # statistics are updated just after the responses go out
    while figures()[("nv_inference_count", "ensemble")] < before[("nv_inference_count", "ensemble")] + 17:
        assert time.monotonic() < deadline, "nv_inference_count did not count the requests"
        time.sleep(0.2)
    delta = {key: value - before[key] for key, value in figures().items()}
    # 16 answers + 1 refusal: the python backend's error responses count as completed requests
    assert delta[("nv_inference_count", "ensemble")] == delta[("nv_inference_request_success", "ensemble")] == 17
    assert delta[("nv_inference_exec_count", "ensemble")] < 17  # Triton's dynamic batches
    assert delta[("nv_inference_request_success", "ensemble_stream")] == 16
    for model in ("ensemble", "ensemble_stream"):  # our decoder's counters: concurrent requests shared steps
        steps, rows = delta[("aigc_decode_steps_total", model)], delta[("aigc_decode_rows_total", model)]
        assert steps > 0 and rows / steps > 1, (model, steps, rows)


@pytest.mark.slow
def test_seeded_sampling_draws_what_transformers_draws(served, reference):
    with TextClient(served.http_url) as http, TextClient(served.grpc_url, protocol="grpc") as grpc:
        first = http.generate(PROMPTS[0], 16, temperature=1.0, seed=7)
        assert first == reference(PROMPTS[0], 16, seed=7)
        assert "".join(grpc.stream(PROMPTS[0], 16, temperature=1.0, seed=7)) == first
        assert grpc.generate(PROMPTS[1], 16, temperature=0.7, top_k=40, top_p=0.9, seed=3) == reference(
            PROMPTS[1], 16, seed=3, temperature=0.7, top_k=40, top_p=0.9)
        others = {http.generate(PROMPTS[0], 16, temperature=1.0, seed=s) for s in range(8, 12)}
        assert len(others | {first}) > 1
        assert http.generate(PROMPTS[0], 16, temperature=0.0, seed=7) == reference(PROMPTS[0], 16)


@pytest.mark.slow
def test_stop_words_end_the_answer_before_them(served, reference):
    full = reference(PROMPTS[0], 16)
    stop = full[len(full) // 2: len(full) // 2 + 2]  # two characters from the middle of the answer
    expected = full[: full.index(stop)]
    with TextClient(served.http_url) as http, TextClient(served.grpc_url, protocol="grpc") as grpc:
        assert http.generate(PROMPTS[0], 16, stop=[stop, "never generated"]) == expected
        assert "".join(grpc.stream(PROMPTS[0], 16, stop=[stop])) == expected
        assert http.generate(PROMPTS[0], 16, stop=["never generated"]) == full
        # a stop word at the very start: an empty answer, which a stream still delivers (one empty piece)
        assert http.generate(PROMPTS[0], 16, stop=[full[:2]]) == ""
        assert list(grpc.stream(PROMPTS[0], 16, stop=[full[:2]])) in ([], [""])


@pytest.mark.slow
def test_query_cli_prints_the_answer_or_the_server_error(served, reference, capsys):
    from deploy.cli import query_main

    assert query_main([PROMPTS[1], "--url", served.http_url, "--max-tokens", "6"]) == 0
    assert capsys.readouterr().out == reference(PROMPTS[1], 6) + "\n"
    assert query_main([PROMPTS[1], "--url", served.grpc_url, "--max-tokens", "6", "--stream"]) == 0
    assert capsys.readouterr().out == reference(PROMPTS[1], 6) + "\n"
    assert query_main([PROMPTS[1], "--url", served.http_url, "--max-tokens", "0"]) == 1
    assert "max_tokens must be between 1 and 512, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_openai_client_completes_and_chats_like_transformers(served, reference):
    import openai

    client = openai.OpenAI(base_url=served.openai_url, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["ensemble"]
    answer = client.completions.create(model="ensemble", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert answer.choices[0].text == reference(PROMPTS[0], 12)
    assert answer.usage.prompt_tokens == len(reference.tokenizer(PROMPTS[0])["input_ids"])
    several = client.completions.create(model="ensemble", prompt=PROMPTS[:3], max_tokens=6, temperature=0)
    assert [c.text for c in sorted(several.choices, key=lambda c: c.index)] == [reference(p, 6) for p in PROMPTS[:3]]
    chunks = list(client.completions.create(model="ensemble", prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == reference(PROMPTS[2], 12)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop") and len(chunks) > 2
    # OpenAI's default temperature is 1: with a seed, the sample transformers draws after manual_seed
    sampled = client.completions.create(model="ensemble", prompt=PROMPTS[0], max_tokens=16, seed=7)
    assert sampled.choices[0].text == reference(PROMPTS[0], 16, seed=7)
    full = reference(PROMPTS[0], 16)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = client.completions.create(model="ensemble", prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=stop)
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    empty = list(client.completions.create(model="ensemble", prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                           stop=full[:2], stream=True))  # nothing generated: still an answer
    assert "".join(c.choices[0].text for c in empty) == "" and empty[-1].choices[0].finish_reason == "stop"

    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a class?"}]
    prompt = reference.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat = client.chat.completions.create(model="ensemble", messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == reference(prompt, 10)
    stream = client.chat.completions.create(model="ensemble", messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == reference(prompt, 10)


@pytest.mark.slow
def test_openai_bad_requests_get_4xx_json_errors_and_the_front_keeps_serving(served, reference):
    import httpx
    import openai

    chat_part = [{"type": "image_url", "image_url": {"url": "http://example.invalid/x.png"}}]
    cases = [
        ("completions", {"model": "ensemble", "prompt": "", "max_tokens": 4}, 400, "text_input is empty"),
        ("completions", {"model": "ensemble", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens must be between"),
        ("completions", {"model": "ensemble", "prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens must be between"),
        ("completions", {"model": "ensemble", "prompt": "word " * 200, "max_tokens": 4}, 400,
         "tokens, over the limit of 127 (max_prompt_tokens; the model's context is 128)"),
        ("completions", {"model": "ensemble", "prompt": "word " * 20, "max_tokens": 100}, 400,
         "exceeds the model's context"),
        ("completions", {"model": "ensemble", "prompt": ["hi"] * 33}, 400, "33 prompts in one request"),
        ("completions", {"model": "ensemble", "prompt": "hi", "max_tokens": 0, "stream": True}, 400, "max_tokens must"),
        ("completions", {"model": "ensemble"}, 400, "prompt"),
        ("completions", {"model": "ensemble", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ("completions", {"model": "ensemble", "prompt": ["a", 3]}, 400, "prompt"),
        ("completions", {"model": "ensemble", "prompt": "hi", "temperature": -1}, 400, "temperature"),
        ("completions", {"model": "ensemble", "prompt": "hi", "n": 2}, 400, "n=1"),
        ("completions", {"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
        ("chat/completions", {"model": "ensemble", "messages": []}, 400, "messages"),
        ("chat/completions", {"model": "ensemble", "messages": [{"role": "user", "content": chat_part}]}, 400,
         "text content"),
    ]
    raw_bodies = [b"{not json", b'{"model": "ensemble", "prompt": "\xff\xfe"}']
    with httpx.Client(base_url=served.openai_url, timeout=60) as http:
        for path, body, status, message in cases:
            response = http.post(f"/{path}", json=body)
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            assert message in error["message"] and error["type"] == "invalid_request_error", (body, error)
        for raw in raw_bodies:
            response = http.post("/completions", content=raw, headers={"Content-Type": "application/json"})
            assert response.status_code == 400, (raw, response.text)
            assert "error" in response.json()
    client = openai.OpenAI(base_url=served.openai_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="max_tokens must be between"):
        client.completions.create(model="ensemble", prompt="hi", max_tokens=-1)
    good = client.completions.create(model="ensemble", prompt=PROMPTS[1], max_tokens=6, temperature=0)
    assert good.choices[0].text == reference(PROMPTS[1], 6)


@pytest.mark.slow
def test_openai_front_limits_against_the_real_server(served, repo, reference):
    """A second front, in this process, on the same Triton, with small limits: each one answered with its error."""
    import httpx
    import openai

    from deploy.openai_server import OpenAIServer, ServingLimits, create_app

    limits = ServingLimits(max_body_bytes=4000, max_prompts=2, max_prompt_tokens=16, max_concurrent=2, max_queued=2)
    front = OpenAIServer(create_app(served.http_url, repo, "ensemble", limits))
    front.start()
    try:
        with httpx.Client(base_url=front.base_url, timeout=120) as http:
            big = http.post("/completions", json={"model": "ensemble", "prompt": "x" * 5000})
            assert big.status_code == 413 and "max_body_bytes" in big.json()["error"]["message"]
            many = http.post("/completions", json={"model": "ensemble", "prompt": ["a", "b", "c"]})
            assert many.status_code == 400 and "over the limit of 2 (max_prompts)" in many.json()["error"]["message"]
            long = http.post("/chat/completions", json={"model": "ensemble",
                                                         "messages": [{"role": "user", "content": "word " * 30}]})
            assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"

        async def burst():  # 12 at once: 2 answered, 2 queued, 8 refused with 429
            async with httpx.AsyncClient(base_url=front.base_url, timeout=120) as http:
                body = {"model": "ensemble", "prompt": PROMPTS[0], "max_tokens": 48, "temperature": 0}
                return await asyncio.gather(*(http.post("/completions", json=body) for _ in range(12)))

        responses = asyncio.run(burst())
        served_ok = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code == 429]
        assert len(served_ok) + len(refused) == 12 and len(served_ok) >= 4 and refused, [r.text for r in responses]
        assert all(r.json()["choices"][0]["text"] == reference(PROMPTS[0], 48) for r in served_ok)
        assert "max_concurrent 2" in refused[0].json()["error"]["message"]
        client = openai.OpenAI(base_url=front.base_url, api_key="unused", max_retries=0)
        answer = client.completions.create(model="ensemble", prompt=PROMPTS[1], max_tokens=6, temperature=0)
        assert answer.choices[0].text == reference(PROMPTS[1], 6)  # the front kept serving
    finally:
        assert front.stop() == 0


@pytest.mark.slow
def test_stopping_the_front_drains_streams_in_flight(served, repo, reference):
    import httpx

    from deploy.openai_server import OpenAIServer, ServingLimits, create_app

    front = OpenAIServer(create_app(served.http_url, repo, "ensemble", ServingLimits(drain_timeout_s=60)))
    front.start()
    body = {"model": "ensemble", "prompt": PROMPTS[2], "max_tokens": 100, "temperature": 0, "stream": True}
    events: list[str] = []
    opened = threading.Event()

    def stream():
        with httpx.Client(base_url=front.base_url, timeout=120) as http:
            with http.stream("POST", "/completions", json=body) as response:
                for line in response.iter_lines():
                    opened.set()
                    if line.startswith("data:"):
                        events.append(line[5:].strip())

    reader = threading.Thread(target=stream)
    reader.start()
    assert opened.wait(60)
    stopper = threading.Thread(target=lambda: events.append(f"left={front.stop()}"))
    stopper.start()
    time.sleep(0.2)
    with httpx.Client(base_url=front.base_url, timeout=30) as http:  # while draining: 503, or the socket is closed
        try:
            late = http.post("/completions", json={"model": "ensemble", "prompt": "hi", "max_tokens": 2})
            assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        except httpx.ConnectError:
            pass
    reader.join(120)
    stopper.join(120)
    assert events[-1] == "left=0" and events[-2] == "[DONE]"  # the stream ran to its end
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2])
    assert text == reference(PROMPTS[2], 100)


@pytest.mark.slow
def test_serve_cli_stops_cleanly_on_sigterm(served, repo):
    """Last test of the module using `served`: it stops the shared server."""
    assert len(processes_mentioning(str(repo))) == 4  # aigc serve, tritonserver, two python stubs
    assert list(Path("/dev/shm").glob(served.shm_prefix + "*"))
    assert served.stop() == 0, "".join(served.output)
    assert processes_mentioning(str(repo)) == {}
    assert not Path(served.backend_dir).exists()
    assert not list(Path("/dev/shm").glob(served.shm_prefix + "*"))
    assert "stopping" in "".join(served.output)
    assert f"OpenAI   {served.openai_url}" in "".join(served.output)
    with pytest.raises(OSError):  # the OpenAI front is gone with it
        socket.create_connection(("127.0.0.1", served.openai_port), timeout=2).close()


TRIVIAL_CONFIG = """backend: "python"
max_batch_size: 1
input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]
"""
CRASH_ONCE_MODEL = """import os, signal
from pathlib import Path

class TritonPythonModel:
    def initialize(self, args):
        marker = Path(args["model_repository"]) / "crashed-once"
        if not marker.exists():
            marker.touch()
            os.kill(os.getppid(), signal.SIGABRT)  # the stub's parent is tritonserver
"""
BROKEN_MODEL = """class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("this model refuses to load")
"""


def trivial_repo(root: Path, name: str, model_py: str) -> Path:
    (root / name / "1").mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(TRIVIAL_CONFIG)
    (root / name / "1" / "model.py").write_text(model_py)
    return root


@pytest.mark.slow
def test_server_restarts_after_a_crash_and_reports_a_failed_load(tmp_path):
    from deploy.server import TritonServer, TritonStartError

    repo = trivial_repo(tmp_path / "crash", "crash_once", CRASH_ONCE_MODEL)
    with TritonServer(repo, ready_timeout_s=120) as server:
        assert server.is_running()
    assert (repo / "crash_once" / "crashed-once").exists()  # the first attempt did die
    assert processes_mentioning(str(repo)) == {}

    repo = trivial_repo(tmp_path / "broken", "broken", BROKEN_MODEL)
    server = TritonServer(repo, ready_timeout_s=120)
    with pytest.raises(TritonStartError, match="this model refuses to load") as failure:
        server.start()
    assert "exited with code 1" in str(failure.value)
    assert not server.is_running() and processes_mentioning(str(repo)) == {}


@pytest.mark.slow
def test_a_sigkilled_owner_takes_its_server_stubs_and_files_with_it(tmp_path):
    """SIGKILL of the process (group) that started Triton: its watchdog removes the server, stubs, files."""
    repo = trivial_repo(tmp_path / "orphan", "identity", "class TritonPythonModel:\n    pass\n")
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from deploy.server import TritonServer\n"
         "s = TritonServer(sys.argv[1], ready_timeout_s=120); s.start()\n"
         "print(s._tmp, s._shm_prefix, flush=True); time.sleep(600)", str(repo)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
    tmp, shm_prefix = owner.stdout.readline().split()
    assert len(processes_mentioning(str(repo))) >= 2  # tritonserver and its stub
    assert list(Path("/dev/shm").glob(shm_prefix + "*"))
    os.killpg(owner.pid, signal.SIGKILL)
    owner.wait()
    deadline = time.monotonic() + 30
    while processes_mentioning(str(repo)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(str(repo)) == {}
    assert not Path(tmp).exists() and not list(Path("/dev/shm").glob(shm_prefix + "*"))


@pytest.mark.slow
def test_export_and_serve_stages_through_the_runner(checkpoint, reference, tmp_path):
    from pipeline import manifest as mf
    from pipeline.presets import resolve_configs
    from pipeline.runner import configs_to_json, execute_stage, make_plan

    configs = resolve_configs("smoke", ["serve.prompt=A class", "export.stream_model=false", "export.backend=pytorch"])
    configs_json = configs_to_json(configs)
    # stand in for a completed align stage holding our checkpoint
    align_fp = next(p.fingerprint for p in make_plan(tmp_path, configs) if p.name == "align")
    (tmp_path / "align").mkdir()
    (tmp_path / "align" / "hf").symlink_to(checkpoint, target_is_directory=True)
    mf.write_json_atomic(tmp_path / "align" / mf.MANIFEST, {
        "stage": "align", "status": "completed", "fingerprint": align_fp, "outputs": {"hf": {"path": "hf"}},
    })

    export = execute_stage(str(tmp_path), "export", configs_json)
    assert export["metrics"]["models"] == ["ensemble"]
    # the other engine than the module's default-exported repository: the HF weights in PyTorch
    assert export["metrics"]["backend"] == "pytorch" and "onnx_max_abs_diff" not in export["metrics"]
    assert export["metrics"]["context"] == 128
    repo = tmp_path / "export" / "triton_repo"
    version = repo / "ensemble" / "1"
    assert not (version / "model.onnx").exists() and (version / "hf" / "tokenizer.json").is_file()
    assert (version / "hf" / "model.safetensors").is_file()

    serve = execute_stage(str(tmp_path), "serve", configs_json)
    answer = json.loads((tmp_path / "serve" / "answer.json").read_text())
    assert answer["prompt"] == "A class"
    assert answer["answer"] == reference("A class", 8)  # smoke: serve.max_tokens=8
    assert answer["start_to_ready_s"] > 0 and answer["latency_ms"] > 0
    assert serve["metrics"]["answer"] == answer["answer"]
    log = (tmp_path / "serve" / "triton.log").read_text()
    assert "Started HTTPService at 127.0.0.1:" in log
    assert processes_mentioning(str(repo)) == {}
    backend_dir = re.search(r'"backend-directory":"([^"]+)"', log).group(1)
    assert not Path(backend_dir).exists()
