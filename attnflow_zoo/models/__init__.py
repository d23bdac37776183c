"""One architecture per file; importing this package registers every preset."""
from . import validator  # noqa: F401
from . import resflow  # noqa: F401
