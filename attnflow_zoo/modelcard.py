"""Model cards: per-family defaults + per-entry data from ``cards/``, rendered with
``huggingface_hub.ModelCard`` (YAML header with a ``model-index`` when metrics are given).

The card data lives next to the package: ``cards/template.md``, the family defaults
``cards/families/<family>.json``, per-entry overrides ``cards/<preset>.json``,
and the dataset terms in ``dataset_license/`` (what a card says about each dataset comes from
``data.DATASETS``, the zoo's one dataset table). Installed from a wheel
they are the package-data packages ``attnflow_zoo._cards`` and ``attnflow_zoo._licenses``; in a
checkout they are read from the repository root.
"""

from __future__ import annotations

import dataclasses
import json
import math
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from .data import DATASETS, card_info
from .errors import ConfigError

FAMILIES = ("attnflow", "marflow", "validator", "resflow")
_PACKAGES = {"cards": "attnflow_zoo._cards", "dataset_license": "attnflow_zoo._licenses"}
ATTENTION_NAMES = {"imap": "iMap", "itrans": "iTrans", "none": "none", "dot": "dot",
                   "embedded": "embedded", "gaussian": "gaussian", "concat": "concat"}
METRIC_KEYS = {"dataset", "split", "bpd", "bpd_estimator", "bpd_num_importance_samples",
               "bpd_num_images", "fid", "fid_num_samples", "fid_temperature", "fid_reference",
               "fid_weights", "extra"}


def resource_dir(kind: str) -> Traversable:
    """``cards`` or ``dataset_license``: the installed package data, else the checkout folder."""
    try:
        root = resources.files(_PACKAGES[kind])
        if root.joinpath("__init__.py").is_file():
            return root
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / kind


def read_resource(kind: str, name: str) -> str:
    """The text of ``<kind>/<name>`` (e.g. ``read_resource("dataset_license", "svhn.md")``)."""
    return resource_dir(kind).joinpath(*name.split("/")).read_text(encoding="utf-8")


def _json(name: str) -> dict[str, Any] | None:
    path = resource_dir("cards").joinpath(*name.split("/"))
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def family_of(preset: str | None, architecture: str) -> str:
    """The card family: from the preset's first word, else from the architecture name."""
    if preset and preset.split("_")[0] in FAMILIES:
        return preset.split("_")[0]
    arch = architecture.lower()
    for family, marker in (("validator", "valid"), ("resflow", "resflow"),
                           ("resflow", "iresnet"), ("marflow", "marflow"),
                           ("attnflow", "attnflow")):
        if marker in arch:
            return family
    return "default"


def card_spec(preset: str | None, architecture: str = "", config: dict[str, Any] | None = None,
              dataset: str | None = None) -> dict[str, Any]:
    """The merged card data: family defaults ← entry file ← what the name/config say."""
    config = config or {}
    family = family_of(preset, architecture)
    spec: dict[str, Any] = dict(_json(f"families/{family}.json") or {})
    entry = _json(f"{preset}.json") if preset else None
    spec.update(entry or {})
    tokens = (preset or "").split("_")
    dataset = spec.get("dataset") or dataset or next((t for t in tokens if t in DATASETS), None)
    dataset = dataset or config.get("dataset")
    spec["dataset_key"] = dataset
    spec["dataset"] = card_info(dataset) or ({
        "name": dataset or "unspecified data", "hub_id": None, "image_shape": "",
        "splits": "", "license_file": "README.md",
        "license_summary": "The training data's terms were not recorded for this checkpoint."})
    for key in ("attn", "attention", "attn_kind", "kind"):
        if isinstance(config.get(key), str):
            spec["attention"] = ATTENTION_NAMES.get(config[key], config[key])
            break
    else:
        name_attn = next((t for t in tokens if t in ATTENTION_NAMES), None)
        if name_attn and "attention" not in (entry or {}):
            spec["attention"] = ATTENTION_NAMES[name_attn]
    decisions = list(spec.get("decisions", []))
    if spec.get("decisions_note"):
        decisions.append(f"This entry: {spec['decisions_note']}")
    if isinstance(config.get("lipschitz"), str):
        decisions.append(f"This checkpoint: lipschitz = {config['lipschitz']}.")
    spec["decisions"] = decisions
    if dataset != "cifar10":
        # SPEC §5's reference numbers are CIFAR-10 results; beside other data they mislead.
        spec["reference_results"] = (entry or {}).get("reference_results", [])
    variant = "tiny" if "tiny" in tokens else "small" if "small" in tokens else None
    spec.setdefault("variant_note", {
        "tiny": "a test-size preset, not trained for quality",
        "small": "a reduced-width preset for quick experiments"}.get(variant or "", ""))
    fmt = {"attention": spec.get("attention", ""), "dataset_name": spec["dataset"]["name"],
           "architecture": architecture}
    spec["title"] = spec.get("title", "{architecture}").format(**fmt)
    spec["family"] = family
    return spec


