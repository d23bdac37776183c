"""The zoo's AttnFlow / MaR-Flow presets and their training recipes, one style of preset beside
the architecture (``attnflow.py``); ``factory`` imports this module, which registers them."""

from ..data.datasets import DATASETS
from ..registry import TINY_RECIPE, Recipe, register_model, register_preset
from .attnflow import AttnFlow, AttnFlowConfig

# --- presets ---------------------------------------------------------------------------------
# Naming: ``{family}_{dataset}`` is the paper-scale model, ``{family}_{dataset}_small`` a
# K = 8, C = 256 model for quick runs, ``{family}_tiny`` / ``{family}_*_tiny`` test sizes.
# family: attnflow_imap, attnflow_itrans, marflow (the backbone without attention);
# ``{family}_cond_{dataset}`` are class-conditional: the dataset's classes condition every prior
# (through its input and a per-class shift of its mean and log-scale), and they train with 10 %
# label dropout (classifier-free guidance); issue 20. The couplings are not conditioned: on the
# digits that measured worse (README, "Class-conditional models").
# Paper scale: the AttnFlow paper does not state K and C; we use mAR-SCF's affine recipe
# (L = 3, K = 32, C = 512 at 32×32; L = 4 at 64×64).
_DATA_SHAPES = {
    # dataset: (image_size, in_channels, num_levels, description); MNIST is padded to 32.
    "cifar10": (32, 3, 3, "CIFAR-10 32×32"),
    "svhn": (32, 3, 3, "SVHN cropped digits 32×32"),
    "mnist": (32, 1, 3, "MNIST padded to 32×32 (1 channel)"),
    "celeba": (64, 3, 4, "CelebA 64×64"),
}
_ATTENTIONS = {"imap": "AttnFlow-iMap", "itrans": "AttnFlow-iTrans",
               "none": "MaR-Flow (no attention)"}
_SIZES = {  # size: (K, C, coupling, description)
    "paper": (32, 512, "affine", "paper scale: K=32, C=512, affine (mAR-SCF affine recipe)"),
    "small": (8, 256, "affine", "small: K=8, C=256, affine"),
    # The configuration AttnFlow's table states (L=3, K=2, C=256); its 3.247 bpd sits beside
    # mAR-SCF's MixLogCDF 3.24, not the affine ≈ 3.33 (SPEC §3.1).
    "mixlog": (2, 256, "mixlogcdf", "paper configuration: K=2, C=256, MixLogCDF couplings"),
    "mixlog_small": (4, 96, "mixlogcdf", "K=4, C=96, MixLogCDF couplings"),
}


# Recipes (SPEC §3, §3.1): mAR-SCF's marscf_main.py, plus the zoo's decisions where it is silent.
_EPOCHS = {"cifar10": 400, "svhn": 270, "mnist": 330, "celeba": 120}  # ≈ 20M images each
_SHIFT = {"cifar10": 3, "svhn": 3, "mnist": 0, "celeba": 3}  # mAR-SCF: MNIST is only padded
_MARSCF_SOURCE = ("mAR-SCF (visinf/mar-scf marscf_main.py): Adamax 8e-4, linear warm-up over "
                  "10,000 images, batch 128 (affine) / 64 (MixLogCDF), CIFAR-10 shift <= 3 px + "
                  "flip. Zoo decisions: EMA 0.999 (Flow++; mAR-SCF keeps none); 20M training "
                  "images on every dataset (mAR-SCF's ~400 CIFAR-10 epochs), a quarter for "
                  "_small presets; shift <= 3 px on SVHN and CelebA.")


def _recipe(dataset: str, size: str) -> Recipe:
    coupling = _SIZES[size][2]
    small = size.endswith("small")
    return Recipe(
        name=f"marscf-{coupling}-{dataset}" + ("-small" if small else ""),
        source=_MARSCF_SOURCE, dataset=dataset, lr=8e-4, warmup_images=10_000,
        batch_size=128 if coupling == "affine" else 64,
        epochs=_EPOCHS[dataset] // 4 if small else _EPOCHS[dataset],
        max_shift=_SHIFT[dataset], ema_decay=0.999)


def _preset(name: str, attention: str, dataset: str, size: str, conditional: bool = False
            ) -> None:
    image_size, channels, levels, ddesc = _DATA_SHAPES[dataset]
    k, hidden, coupling, sdesc = _SIZES[size]
    classes = DATASETS[dataset].num_classes if conditional else 0  # the data table's count
    what = f"class-conditional ({classes} classes) " if conditional else ""
    register_preset(name, AttnFlow, AttnFlowConfig(
        image_size=image_size, in_channels=channels, num_levels=levels, num_steps=k,
        hidden_channels=hidden, attention=attention, coupling=coupling, num_classes=classes),
        f"{what}{_ATTENTIONS[attention]} on {ddesc}, L={levels}, {sdesc}.",
        recipe=_recipe(dataset, size))


