"""The figures table each multimodal stage prints when it finishes."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def figures_table(title: str, metrics: dict) -> Table:
    """Return a rich table of `metrics`: one row per figure, its value right-aligned."""
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, str(v))
    return table


def print_figures(title: str, metrics: dict, rows: list[tuple[str, str]] = ()) -> None:
    """Print `metrics` (but a "curve") as the figures table titled `title`, then any more (label, value) `rows`."""
    table = figures_table(title, {k: v for k, v in metrics.items() if k != "curve"})
    for row in rows:
        table.add_row(*row)
    Console().print(table)
