"""The four patches megatron-core 0.16.1 needs to train and decode a GPTModel on a CPU-only machine.

megatron-core assumes CUDA in three places that a CPU forward/backward reaches,
and in a fourth that decoding with a KV cache reaches:

1. the model-parallel RNG tracker: `model_parallel_cuda_manual_seed` seeds CUDA
   generators. We install the tracker without CUDA state instead
   (`initialize_rng_tracker(inference_rng_tracker=True)`: its `fork()` is a no-op,
   which is exact for us since dropout is 0 and there is no tensor parallelism).
2. `parallel_state._GLOBAL_MEMORY_BUFFER`: core attention asks it for its score
   buffer, which `GlobalMemoryBuffer` allocates on `torch.cuda.current_device()`.
   We put a subclass there that allocates on the CPU.
3. `RotaryEmbedding.get_emb` moves `inv_freq` to `torch.cuda.current_device()`.
   We give the rotary module (only it) a `torch` whose `cuda.current_device()`
   answers "cpu"; the real `torch.cuda` is left alone for everyone else.
4. `Attention._allocate_memory` puts the KV cache of a `StaticInferenceContext`
   on `torch.cuda.current_device()`: the attention module gets the same `torch`.

`apply_cpu_shims()` applies them only when CUDA is absent. `check_cpu_shims()`
fails loudly when a megatron-core upgrade moves what they patch.
"""

from __future__ import annotations

import inspect
import operator
import types
from functools import reduce
from importlib.metadata import version

import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings import rotary_pos_embedding
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer import attention
from megatron.core.utils import GlobalMemoryBuffer

PATCHED_MCORE_VERSION = "0.16.1"


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
    """Stands in for `torch.cuda` inside the rotary and attention modules: the current device is the CPU."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"


class _TorchWithCPUCuda(types.ModuleType):
    """Stands in for `torch` inside the rotary and attention modules; everything but `.cuda` is torch's."""

    cuda = _CPUCuda()

    def __getattr__(self, name):
        return getattr(torch, name)


def apply_cpu_shims() -> bool:
    """Apply the four CPU shims when CUDA is absent; return whether they were applied.

    Call after `parallel_state.initialize_model_parallel` (it installs the memory
    buffer that shim 2 replaces).
    """
    if torch.cuda.is_available():
        return False
    mcore_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    parallel_state._GLOBAL_MEMORY_BUFFER = CPUGlobalMemoryBuffer()
    rotary_pos_embedding.torch = _TorchWithCPUCuda("torch")
    attention.torch = _TorchWithCPUCuda("torch")
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
    get_emb = inspect.getsource(rotary_pos_embedding.RotaryEmbedding.get_emb)
    if "torch.cuda.current_device()" not in get_emb:
        problems.append("RotaryEmbedding.get_emb no longer moves inv_freq to torch.cuda.current_device()")
    if "torch.cuda.current_device()" not in inspect.getsource(attention.Attention._allocate_memory):
        problems.append("Attention._allocate_memory no longer allocates the KV cache on torch.cuda.current_device()")
    if problems:
        raise RuntimeError("megatron-core CPU shims are out of date:\n  " + "\n  ".join(problems))
