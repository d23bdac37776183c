"""Data loading on real MNIST digits (local imagefolder), the on-disk cache, augmentation."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from attnflow_zoo.data import datasets, quantize
from attnflow_zoo.data.augment import augment
from attnflow_zoo.errors import DataError


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts real decodes (the real function still runs)."""
    calls: list[int] = []
    real = datasets._decode

    def counting(ds, *args, **kwargs):
        calls.append(len(ds))
        return real(ds, *args, **kwargs)

    monkeypatch.setattr(datasets, "_decode", counting)
    return calls


def _reference(folder, split: str) -> np.ndarray:
    files = sorted((folder / split).rglob("*.png"))
    return np.stack([np.asarray(Image.open(f)) for f in files])


def test_native_size_shape_dtype_and_pixels(mnist_folder, tmp_path):
    x = datasets.load_images(mnist_folder, "test", cache_dir=tmp_path)
    assert x.dtype == torch.uint8 and x.shape == (1000, 1, 28, 28)
    # Same multiset of images as the PNGs on disk (the loader's order is the dataset's own).
    ref = _reference(mnist_folder, "test")
    got = sorted(x[:, 0].numpy().tobytes()[i * 784:(i + 1) * 784] for i in range(1000))
    assert got == sorted(r.tobytes() for r in ref)


def test_pad_to_32_keeps_the_digit(mnist_folder, tmp_path):
    native = datasets.load_images(mnist_folder, "test", limit=50, cache_dir=tmp_path)
    padded = datasets.load_images(mnist_folder, "test", image_size=32, limit=50, cache_dir=tmp_path)
    assert padded.shape == (50, 1, 32, 32)
    assert torch.equal(padded[:, :, 2:30, 2:30], native)
    assert padded[:, :, :2].eq(0).all() and padded[:, :, :, 30:].eq(0).all()


def test_resize_smaller_crops_and_resizes(mnist_folder, tmp_path):
    x = datasets.load_images(mnist_folder, "test", image_size=14, limit=20, cache_dir=tmp_path)
    assert x.shape == (20, 1, 14, 14) and x.dtype == torch.uint8 and x.max() > 100


