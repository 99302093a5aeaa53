"""A causal LM as one function with its KV cache in explicit tensors, run by PyTorch or ONNX Runtime.

    step(input_ids (B, T), attention_mask (B, P+T), position_ids (B, T), past_keys, past_values)
        -> logits (B, V) of the last position, present_keys, present_values

past/present keys and values are (L, B, H_kv, P, D) (L layers, H_kv key-value heads, P cached
positions, D head size); present has P+T positions. Rows are left padded: attention_mask is 0
on padding, position_ids count a row's real tokens. The same signature is what the ONNX export
has, so the decoder does not know which backend runs it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache

ONNX_FILE = "model.onnx"  # the exported step function; its weights lie beside it
INPUT_NAMES = ("input_ids", "attention_mask", "position_ids", "past_keys", "past_values")
OUTPUT_NAMES = ("logits", "present_keys", "present_values")


class ExplicitKVCausalLM(torch.nn.Module):
    """An HF causal LM whose forward takes and returns the KV cache as stacked tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval()
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, past_keys, past_values):
        """Return (logits (B, V) of the last position, present_keys, present_values (L, B, H, P+T, D))."""
        cache = DynamicCache(config=self.model.config)
        for layer in range(self.layers):
            cache.update(past_keys[layer], past_values[layer], layer)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        keys = torch.stack([layer.keys for layer in out.past_key_values.layers])  # (L, B, H, P+T, D)
        values = torch.stack([layer.values for layer in out.past_key_values.layers])
        return out.logits[:, -1, :], keys, values


def cache_geometry(config) -> tuple[int, int, int]:
    """Return (layers, key-value heads, head size) of an HF model config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


class TorchStep:
    """The step function run by PyTorch in this process (the `pytorch` backend)."""

    def __init__(self, hf_dir: Path, threads: int = 1):
        torch.set_num_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        self.module = ExplicitKVCausalLM(model)
        self.geometry = cache_geometry(model.config)

    def __call__(self, input_ids, attention_mask, position_ids, past_keys, past_values):
        """Return (logits (B, V), present_keys, present_values) as torch tensors."""
        with torch.inference_mode():
            return self.module(input_ids, attention_mask, position_ids, past_keys, past_values)


class OnnxStep:
    """The step function run by ONNX Runtime from `model.onnx` (the `onnx` backend)."""

    def __init__(self, onnx_file: Path, geometry: tuple[int, int, int], threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        self.geometry = geometry

    def __call__(self, input_ids, attention_mask, position_ids, past_keys, past_values):
        """Return (logits (B, V), present_keys, present_values) as torch tensors."""
        feed = {
            name: np.ascontiguousarray(tensor.numpy())
            for name, tensor in zip(INPUT_NAMES, (input_ids, attention_mask, position_ids, past_keys, past_values))
        }
        return tuple(torch.from_numpy(a) for a in self.session.run(list(OUTPUT_NAMES), feed))


def load_step(backend: str, hf_dir: Path, onnx_file: Path | None = None, threads: int = 1):
    """Return the step function of `backend`: "pytorch" runs the HF checkpoint `hf_dir`; "onnx"
    runs `onnx_file`, with the cache geometry read from `hf_dir`'s config."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if backend == "pytorch":
        return TorchStep(hf_dir, threads)
    if backend == "onnx":
        from transformers import AutoConfig

        torch.set_num_threads(threads)  # the decoder's own tensor work
        return OnnxStep(Path(onnx_file), cache_geometry(AutoConfig.from_pretrained(hf_dir)), threads)
    raise ValueError(f"unknown backend {backend!r}: pytorch or onnx (tensorrt_llm runs its own decoder)")


def empty_cache(geometry: tuple[int, int, int], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return empty past keys and values (L, batch, H, 0, D)."""
    layers, heads, head_dim = geometry
    empty = torch.zeros(layers, batch, heads, 0, head_dim)
    return empty, empty.clone()
