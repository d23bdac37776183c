"""Datasets -> uint8 tensors: the dataset table, loading (HF ``datasets``, local folders, the
embedded digits), decoded once and cached on disk."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .._io import atomic_path
from ..errors import DataError, OutputError
from ..progress import note
from .folders import fingerprint, image_column, imagefolder_split, label_column, local_splits
from .images import decode as _decode
from .images import resize_note
from .labels import num_classes

# --- datasets -> uint8 tensors, decoded once ---------------------------------------------------

@dataclass(frozen=True)
class DatasetSpec:
    """Everything the zoo knows about a named dataset: where it lives on the Hub, its splits,
    how it is trained on, and what a model card says about it.

    Attributes:
        repo_id, column, config: the Hub dataset, its image column and config name.
        embedded: for a dataset that ships inside the package (``attnflow_zoo/assets``), its
            file; it is read offline, then decoded and cached like every other dataset.
        splits: the split names; ``heldout``: the one held-out bits/dim is reported on.
        labels, num_classes: whether the dataset has class labels (its ``label`` column), and
            how many classes.
        flip: whether horizontal flips are a valid augmentation (False for digits).
        name, shape_text, splits_text: what a model card shows.
        license_file, license_summary: the terms (``dataset_license/``).
    """

    repo_id: str
    column: str
    splits: tuple[str, ...]
    name: str
    shape_text: str
    splits_text: str
    license_file: str
    license_summary: str
    config: str | None = None
    heldout: str = "test"
    flip: bool = True
    embedded: str | None = None
    labels: bool = True
    num_classes: int = 10


#: The one dataset table of the zoo.
DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        "uoft-cs/cifar10", "img", ("train", "test"), "CIFAR-10", "3x32x32",
        "50,000 train / 10,000 test", "cifar10.md",
        "The dataset's authors state no license; cite Krizhevsky (2009)."),
    "svhn": DatasetSpec(
        "ufldl-stanford/svhn", "image", ("train", "test", "extra"), "SVHN (cropped digits)",
        "3x32x32", "73,257 train / 26,032 test (extra split unused)", "svhn.md",
        "The dataset page marks the data for non-commercial use only; cite Netzer et al. (2011).",
        config="cropped_digits", flip=False),
    "mnist": DatasetSpec(
        "ylecun/mnist", "image", ("train", "test"), "MNIST", "1x28x28",
        "60,000 train / 10,000 test", "mnist.md",
        "A derivative of NIST data; the original page states no license, and it is commonly "
        "redistributed under CC BY-SA 3.0 (as TensorFlow's documentation states). Cite LeCun "
        "et al. (1998).", flip=False),
    "digits": DatasetSpec(
        "attnflow_zoo/assets/digits.npz", "image", ("train", "test"),
        "digits (5,000 MNIST digits embedded in attnflow_zoo)", "1x28x28",
        "4,000 train / 1,000 test (fixed, stratified: 400 / 100 per class)", "digits.md",
        "MNIST's terms: a derivative of NIST data, commonly redistributed under CC BY-SA 3.0. "
        "Cite LeCun et al. (1998).", flip=False, embedded="digits.npz"),
    "celeba": DatasetSpec(
        "flwrlabs/celeba", "image", ("train", "valid", "test"), "CelebA",
        "3x218x178 aligned (32x32: center crop 178, resize)",
        "official train / valid / test (162,770 / 19,867 / 19,962)", "celeba.md",
        "Non-commercial research use only, under the CelebA dataset release agreement; the "
        "images show real people and are not the property of CUHK. Cite Liu et al. (2015).",
        labels=False, num_classes=0),
}


def dataset_spec(dataset: str | os.PathLike[str]) -> DatasetSpec | None:
    """The table entry of a named dataset, None for a local folder."""
    return DATASETS.get(str(dataset).lower()) if isinstance(dataset, str) else None


def dataset_label(dataset: str | os.PathLike[str]) -> str:
    """How metrics name a dataset: its table key, or a local folder's absolute path."""
    spec = dataset_spec(dataset)
    return str(dataset).lower() if spec is not None else str(Path(dataset).expanduser().resolve())


