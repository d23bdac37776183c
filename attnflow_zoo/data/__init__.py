"""Data: datasets as uint8 tensors (``datasets``), 8-bit <-> continuous (``quantize``),
image files (``images``), local folders (``folders``), class labels (``labels``) and
augmentation (``augment``)."""
