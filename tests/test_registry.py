"""The stage registry: each package's stage module, found through the `aigc.stages` entry points."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline import cli
from pipeline.stage import build_registry, get_stage, load_registry, upstream_closure

LLM_CHAIN = ("curate", "tokenize", "pretrain", "sft", "align", "evaluate", "export", "serve")


def test_packages_register_the_chains_stages_and_commands():
    registry = load_registry()
    assert registry.chain() == LLM_CHAIN
    assert registry.chain("t2i") == ("t2i_data", "t2i_vae", "t2i_train")
    assert registry.chain("nerf") == ("nerf_data", "nerf_train")
    assert list(registry.stages)[:len(LLM_CHAIN)] == list(LLM_CHAIN)
    assert get_stage("t2i_train").run == "multimodal.t2i_train:run"
    assert upstream_closure(["t2i_train"]) == ["t2i_data", "t2i_vae", "t2i_train"]
    assert upstream_closure(["sft"]) == ["curate", "tokenize", "pretrain", "sft"]
    assert {"serve", "query", "t2i", "nerf", "eval-checkpoint"} <= set(registry.commands)
    assert {"tiny", "smoke"} <= set(registry.presets)
    with pytest.raises(KeyError, match="unknown chain 'gan'"):
        registry.chain("gan")


def test_every_cli_command_is_a_chain_stage_a_registered_command_or_a_pipeline_command():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    registry = load_registry()
    for command in sub.choices:
        assert command in registry.chain() or command in registry.commands or command in (
            "run", "status", "report", "logs", "cancel"), command



def test_every_multimodal_subcommand_runs_a_registered_stage_or_reads_one():
    from multimodal.cli import nerf_parser, stage_commands, t2i_parser

    registry = load_registry()
    for chain, parser, client in (("t2i", t2i_parser(), "sample"), ("nerf", nerf_parser(), "render")):
        (sub,) = [a for a in parser._actions if a.dest == "command"]
        stages = stage_commands(registry.chain(chain))
        assert set(stages.values()) == set(registry.chain(chain))  # every stage of the recipe has its command
        for command in sub.choices:
            # or a stage of its own chain built on the recipe's (`aigc t2i consistency` -> t2i_consistency)
            assert command in stages or command == client or f"{chain}_{command}" in registry.chain(
                f"{chain}_{command}"), (chain, command)
    from multimodal.cli import zoo_parser
    from multimodal.zoo.registry import RECIPES

    (sub,) = [a for a in zoo_parser()._actions if a.dest == "recipe"]
    assert set(sub.choices) == {"list", *RECIPES}
    for name, recipe in RECIPES.items():  # `aigc zoo RECIPE train` runs the registered stage zoo_RECIPE
        assert registry.stages[recipe.stage].config_cls is recipe.config and recipe.stage in registry.chains
        (commands,) = [a for a in sub.choices[name]._actions if a.dest == "command"]
        assert set(commands.choices) == {"train", "sample"}


def test_registry_loads_without_heavy_imports():
    code = ("import sys; from pipeline.stage import load_registry; load_registry(); "
            "print(sorted(m for m in ('torch', 'megatron', 'ray', 'diffusers', 'tritonclient') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_chain_must_list_each_stage_after_its_inputs(monkeypatch):
    import contract_stages

    monkeypatch.setattr(contract_stages, "CHAINS", {"bad": ("b", "a")})
    with pytest.raises(ValueError, match="chain 'bad': 'b' needs \\['a'\\]"):
        build_registry(["contract_stages"])


def test_readme_stage_graph_is_the_registry():
    import importlib.util
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = text.split("<!-- stage-graph -->")[1].split("<!-- /stage-graph -->")[0]
    rows = [[c.strip().strip("`") for c in line.strip("|").split("|")] for line in table.strip().splitlines()[2:]]
    registry = load_registry()
    expected = []
    for chain in registry.chains:
        if chain.startswith("zoo_"):  # the zoo's one-stage chains are the rows of the Model zoo table
            continue
        for name in registry.chain(chain):
            stage = registry.stages[name]
            expected.append([chain, name, ", ".join(stage.inputs) or "–", stage.run,
                             "N" if stage.multi_rank else "1"])
    assert sorted(rows) == sorted(expected)
    for module in {s.run.partition(":")[0] for s in registry.stages.values()}:
        assert importlib.util.find_spec(module) is not None, module
    from multimodal.zoo.registry import RECIPES

    zoo = text.split("<!-- zoo-recipes -->")[1].split("<!-- /zoo-recipes -->")[0]
    rows = [[c.strip().strip("`") for c in line.strip("|").split("|")] for line in zoo.strip().splitlines()[2:]]
    assert sorted(r[0] for r in rows) == sorted(RECIPES)  # every zoo recipe (stage zoo_<recipe>) has its row
    for row in rows:
        recipe = RECIPES[row[0]]
        assert row[1] == recipe.family and f"aigc zoo {recipe.name} train" in row[-1], row
        assert registry.chain(recipe.stage) == ("t2i_data", recipe.stage)


def test_alignment_and_multimodal_use_only_the_shared_language_model_helpers_of_recipes():
    # README Architecture: what `alignment` and `multimodal` may import of `recipes`.
    import ast
    from pathlib import Path

    shared = {"recipes.hf_lm", "recipes.data_parallel", "recipes.loop_checkpoint", "recipes.instructions"}
    root = Path(__file__).resolve().parent.parent
    for path in sorted((root / "alignment").glob("*.py")) + sorted((root / "multimodal").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("recipes"):
                used = {f"recipes.{a.name}" for a in node.names} if node.module == "recipes" else {node.module}
                assert used <= shared, f"{path.name} imports {used - shared}"
