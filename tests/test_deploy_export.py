"""Tests of deploy's export backends and decoding runtime, in process (no server).

ONNX export with an explicit KV cache decoded by ONNX Runtime, the continuously batching
decoder on PyTorch and ONNX Runtime, token choice and detokenization with stop strings, all
compared with transformers' generate() on the same tiny random checkpoint; and the
TensorRT-LLM backend, which runs only where tensorrt_llm imports (skipped elsewhere).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from test_deploy import PROMPTS, build_checkpoint  # noqa: E402

from deploy.llm_runtime.batch_decoder import BatchDecoder, Request  # noqa: E402
from deploy.llm_runtime.kv_lm import INPUT_NAMES, OUTPUT_NAMES, OnnxStep, TorchStep, cache_geometry  # noqa: E402
from deploy.llm_runtime.sampling import sampling_for  # noqa: E402
from deploy.llm_runtime.text_stream import TextStream  # noqa: E402
from deploy.tensorrt_llm_export import tensorrt_llm_missing  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def hf(checkpoint):
    """Return (tokenizer, model) of the checkpoint, fp32, one thread."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    return (AutoTokenizer.from_pretrained(checkpoint),
            AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval())


def generate_ids(hf, prompt: str, max_tokens: int, seed: int | None = None, **sampling) -> list[int]:
    """Return transformers' generate() new token ids (cut at eos): greedy, or sampled after
    torch.manual_seed(seed) with temperature/top_k/top_p."""
    import torch

    tok, model = hf
    enc = tok(prompt, return_tensors="pt")
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=seed is not None,
                             pad_token_id=tok.pad_token_id, **sampling)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    return new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new


def generate_text(hf, prompt: str, max_tokens: int, **kw) -> str:
    return hf[0].decode(generate_ids(hf, prompt, max_tokens, **kw), skip_special_tokens=True)


@pytest.fixture(scope="module")
def onnx_file(hf, tmp_path_factory):
    from deploy.onnx_export import export_onnx

    path, difference = export_onnx(hf[1], tmp_path_factory.mktemp("onnx"))
    assert difference < 1e-4, difference
    return path


def decoder_for(step, tok, **kw) -> BatchDecoder:
    return BatchDecoder(step, tok, tok.eos_token_id, tok.pad_token_id, **kw)


@pytest.mark.slow
def test_onnx_graph_has_explicit_kv_cache_with_dynamic_axes(onnx_file, hf):
    import onnx

    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    assert [i.name for i in graph.input] == list(INPUT_NAMES)
    assert [o.name for o in graph.output] == list(OUTPUT_NAMES)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(graph.input) + list(graph.output)}
    layers, heads, head_dim = cache_geometry(hf[1].config)
    assert isinstance(dims["input_ids"][0], str) and isinstance(dims["input_ids"][1], str)  # batch, new tokens
    past = dims["past_keys"]
    assert past[0] == layers and past[2] == heads and past[4] == head_dim
    assert isinstance(past[1], str) and isinstance(past[3], str)  # batch, cached positions
    assert dims["present_keys"][3] != past[3]  # grows by the new tokens
    assert dims["logits"][1] == hf[1].config.vocab_size


@pytest.mark.slow
def test_an_onnx_graph_that_disagrees_with_pytorch_fails_the_parity_check(onnx_file, hf, tmp_path):
    """The exported graph with one weight perturbed in its initializers: the check measures it and fails."""
    import re

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from deploy.onnx_export import PARITY_TOLERANCE, ParityError, check_parity, parity_difference

    graph = onnx.load(str(onnx_file))  # with its external weights
    floats = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    weight = max(floats, key=lambda t: int(np.prod(t.dims)))
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + np.float32(0.05), weight.name))
    perturbed = tmp_path / "model.onnx"
    onnx.save(graph, str(perturbed), save_as_external_data=True, location="model.onnx.data")

    difference = parity_difference(perturbed, hf[1])
    assert difference > PARITY_TOLERANCE
    with pytest.raises(ParityError, match=re.escape(f"differs from PyTorch by {difference:.3g}")):
        check_parity(perturbed, difference)
    with pytest.raises(ParityError, match="nan"):
        check_parity(perturbed, float("nan"))
    check_parity(onnx_file, parity_difference(onnx_file, hf[1]))  # the real export passes


