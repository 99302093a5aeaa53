"""The stage contract: what a stage is, what it receives, what it returns, and the registry.

A stage is a function `run(ctx: StageContext) -> StageResult`. It reads its
inputs through `ctx.input_path(stage, role)`, writes only under `ctx.out_dir`
(a temporary directory renamed into place on success), and returns the roles of
the files it wrote plus its metrics. The runner (pipeline.runner) does the rest:
fingerprints, caching, atomic rename, manifest.

A stage registered with `multi_rank=True` may run as several processes (ranks:
`aigc <stage> --nproc-per-node N`, or a Slurm job with more than one task); the
others refuse a multi-process launch. Every rank then runs the function with
the same `ctx`, but for `ctx.rank`, `ctx.world_size` and `ctx.local_rank`, and
with the default torch.distributed process group already joined. Rank 0 alone
(`ctx.is_main`) prints progress bars and tables and writes the shared outputs;
the other ranks may write their own files under `ctx.out_dir`. The outputs and
metrics recorded are those rank 0 returns; the stage completes only where every
rank returned.

Packages other than `pipeline` register stages here by module path only, so the
pipeline imports them lazily and never directly.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable

# Stage order of the LLM chain (what `aigc run` runs), and the light module that
# defines each registered stage's `STAGES[name]` (config class + path of the run
# function). STAGE_MODULES lists every stage, upstream before downstream; other
# chains (e.g. multimodal recipes) register their stages there too. Heavy imports
# (torch, megatron, ray, tritonclient) belong in the run function's module.
STAGE_ORDER: tuple[str, ...] = (
    "curate",
    "tokenize",
    "pretrain",
    "sft",
    "align",
    "evaluate",
    "export",
    "serve",
)
STAGE_MODULES: dict[str, str] = {
    "curate": "curation.stages",
    "tokenize": "curation.stages",
    "pretrain": "recipes.stages",
    "sft": "recipes.stages",
    "align": "alignment.stages",
    "evaluate": "recipes.stages",
    "export": "deploy.stages",
    "serve": "deploy.stages",
}


@dataclasses.dataclass(frozen=True)
class Stage:
    """A pipeline stage: its name, config class, run function path, upstream stages."""

    name: str
    config_cls: type
    run: str  # "package.module:function", imported only when the stage runs
    inputs: tuple[str, ...] = ()
    code: tuple[str, ...] = ()  # packages/files whose source is in the fingerprint (default: run's package)
    path_fields: tuple[str, ...] = ()  # config fields naming user files; their size+mtime enter the fingerprint
    key_metrics: tuple[str, ...] = ()  # metrics `aigc status` shows first
    multi_rank: bool = False  # runs as N ranks (torchrun/srun); other stages refuse a multi-process launch
    dry_run: str = ""  # "module:function(config, world_size, executor)" -> what `--dry-run` prints for the stage

    def load_run(self) -> Callable[["StageContext"], "StageResult"]:
        """Return the stage's run function (imports its module)."""
        return _load(self.run)

    def load_dry_run(self) -> Callable[[Any, int, str], Any] | None:
        """Return the stage's dry-run description function, or None when it has none."""
        return _load(self.dry_run) if self.dry_run else None


def _load(path: str) -> Callable:
    module, _, func = path.partition(":")
    return getattr(importlib.import_module(module), func)


@dataclasses.dataclass
class StageResult:
    """What a stage returns: output roles -> paths relative to out_dir, and metrics."""

    outputs: dict[str, str]
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StageContext:
    """Everything a running stage may use."""

    name: str
    config: Any
    run_dir: Path
    out_dir: Path  # write here only; renamed to run_dir/name on success
    inputs: dict[str, dict]  # upstream stage name -> its manifest (dict)
    threads: int = 1
    seed: int = 1234
    rank: int = 0  # this process's rank among the stage's world_size processes
    world_size: int = 1
    local_rank: int = 0  # rank on this node (the GPU it uses)

    @property
    def is_main(self) -> bool:
        """Return True on rank 0, the one rank that prints progress and writes shared outputs."""
        return self.rank == 0

    def input_path(self, stage: str, role: str) -> Path:
        """Return the absolute path of output `role` of upstream `stage`."""
        if stage not in self.inputs:
            raise KeyError(f"stage {self.name!r} did not declare {stage!r} as an input")
        outputs = self.inputs[stage]["outputs"]
        if role not in outputs:
            raise KeyError(f"stage {stage!r} has no output {role!r}; it has {sorted(outputs)}")
        return self.run_dir / stage / outputs[role]["path"]

    def input_metrics(self, stage: str) -> dict:
        """Return the metrics recorded by upstream `stage`."""
        return self.inputs[stage].get("metrics", {})


def get_stage(name: str) -> Stage:
    """Return the registered `Stage` called `name`."""
    if name not in STAGE_MODULES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_MODULES)}")
    module = importlib.import_module(STAGE_MODULES[name])
    return getattr(module, "STAGES")[name]


def upstream_closure(names: list[str]) -> list[str]:
    """Return `names` and every stage they depend on, upstream first (registry order)."""
    needed = set(names)
    for name in reversed(list(STAGE_MODULES)):
        if name in needed:
            needed.update(get_stage(name).inputs)
    return [n for n in STAGE_MODULES if n in needed]
