"""Writes a Triton model repository that serves an LLM through the python backend.

Layout (self-contained, so the repository can be moved or copied to another host):

    <repo>/<name>/config.pbtxt          inputs/outputs named like TensorRT-LLM's ensemble
    <repo>/<name>/1/model.py            deploy/templates/model.py
    <repo>/<name>/1/llm_runtime/        deploy/llm_runtime (the decoder model.py runs)
    <repo>/<name>/1/hf/                 the HF checkpoint: tokenizer and config, and the
                                        weights where the backend is pytorch
    <repo>/<name>/1/model.onnx(.data)   backend onnx: the step function with explicit KV cache
    <repo>/<name>/1/engine/             backend tensorrt_llm: the TensorRT-LLM engine
                                        (backend vllm runs the hf/ checkpoint in vLLM's engine)
    <repo>/<name>_stream/config.pbtxt   the same contract, decoupled: one response per new text piece
    <repo>/<name>_stream/1/model.py     the same model.py (+ llm_runtime); its files are ../<name>/1/...

The contract is TensorRT-LLM's ensemble (`text_input`, `max_tokens`, `temperature`,
`top_k`, `top_p`, `random_seed`, `stop_words` -> `text_output`), so one client talks to
this CPU repository and to a TensorRT-LLM repository on GPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from deploy.stages import ExportConfig

MODEL_PY = Path(__file__).parent / "templates" / "model.py"
RUNTIME = Path(__file__).parent / "llm_runtime"
STREAM_SUFFIX = "_stream"
BACKENDS = ("pytorch", "onnx", "tensorrt_llm", "vllm")
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.pt")

# (name, Triton type, dims, optional) of every input, per batch row.
INPUTS: tuple[tuple[str, str, str, bool], ...] = (
    ("text_input", "TYPE_STRING", "[ 1 ]", False),
    ("max_tokens", "TYPE_INT32", "[ 1 ]", False),
    ("temperature", "TYPE_FP32", "[ 1 ]", True),
    ("top_k", "TYPE_INT32", "[ 1 ]", True),
    ("top_p", "TYPE_FP32", "[ 1 ]", True),
    ("random_seed", "TYPE_UINT64", "[ 1 ]", True),
    ("stop_words", "TYPE_STRING", "[ -1 ]", True),
)
OUTPUT = ("text_output", "TYPE_STRING")


def config_pbtxt(name: str, spec: ExportConfig, files: str, decoupled: bool) -> str:
    """Return the config.pbtxt text of model `name` whose model files are in `files` (a path
    relative to the model's directory: the version directory holding hf/, model.onnx, engine/)."""
    inputs = ",\n".join(
        f'  {{ name: "{n}" data_type: {t} dims: {d}{" optional: true" if opt else ""} }}'
        for n, t, d, opt in INPUTS
    )
    params = {
        "backend": spec.backend,
        "checkpoint": f"{files}/hf",
        "max_tokens_limit": str(spec.max_tokens_limit),
        "torch_threads": str(spec.torch_threads),
        "max_queue_size": str(spec.max_queue_size),
    }
    if spec.backend == "onnx":
        from deploy.llm_runtime.kv_lm import ONNX_FILE

        params["weights"] = f"{files}/{ONNX_FILE}"
    elif spec.backend == "tensorrt_llm":
        from deploy.tensorrt_llm_export import ENGINE_DIR

        params["weights"] = f"{files}/{ENGINE_DIR}"
    elif spec.backend == "vllm":
        from deploy.vllm_env import vllm_python_path

        params["python_path"] = vllm_python_path()  # model.py puts it first on sys.path
        params["kv_cache_mib"] = str(spec.vllm_kv_cache_mib)
    parameters = "\n".join(
        f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()
    )
    if decoupled:
        scheduling = "model_transaction_policy { decoupled: true }"
    else:
        scheduling = (f"dynamic_batching {{ max_queue_delay_microseconds: {spec.max_queue_delay_us} "
                      f"default_queue_policy {{ max_queue_size: {spec.max_queue_size} }} }}")
    return (
        f'name: "{name}"\n'
        'backend: "python"\n'
        f"max_batch_size: {spec.max_batch_size}\n"
        f"{scheduling}\n"
        f"input [\n{inputs}\n]\n"
        f'output [\n  {{ name: "{OUTPUT[0]}" data_type: {OUTPUT[1]} dims: [ -1 ] }}\n]\n'
        "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
        f"{parameters}\n"
    )


def write_model_files(hf_dir: Path, version_dir: Path, spec: ExportConfig) -> dict:
    """Write what the backend runs into `version_dir` (hf/, and model.onnx or engine/; pytorch and
    vllm run hf/'s weights); return
    figures of the export (for onnx: `onnx_max_abs_diff`, ONNX Runtime against PyTorch)."""
    if spec.backend in ("pytorch", "vllm"):
        shutil.copytree(hf_dir, version_dir / "hf")
        return {}
    shutil.copytree(hf_dir, version_dir / "hf", ignore=shutil.ignore_patterns(*WEIGHT_FILES))
    if spec.backend == "onnx":
        import torch
        from transformers import AutoModelForCausalLM

        from deploy.onnx_export import export_onnx

        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        _, difference = export_onnx(model, version_dir)
        return {"onnx_max_abs_diff": float(f"{difference:.3g}")}
    from transformers import AutoConfig

    from deploy.tensorrt_llm_export import ENGINE_DIR, build_engine

    context = AutoConfig.from_pretrained(hf_dir).max_position_embeddings
    build_engine(hf_dir, version_dir / ENGINE_DIR, spec.max_batch_size, context)
    return {}


def write_repository(hf_dir: Path, repo_dir: Path, spec: ExportConfig) -> dict:
    """Write the Triton repository for checkpoint `hf_dir` into `repo_dir` (created); return
    {"models": names of the models written, "backend", and the backend's export figures}."""
    if spec.max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1 (dynamic batching), got {spec.max_batch_size}")
    if spec.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {spec.backend!r}")
    for needed in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (Path(hf_dir) / needed).is_file():
            raise FileNotFoundError(f"{hf_dir} is not an HF checkpoint with a tokenizer: {needed} is missing")
    name = spec.model_name
    main = Path(repo_dir) / name
    (main / "1").mkdir(parents=True)
    figures = write_model_files(Path(hf_dir), main / "1", spec)
    _write_code(main / "1")
    (main / "config.pbtxt").write_text(config_pbtxt(name, spec, "1", decoupled=False))
    models = [name]
    if spec.stream_model:
        stream_name = name + STREAM_SUFFIX
        stream = Path(repo_dir) / stream_name
        (stream / "1").mkdir(parents=True)
        _write_code(stream / "1")
        (stream / "config.pbtxt").write_text(config_pbtxt(stream_name, spec, f"../{name}/1", decoupled=True))
        models.append(stream_name)
    return {"models": models, "backend": spec.backend, **figures}


def _write_code(version_dir: Path) -> None:
    """Copy model.py and the llm_runtime package into a model's version directory."""
    shutil.copy(MODEL_PY, version_dir / "model.py")
    shutil.copytree(RUNTIME, version_dir / "llm_runtime", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
