"""One architecture per file, its presets at the bottom (``factory`` imports them all); the
AttnFlow family's many presets are in ``attnflow_presets.py``."""
