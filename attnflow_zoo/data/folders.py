"""Local dataset folders: their split names, an imagefolder split as a ``datasets.Dataset``,
the image column, and the fingerprint that keys their cache (``data`` reads them through
these)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from PIL import Image

from ..errors import DataError


def local_splits(folder: Path) -> list[str]:
    """The split names of a local folder, found as ``load_images`` finds them: a saved
    ``DatasetDict``'s, parquet files' (``datasets``' own file-name patterns, e.g.
    ``data/test-00000-of-00001.parquet`` or ``test.parquet``) or an imagefolder's subfolders."""
    if not folder.is_dir():
        return []
    if (folder / "dataset_dict.json").is_file():
        import json

        try:
            return list(json.loads((folder / "dataset_dict.json").read_text())["splits"])
        except (OSError, ValueError, KeyError, TypeError):
            return []
    if any(folder.rglob("*.parquet")):
        from datasets.data_files import get_data_patterns

        try:
            return list(get_data_patterns(str(folder)))
        except Exception:  # noqa: BLE001 - no recognisable pattern: load_dataset says why
            return []
    return sorted(d.name for d in folder.iterdir() if d.is_dir())


def fingerprint(folder: Path) -> str:
    h = hashlib.sha256(str(folder).encode())
    try:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for name in sorted(filenames):
                st = os.stat(os.path.join(dirpath, name))
                h.update(f"{os.path.relpath(os.path.join(dirpath, name), folder)}:"
                         f"{st.st_size}:{st.st_mtime_ns}\n".encode())
    except OSError as err:
        raise DataError(f"cannot read {folder}: {err.strerror}; check its permissions") from err
    return h.hexdigest()[:16]


def imagefolder_split(folder: Path, split: str):
    """An imagefolder split (``root/{split}/[label/]*.png``; images at the top level are the
    single split ``train``) as a ``datasets.Dataset`` with an ``Image`` column, and a
    ``ClassLabel`` column ``label`` when every image of every split sits in a class folder
    ``root/{split}/{class}/`` (classes numbered in sorted name order over all splits, so a class
    has the same number in every split, as ``datasets``' imagefolder numbers them).

    Files are listed here rather than by ``load_dataset("imagefolder")``, whose data-file
    resolution takes seconds per call on thousands of files; decoding is still ``datasets``'.
    """
    import datasets

    extensions = {ext.lower() for ext in Image.registered_extensions()}

    def images_under(d: Path, recursive: bool = True) -> list[str]:
        found = d.rglob("*") if recursive else d.glob("*")
        return sorted(str(p) for p in found if p.suffix.lower() in extensions and p.is_file())

    splits = sorted(d.name for d in folder.iterdir() if d.is_dir() and images_under(d))
    top = images_under(folder, recursive=False)
    if not splits and not top:
        raise DataError(f"{folder} holds no images or parquet files; pass an imagefolder "
                        "`root/{split}/…/*.png` or a folder of parquet files")
    if not splits:
        splits = ["train"]
    if split not in splits:
        raise DataError(f"{folder} has no split {split!r}; available: {', '.join(splits)}")
    files = top if top and not (folder / split).is_dir() else images_under(folder / split)
    every = [Path(f) for s in splits for f in images_under(folder / s)] if not top else []
    if every and all(len(f.relative_to(folder).parts) == 3 for f in every):
        names = sorted({f.parent.name for f in every})
        index = {name: i for i, name in enumerate(names)}
        features = datasets.Features({"image": datasets.Image(),
                                      "label": datasets.ClassLabel(names=names)})
        return datasets.Dataset.from_dict(
            {"image": files, "label": [index[Path(f).parent.name] for f in files]},
            features=features)
    return datasets.Dataset.from_dict({"image": files}).cast_column("image", datasets.Image())


def label_column(ds) -> str | None:
    """The class-label column of a dataset: its first ``ClassLabel`` feature, else an integer
    column named ``label`` or ``labels``; None if it has neither."""
    import datasets

    for name, feature in ds.features.items():
        if isinstance(feature, datasets.ClassLabel):
            return name
    for name in ("label", "labels"):
        feature = ds.features.get(name)
        if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
            return name
    return None


def image_column(ds, source: str | Path) -> str:
    import datasets

    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise DataError(f"{source} has no image column (columns: {', '.join(ds.features)}); "
                    "pass a folder of images or parquet files with an Image feature")