def heldout_split(dataset: str | os.PathLike[str]) -> str | None:
    """The split held-out bits/dim is reported on: the table's (``test``) for a named dataset,
    else a local folder's test/valid/validation split, else None."""
    spec = dataset_spec(dataset)
    if spec is not None:
        return spec.heldout
    names = local_splits(Path(dataset).expanduser())
    return next((n for n in ("test", "valid", "validation") if n in names), None)


def default_flip(dataset: str | os.PathLike[str] | None) -> bool:
    """Whether horizontal flips are on by default: the table's rule for a named dataset (off for
    digits), off for a local folder or in-memory data (flips are a data-specific assumption)."""
    spec = dataset_spec(dataset) if dataset is not None else None
    return spec.flip if spec is not None else False


def card_info(dataset: str | None) -> dict[str, str | None] | None:
    """What a model card says about a named dataset (None if it is not in the table)."""
    spec = dataset_spec(dataset) if dataset else None
    if spec is None:
        return None
    return {"name": spec.name, "hub_id": None if spec.embedded else spec.repo_id,
            "hub_config": spec.config,
            "image_shape": spec.shape_text, "splits": spec.splits_text,
            "license_file": spec.license_file, "license_summary": spec.license_summary}


_FORMAT_VERSION = "2"  # 2: the class labels are cached with the images
#: How ``limit`` picks images (recorded in run.json): the same subset for every command, so
#: ``train --limit`` / ``--eval-limit`` and ``evaluate --limit`` see the same images.
LIMIT_RULE = "a random subset drawn with seed 0 (kept in dataset order)"
LIMIT_SEED = 0


def limit_indices(num_images: int, limit: int | None) -> list[int] | None:
    """The indices ``limit`` keeps out of ``num_images`` (``LIMIT_RULE``); None keeps all.

    Not the first ``limit``: a folder's files are listed sorted, so those are one class.
    """
    if limit is None or limit >= num_images:
        return None
    g = torch.Generator().manual_seed(LIMIT_SEED)
    return sorted(torch.randperm(num_images, generator=g)[:limit].tolist())


def default_cache_dir() -> Path:
    """``<HF datasets cache>/attnflow_zoo`` (honours ``HF_DATASETS_CACHE`` / ``HF_HOME``)."""
    env = os.environ.get("HF_DATASETS_CACHE")
    if env:
        return Path(env) / "attnflow_zoo"
    home = os.environ.get("HF_HOME")
    base = Path(home) if home else Path.home() / ".cache" / "huggingface"
    return base / "datasets" / "attnflow_zoo"


def load_images(dataset: str | Path, split: str = "train", *, image_size: int | None = None,
                limit: int | None = None, cache_dir: str | Path | None = None) -> Tensor:
    """One split of a dataset as a uint8 tensor N×C×H×W, decoded once and cached on disk.

    Args:
        dataset: ``"cifar10"``, ``"svhn"`` (cropped digits), ``"mnist"``, ``"celeba"`` (official
            train/valid/test split, aligned 218×178), or the path of a local ``datasets`` folder
            (imagefolder ``root/{split}/…/*.png`` or parquet files).
        split: the split's name (``DATASETS[name].splits``; a local folder's own split names).
        image_size: side S of the square output. Larger images are centre-cropped to a square of
            their shorter side, then resized with antialiased bilinear filtering (CelebA: crop 178
            then resize); smaller images are zero-padded symmetrically (MNIST 28 → 32, the
            standard for flows). ``None`` keeps the native size (all images must share it).
        limit: keep ``limit`` images of the split: a seeded random subset (``LIMIT_RULE``).
        cache_dir: where the decoded tensors live; default ``default_cache_dir()``.

    Returns:
        uint8 tensor N×C×H×W with C = 1 when every image is grey, else C = 3 (grey images are
        replicated, alpha is dropped).

    The cache key holds the dataset, split, size and limit, and for a local folder a fingerprint
    of its path and its files' sizes and mtimes, so editing the folder re-decodes it. Files are
    safetensors written atomically (temporary file + rename). What was done to images of another
    size than ``image_size`` is said in one line on stderr (never silently).
    """
    images, _, said = _load_images(dataset, split, image_size, limit, cache_dir)
    if said:
        note(said)
    return images


