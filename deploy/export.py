"""The `export` stage: the final HF checkpoint, and a Triton model repository that serves it.

Outputs: `hf/` (role `hf`, a copy of the aligned checkpoint) and `triton_repo/`
(role `triton_repo`, see deploy.repository). `backend` picks what the Triton model
runs: the checkpoint in PyTorch, an ONNX export with explicit KV cache in ONNX Runtime,
or a TensorRT-LLM engine (only where TensorRT-LLM imports: it has no PyPI wheel and
needs a GPU; elsewhere the stage stops with that message). Every backend keeps
TensorRT-LLM's ensemble contract, so clients carry over.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text
from safetensors import safe_open

from deploy.repository import write_repository
from pipeline.stage import StageContext, StageResult


def parameter_count(safetensors_file: Path) -> int:
    """Return the number of parameters stored in a safetensors file (reads only its header)."""
    total = 0
    with safe_open(str(safetensors_file), framework="numpy") as f:
        for key in f.keys():
            count = 1
            for dim in f.get_slice(key).get_shape():
                count *= dim
            total += count
    return total


def run(ctx: StageContext) -> StageResult:
    """Copy the aligned checkpoint and write the Triton repository; return roles hf, triton_repo."""
    cfg = ctx.config
    source = ctx.input_path("align", "hf")
    hf_out = ctx.out_dir / "hf"
    repo = ctx.out_dir / "triton_repo"
    for stale in (hf_out, repo):  # a resumed work dir may hold a half-written copy
        shutil.rmtree(stale, ignore_errors=True)
    shutil.copytree(source, hf_out)
    written = write_repository(hf_out, repo, cfg)

    model_config = json.loads((hf_out / "config.json").read_text())
    metrics = {
        "model_name": cfg.model_name,
        **written,
        "parameters": parameter_count(hf_out / "model.safetensors"),
        "context": int(model_config.get("max_position_embeddings", 0)),
        "checkpoint_mb": round(sum(f.stat().st_size for f in hf_out.rglob("*") if f.is_file()) / 2**20, 3),
        "max_batch_size": cfg.max_batch_size,
    }
    table = Table(title="export")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, Text(", ".join(value) if isinstance(value, list) else str(value)))  # paths: not markup
    Console().print(table)
    return StageResult(outputs={"hf": "hf", "triton_repo": "triton_repo"}, metrics=metrics)
