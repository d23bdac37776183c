"""Invertible building blocks, one idea per file."""

from .coupling import AffineCoupling
from .linear import InvConv1x1
from .masked_attention import IMap, ITrans, checkerboard_mask
from .mixlogcdf import MixLogCDFCoupling
from .normalization import ActNorm
from .reshape import Squeeze, merge_channels, split_channels

__all__ = ["ActNorm", "AffineCoupling", "IMap", "ITrans", "InvConv1x1", "MixLogCDFCoupling",
           "Squeeze",
           "checkerboard_mask", "merge_channels", "split_channels"]
