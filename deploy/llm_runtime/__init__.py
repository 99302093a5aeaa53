"""The decoding runtime behind our Triton models: explicit-KV forward steps, token choice,
detokenization and a continuously batching decoder.

Self-contained (torch, numpy, transformers, and onnxruntime or tensorrt_llm where the backend
needs them; nothing from aigc): the repository writer copies this package next to each
model.py, and aigc's tests and benchmarks import it as deploy.llm_runtime.
"""