_preset("attnflow_imap_cifar10", "imap", "cifar10", "paper")
_preset("attnflow_imap_cifar10_small", "imap", "cifar10", "small")
_preset("attnflow_imap_svhn", "imap", "svhn", "paper")
_preset("attnflow_imap_svhn_small", "imap", "svhn", "small")
_preset("attnflow_imap_mnist", "imap", "mnist", "paper")
_preset("attnflow_imap_mnist_small", "imap", "mnist", "small")
_preset("attnflow_imap_cond_cifar10", "imap", "cifar10", "paper", conditional=True)
_preset("attnflow_imap_cond_cifar10_small", "imap", "cifar10", "small", conditional=True)
_preset("attnflow_imap_cond_svhn", "imap", "svhn", "paper", conditional=True)
_preset("attnflow_imap_cond_svhn_small", "imap", "svhn", "small", conditional=True)
_preset("attnflow_imap_cond_mnist", "imap", "mnist", "paper", conditional=True)
_preset("attnflow_imap_cond_mnist_small", "imap", "mnist", "small", conditional=True)
_preset("attnflow_imap_celeba", "imap", "celeba", "paper")
_preset("attnflow_imap_celeba_small", "imap", "celeba", "small")
_preset("attnflow_itrans_cifar10", "itrans", "cifar10", "paper")
_preset("attnflow_itrans_cifar10_small", "itrans", "cifar10", "small")
_preset("attnflow_itrans_svhn", "itrans", "svhn", "paper")
_preset("attnflow_itrans_svhn_small", "itrans", "svhn", "small")
_preset("attnflow_itrans_mnist", "itrans", "mnist", "paper")
_preset("attnflow_itrans_mnist_small", "itrans", "mnist", "small")
_preset("attnflow_itrans_celeba", "itrans", "celeba", "paper")
_preset("attnflow_itrans_celeba_small", "itrans", "celeba", "small")
_preset("marflow_cifar10", "none", "cifar10", "paper")
_preset("marflow_cifar10_small", "none", "cifar10", "small")
_preset("marflow_svhn", "none", "svhn", "paper")
_preset("marflow_svhn_small", "none", "svhn", "small")
_preset("marflow_mnist", "none", "mnist", "paper")
_preset("marflow_mnist_small", "none", "mnist", "small")
_preset("marflow_celeba", "none", "celeba", "paper")
_preset("marflow_celeba_small", "none", "celeba", "small")
_preset("attnflow_imap_cifar10_mixlog", "imap", "cifar10", "mixlog")
_preset("attnflow_imap_cifar10_mixlog_small", "imap", "cifar10", "mixlog_small")
_preset("attnflow_itrans_cifar10_mixlog", "itrans", "cifar10", "mixlog")
_preset("attnflow_itrans_cifar10_mixlog_small", "itrans", "cifar10", "mixlog_small")
_preset("marflow_cifar10_mixlog", "none", "cifar10", "mixlog")
_preset("marflow_cifar10_mixlog_small", "none", "cifar10", "mixlog_small")
_preset("attnflow_imap_svhn_mixlog", "imap", "svhn", "mixlog")
_preset("attnflow_imap_svhn_mixlog_small", "imap", "svhn", "mixlog_small")
_preset("attnflow_itrans_svhn_mixlog", "itrans", "svhn", "mixlog")
_preset("attnflow_itrans_svhn_mixlog_small", "itrans", "svhn", "mixlog_small")
_preset("marflow_svhn_mixlog", "none", "svhn", "mixlog")
_preset("marflow_svhn_mixlog_small", "none", "svhn", "mixlog_small")
_preset("attnflow_imap_celeba_mixlog_small", "imap", "celeba", "mixlog_small")
_preset("attnflow_itrans_celeba_mixlog_small", "itrans", "celeba", "mixlog_small")
_preset("marflow_celeba_mixlog_small", "none", "celeba", "mixlog_small")

# The quickstart entry (`attnflow quickstart`, the embedded digits): small enough to learn digits
# in minutes on a CPU. Glow's Gaussian prior: with mAR's conv-LSTM prior (default sizes) the
# model has 1.9M parameters instead of 0.43M and a training step (batch 16, 1 thread) took 6.2x
# as long (median of 4 interleaved rounds on the shared 2-core machine).
DIGITS_RECIPE = Recipe(
    name="quickstart-digits", source="the zoo's own (no paper trains on these 4,000 digits), "
    "for a few minutes of CPU time; mAR-SCF's MNIST recipe leaves out the shift, and so does "
    "this one; a class-conditional variant adds Glow's y_cond class loss (weight 0.1) and "
    "trains its class parameters at 10× the lr", dataset="digits", lr=2e-3,
    warmup_images=320, batch_size=16, steps=3000, max_shift=0, ema_decay=0.999,
    fid_num_samples=None,
    # Class-conditional variants (``--conditional``): Glow's y_cond class loss on the top latent
    # and the class parameters at 10× the lr (issue 20; README "Class-conditional models").
    class_loss_weight=0.1, class_lr_scale=10.0)


