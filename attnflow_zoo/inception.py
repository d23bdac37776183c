"""Moved: the FID Inception is torch-fidelity's ``FeatureExtractorInceptionV3``, loaded by
``attnflow_zoo.metrics.load_inception`` (DESIGN §FID). This module only re-exports those names
for callers that still import ``attnflow_zoo.inception``; import them from ``metrics``."""

from .metrics import FEATURE_DIM, INCEPTION_ENV_VAR, InceptionFeatures, load_inception

ENV_VAR = INCEPTION_ENV_VAR

__all__ = ["ENV_VAR", "FEATURE_DIM", "InceptionFeatures", "load_inception"]
