"""The README's benchmark figures are the committed results files, rendered (benchmarks/readme_tables.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import readme_tables  # noqa: E402

README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = {m["name"]: m["body"] for m in readme_tables.BLOCK.finditer(README)}


def test_every_readme_block_equals_its_rendering_from_the_results_files():
    rendered, changed = readme_tables.render(README)
    assert not changed, f"README blocks differ from benchmarks/results: {changed} (python benchmarks/readme_tables.py)"
    assert rendered == README


def test_every_results_file_is_shown_and_every_block_has_its_files():
    assert set(BLOCKS) == set(readme_tables.RENDERERS), "a renderer without a README block, or the reverse"
    used = {f for files, _ in readme_tables.RENDERERS.values() for f in files}
    on_disk = {p.stem for p in readme_tables.RESULTS.glob("*.json")}
    assert on_disk == used, f"results files not in the README: {on_disk - used}; missing: {used - on_disk}"


def test_each_block_names_the_command_that_produced_it():
    for name, (files, _) in readme_tables.RENDERERS.items():
        for f in files:
            doc = readme_tables.load(f)
            assert doc["command"].startswith("python benchmarks/"), doc["command"]
            assert f"`{doc['command']}`" in BLOCKS[name]


def test_the_benchmarks_prose_outside_the_blocks_carries_no_figures():
    section = README.split("\n## Benchmarks\n", 1)[1].split("\n## ", 1)[0]
    prose = readme_tables.BLOCK.sub("", section)
    prose = re.sub(r"`[^`]*`", "", prose)  # commands and settings may hold numbers
    figures = re.findall(r"\d+\.\d+|\d+(?:\.\d+)?\s*(?:×|%|ms\b|GiB|dB|tokens/s|docs/s)", prose)
    assert not figures, f"figures in the Benchmarks prose, outside a rendered block: {figures}"


def test_a_changed_result_is_caught(tmp_path, monkeypatch):
    name = next(iter(BLOCKS))
    files, renderer = readme_tables.RENDERERS[name]
    doc = readme_tables.load(files[0])
    doc["command"] += " --changed"
    monkeypatch.setattr(readme_tables, "load", lambda f: doc if f == files[0] else readme_tables.json.loads(
        (readme_tables.RESULTS / f"{f}.json").read_text()))
    assert readme_tables.render(README)[1] == [name]