@register_model(AttnFlow, recipe=DIGITS_RECIPE)
def attnflow_imap_digits() -> AttnFlowConfig:
    """AttnFlow-iMap on the embedded digits 1×32×32, L=3, K=4, C=64, Gaussian prior (quickstart)."""
    return AttnFlowConfig(image_size=32, in_channels=1, num_levels=3, num_steps=4,
                          hidden_channels=64, attention="imap", prior="gaussian")


_TINY = dict(image_size=8, in_channels=3, num_levels=2, num_steps=2, hidden_channels=8,
             prior_hidden_channels=8, prior_num_layers=2, prior_cond_hidden_channels=8,
             prior_embed_channels=2)


@register_model(AttnFlow, recipe=TINY_RECIPE)
def attnflow_imap_tiny() -> AttnFlowConfig:
    """AttnFlow-iMap (spatial mixing), tiny: 3×8×8, L=2, K=2, C=8 (tests)."""
    return AttnFlowConfig(**_TINY, attention="imap", imap_mixing="spatial")


@register_model(AttnFlow, recipe=TINY_RECIPE)
def attnflow_imap_channel_tiny() -> AttnFlowConfig:
    """AttnFlow-iMap (channel mixing), tiny: 3×8×8, L=2, K=2, C=8 (tests)."""
    return AttnFlowConfig(**_TINY, attention="imap", imap_mixing="channel")


@register_model(AttnFlow, recipe=TINY_RECIPE)
def attnflow_itrans_tiny() -> AttnFlowConfig:
    """AttnFlow-iTrans (2×2 patches, level 1 only), tiny: 3×8×8, L=2, K=2, C=8 (tests)."""
    # Level 2 is 2×2: a single 2×2 token, so iTrans is switched off there.
    return AttnFlowConfig(**_TINY, attention="itrans", itrans_patch_size=2,
                          attention_levels=(True, False))


@register_model(AttnFlow, recipe=TINY_RECIPE)
def attnflow_itrans_p1_tiny() -> AttnFlowConfig:
    """AttnFlow-iTrans (1×1 patches), tiny: 3×8×8, L=2, K=2, C=8 (tests)."""
    return AttnFlowConfig(**_TINY, attention="itrans", itrans_patch_size=1)


@register_model(AttnFlow, recipe=TINY_RECIPE)
def attnflow_itrans_paper_tiny() -> AttnFlowConfig:
    """AttnFlow-iTrans in the published form A = softmax + αI (1×1 patches), tiny (tests)."""
    return AttnFlowConfig(**_TINY, attention="itrans", itrans_patch_size=1, itrans_form="paper")


_MIXLOG_TINY = dict(coupling="mixlogcdf", mixlog_num_components=3, mixlog_num_blocks=1,
                    mixlog_num_heads=2)


@register_model(AttnFlow, recipe=TINY_RECIPE)
def attnflow_imap_mixlog_tiny() -> AttnFlowConfig:
    """AttnFlow-iMap with MixLogCDF couplings, tiny: 3×8×8, L=2, K=2, C=8, K_mix=3 (tests)."""
    return AttnFlowConfig(**_TINY, **_MIXLOG_TINY, attention="imap")


@register_model(AttnFlow, recipe=TINY_RECIPE)
def marflow_mixlog_tiny() -> AttnFlowConfig:
    """MaR-Flow with MixLogCDF couplings, tiny: 3×8×8, L=2, K=2, C=8, K_mix=3 (tests)."""
    return AttnFlowConfig(**_TINY, **_MIXLOG_TINY, attention="none")


@register_model(AttnFlow, recipe=TINY_RECIPE)
def marflow_tiny() -> AttnFlowConfig:
    """MaR-Flow (no attention), tiny: 3×8×8, L=2, K=2, C=8 (tests)."""
    return AttnFlowConfig(**_TINY, attention="none")


_COND_TINY = dict(num_classes=3, class_embed_channels=4)


@register_model(AttnFlow, recipe=TINY_RECIPE)
def attnflow_imap_cond_tiny() -> AttnFlowConfig:
    """Class-conditional AttnFlow-iMap (3 classes; mAR priors and their shifts conditioned; a
    null class), tiny (tests)."""
    return AttnFlowConfig(**_TINY, **_COND_TINY, attention="imap")


@register_model(AttnFlow, recipe=TINY_RECIPE)
def attnflow_itrans_cond_couplings_tiny() -> AttnFlowConfig:
    """Class-conditional AttnFlow-iTrans, couplings and Gaussian priors conditioned, tiny."""
    return AttnFlowConfig(**_TINY, **_COND_TINY, attention="itrans", itrans_patch_size=1,
                          prior="gaussian", condition_couplings=True)
