"""One architecture per file, its presets at the bottom (``factory`` imports them all)."""