def test_cache_is_written_once_and_read_back(mnist_folder, tmp_path, decode_calls):
    first = datasets.load_images(mnist_folder, "train", image_size=32, limit=300,
                                   cache_dir=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    second = datasets.load_images(mnist_folder, "train", image_size=32, limit=300,
                                    cache_dir=tmp_path)
    assert decode_calls == [300]
    assert torch.equal(first, second)
    # What comes back is the file's content: overwrite it and the loader returns the new bytes.
    from safetensors.torch import save_file

    marker = torch.full_like(first, 7)
    save_file({"images": marker}, str(files[0]))
    assert torch.equal(datasets.load_images(mnist_folder, "train", image_size=32, limit=300,
                                        cache_dir=tmp_path), marker)
    assert decode_calls == [300]
    # A different size / limit / split is another entry.
    datasets.load_images(mnist_folder, "test", image_size=32, limit=300, cache_dir=tmp_path)
    assert decode_calls == [300, 300]


def test_editing_the_folder_invalidates_the_cache(mnist_folder, tmp_path, decode_calls):
    folder = tmp_path / "copy"
    shutil.copytree(mnist_folder / "test", folder / "test")
    a = datasets.load_images(folder, "test", cache_dir=tmp_path / "c")
    victim = sorted((folder / "test").rglob("*.png"))[0]
    Image.fromarray(np.full((28, 28), 255, np.uint8), mode="L").save(victim)
    b = datasets.load_images(folder, "test", cache_dir=tmp_path / "c")
    assert len(decode_calls) == 2 and not torch.equal(a, b)


def test_corrupt_cache_entry_is_rebuilt(mnist_folder, tmp_path, decode_calls):
    a = datasets.load_images(mnist_folder, "test", limit=10, cache_dir=tmp_path)
    next(tmp_path.glob("*.safetensors")).write_bytes(b"not a safetensors file")
    b = datasets.load_images(mnist_folder, "test", limit=10, cache_dir=tmp_path)
    assert torch.equal(a, b) and len(decode_calls) == 2


def test_mixed_modes_become_rgb(tmp_path):
    folder = tmp_path / "mixed" / "train" / "a"
    folder.mkdir(parents=True)
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(grey, mode="L").save(folder / "0.png")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(folder / "1.png")
    x = datasets.load_images(tmp_path / "mixed", "train", cache_dir=tmp_path / "c")
    assert x.shape == (2, 3, 8, 8)
    greys = [i for i in range(2) if torch.equal(x[i, 0], x[i, 1])]
    assert len(greys) == 1 and torch.equal(x[greys[0], 0], torch.from_numpy(grey))


def test_rectangular_images_are_center_cropped(tmp_path):
    # CelebA's rule: 218×178 -> centre crop 178×178 -> resize.
    folder = tmp_path / "faces" / "train" / "a"
    folder.mkdir(parents=True)
    img = np.zeros((218, 178), np.uint8)
    img[20:198] = 255  # exactly the central 178 rows are white
    Image.fromarray(img, mode="L").save(folder / "0.png")
    native = datasets.load_images(tmp_path / "faces", "train", cache_dir=tmp_path / "c")
    assert native.shape == (1, 1, 218, 178)
    x = datasets.load_images(tmp_path / "faces", "train", image_size=64, cache_dir=tmp_path / "c")
    assert x.shape == (1, 1, 64, 64) and x.eq(255).all()


def test_parquet_folder(mnist_folder, tmp_path):
    import datasets as hf_datasets

    ref = datasets.load_images(mnist_folder, "test", cache_dir=tmp_path / "c")[:20]  # sorted files
    files = sorted(str(p) for p in (mnist_folder / "test").rglob("*.png"))[:20]
    ds = hf_datasets.Dataset.from_dict({"label": list(range(20)), "picture": files})
    ds = ds.cast_column("picture", hf_datasets.Image())
    (tmp_path / "pq" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "pq" / "data" / "test-00000-of-00001.parquet"))
    x = datasets.load_images(tmp_path / "pq", "test", cache_dir=tmp_path / "c")
    assert x.shape == (20, 1, 28, 28)
    assert sorted(map(bytes, x.flatten(1).numpy())) == sorted(map(bytes, ref.flatten(1).numpy()))
    # Its test split is the held-out split (scored by train and evaluate), as for a folder tree.
    ds.to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    assert datasets.local_splits(tmp_path / "pq") == ["train", "test"]
    assert datasets.heldout_split(tmp_path / "pq") == "test"
    assert datasets.heldout_split(mnist_folder) == "test"