def check_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Validate a metrics dict (see ``render_card``); ``ConfigError`` naming what is missing."""
    unknown = sorted(set(metrics) - METRIC_KEYS)
    if unknown:
        raise ConfigError(f"unknown metrics key(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(METRIC_KEYS))}")
    if "bpd" in metrics and "bpd_estimator" not in metrics:
        raise ConfigError("metrics give bpd without bpd_estimator ('single-sample' or "
                          "'importance-weighted'); the card must say which")
    if "fid" in metrics:
        for key in ("fid_num_samples", "fid_weights"):
            if key not in metrics:
                raise ConfigError(f"metrics give fid without {key}; the card must state the "
                                  "FID protocol")
        if "random" in str(metrics["fid_weights"]).lower():
            raise ConfigError("this FID was computed with random Inception weights; it is not "
                              "a FID and cannot go on a model card")
    for key in ("bpd", "fid"):
        if key in metrics and not (isinstance(metrics[key], int | float)
                                   and math.isfinite(metrics[key])):
            raise ConfigError(f"metrics {key} must be a finite number, got {metrics[key]!r}")
    return metrics


def _metric_rows(m: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    if "bpd" in m:
        est = m["bpd_estimator"]
        k = m.get("bpd_num_importance_samples")
        est += f" (K = {k})" if k and k > 1 else ""
        n = f", {m['bpd_num_images']} images" if "bpd_num_images" in m else ""
        rows.append({"name": "bits/dim", "value": f"{m['bpd']:.4f}",
                     "protocol": f"{m.get('split', 'test')} split{n}, {est} estimate, uniform "
                                 "dequantisation"})
    if "fid" in m:
        rows.append({"name": "FID", "value": f"{m['fid']:.2f}",
                     "protocol": f"{m['fid_num_samples']} samples at temperature "
                                 f"{m.get('fid_temperature', 1.0)} vs "
                                 f"{m.get('fid_reference', 'train split')} statistics; Inception "
                                 f"weights {m['fid_weights']}; images resized bilinearly to 299"})
    for extra in m.get("extra", []):
        rows.append({"name": extra["name"], "value": extra["value"],
                     "protocol": extra.get("protocol", "")})
    return rows


def render_card(*, architecture: str, config: Any, preset: str | None, repo_id: str,
                metrics: dict[str, Any] | None = None, license: str = "apache-2.0") -> Any:
    """The model card of a checkpoint as a ``huggingface_hub.ModelCard``.

    Args:
        architecture: the model class name (``config.json``'s architecture).
        config: the config dataclass (or its dict).
        preset: the zoo entry name, or None (the family default card is used).
        repo_id: where the card will live (shown in the usage snippet).
        metrics: optional, e.g. ``{"dataset": "cifar10", "split": "test", "bpd": 3.31,
            "bpd_estimator": "single-sample", "bpd_num_images": 10000, "fid": 41.0,
            "fid_num_samples": 50000, "fid_temperature": 1.0, "fid_reference": "cifar10 train",
            "fid_weights": "pt_inception-2015-12-05-6726825d", "extra": [{"name": ...,
            "value": ..., "protocol": ...}]}``. Given metrics go into a ``model-index`` block.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    metrics = check_metrics(dict(metrics or {}))
    spec = card_spec(preset, architecture, cfg, metrics.get("dataset"))
    ds = spec["dataset"]
    model_name = repo_id.split("/")[-1]
    results = []
    common = {"task_type": "unconditional-image-generation",
              "task_name": "Unconditional Image Generation",
              "dataset_type": ds.get("hub_id") or spec["dataset_key"] or "unknown",
              "dataset_name": ds["name"], "dataset_config": ds.get("hub_config")}
    if "bpd" in metrics:
        results.append(EvalResult(**common, dataset_split=metrics.get("split", "test"),
                                  metric_type="bits_per_dim",
                                  metric_name=f"Bits per dimension ({metrics['bpd_estimator']})",
                                  metric_value=float(metrics["bpd"])))
    if "fid" in metrics:
        results.append(EvalResult(**common, dataset_split="train", metric_type="fid",
                                  metric_name=f"FID ({metrics['fid_num_samples']} samples)",
                                  metric_value=float(metrics["fid"])))
    tags = sorted(set(spec.get("tags", [])) | {"attnflow_zoo", "normalizing-flows",
                                               "pytorch_model_hub_mixin"})
    card_data = ModelCardData(
        license=license, library_name="attnflow_zoo", tags=tags,
        datasets=[ds["hub_id"]] if ds.get("hub_id") else None,
        pipeline_tag="unconditional-image-generation",
        model_name=model_name if results else None, eval_results=results or None)
    ours = None
    if "bpd" in metrics or "fid" in metrics:
        ours = {"bpd": f"{metrics['bpd']:.3f}" if "bpd" in metrics else "-",
                "fid": f"{metrics['fid']:.1f}" if "fid" in metrics else "-"}
    template = read_resource("cards", "template.md")
    return ModelCard.from_template(
        card_data, template_str=template, title=spec["title"], summary=spec.get("summary", ""),
        preset=preset or "(not a zoo preset)", architecture=architecture, repo_id=repo_id,
        variant_note=spec.get("variant_note", ""), paper=spec.get("paper"), dataset=ds,
        training_recipe=spec.get("training_recipe", []), decisions=spec.get("decisions", []),
        config_json=json.dumps(cfg, indent=2, sort_keys=True),
        metrics_rows=_metric_rows(metrics),
        reference_results=spec.get("reference_results", []) if ds["name"] else [],
        ours=ours if spec.get("reference_results") else None, license=license,
        citation=spec.get("citation", ""))
