"""``attnflow models``: the zoo as a table."""

from __future__ import annotations

from typing import Annotated

import typer


def models(
    pattern: Annotated[str, typer.Argument(help="Shell-style filter, e.g. 'attnflow*'.")] = "*",
    params: Annotated[bool, typer.Option("--params/--no-params",
                                         help="Count each preset's parameters.")] = True,
) -> None:
    """List the zoo's presets with their parameter count, Hub repo and description."""
    from rich.console import Console
    from rich.table import Table

    from attnflow_zoo.factory import describe_models

    table = Table(title="attnflow zoo")
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("class", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("hub repo", no_wrap=True)
    table.add_column("description", overflow="fold")
    for row in describe_models(pattern, count_params=params):
        table.add_row(row["name"], row["class"], row["params"], row["hub_repo"] or "-",
                      row["description"])
    Console().print(table)
