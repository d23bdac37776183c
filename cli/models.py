"""``attnflow models``: the zoo as a table: each entry's recipe and whether weights exist."""

from __future__ import annotations

from typing import Annotated

import typer


def models(
    pattern: Annotated[str, typer.Argument(help="Shell-style filter, e.g. 'attnflow*'.")] = "*",
    params: Annotated[bool, typer.Option("--params/--no-params",
                                         help="Count each preset's parameters.")] = True,
) -> None:
    """List the zoo's presets: parameters, training recipe, published weights, description."""
    from rich.console import Console
    from rich.table import Table

    from attnflow_zoo.factory import describe_models
    from attnflow_zoo.registry import get_entry
    from attnflow_zoo.training.recipes import summary

    table = Table(title="attnflow zoo")
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("class", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("recipe", overflow="fold")
    table.add_column("weights", no_wrap=True)
    table.add_column("description", overflow="fold")
    for row in describe_models(pattern, count_params=params):
        entry = get_entry(row["name"])
        table.add_row(row["name"], row["class"], row["params"], summary(entry.recipe),
                      entry.weights or "none", row["description"])
    Console().print(table)
