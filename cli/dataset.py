"""The ``--dataset`` option's words: the data table's names, listed once for the CLI (the help
is built without importing the library; tests/test_data.py holds it to ``data.DATASETS``)."""

from __future__ import annotations

#: The names of ``attnflow_zoo.data.datasets.DATASETS``.
DATASET_NAMES = ("cifar10", "svhn", "mnist", "celeba", "digits")


def dataset_help(more: str = "") -> str:
    """The help of a ``--dataset`` option, with ``more`` (a default, say) after it."""
    names = ", ".join(n for n in DATASET_NAMES if n != "digits")
    text = (f"{names}, digits (embedded, offline) or a local `datasets` folder "
            "(imagefolder / parquet)")
    return f"{text} {more}".strip() + "."
