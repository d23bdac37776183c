"""Invertible building blocks, one idea per file."""

from .coupling import AffineCoupling
from .linear import InvConv1x1
from .normalization import ActNorm
from .reshape import Squeeze, merge_channels, split_channels

__all__ = ["ActNorm", "AffineCoupling", "InvConv1x1", "Squeeze", "merge_channels",
           "split_channels"]