def _load_images(dataset: str | Path, split: str, image_size: int | None, limit: int | None,
                 cache_dir: str | Path | None) -> tuple[Tensor, Tensor | None, str]:
    """``load_images``, the split's class labels ((N,) int64, None without a label column or
    class folders) and the line saying how the images were resized ("" if they were not)."""
    source, spec = _resolve(dataset)
    if spec is not None and split not in spec.splits:
        raise DataError(f"{dataset} has no split {split!r}; available: {', '.join(spec.splits)}")
    if image_size is not None and image_size <= 0:
        raise DataError(f"image_size must be positive, got {image_size}")
    if limit is not None and limit <= 0:
        raise DataError(f"limit must be positive, got {limit}")
    key = _cache_key(source, spec, split, image_size, limit)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / f"{key}.safetensors"
    if path.is_file():
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                resized = (f.metadata() or {}).get("resized")
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt, never trusted
            path.unlink(missing_ok=True)
        else:
            return (tensors["images"], tensors.get("labels"),
                    f"{Path(str(source)).name}/{split}: {resized}" if resized else "")
    ds = _load_split(source, spec, split, cache_dir)
    keep = limit_indices(len(ds), limit)
    if keep is not None:
        ds = ds.select(keep)
    column = spec.column if spec is not None else image_column(ds, source)
    name = spec.repo_id if spec is not None else str(source)
    images, sizes = _decode(ds, column, image_size, f"decode {Path(name).name}/{split}")
    labels = None
    if spec is None or spec.labels:
        found = label_column(ds)
        labels = None if found is None else torch.tensor(list(ds[found]), dtype=torch.int64)
    resized = resize_note(sizes, image_size)
    _save_atomic(path, {"images": images} | ({} if labels is None else {"labels": labels}),
                 {"dataset": name, "split": split, "format": _FORMAT_VERSION,
                  "resized": resized})
    return images, labels, f"{Path(str(source)).name}/{split}: {resized}" if resized else ""


def _resolve(dataset: str | Path) -> tuple[str | Path, DatasetSpec | None]:
    spec = dataset_spec(dataset)
    if spec is not None:
        return str(dataset).lower(), spec
    path = Path(dataset).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DataError(f"{path} is not a folder; pass a `datasets` imagefolder or parquet "
                            "folder, or one of " + ", ".join(DATASETS))
        return path.resolve(), None
    raise DataError(f"unknown dataset {str(dataset)!r}: use one of {', '.join(DATASETS)} or the "
                    "path of a local `datasets` folder (imagefolder or parquet)")


def _cache_key(source: str | Path, spec: DatasetSpec | None, split: str,
               image_size: int | None, limit: int | None) -> str:
    if spec is not None:
        name = str(source)
    else:
        folder = Path(source)
        name = f"{folder.name or 'folder'}-{fingerprint(folder)}"
    size = "native" if image_size is None else f"s{image_size}"
    count = "all" if limit is None else f"n{limit}r{LIMIT_SEED}"
    safe_split = "".join(c if c.isalnum() or c in "-_" else "_" for c in split)
    return f"{name}_{safe_split}_{size}_{count}_v{_FORMAT_VERSION}"


