"""The patches megatron-core 0.16.1 needs to train a GPTModel with its own parallel machinery on CPUs.

megatron-core assumes CUDA in a few places that a CPU forward/backward, its
tensor-parallel layers, its pipeline schedules, its DistributedDataParallel and
its optimizer reach. Each shim is the smallest change that lets megatron's own
code run on the CPU with the gloo backend; none re-implements a megatron part:

1. the model-parallel RNG tracker: `model_parallel_cuda_manual_seed` seeds CUDA
   generators. We install the tracker without CUDA state instead
   (`initialize_rng_tracker(inference_rng_tracker=True)`: its `fork()` is a no-op,
   which is exact for us since dropout is 0 and weights are initialised by
   `recipes.sharding`, not inside forks).
2. `parallel_state._GLOBAL_MEMORY_BUFFER`: core attention asks it for its score
   buffer, which `GlobalMemoryBuffer` allocates on `torch.cuda.current_device()`.
   We put a subclass there that allocates on the CPU.
3. A CPU view of `torch` for the megatron modules in `CUDA_MODULES`: they read
   `torch.cuda.current_device()` (RoPE's `inv_freq`, the KV cache, the p2p
   receive buffers of the pipeline schedules, DDP's grad buffers, tensor-parallel
   gathers), create tensors with `device="cuda"` (the schedules' token counter,
   the optimizer's loss scale, the grad-norm reduction) or call
   `torch.cuda.synchronize()` (p2p). Each such module gets a `torch` whose
   `cuda.current_device()` answers "cpu", whose `cuda.synchronize()` does
   nothing, and whose tensor factories put `device="cuda"` tensors on the CPU;
   everything else is torch's, and the real `torch.cuda` is left alone.
4. `clip_grad_by_total_norm_fp32` asserts every gradient is a
   `torch.cuda.FloatTensor`. The optimizer gets the same scaling (grads times
   max_norm / (total_norm + 1e-6) when below 1) without the assertion.

`apply_cpu_shims()` applies them only when CUDA is absent. `check_cpu_shims()`
fails loudly when a megatron-core upgrade moves what they patch.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import operator
import types
from functools import reduce
from importlib.metadata import version

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import clip_grads
from megatron.core.optimizer import optimizer as mcore_optimizer
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.utils import GlobalMemoryBuffer

PATCHED_MCORE_VERSION = "0.16.1"

# The megatron modules that get the CPU view of torch (shim 3), each with a line of its source the shim answers.
CUDA_MODULES: dict[str, str] = {
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "torch.cuda.current_device()",
    "megatron.core.transformer.attention": "torch.cuda.current_device()",
    "megatron.core.tensor_parallel.layers": "torch.cuda.current_device()",
    "megatron.core.tensor_parallel.mappings": "torch.cuda.current_device()",
    "megatron.core.pipeline_parallel.schedules": 'device="cuda"',
    "megatron.core.pipeline_parallel.p2p_communication": "torch.cuda.synchronize()",
    "megatron.core.distributed.param_and_grad_buffer": "torch.cuda.current_device()",
    "megatron.core.optimizer.optimizer": "device='cuda'",
    "megatron.core.optimizer.clip_grads": "device='cuda'",
    "megatron.core.utils": 'device="cuda"',
}
FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange")


class CPUGlobalMemoryBuffer(GlobalMemoryBuffer):
    """A `GlobalMemoryBuffer` that keeps its buffers in CPU memory."""

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        """Return a CPU view of shape `tensor_shape` into the named reusable buffer."""
        required_len = reduce(operator.mul, tensor_shape, 1)
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < required_len:
            buf = torch.empty(required_len, dtype=dtype, device="cpu", requires_grad=False)
            self.buffer[(name, dtype)] = buf
        return buf[0:required_len].view(*tensor_shape)


class _CPUCuda(types.SimpleNamespace):
    """Stands in for `torch.cuda` inside the modules of CUDA_MODULES: the current device is the CPU."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(device=None):
        return None


def _on_cpu(factory):
    """Return `factory` (e.g. torch.zeros) with a CUDA `device` argument replaced by the CPU."""

    @functools.wraps(factory)
    def create(*args, **kwargs):
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return create


class _TorchWithCPUCuda(types.ModuleType):
    """Stands in for `torch` inside the modules of CUDA_MODULES; everything but `.cuda` and CUDA devices is torch's."""

    cuda = _CPUCuda()

    def __getattr__(self, name):
        value = getattr(torch, name)
        return _on_cpu(value) if name in FACTORIES else value


def clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False) -> None:
    """Scale the gradients of `parameters` in place as megatron's `clip_grad_by_total_norm_fp32`, on any device."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def apply_cpu_shims() -> bool:
    """Apply the CPU shims when CUDA is absent; return whether they were applied.

    Call after `parallel_state.initialize_model_parallel` (it installs the memory
    buffer that shim 2 replaces).
    """
    if torch.cuda.is_available():
        return False
    mcore_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    parallel_state._GLOBAL_MEMORY_BUFFER = CPUGlobalMemoryBuffer()
    for name in CUDA_MODULES:
        importlib.import_module(name).torch = _TorchWithCPUCuda("torch")
    mcore_optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_cpu
    return True


def check_cpu_shims() -> None:
    """Raise RuntimeError if megatron-core no longer has what the shims patch, as they patch it."""
    problems = []
    if version("megatron-core") != PATCHED_MCORE_VERSION:
        problems.append(
            f"megatron-core is {version('megatron-core')}, the shims were written for {PATCHED_MCORE_VERSION}"
        )
    params = inspect.signature(mcore_random.initialize_rng_tracker).parameters
    if not {"inference_rng_tracker", "force_reset"} <= set(params):
        problems.append("initialize_rng_tracker lost its inference_rng_tracker/force_reset arguments")
    if not hasattr(parallel_state, "_GLOBAL_MEMORY_BUFFER"):
        problems.append("parallel_state._GLOBAL_MEMORY_BUFFER is gone")
    if "torch.cuda.current_device()" not in inspect.getsource(GlobalMemoryBuffer.get_tensor):
        problems.append("GlobalMemoryBuffer.get_tensor no longer allocates on torch.cuda.current_device()")
    base_params = list(inspect.signature(GlobalMemoryBuffer.get_tensor).parameters)
    shim_params = list(inspect.signature(CPUGlobalMemoryBuffer.get_tensor).parameters)
    if base_params != shim_params:
        problems.append(f"GlobalMemoryBuffer.get_tensor{base_params} differs from the shim's {shim_params}")
    for name, line in CUDA_MODULES.items():
        if line not in inspect.getsource(importlib.import_module(name)):
            problems.append(f"{name} no longer has {line!r}: review its CPU shim")
    if "torch.cuda.FloatTensor" not in inspect.getsource(clip_grads.clip_grad_by_total_norm_fp32):
        problems.append("clip_grad_by_total_norm_fp32 no longer asserts CUDA gradients: review its CPU shim")
    if not hasattr(mcore_optimizer, "clip_grad_by_total_norm_fp32"):
        problems.append("megatron.core.optimizer.optimizer no longer calls clip_grad_by_total_norm_fp32")
    if problems:
        raise RuntimeError("megatron-core CPU shims are out of date:\n  " + "\n  ".join(problems))
