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

The registry: each package declares its stages in a light module (no torch,
megatron, ray imports) named by an entry point of the group `aigc.stages` in
pyproject.toml. That module holds `STAGES` (name -> Stage) and may hold `CHAINS`
(chain name -> stage names in run order), `COMMANDS` (CLI command ->
("module:function", help)) and `PRESETS` (named config -> its overrides of the
package's stages). The pipeline reads them through `load_registry()` and names
no stage itself; `aigc run` runs the chain `llm`.
"""

from __future__ import annotations

import dataclasses
import importlib
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

ENTRY_POINT_GROUP = "aigc.stages"
DEFAULT_CHAIN = "llm"  # what `aigc run` runs


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


@dataclasses.dataclass(frozen=True)
class Registry:
    """Every registered stage (upstream before downstream), the chains, commands and presets they declare."""

    stages: dict[str, Stage]
    chains: dict[str, tuple[str, ...]]
    commands: dict[str, tuple[str, str]]  # command -> ("module:function", help)
    presets: dict[str, list[str]]  # named config -> overrides, every package's together

    def chain(self, name: str = DEFAULT_CHAIN) -> tuple[str, ...]:
        """Return the stage names of chain `name`, in run order."""
        if name not in self.chains:
            raise KeyError(f"unknown chain {name!r}; chains: {', '.join(self.chains)}")
        return self.chains[name]


_active: Registry | None = None  # loaded on first use; `install` replaces it


def build_registry(modules: list[str]) -> Registry:
    """Return the Registry of the stage modules `modules` (their STAGES, CHAINS, COMMANDS, PRESETS)."""
    stages: dict[str, Stage] = {}
    chains: dict[str, tuple[str, ...]] = {}
    commands: dict[str, tuple[str, str]] = {}
    presets: dict[str, list[str]] = {}
    for path in modules:
        module = importlib.import_module(path)
        for name, stage in module.STAGES.items():
            if name in stages:
                raise ValueError(f"stage {name!r} is registered twice (again by {path})")
            stages[name] = stage
        chains.update(getattr(module, "CHAINS", {}))
        commands.update(getattr(module, "COMMANDS", {}))
        for preset, overrides in getattr(module, "PRESETS", {}).items():
            presets.setdefault(preset, []).extend(overrides)
    for chain, names in chains.items():
        for i, name in enumerate(names):
            if name not in stages:
                raise ValueError(f"chain {chain!r} names {name!r}, which no stage module registers")
            late = [up for up in stages[name].inputs if up not in names[:i]]
            if late:
                raise ValueError(f"chain {chain!r}: {name!r} needs {late}, which do not come before it")
    ordered: dict[str, Stage] = {}  # the LLM chain first, other chains next, each stage after its inputs

    def visit(name: str, needed_by: str) -> None:
        if name not in stages:
            raise ValueError(f"stage {needed_by!r} needs {name!r}, which no stage module registers")
        if name not in ordered:
            for up in stages[name].inputs:
                visit(up, name)
            ordered[name] = stages[name]

    for name in [*chains.get(DEFAULT_CHAIN, ()), *(n for names in chains.values() for n in names), *stages]:
        visit(name, name)
    return Registry(ordered, chains, commands, presets)


def load_registry() -> Registry:
    """Return the registry of every stage module named by an `aigc.stages` entry point (loaded once)."""
    global _active
    if _active is None:
        found = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
        if not found:
            raise RuntimeError(f"no stage module is registered under the entry points {ENTRY_POINT_GROUP!r}: "
                               "reinstall aigc (`pip install -e .`)")
        _active = build_registry([ep.value for ep in found])
    return _active


def install(modules: list[str]) -> Registry:
    """Replace the registry with that of `modules` (e.g. toy stages in tests); return it."""
    global _active
    _active = build_registry(modules)
    return _active


def get_stage(name: str) -> Stage:
    """Return the registered `Stage` called `name`."""
    stages = load_registry().stages
    if name not in stages:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(stages)}")
    return stages[name]


def upstream_closure(names: list[str]) -> list[str]:
    """Return `names` and every stage they depend on, upstream first (registry order)."""
    stages = load_registry().stages
    needed = set(names)
    for name in reversed(list(stages)):
        if name in needed:
            needed.update(get_stage(name).inputs)
    return [n for n in stages if n in needed]