def test_limit_is_a_seeded_random_subset_not_the_first_files(mnist_folder, tmp_path):
    """The folder lists files sorted by class: the first N would all be zeros."""
    full = datasets.load_images(mnist_folder, "train", cache_dir=tmp_path)
    a = datasets.load_images(mnist_folder, "train", limit=200, cache_dir=tmp_path)
    b = datasets.load_images(mnist_folder, "train", limit=200, cache_dir=tmp_path / "other")
    assert torch.equal(a, b)  # the same subset every time (and in every command)
    keep = datasets.limit_indices(len(full), 200)
    assert torch.equal(a, full[keep]) and keep != list(range(200))
    # It spans the classes: the folder holds 400 images per class in order.
    assert len({i // 400 for i in keep}) == 10


def test_resizing_is_said_not_silent(mnist_folder, tmp_path, capsys):
    datasets.load_images(mnist_folder, "test", image_size=32, limit=10, cache_dir=tmp_path)
    first = capsys.readouterr().err
    assert "28×28 zero-padded to 32×32" in first and "`image_size`" in first
    datasets.load_images(mnist_folder, "test", image_size=32, limit=10, cache_dir=tmp_path)
    assert "zero-padded" in capsys.readouterr().err  # said again when read from the cache
    datasets.load_images(mnist_folder, "test", image_size=14, limit=10, cache_dir=tmp_path)
    assert "28×28 resized (bilinear) to 14×14" in capsys.readouterr().err
    datasets.load_images(mnist_folder, "test", limit=10, cache_dir=tmp_path)
    assert capsys.readouterr().err == ""


def test_float_images_are_refused():
    """`bits_per_dim(x.float() / 255)` used to score ≈ 7.1 bits/dim of the wrong data."""
    from _toy_flow import ToyFlow, ToyFlowConfig

    from attnflow_zoo.errors import ShapeError

    x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    model = ToyFlow(ToyFlowConfig())
    for bad in (x.float() / 255, x.float(), x.to(torch.int64)):
        with pytest.raises(ShapeError, match="uint8"):
            model.bits_per_dim(bad)
        with pytest.raises(ShapeError, match="uint8"):
            quantize.dequantize(bad)
    assert model.bits_per_dim(x).shape == (2,)


def test_split_errors_list_available_splits(mnist_folder, tmp_path):
    with pytest.raises(DataError, match="available: test, train"):
        datasets.load_images(mnist_folder, "valid", cache_dir=tmp_path)
    with pytest.raises(DataError, match="available: train, valid, test"):
        datasets.load_images("celeba", "validation", cache_dir=tmp_path)


def test_offline_hub_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="internet.*local"):
        datasets.load_images("mnist", "test", cache_dir=tmp_path)


@pytest.mark.parametrize("make", ["missing", "empty", "file", "broken"])
def test_bad_folders(tmp_path, make):
    target = tmp_path / "d"
    if make == "empty":
        target.mkdir()
    elif make == "file":
        target.write_text("x")
    elif make == "broken":
        (target / "train" / "a").mkdir(parents=True)
        (target / "train" / "a" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError):
        datasets.load_images(target, "train", cache_dir=tmp_path / "c")
    assert not list((tmp_path / "c").glob("*.safetensors")) if (tmp_path / "c").exists() else True


def test_augment_shifts_with_edge_padding_and_flips(gen):
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).reshape(2, 3, 8, 8).to(torch.uint8)
    x_before = x.clone()
    y = augment(x, gen, max_shift=3, flip=True)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.equal(x, x_before)
    # Brute force: each output equals one of the 7·7·2 shifted/flipped candidates.
    for b in range(2):
        candidates = []
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                rows = (torch.arange(8) - dy).clamp(0, 7)
                cols = (torch.arange(8) - dx).clamp(0, 7)
                shifted = x[b][:, rows][:, :, cols]
                candidates += [shifted, shifted.flip(-1)]
        assert any(torch.equal(y[b], c) for c in candidates)
    # ... and it really augments: over a batch, most images move (an identity would pass above).
    many = augment(x.repeat(32, 1, 1, 1), gen, max_shift=3, flip=True)
    moved = sum(not torch.equal(many[b], x[b % 2]) for b in range(64))
    assert moved > 32
    # Same generator state -> same output; no flip means never mirrored.
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(augment(x, g1), augment(x, g2))


def test_augment_without_flip_is_a_pure_shift(gen):
    x = torch.rand(64, 1, 6, 6, generator=gen)
    y = augment(x, gen, max_shift=2, flip=False)
    # Without flip, column order is non-decreasing in the source (a clamp of j − dx).
    ramp = torch.arange(6.0).expand(64, 1, 6, 6)
    z = augment(ramp, torch.Generator().manual_seed(1), max_shift=2, flip=False)
    assert (z.diff(dim=-1) >= 0).all()
    assert not torch.equal(z, ramp), "no image was shifted"
    # Rows are shifted too: a ramp along H stays non-decreasing and moves in some images.
    ramp_rows = torch.arange(6.0).view(6, 1).expand(64, 1, 6, 6)
    zr = augment(ramp_rows, torch.Generator().manual_seed(2), max_shift=2, flip=False)
    assert (zr.diff(dim=-2) >= 0).all() and not torch.equal(zr, ramp_rows)
    assert y.shape == x.shape
    zero = augment(x, gen, max_shift=0, flip=False)
    assert torch.equal(zero, x)


