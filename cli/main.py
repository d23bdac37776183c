"""Entry point of the ``attnflow`` console script.

Each command lives in its own module and imports the library lazily, so ``attnflow --help``
stays fast. Expected failures (``AttnFlowError``) print one line and exit with status 1.
"""

from __future__ import annotations

import sys

import typer

from . import card, evaluate, models, push, reproduce, sample, train, validate

app = typer.Typer(
    name="attnflow",
    help="Normalizing flows with invertible attention: train, evaluate, sample, validate, push.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Normalizing flows with invertible attention: train, evaluate, sample, validate, push."""


app.command("models")(models.models)
app.command("train")(train.train)
app.command("evaluate")(evaluate.evaluate)
app.command("sample")(sample.sample)
app.command("push")(push.push)
app.command("validate")(validate.validate)
app.command("card")(card.card)
app.command("reproduce")(reproduce.reproduce)


def main() -> None:
    """Run the app; library errors become one line on stderr and exit status 1."""
    from attnflow_zoo.errors import AttnFlowError

    try:
        app()
    except AttnFlowError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(1)