@pytest.mark.slow
def test_onnx_runtime_decodes_the_tokens_of_pytorch_greedy(onnx_file, hf):
    """Token by token with past/present tensors in ONNX Runtime == generate()'s greedy tokens."""
    import torch

    tok, model = hf
    step = OnnxStep(onnx_file, cache_geometry(model.config))
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        layers, heads, head_dim = step.geometry
        keys = values = torch.zeros(layers, 1, heads, 0, head_dim)
        tokens, inputs, position = [], torch.tensor([ids]), 0
        for _ in range(16):
            width = inputs.shape[1]
            mask = torch.ones(1, keys.shape[3] + width, dtype=torch.long)
            positions = torch.arange(position, position + width)[None]
            logits, keys, values = step(inputs, mask, positions, keys, values)
            token = int(logits.argmax(-1))
            if token == tok.eos_token_id:
                break
            tokens.append(token)
            inputs, position = torch.tensor([[token]]), position + width
        assert tokens == generate_ids(hf, prompt, 16), prompt


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pytorch", "onnx"])
def test_batch_decoder_answers_like_generate(backend, checkpoint, onnx_file, hf):
    """A batch of prompts of different lengths and max_tokens, greedy and seeded sampling mixed."""
    tok, model = hf
    step = TorchStep(checkpoint) if backend == "pytorch" else OnnxStep(onnx_file, cache_geometry(model.config))
    requests, expected = [], []
    for i, prompt in enumerate(PROMPTS):
        ids = tok(prompt)["input_ids"]
        requests.append(Request(ids, 3 + 4 * i))
        expected.append(generate_text(hf, prompt, 3 + 4 * i))
        sampling = {"temperature": 0.8, "top_k": 20, "top_p": 0.9}
        requests.append(Request(ids, 12, sampling_for(**sampling), seed=100 + i))
        expected.append(generate_text(hf, prompt, 12, seed=100 + i, **sampling))
    rows = []
    texts = decoder_for(step, tok, on_step=rows.append).complete(requests)
    assert texts == expected
    assert max(rows) == len(requests) and min(rows) < max(rows)  # one batch, finished rows leave it


@pytest.mark.slow
def test_requests_join_a_running_batch_and_stream_their_text(checkpoint, hf):
    """Continuous batching: requests submitted while others decode join the same batch."""
    tok, _ = hf
    rows: list[int] = []
    decoder = decoder_for(TorchStep(checkpoint), tok, on_step=rows.append)
    decoder.start()
    pieces: dict[int, list[str]] = {i: [] for i in range(len(PROMPTS))}
    done: dict[int, str] = {}
    finished = threading.Semaphore(0)
    try:
        for i, prompt in enumerate(PROMPTS):
            decoder.submit(Request(tok(prompt)["input_ids"], 40, on_piece=pieces[i].append,
                                   on_done=lambda text, i=i: (done.__setitem__(i, text), finished.release())))
            time.sleep(0.01)
        assert all(finished.acquire(timeout=60) for _ in PROMPTS)
    finally:
        decoder.stop()
    for i, prompt in enumerate(PROMPTS):
        assert done[i] == generate_text(hf, prompt, 40) == "".join(pieces[i])
        assert len(pieces[i]) > 1
    assert max(rows) > 1


def test_sampling_settings_are_checked():
    assert sampling_for(None, None, None) is None
    assert sampling_for(0.0, 50, 0.5) is None  # temperature 0 is greedy
    assert sampling_for(None, 5, None).top_k == 5
    for bad, message in [((-1.0, None, None), "temperature"), ((None, -2, None), "top_k"),
                         ((None, None, 1.5), "top_p"), ((None, None, 0.0), "top_p")]:
        with pytest.raises(ValueError, match=message):
            sampling_for(*bad)


def test_text_stream_cuts_at_stop_strings_across_tokens(hf):
    tok, _ = hf
    text = "The for statement is used to iterate"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for stop, expected in [(("statement",), "The for "), (("nowhere",), text), (("is", "for"), "The ")]:
        stream = TextStream(tok, stop)
        pieces = []
        for token in ids:
            pieces.append(stream.push(token))
            if stream.stopped:
                break
        pieces.append(stream.finish())
        assert "".join(pieces) == stream.text == expected, stop
        assert not any(s in "".join(pieces) for s in stop)
    plain = TextStream(tok)  # neither streaming nor stop strings: decoded once at the end
    assert [plain.push(t) for t in ids] == [""] * len(ids) and plain.finish() == text


def test_tensorrt_llm_backend_is_refused_with_a_clear_message_where_missing(checkpoint, tmp_path):
    from deploy.repository import write_repository
    from deploy.stages import ExportConfig

    missing = tensorrt_llm_missing()
    if missing is None:
        pytest.skip("TensorRT-LLM is installed here: see test_tensorrt_llm_engine_is_built")
    with pytest.raises(RuntimeError, match="export backend tensorrt_llm: TensorRT-LLM"):
        write_repository(checkpoint, tmp_path / "repo", ExportConfig(backend="tensorrt_llm"))


@pytest.mark.skipif(tensorrt_llm_missing() is not None, reason=f"TensorRT-LLM backend: {tensorrt_llm_missing()}")
def test_tensorrt_llm_engine_is_built_and_decodes_like_generate(checkpoint, hf, tmp_path):
    from deploy.llm_runtime.trtllm_runner import TensorRTLLMRunner
    from deploy.repository import write_repository
    from deploy.stages import ExportConfig

    written = write_repository(checkpoint, tmp_path / "repo", ExportConfig(backend="tensorrt_llm"))
    version = tmp_path / "repo" / "ensemble" / "1"
    assert written["backend"] == "tensorrt_llm" and (version / "engine").is_dir()
    tok, _ = hf
    runner = TensorRTLLMRunner(version / "engine", version / "hf", tok.eos_token_id, tok.pad_token_id)
    try:
        texts = runner.complete([Request(tok(p)["input_ids"], 8) for p in PROMPTS])
    finally:
        runner.stop()
    assert texts == [generate_text(hf, p, 8) for p in PROMPTS]
