"""Entry point of the ``attnflow`` console script.

Each command lives in its own module and imports the library lazily, so ``attnflow --help``
stays fast. Every expected failure prints ONE line on stderr and exits non-zero, without a
traceback: a library error (``AttnFlowError``, status 1), a usage error (a missing or invalid
option, status 2), an unreachable Hub (status 1), an interrupt (130; a training run stopped by
a signal exits 128 + signal after saying where its checkpoint is and how to resume).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from . import (
    card,
    convert,
    evaluate,
    inspection,
    interpolate,
    models,
    push,
    quickstart,
    reconstruct,
    reproduce,
    sample,
    train,
    validate,
)
from .flags import command_of, in_flags

app = typer.Typer(
    name="attnflow",
    help="Normalizing flows with invertible attention: quickstart, train, evaluate, sample, "
         "inspect their latents and attention, validate, push.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("attnflow-zoo")
        except PackageNotFoundError:  # pragma: no cover - run from a source tree
            number = "unknown"
        typer.echo(f"attnflow_zoo {number}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the attnflow_zoo version and exit.")
                       ] = False,
) -> None:
    """Normalizing flows with invertible attention: quickstart, train, evaluate, sample, push."""


app.command("quickstart")(quickstart.quickstart)
app.command("models")(models.models)
app.command("train")(train.train)
app.command("evaluate")(evaluate.evaluate)
app.command("sample")(sample.sample)
app.command("push")(push.push)
app.command("validate")(validate.validate)
app.command("card")(card.card)
app.command("reproduce")(reproduce.reproduce)
app.command("reconstruct")(reconstruct.reconstruct)
app.command("interpolate")(interpolate.interpolate)
app.command("inspect")(inspection.inspect)
app.add_typer(convert.app, name="convert")


def _fail(message: str, code: int) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    typer.secho(f"error: {first}", fg=typer.colors.RED, err=True)
    sys.exit(code)


def _network_error(err: BaseException) -> bool:
    """An error of the HTTP stack (no network, DNS, refused connection, timeout)."""
    module = type(err).__module__.split(".")[0]
    return module.startswith(("httpx", "httpcore", "requests", "urllib3")) or isinstance(
        err, (ConnectionError, TimeoutError))


def _in_flags(message: str) -> str:
    """A library message (an error or a note) in the words of the command that runs."""
    return in_flags(message, command_of(typer.main.get_command(app), sys.argv[1:]))


def main() -> None:
    """Run the app; expected failures become one line on stderr (see the module docstring).
    The library's errors and notes name its arguments: they are said in the command's flags."""
    from attnflow_zoo.progress import word_notes

    word_notes(_in_flags)
    try:
        code = _run()
    finally:
        word_notes(None)
    sys.exit(code)


def _run() -> int:
    """``app`` with its expected failures said in one line (``_fail`` exits); its exit status."""
    from attnflow_zoo.errors import AttnFlowError

    try:
        code = app(standalone_mode=False)
    except AttnFlowError as err:
        _fail(_in_flags(str(err)), getattr(err, "exit_code", 1))
    except typer.TyperException as err:  # typer's click: usage errors and friends
        ctx = getattr(err, "ctx", None)
        if type(err).__name__ == "NoArgsIsHelpError":  # `attnflow train` alone: its help
            typer.echo(ctx.get_help() if ctx is not None else "")
            sys.exit(0)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _fail(f"{err.format_message()}{hint}", getattr(err, "exit_code", 2))
    except (KeyboardInterrupt, typer.Abort):
        _fail("interrupted", 130)
    except Exception as err:
        if not _network_error(err):
            raise
        _fail(f"cannot reach the Hugging Face Hub ({type(err).__name__}: {err}); check the "
              "network, or work offline with local folders (HF_HUB_OFFLINE=1)", 1)
    return code if isinstance(code, int) else 0
