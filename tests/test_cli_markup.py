"""Text from the system (paths, exception messages, model output) is printed literally by the CLI, never
parsed as rich markup: a stage error naming a path with `[/x]` in it shows in `aigc status` as it is."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from pipeline import cli
from pipeline.presets import resolve_configs
from pipeline.runner import configs_to_json, execute_stage
from tiny_lm import write_upstream


def test_status_prints_an_error_with_square_brackets_literally(tmp_path, capsys):
    run_dir = tmp_path / "runs[" / "x]"  # its path holds "[/x]", a closing markup tag
    configs = resolve_configs("smoke", [])
    corpus = run_dir / "curate" / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "shard-00000.jsonl").write_text('{"id": 1, "text": "an id that is not a string"}\n')
    write_upstream(run_dir, configs, "curate", {"corpus": "corpus"})
    with pytest.raises(ValueError, match="corpus record needs"):
        execute_stage(str(run_dir), "tokenize", configs_to_json(configs))
    (run_dir / cli.RUN_CONFIG_FILE).write_text(json.dumps({"config": "smoke", "overrides": []}))
    error = json.loads((run_dir / "tokenize.tmp" / "failure.json").read_text())["error"]
    assert "[/x]" in error

    assert cli.main(["status", "--run-dir", str(run_dir)]) == 0
    assert "failed" in capsys.readouterr().out

    wide = Console(width=1000, record=True)
    wide.print(cli._status_table(run_dir, cli._load_run_configs(run_dir), ["curate", "tokenize"]))
    shown = wide.export_text()
    assert error in shown and f"aigc status: {run_dir}" in shown
