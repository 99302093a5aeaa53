"""Build a TensorRT-LLM engine from the HF checkpoint (the `tensorrt_llm` export backend).

TensorRT-LLM comes from NVIDIA's package index or containers, never PyPI, and needs a GPU:
on machines without it, `tensorrt_llm_missing()` says why and the export stage stops with
that message. The engine is built with the LLM API (the same engine `trtllm-build` makes)
and served by our Triton model through deploy.llm_runtime.trtllm_runner, behind the same
text_input/max_tokens -> text_output contract as TensorRT-LLM's own ensemble.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from deploy.llm_runtime.trtllm_runner import engine_llm_class

ENGINE_DIR = "engine"


def tensorrt_llm_missing() -> str | None:
    """Return why the tensorrt_llm backend cannot run here, or None where it can."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return ("TensorRT-LLM is not installed (it is published on NVIDIA's package index and in NGC "
                "containers, not as a PyPI wheel, and needs an NVIDIA GPU); export with "
                "export.backend=pytorch or export.backend=onnx instead")
    try:
        import torch

        if not torch.cuda.is_available():
            return "TensorRT-LLM needs an NVIDIA GPU and torch sees none"
    except ImportError:
        return "TensorRT-LLM needs torch with CUDA"
    return None


def build_engine(hf_dir: Path, engine_dir: Path, max_batch_size: int, max_seq_len: int) -> Path:
    """Build and save a TensorRT-LLM engine for checkpoint `hf_dir` in `engine_dir`; return it.
    Raises RuntimeError with tensorrt_llm_missing()'s message where TensorRT-LLM cannot run."""
    missing = tensorrt_llm_missing()
    if missing:
        raise RuntimeError(f"export backend tensorrt_llm: {missing}")
    from tensorrt_llm.llmapi import BuildConfig

    build_config = BuildConfig(max_batch_size=max_batch_size, max_seq_len=max_seq_len, max_input_len=max_seq_len)
    llm = engine_llm_class()(model=str(hf_dir), build_config=build_config)
    try:
        llm.save(str(engine_dir))
    finally:
        llm.shutdown()
    return Path(engine_dir)