def test_embedded_digits_load_offline(tmp_path) -> None:
    """`digits` ships inside the package: 4,000 / 1,000 real digits, stratified, padded to 32
    like the zoo's MNIST presets, read through the same decode-and-cache path."""
    from attnflow_zoo.data import datasets

    train = datasets.load_images("digits", "train", image_size=32, cache_dir=tmp_path)
    test = datasets.load_images("digits", "test", image_size=32, cache_dir=tmp_path)
    assert train.shape == (4000, 1, 32, 32) and test.shape == (1000, 1, 32, 32)
    assert train.dtype == torch.uint8 and int(train.max()) == 255
    assert train[:, :, :2].max() == 0 and train[:, :, -2:].max() == 0  # 28 -> 32 zero padding
    assert datasets.heldout_split("digits") == "test" and not datasets.default_flip("digits")
    assert list(tmp_path.glob("digits_*.safetensors"))  # cached like every dataset
    ds = datasets._embedded_split("digits.npz", "test")
    assert sorted(set(ds["label"])) == list(range(10))
    assert all(n == 100 for n in torch.bincount(torch.tensor(ds["label"])).tolist())
    assert datasets.card_info("digits")["hub_id"] is None


def test_unrepresentable_images_are_counted_and_marked_never_black():
    """The rule: non-finite = some NaN/±inf; out of range = finite with some |x| > ½ + margin
    (|x| > 1). Flagged images come back as a checkerboard (non-finite) or inside a dotted frame
    (out of range, otherwise the clamped image); the others exactly as ``from_model_space``."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 8, 8, generator=g) - 0.5
    x[1, 0, 3, 3] = float("nan")
    x[2, 0, 0, 5] = float("inf")
    x[3, 0, 4, 4] = -0.99  # past the data range, within the margin: clamped, not flagged
    x[4, 0, 2, 6] = 1.5
    x[5] = -3.0  # all far below the range: would be a plain black tile
    non_finite, out_of_range = quantize.unrepresentable(x)
    assert non_finite.tolist() == [False, True, True, False, False, False]
    assert out_of_range.tolist() == [False, False, False, False, True, True]
    checked = quantize.checked_images(x)
    assert (checked.num_nonfinite, checked.num_out_of_range) == (2, 2)
    assert checked.counts() == {"num_images": 6, "num_nonfinite": 2, "num_out_of_range": 2}
    assert "2 of 6 images non-finite" in checked.summary()
    plain = quantize.from_model_space(x)
    for i in (0, 3):
        assert torch.equal(checked.images[i], plain[i])
    for i in (1, 2):  # 4×4 squares alternating black and white
        tile = checked.images[i, 0]
        assert tile[0, 0] == 0 and tile[0, 4] == 255 and tile[4, 4] == 0 and tile[4, 0] == 255
    for i in (4, 5):
        tile = checked.images[i, 0]
        assert torch.equal(tile[1:-1, 1:-1], plain[i, 0, 1:-1, 1:-1])
        assert tile[0, 0] == 0 and tile[0, 1] == 255 and tile[7, 0] == 255 and tile[7, 7] == 0
    assert all(int(t.max()) == 255 for t in checked.images[1:3])
    assert int(checked.images[5].max()) == 255  # not black


def test_checked_images_concatenate():
    x = torch.full((2, 1, 4, 4), float("nan"))
    parts = [quantize.checked_images(x), quantize.checked_images(torch.zeros(3, 1, 4, 4))]
    both = quantize.CheckedImages.concat(parts)
    assert both.images.shape == (5, 1, 4, 4) and both.num_nonfinite == 2
    assert both.num_out_of_range == 0


def test_the_cli_names_every_dataset_of_the_table():
    """The CLI's --dataset help is written without importing the library: it must list the data
    table's names, all of them and no other."""
    from attnflow_cli.dataset import DATASET_NAMES, dataset_help

    assert sorted(DATASET_NAMES) == sorted(datasets.DATASETS)
    assert all(name in dataset_help() for name in datasets.DATASETS)
