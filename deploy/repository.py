"""Writes a Triton model repository that serves an HF causal LM through the python backend.

Layout (self-contained, so the repository can be moved or copied to another host):

    <repo>/<name>/config.pbtxt          inputs/outputs named like TensorRT-LLM's ensemble
    <repo>/<name>/1/model.py            deploy/templates/model.py
    <repo>/<name>/1/hf/                 the HF checkpoint (config, safetensors, tokenizer)
    <repo>/<name>_stream/config.pbtxt   the same contract, decoupled: one response per new text piece
    <repo>/<name>_stream/1/model.py     the same model.py; its checkpoint is ../<name>/1/hf

The contract is TensorRT-LLM's ensemble (`text_input`, `max_tokens`, `temperature`,
`top_k`, `top_p`, `random_seed` -> `text_output`), so one client talks to this CPU
repository and to a TensorRT-LLM repository on GPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from deploy.stages import ExportConfig

MODEL_PY = Path(__file__).parent / "templates" / "model.py"
STREAM_SUFFIX = "_stream"

# (name, Triton type, optional) of every input; every tensor has dims [1] per batch row.
INPUTS: tuple[tuple[str, str, bool], ...] = (
    ("text_input", "TYPE_STRING", False),
    ("max_tokens", "TYPE_INT32", False),
    ("temperature", "TYPE_FP32", True),
    ("top_k", "TYPE_INT32", True),
    ("top_p", "TYPE_FP32", True),
    ("random_seed", "TYPE_UINT64", True),
)
OUTPUT = ("text_output", "TYPE_STRING")


def config_pbtxt(name: str, spec: ExportConfig, checkpoint: str, decoupled: bool) -> str:
    """Return the config.pbtxt text of model `name` whose checkpoint is at `checkpoint`
    (a path relative to the model's directory)."""
    inputs = ",\n".join(
        f'  {{ name: "{n}" data_type: {t} dims: [ 1 ]{" optional: true" if opt else ""} }}'
        for n, t, opt in INPUTS
    )
    params = {
        "checkpoint": checkpoint,
        "max_tokens_limit": str(spec.max_tokens_limit),
        "torch_threads": str(spec.torch_threads),
    }
    parameters = "\n".join(
        f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()
    )
    if decoupled:
        scheduling = "model_transaction_policy { decoupled: true }"
    else:
        scheduling = f"dynamic_batching {{ max_queue_delay_microseconds: {spec.max_queue_delay_us} }}"
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


def write_repository(hf_dir: Path, repo_dir: Path, spec: ExportConfig) -> list[str]:
    """Write the Triton repository for checkpoint `hf_dir` into `repo_dir` (created);
    return the names of the models written."""
    if spec.max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1 (dynamic batching), got {spec.max_batch_size}")
    for needed in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (Path(hf_dir) / needed).is_file():
            raise FileNotFoundError(f"{hf_dir} is not an HF checkpoint with a tokenizer: {needed} is missing")
    name = spec.model_name
    main = Path(repo_dir) / name
    (main / "1").mkdir(parents=True)
    shutil.copytree(hf_dir, main / "1" / "hf")
    shutil.copy(MODEL_PY, main / "1" / "model.py")
    (main / "config.pbtxt").write_text(config_pbtxt(name, spec, "1/hf", decoupled=False))
    models = [name]
    if spec.stream_model:
        stream_name = name + STREAM_SUFFIX
        stream = Path(repo_dir) / stream_name
        (stream / "1").mkdir(parents=True)
        shutil.copy(MODEL_PY, stream / "1" / "model.py")
        checkpoint = f"../{name}/1/hf"
        (stream / "config.pbtxt").write_text(config_pbtxt(stream_name, spec, checkpoint, decoupled=True))
        models.append(stream_name)
    return models
