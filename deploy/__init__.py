"""Deployment: export (PyTorch, ONNX with explicit KV cache, TensorRT-LLM), the Triton model repository
and its decoding runtime, server lifecycle, client, and an OpenAI-compatible front."""
