"""Export an HF causal LM to ONNX with an explicit KV cache (past/present tensors).

The graph is deploy.llm_runtime.kv_lm's step function (see there for shapes), exported
with torch.onnx.export(dynamo=True); batch, new-token and cached-position axes are
dynamic, so one file serves prefill (P = 0) and decoding (T = 1) of any batch. The
export is checked at once: ONNX Runtime must reproduce PyTorch's logits and cache on a
left-padded batch with a non-empty past to within PARITY_TOLERANCE (both run fp32 on the
same inputs, so a larger difference means the graph computes something else), else the
export fails with ParityError naming the measured difference.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from deploy.llm_runtime.kv_lm import INPUT_NAMES, ONNX_FILE, OUTPUT_NAMES, ExplicitKVCausalLM, OnnxStep, cache_geometry

PARITY_TOLERANCE = 1e-4  # largest |ONNX Runtime - PyTorch| over fp32 logits and cache an export may show


class ParityError(RuntimeError):
    """The exported ONNX graph does not compute what the PyTorch model computes."""


def example_inputs(geometry: tuple[int, int, int], vocab: int) -> tuple[torch.Tensor, ...]:
    """Return step inputs with batch 2, 3 new tokens and 2 cached positions, the first row
    left padded (sizes above 1, so no axis is specialised to a constant)."""
    layers, heads, head_dim = geometry
    batch, new, past = 2, 3, 2
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, new), generator=generator)
    attention_mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])  # (B, P+T)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
    past_keys = torch.randn(layers, batch, heads, past, head_dim, generator=generator)
    past_values = torch.randn(layers, batch, heads, past, head_dim, generator=generator)
    return input_ids, attention_mask, position_ids, past_keys, past_values


def export_onnx(model, out_dir: Path) -> tuple[Path, float]:
    """Export `model` (an HF causal LM) as `out_dir`/model.onnx (+ its external weights file);
    return (the file, the largest |ONNX Runtime - PyTorch| over logits and cache on example inputs).

    Raises ParityError where that difference is above PARITY_TOLERANCE.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = ExplicitKVCausalLM(model.float()).eval()
    inputs = example_inputs(cache_geometry(model.config), model.config.vocab_size)
    batch, new, past, total = (torch.export.Dim(n) for n in ("batch", "new", "past", "total"))
    dynamic_shapes = (
        {0: batch, 1: new},  # input_ids
        {0: batch, 1: total},  # attention_mask (= past + new)
        {0: batch, 1: new},  # position_ids
        {1: batch, 3: past},  # past_keys
        {1: batch, 3: past},  # past_values
    )
    path = out_dir / ONNX_FILE
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # "torchvision is not installed" and similar chatter, not findings
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # axis renames, deprecations
            torch.onnx.export(
                module, inputs, str(path), dynamo=True, input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES), dynamic_shapes=dynamic_shapes, external_data=True, verbose=False,
            )
    finally:
        exporter_log.setLevel(level)
    difference = parity_difference(path, model)
    check_parity(path, difference)
    return path, difference


def parity_difference(onnx_file: Path, model) -> float:
    """Return the largest |ONNX Runtime - PyTorch| over logits and cache of the graph `onnx_file`
    and the HF causal LM `model` (fp32), on the example inputs."""
    module = ExplicitKVCausalLM(model.float()).eval()
    geometry = cache_geometry(model.config)
    inputs = example_inputs(geometry, model.config.vocab_size)
    with torch.no_grad():
        expected = module(*inputs)
    got = OnnxStep(onnx_file, geometry)(*inputs)
    return max(float((a - b).abs().max()) for a, b in zip(got, expected))


def check_parity(onnx_file: Path, difference: float) -> None:
    """Raise ParityError where `difference` (from parity_difference) is above PARITY_TOLERANCE or not a number."""
    if not difference <= PARITY_TOLERANCE:
        raise ParityError(
            f"ONNX export {onnx_file}: ONNX Runtime differs from PyTorch by {difference:.3g} (largest absolute "
            f"difference of logits and KV cache on the example inputs), above the tolerance {PARITY_TOLERANCE:g}; "
            "the exported graph does not compute what the model does"
        )
