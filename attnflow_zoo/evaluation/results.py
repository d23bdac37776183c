"""THE metrics schema: what ``attnflow evaluate --json`` prints, ``attnflow push --metrics`` and
the model card read, and ``attnflow reproduce`` keeps as ``metrics.json``.

One flat JSON object; every key is optional but the pairs below (a value needs its protocol):

==========================  ===================================================================
key                         meaning
==========================  ===================================================================
format                      1 (this schema)
dataset                     the data scored: a data-table key (``cifar10``) or a local folder's
                            absolute path
split                       the split bits/dim was measured on (``test``)
step                        the training step of the checkpoint scored (None: not from training)
bpd                         mean bits/dim (SPEC §4) — needs ``bpd_estimator``
bpd_estimator               ``single-sample`` or ``importance-weighted`` dequantisation
bpd_num_importance_samples  K of an importance-weighted estimate
bpd_num_images              images scored
bpd_seed, bpd_batch_size    the dequantisation noise stream (seed, batch)
bayes_accuracy              a class-conditional model's Bayes-rule accuracy on ``split``:
                            argmax_y log p(x | y) = the label (SPEC §7) — needs
                            ``bayes_num_images``; the same noise stream as bpd
bayes_num_images            images classified
bpd_noise_std               σ of the Gaussian noise the checkpoint was trained with (> 0: a
                            sample-quality checkpoint, whose bpd is not a discrete-data
                            bits/dim; absent or 0: a likelihood checkpoint)
fid                         Fréchet Inception distance — needs ``fid_num_samples``,
                            ``fid_weights``
fid_num_samples             model samples (50,000 for the standard FID)
fid_temperature             the samples' prior temperature
fid_seed                    seed of the samples
fid_weights                 the Inception features (``torch-fidelity-inception-2015-12-05-…``);
                            any id containing "random" is a pipeline test, never a FID
fid_reference               label of the reference statistics (``cifar10 train``)
fid_reference_split         their split
fid_reference_num_images    images behind them
fid_reference_statistics    the ``.npz`` they were kept in
extra                       [{"name", "value", "protocol"}] shown on the card as they are
==========================  ===================================================================
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError

FORMAT = 1
_NUMBER = (int, float)
#: key -> accepted JSON types.
FIELDS: dict[str, tuple[type, ...]] = {
    "format": (int,), "dataset": (str,), "split": (str,), "step": (int, type(None)),
    "bpd": _NUMBER, "bpd_estimator": (str,), "bpd_num_importance_samples": (int,),
    "bpd_num_images": (int,), "bpd_seed": (int,), "bpd_batch_size": (int,),
    "bayes_accuracy": _NUMBER, "bayes_num_images": (int,),
    "bpd_noise_std": _NUMBER,
    "fid": _NUMBER, "fid_num_samples": (int,), "fid_temperature": _NUMBER, "fid_seed": (int,),
    "fid_weights": (str,), "fid_reference": (str,), "fid_reference_split": (str,),
    "fid_reference_num_images": (int,), "fid_reference_statistics": (str,), "extra": (list,),
}
BPD_ESTIMATORS = ("single-sample", "importance-weighted")


def check_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` if it follows the schema; else ``ConfigError`` saying what is wrong."""
    if not isinstance(metrics, dict):
        raise ConfigError("metrics must be a JSON object (the output of `attnflow evaluate "
                          "--json`)")
    unknown = sorted(set(metrics) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown metrics key(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(FIELDS))}")
    for key, value in metrics.items():
        types = FIELDS[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ConfigError(f"metrics {key} must be {' or '.join(t.__name__ for t in types)}, "
                              f"got {value!r}")
    if metrics.get("format", FORMAT) != FORMAT:
        raise ConfigError(f"metrics format {metrics['format']} is not {FORMAT}; re-run "
                          "`attnflow evaluate --json` with this attnflow_zoo")
    if "bpd" in metrics and "bpd_estimator" not in metrics:
        raise ConfigError("metrics give bpd without bpd_estimator ('single-sample' or "
                          "'importance-weighted'); the card must say which")
    if "bpd_estimator" in metrics and metrics["bpd_estimator"] not in BPD_ESTIMATORS:
        raise ConfigError(f"bpd_estimator must be one of {', '.join(BPD_ESTIMATORS)}, got "
                          f"{metrics['bpd_estimator']!r}")
    if "fid" in metrics:
        for key in ("fid_num_samples", "fid_weights"):
            if key not in metrics:
                raise ConfigError(f"metrics give fid without {key}; the card must state the "
                                  "FID protocol")
    if "bayes_accuracy" in metrics and ("bayes_num_images" not in metrics
                                        or not 0 <= metrics["bayes_accuracy"] <= 1):
        raise ConfigError("metrics bayes_accuracy must be a share in [0, 1] with "
                          "bayes_num_images (how many images were classified)")
    for key in ("bpd", "fid"):
        if key in metrics and not math.isfinite(metrics[key]):
            raise ConfigError(f"metrics {key} must be a finite number, got {metrics[key]!r}")
    for extra in metrics.get("extra", []):
        if not isinstance(extra, dict) or not {"name", "value"} <= set(extra):
            raise ConfigError("each metrics `extra` entry needs a name and a value")
    return metrics


def is_real_fid(metrics: dict[str, Any]) -> bool:
    """Whether ``metrics`` hold a FID computed with real (not random) Inception weights."""
    return "fid" in metrics and "random" not in str(metrics.get("fid_weights", "")).lower()


def refuse_pipeline_fid(metrics: dict[str, Any]) -> None:
    """``ConfigError`` if ``metrics`` hold a FID of random Inception weights (not a FID)."""
    if "fid" in metrics and not is_real_fid(metrics):
        raise ConfigError("this FID was computed with random Inception weights; it is not a FID "
                          "and cannot go on a model card (drop the fid* keys, or measure it "
                          "with the standard weights)")


def publishable(metrics: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the metrics a card may show, notes on what was left off and why)."""
    check_metrics(metrics)
    if "fid" not in metrics or is_real_fid(metrics):
        return dict(metrics), []
    kept = {k: v for k, v in metrics.items() if not k.startswith("fid")}
    return kept, [f"a FID of {metrics['fid']:.4g} was measured with random Inception weights "
                  f"({metrics['fid_weights']}) to test the pipeline; it is not a FID and is "
                  "not shown"]


def load_metrics(source: str | os.PathLike[str]) -> dict[str, Any]:
    """Metrics from a JSON file or a JSON object string (``--metrics``), checked."""
    text = os.fspath(source)
    if not text.lstrip().startswith("{"):
        try:
            text = Path(text).read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"--metrics: cannot read {source} ({err.strerror}); pass the JSON "
                              "file `attnflow evaluate --json` wrote, or a JSON object") from err
    try:
        metrics = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--metrics is neither a JSON file nor valid JSON: {err}") from err
    return check_metrics(metrics)