def _load_split(source: str | Path, spec: DatasetSpec | None, split: str,
                cache_dir: str | Path | None):
    import datasets

    hf_cache = str(Path(cache_dir) / "hf") if cache_dir is not None else None
    try:
        if spec is not None and spec.embedded is not None:
            return _embedded_split(spec.embedded, split)
        if spec is not None:
            with _cache_only_if_unreachable():
                return datasets.load_dataset(spec.repo_id, spec.config, split=split,
                                             cache_dir=hf_cache)
        folder = Path(source)
        if (folder / "dataset_dict.json").is_file() or (folder / "dataset_info.json").is_file():
            ds = datasets.load_from_disk(str(folder))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{folder} has no split {split!r}; available: "
                                    f"{', '.join(ds)}")
                ds = ds[split]
            return ds
        if any(folder.rglob("*.parquet")):
            return datasets.load_dataset(str(folder), split=split, cache_dir=hf_cache)
        return imagefolder_split(folder, split)
    except ValueError as err:
        if "Unknown split" in str(err):
            raise DataError(f"{source} has no split {split!r}: {err}") from err
        raise DataError(f"cannot read dataset {source}: {err}") from err
    except ConnectionError as err:
        raise DataError(
            f"{source} is not in the local Hugging Face cache and the Hub cannot be reached "
            f"({type(err).__name__}); run once with internet to cache it, or pass the path of a "
            "local `datasets` folder (imagefolder or parquet)") from err
    except OSError as err:
        raise DataError(f"cannot read dataset {source}: {err}; pass a folder of images "
                        "(imagefolder `root/{split}/…/*.png`) or parquet files") from err


@contextmanager
def _cache_only_if_unreachable() -> Iterator[None]:
    """While active, ``datasets`` reads the Hub datasets it has cached and asks the network for
    nothing when the Hub cannot be reached (``online.unreachable``: one short check per process),
    exactly as under ``HF_HUB_OFFLINE=1``; a dataset it has not cached fails at once (a
    ``ConnectionError``) instead of after ~25 s of retries."""
    from .. import online

    if not online.unreachable():
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _embedded_split(name: str, split: str):
    """A split of a dataset shipped in ``attnflow_zoo/assets`` as a ``datasets.Dataset`` (image,
    label), read from package data (works from a wheel, offline)."""
    from importlib import resources

    import datasets

    with resources.files("attnflow_zoo.assets").joinpath(name).open("rb") as fh:
        arrays = np.load(fh)
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    return datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in images],
                                       "label": labels.tolist()}).cast_column(
        "image", datasets.Image())


def _save_atomic(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    try:
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata=metadata)
    except OutputError as err:
        # The cache is an optimisation: a read-only cache dir must not stop training.
        import warnings

        warnings.warn(f"could not cache decoded images: {err}", stacklevel=3)


def load_for_shape(dataset: str | Path, split: str, shape: tuple[int, int, int], *,
                   limit: int | None = None) -> Tensor:
    """``load_images`` at a model's (C, H, W): square images are cropped/resized/padded to H;
    ``DataError`` (saying what to change) if the result is not C×H×W."""
    return load_labelled(dataset, split, shape, limit=limit)[0]


def load_labelled(dataset: str | Path, split: str, shape: tuple[int, int, int], *,
                  limit: int | None = None) -> tuple[Tensor, Tensor | None]:
    """``load_for_shape`` and the images' class labels, (N,) int64 in dataset order: a Hub
    dataset's ``label`` column (or its first ``ClassLabel`` column), a local imagefolder's class
    folders (``root/{split}/{class}/*.png``, classes numbered in sorted name order over all
    splits); None for a dataset without labels (CelebA, a flat folder)."""
    c, h, w = shape
    images, labels, said = _load_images(dataset, split, h if h == w else None, limit, None)
    if tuple(images.shape[1:]) != (c, h, w):
        got = "×".join(map(str, images.shape[1:]))
        raise DataError(f"{dataset} ({split}) gives images of {got} but the model takes "
                        f"{c}×{h}×{w}; pick a model, `image_size` or `in_channels` that fits "
                        "the data")
    if said:
        note(said)
    return images, labels


def count_classes(dataset: str | Path) -> int:
    """K of a dataset's class labels without decoding its images (0 if it has none): the
    table's for a named dataset, else the train split's ``ClassLabel`` size or max label + 1
    (what ``attnflow train --conditional`` sets ``num_classes`` to)."""
    source, spec = _resolve(dataset)
    if spec is not None:
        return spec.num_classes if spec.labels else 0
    ds = _load_split(source, None, "train", None)
    column = label_column(ds)
    if column is None:
        return 0
    feature = ds.features[column]
    return int(getattr(feature, "num_classes", 0)) or num_classes(
        torch.tensor(list(ds[column]), dtype=torch.int64))
