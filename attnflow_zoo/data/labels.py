"""Class labels of a dataset as a model uses them: how many classes they hold, and the checked
labels a class-conditional model trains on or is scored with (``data`` loads them with the
images, through the one loading path)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import DataError


def num_classes(labels: Tensor | None) -> int:
    """K of a dataset's labels (max + 1; 0 without labels), for ``--conditional``."""
    return 0 if labels is None or labels.numel() == 0 else int(labels.max()) + 1



def labels_for(num_classes: int, labels: Tensor | None, where: str,
               num_images: int | None = None) -> Tensor | None:
    """The labels a model with ``num_classes`` = K trains on or is scored with: None for an
    unconditional model (K = 0: a dataset's labels are not used); for a class-conditional one,
    ``labels`` as (N,) int64, after a ``DataError`` saying what to do if there are none or one
    lies outside 0..K−1 or their count is not ``num_images``. ``where`` names the data in the
    message."""
    if not num_classes:
        return None
    if labels is None:
        raise DataError(f"the model is class-conditional but {where} has no labels (no `label` "
                        "column or class folders root/{split}/{class}/); train an unconditional "
                        "model (no `conditional`, a preset without _cond_) or use labelled data")
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
        raise DataError(f"the labels of {where} must be one integer per image, got "
                        f"{labels.dtype} of shape {tuple(labels.shape)}")
    if num_images is not None and len(labels) != num_images:
        raise DataError(f"{where} has {len(labels)} labels for {num_images} images; pass one "
                        "label per image")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"{where} has labels {int(labels.min())}..{int(labels.max())} but the "
                        f"model has {num_classes} classes (0..{num_classes - 1}); train with "
                        "`conditional` (it sets the number of classes from the data) or relabel "
                        "the data")
    return labels.to(torch.int64)
