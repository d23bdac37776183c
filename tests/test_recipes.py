"""Recipes as data: every zoo entry has one, and ``recipes.train_config`` turns it into the
``TrainConfig`` by one stated rule (global batch kept, lr not rescaled, warm-up in images)."""

from __future__ import annotations

import math

import pytest

from attnflow_zoo.errors import ConfigError
from attnflow_zoo.factory import list_models
from attnflow_zoo.registry import get_entry
from attnflow_zoo.training import recipes

DENSITY = [n for n in list_models() if not n.startswith("validator")]
MIXLOG = [n for n in list_models("*_mixlog*") if not n.endswith("_tiny")]


@pytest.mark.parametrize("name", list_models())
def test_every_entry_has_a_recipe_and_no_weights_yet(name: str) -> None:
    entry = get_entry(name)
    assert entry.recipe is not None and entry.recipe.source
    assert entry.weights is None  # no zoo entry has published weights yet
    if name.startswith("validator"):
        assert entry.recipe.task == "invertibility"
        with pytest.raises(ConfigError, match="attnflow validate"):
            recipes.train_config(name, world_size=1)
    else:
        config = recipes.train_config(name, world_size=1)
        recipe = entry.recipe
        assert (config.batch_size, config.lr, config.ema_decay) == (
            recipe.batch_size, recipe.lr, recipe.ema_decay)
        assert config.warmup_steps == math.ceil(recipe.warmup_images / recipe.batch_size)
        if recipe.dataset is not None:
            assert recipe.dataset in name


@pytest.mark.parametrize("name", MIXLOG)
def test_mixlog_presets_train_mar_scf_mixlogcdf_recipe(name: str) -> None:
    """SPEC §3.1: Adamax 8e-4, warm-up over 10k images, batch 64, shift ≤ 3 px (+ flip where the
    data allows it), EMA of the weights."""
    recipe = get_entry(name).recipe
    config = recipes.train_config(name, world_size=1)
    assert recipe.optimizer == "adamax" and config.lr == 8e-4 and config.batch_size == 64
    assert recipe.warmup_images == 10_000 and config.warmup_steps == 157
    assert config.max_shift == 3 and config.augment and config.ema_decay == 0.999
    assert config.flip is None  # the dataset's rule: on for CIFAR-10 / CelebA, off for SVHN
    assert recipe.fid_num_samples == 50_000 and recipe.fid_reference_split == "train"


@pytest.mark.parametrize(("name", "batch", "lr", "epochs"), [
    ("attnflow_imap_cifar10", 128, 8e-4, 400),  # mAR-SCF's affine recipe
    ("marflow_mnist", 128, 8e-4, 330),
    ("resflow_concat_cifar10", 64, 3e-3, 200),  # Zha et al. / i-ResNet (SPEC §2.5)
])
def test_paper_scale_recipes(name: str, batch: int, lr: float, epochs: int) -> None:
    config = recipes.train_config(name, world_size=1)
    assert (config.batch_size, config.lr, config.epochs, config.steps) == (batch, lr, epochs, None)


def test_validator_recipe_is_spec_2_4() -> None:
    recipe = get_entry("validator_dot_cifar10").recipe
    assert (recipe.optimizer, recipe.lr, recipe.batch_size, recipe.epochs,
            recipe.train_limit) == ("adam", 3e-3, 64, 100, 1000)
    full = get_entry("validator_dot_celeba_fullscale").recipe
    assert (full.batch_size, full.epochs) == (1, 1)


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_global_batch_and_lr_are_kept_under_torchrun(world_size: int) -> None:
    one = recipes.train_config("attnflow_imap_cifar10_mixlog", world_size=1)
    many = recipes.train_config("attnflow_imap_cifar10_mixlog", world_size=world_size)
    assert many == one  # each of N processes takes batch / N rows of the same global batch


def test_world_size_comes_from_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="does not split over 3 processes"):
        recipes.train_config("attnflow_imap_cifar10_mixlog")
    assert recipes.train_config("attnflow_imap_cifar10_mixlog", batch_size=96).batch_size == 96


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"batch_size": 128}, {"batch_size": 128, "lr": 8e-4, "warmup_steps": 79}),  # 10k images
    ({"warmup_images": 640}, {"warmup_steps": 10}),
    ({"steps": 20}, {"steps": 20, "epochs": None}),
    ({"epochs": 3}, {"epochs": 3, "steps": None}),
    ({"warmup_steps": 5, "checkpoint_every": 7}, {"warmup_steps": 5, "checkpoint_every": 7}),
    ({"ema_decay": None, "max_shift": 0}, {"ema_decay": None, "max_shift": 0}),
    ({"precision": "bf16"}, {"precision": "bf16"}),
])
def test_overrides(overrides: dict, expected: dict) -> None:
    config = recipes.train_config("attnflow_imap_cifar10_mixlog", world_size=1, **overrides)
    assert {k: getattr(config, k) for k in expected} == expected


@pytest.mark.parametrize(("overrides", "message"), [
    ({"learning_rate": 1e-3}, "unknown recipe/training setting"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"lr": -1.0}, "lr must be a positive number"),
    ({"precision": "fp8"}, "precision must be one of"),
    ({"batch_size": 63}, "does not split over 2 processes"),
])
def test_bad_overrides_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        recipes.train_config("attnflow_imap_cifar10_mixlog", world_size=2, **overrides)


def test_parse_assignments() -> None:
    assert recipes.parse_assignments(
        ["steps=20", "ema-decay=none", "flip=False", "lr=1e-3", "schedule=cosine"]) == {
        "steps": 20, "ema_decay": None, "flip": False, "lr": 1e-3, "schedule": "cosine"}
    with pytest.raises(ConfigError, match="key=value"):
        recipes.parse_assignments(["steps"])


def test_recipe_summary_and_card_lines() -> None:
    recipe = get_entry("attnflow_imap_cifar10_mixlog").recipe
    assert recipes.summary(recipe) == (
        "adamax 0.0008 · b64 · 400 ep · wu 10k img · shift 3, flip · EMA 0.999")
    assert recipes.summary(get_entry("attnflow_imap_svhn_mixlog").recipe).endswith(
        "shift 3, no flip · EMA 0.999")
    text = " ".join(recipes.describe(recipe))
    assert "10,000 images (= 157 steps at this batch)" in text and "not rescaled" in text
    assert "FID of 50,000 samples at temperature 1 against the train split" in text


def test_deviations_name_what_a_run_changed() -> None:
    recipe = get_entry("attnflow_imap_cifar10_mixlog").recipe
    same = recipes.config_from_recipe(recipe).to_dict()
    run = {"dataset": {"name": "cifar10"}, "world_size": 1, "train_config": same}
    assert recipes.deviations(recipe, run) == []
    run["train_config"] = {**same, "steps": 20, "epochs": None, "batch_size": 16}
    run["dataset"] = {"name": None, "path": "/data/digits", "limit": 500}
    assert recipes.deviations(recipe, run) == [
        "trained on /data/digits (recipe: cifar10)", "only the first 500 training images",
        "steps 20 (recipe: 400 epochs)", "batch_size 16 (recipe: 64)"]
