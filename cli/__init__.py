"""The ``attnflow`` command line: thin Typer commands over ``attnflow_zoo`` (one per file)."""
