"""One architecture per file; importing this package registers every preset."""
from . import attnflow  # noqa: F401
