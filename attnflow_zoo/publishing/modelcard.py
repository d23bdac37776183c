"""Model cards: per-family defaults + per-entry data from ``cards/``, rendered with
``huggingface_hub.ModelCard`` from what is passed in — the run record (``run.json``: what the
training run really did), the measured metrics (the schema of ``results``) and the entry's
recipe as sentences. It knows no registry: ``publish`` gathers those and calls ``render_card``.

Truth rules: the data a checkpoint was trained on is the run record's (a local folder by its
path); without a run record the card says the training was not recorded and claims no
``datasets``; ``model-index`` holds only metrics that were measured (and never a FID of random
Inception weights); the papers' numbers stand beside measured ones only on the same dataset.

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
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from ..data.datasets import DATASETS, card_info
from ..evaluation.results import check_metrics, refuse_pipeline_fid
from ..progress import clock

FAMILIES = ("attnflow", "marflow", "validator", "resflow", "tarflow")
_PACKAGES = {"cards": "attnflow_zoo._cards", "dataset_license": "attnflow_zoo._licenses"}
ATTENTION_NAMES = {"imap": "iMap", "itrans": "iTrans", "none": "none", "dot": "dot",
                   "embedded": "embedded", "gaussian": "gaussian", "concat": "concat"}
#: Tags every card carries (the mixin's own two included).
BASE_TAGS = {"attnflow_zoo", "normalizing-flows", "pytorch_model_hub_mixin", "model_hub_mixin"}
LOCAL_LICENSE = ("A local folder: its terms are those of wherever its images come from, which "
                 "this card cannot know; check them before publishing weights trained on it.")


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
    for family, marker in (("validator", "valid"), ("resflow", "resflow"), ("tarflow", "tarflow"),
                           ("resflow", "iresnet"), ("marflow", "marflow"),
                           ("attnflow", "attnflow")):
        if marker in arch:
            return family
    return "default"


# --- which data --------------------------------------------------------------------------------
def _count(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def _local_info(path: str, shape_text: str = "", splits: str = "") -> dict[str, Any]:
    return {"name": f"local folder `{path}`", "short": f"local folder {Path(path).name}",
            "hub_id": None, "hub_config": None, "image_shape": shape_text, "splits": splits,
            "license_file": "README.md", "license_summary": LOCAL_LICENSE, "local_path": path}


def _named_info(key: str) -> dict[str, Any]:
    info = dict(card_info(key) or {})
    info["short"] = info["name"]
    return info


def trained_on(run: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the card says about the training data of a run record (None: not recorded)."""
    ds = (run or {}).get("dataset") or {}
    key, path = ds.get("name"), ds.get("path")
    shape = ds.get("image_shape")
    shape_text = "×".join(map(str, shape)) + " as trained" if shape else ""
    used = []
    if ds.get("num_train") is not None:
        rule = ds.get("limit_rule") or f"the first {_count(ds.get('limit'))}"
        limit = f" ({rule})" if ds.get("limit") else ""
        used.append(f"{ds.get('train_split', 'train')} split: {_count(ds['num_train'])} images "
                    f"used{limit}")
    if ds.get("num_validation"):
        used.append(f"validation: {_count(ds['num_validation'])} images carved from the "
                    f"{ds.get('train_split', 'train')} split")
    if ds.get("num_heldout"):
        used.append(f"held-out {ds.get('heldout_split') or ''} split: "
                    f"{_count(ds['num_heldout'])} images".replace("  ", " "))
    splits = "; ".join(used)
    if key and card_info(key):
        info = _named_info(key)
        info["splits"] = splits or info["splits"]
        info["image_shape"] = shape_text or info["image_shape"]
        return info
    if path:
        return _local_info(str(path), shape_text, splits)
    return None


def _scored_on(metrics: dict[str, Any]) -> dict[str, Any] | None:
    dataset = metrics.get("dataset")
    if not dataset:
        return None
    return _named_info(dataset) if card_info(dataset) else _local_info(dataset)


def card_spec(preset: str | None, architecture: str = "", config: dict[str, Any] | None = None,
              dataset: str | None = None, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """The merged card data: family defaults ← entry file ← what the name/config say ← what the
    run record says (the data it was really trained on)."""
    config = config or {}
    family = family_of(preset, architecture)
    spec: dict[str, Any] = dict(_json(f"families/{family}.json") or {})
    entry = _json(f"{preset}.json") if preset else None
    spec.update(entry or {})
    tokens = (preset or "").split("_")
    nominal = spec.get("dataset") or dataset or next((t for t in tokens if t in DATASETS), None)
    nominal = nominal or config.get("dataset")
    actual = trained_on(run)
    spec["trained_on"] = actual
    if actual is not None:
        spec["dataset_key"] = actual.get("local_path") or (run or {})["dataset"].get("name")
        spec["dataset"] = actual
    else:
        spec["dataset_key"] = nominal
        spec["dataset"] = _named_info(nominal) if card_info(nominal) else {
            "name": nominal or "unspecified data", "short": nominal or "unspecified data",
            "hub_id": None, "image_shape": "", "splits": "", "license_file": "README.md",
            "license_summary": "The training data's terms were not recorded for this checkpoint."}
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
    if spec["dataset_key"] != spec.get("reference_dataset", "cifar10"):
        # The family's reference numbers are on one dataset (SPEC §5's on CIFAR-10); beside
        # other data they mislead.
        spec["reference_results"] = (entry or {}).get("reference_results", [])
    spec.setdefault("reference_caption", "CIFAR-10 test; FID on 50k samples")
    variant = "tiny" if "tiny" in tokens else "small" if "small" in tokens else None
    spec.setdefault("variant_note", {
        "tiny": "a test-size preset, not trained for quality",
        "small": "a reduced-width preset for quick experiments"}.get(variant or "", ""))
    fmt = {"attention": spec.get("attention", ""), "dataset_name": spec["dataset"]["short"],
           "architecture": architecture}
    spec["title"] = spec.get("title", "{architecture}").format(**fmt)
    spec["family"] = family
    return spec


# --- what was measured ---------------------------------------------------------------------------
def noise_of(config: dict[str, Any], metrics: dict[str, Any]) -> float:
    """σ of the Gaussian noise a checkpoint was trained with (its config's ``noise_std``, or
    the metrics' ``bpd_noise_std``); 0 for a likelihood checkpoint."""
    return float(config.get("noise_std") or metrics.get("bpd_noise_std") or 0.0)


def checkpoint_kind(noise_std: float) -> str:
    """The card's sentence on which kind of checkpoint it is (likelihood or sample quality)."""
    if noise_std > 0:
        return (f"a sample-quality checkpoint: trained on the 8-bit bins' centres plus Gaussian "
                f"noise σ = {noise_std:g} (model space), for sampling with denoising; its "
                "bits/dim is not a discrete-data bits/dim and is not comparable with "
                "likelihood checkpoints or the papers' bits/dim")
    return ("a likelihood checkpoint: trained with uniform dequantisation; its bits/dim is a "
            "discrete-data bits/dim")


def _metric_rows(m: dict[str, Any], noise_std: float = 0.0) -> list[dict[str, Any]]:
    rows = []
    if "bpd" in m:
        est = m["bpd_estimator"]
        k = m.get("bpd_num_importance_samples")
        est += f" (K = {k})" if k and k > 1 else ""
        n = f"{m['bpd_num_images']:,} images, " if "bpd_num_images" in m else ""
        kind = (f"; NOT a discrete-data bits/dim: the checkpoint was trained with Gaussian "
                f"noise σ = {noise_std:g}" if noise_std > 0 else "")
        rows.append({"name": "bits/dim", "value": f"{m['bpd']:.4f}",
                     "split": m.get("split", "test"),
                     "protocol": f"{n}{est} estimate, uniform dequantisation"
                                 + (f", noise seed {m['bpd_seed']}" if "bpd_seed" in m else "")
                                 + kind})
    if "fid" in m:
        ref = m.get("fid_reference", "train split")
        n_ref = (f" ({m['fid_reference_num_images']:,} images)"
                 if "fid_reference_num_images" in m else "")
        rows.append({"name": "FID", "value": f"{m['fid']:.2f}",
                     "split": m.get("fid_reference_split", "train"),
                     "protocol": f"{m['fid_num_samples']:,} samples at temperature "
                                 f"{m.get('fid_temperature', 1.0):g} vs the statistics of "
                                 f"{ref}{n_ref}; Inception features {m['fid_weights']}"})
    if "bayes_accuracy" in m:
        seed = f", noise seed {m['bpd_seed']}" if "bpd_seed" in m else ""
        rows.append({"name": "Bayes-rule accuracy", "value": f"{m['bayes_accuracy']:.4f}",
                     "split": m.get("split", "test"),
                     "protocol": f"{m['bayes_num_images']:,} images, ŷ = argmax over the "
                                 f"classes of log p(x | y){seed}"})
    for extra in m.get("extra", []):
        rows.append({"name": extra["name"], "value": extra["value"],
                     "split": extra.get("split", ""), "protocol": extra.get("protocol", "")})
    return rows


def run_lines(run: dict[str, Any], data_text: str, deviations: list[str] | None) -> list[str]:
    """What a run record says, as sentences for the card."""
    tc = run.get("train_config") or {}
    lines = [f"Data: {data_text}."]
    step = run.get("step")
    batch = tc.get("batch_size")
    if step is not None:
        seen = run.get("samples_seen") or (step * batch if batch else None)
        num_train = (run.get("dataset") or {}).get("num_train")
        epochs = f" ≈ {seen / num_train:.2f} epochs" if seen and num_train else ""
        total = run.get("total_steps")
        planned = f" of the {_count(total)} planned" if isinstance(total, int) and total > step \
            else ""
        status = run.get("status")
        state = f"; the run's status: {status}" if status and status != "finished" else ""
        lines.append(f"Length: {_count(step)} steps{planned} of a global batch of {batch}"
                     + (f" ({_count(seen)} images{epochs})" if seen else "") + f"{state}.")
    if tc:
        ema = f"EMA {tc['ema_decay']:g}" if tc.get("ema_decay") else "no EMA"
        aug = (f"shift <= {tc.get('max_shift')} px, flips {'on' if tc.get('flip') else 'off'}"
               if tc.get("augment") else "no augmentation")
        name = {"adam": "Adam", "adamw": "AdamW"}.get(tc.get("optimizer", ""), "Adamax")
        betas = f" betas {tuple(tc['betas'])}" if tc.get("betas") else ""
        decay = f" weight decay {tc['weight_decay']:g}," if tc.get("weight_decay") else ""
        noise = (f"; Gaussian input noise σ = {tc['noise_std']:g}" if tc.get("noise_std")
                 else "")
        lines.append(f"Optimisation: {name}{betas} lr {tc.get('lr')},{decay} warm-up "
                     f"{tc.get('warmup_steps')} steps, {tc.get('schedule', 'constant')} "
                     f"schedule, {ema}; {aug}{noise}; precision {_precision(tc)}; seed "
                     f"{tc.get('seed')}.")
    hw = []
    if run.get("device"):
        hw.append(f"{run.get('world_size', 1)} × {run['device']}")
    if run.get("wall_seconds") is not None:
        hw.append(f"wall time {clock(float(run['wall_seconds']))} (h:mm:ss)")
    if run.get("started"):
        hw.append(f"started {run['started']}")
    versions = [f"{k} {run[k]}" for k in ("torch", "attnflow_zoo") if run.get(k)]
    if hw or versions:
        lines.append("Hardware: " + ", ".join(hw + versions) + ".")
    if run.get("recipe"):
        follows = ("departs from it: " + "; ".join(deviations) + " — the numbers below are this "
                   "run's, not the recipe's") if deviations else "follows it"
        lines.append(f"Recipe `{run['recipe']}`: this run {follows}.")
    best = run.get("best")
    if isinstance(best, dict) and best.get("step") is not None:
        lines.append(f"Best checkpoint (by {best.get('split')} bits/dim "
                     f"{best.get('bpd')}): step {best['step']}.")
    return lines


def _training_rows(run: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = []
    for m in (run or {}).get("metrics") or []:
        if isinstance(m, dict) and "name" in m and "value" in m:
            value = m["value"]
            rows.append({"name": m["name"], "value": f"{value:.4f}" if isinstance(value, float)
                         else value, "split": m.get("split", ""), "step": m.get("step", ""),
                         "protocol": m.get("protocol", "")
                         + (f" ({_count(m['num_images'])} images)" if m.get("num_images") else "")})
    return rows


def render_card(*, architecture: str, config: Any, preset: str | None, repo_id: str,
                metrics: dict[str, Any] | None = None, run: dict[str, Any] | None = None,
                recipe: dict[str, Any] | None = None, left_out: list[str] | None = None,
                license: str = "apache-2.0") -> Any:
    """The model card of a checkpoint as a ``huggingface_hub.ModelCard``.

    Args:
        architecture: the model class name (``config.json``'s architecture).
        config: the config dataclass (or its dict).
        preset: the zoo entry name, or None (the family default card is used).
        repo_id: where the card will live (shown in the usage snippet).
        metrics: measured metrics in the schema of ``evaluation.results`` (what
            ``attnflow evaluate --json`` prints); they go into ``model-index``. A FID of random
            Inception weights is refused (``ConfigError``).
        run: the checkpoint's run record (``checkpoint.read_run_record``), or None.
        recipe: ``{"name", "lines", "deviations"}``: the entry's recipe as sentences and how
            the run departs from it (``recipes.describe`` / ``recipes.deviations``).
        left_out: notes on measured numbers not shown (e.g. a pipeline-test FID).
    """
    from huggingface_hub import ModelCard, ModelCardData

    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    metrics = check_metrics(dict(metrics or {}))
    refuse_pipeline_fid(metrics)
    spec = card_spec(preset, architecture, cfg, metrics.get("dataset"), run)
    ds = spec["dataset"]
    scored = _scored_on(metrics) or ds
    model_name = repo_id.split("/")[-1]
    noise = noise_of(cfg, metrics)
    num_classes = int(cfg.get("num_classes") or 0)
    results = _eval_results(metrics, scored, noise, num_classes)
    arxiv = list(spec.get("arxiv", []))
    tags = sorted(set(spec.get("tags", [])) | BASE_TAGS | {f"arxiv:{a}" for a in arxiv}
                  | ({"class-conditional"} if num_classes else set()))
    actual = spec["trained_on"]
    card_data = ModelCardData(
        license=license, library_name="attnflow_zoo", tags=tags,
        datasets=[actual["hub_id"]] if actual and actual.get("hub_id") else None,
        pipeline_tag=None if num_classes else TASKS[False][0],
        model_name=model_name if results else None, eval_results=results or None)
    ours = None
    same_data = spec["dataset_key"] == (metrics.get("dataset") or spec["dataset_key"])
    if ("bpd" in metrics or "fid" in metrics) and same_data:
        comparable = "bpd" in metrics and noise == 0
        ours = {"bpd": f"{metrics['bpd']:.3f}" if comparable else "-",
                "fid": f"{metrics['fid']:.1f}" if "fid" in metrics else "-"}
    data_text = ", ".join(x for x in (ds["name"], ds.get("image_shape"), ds.get("splits")) if x)
    recipe = recipe or {}
    template = read_resource("cards", "template.md")
    return ModelCard.from_template(
        card_data, template_str=template, title=spec["title"], summary=spec.get("summary", ""),
        preset=preset or "(not a zoo preset)", architecture=architecture, repo_id=repo_id,
        variant_note=spec.get("variant_note", ""), paper=spec.get("paper"), arxiv=arxiv,
        dataset=ds, trained=actual is not None, num_classes=num_classes,
        guidance=bool(num_classes and cfg.get("class_dropout")),
        recipe_lines=recipe.get("lines", []),
        run_lines=run_lines(run, data_text, recipe.get("deviations")) if run else [],
        architecture_notes=spec.get("architecture_notes", []),
        decisions=spec.get("decisions", []),
        config_json=json.dumps(cfg, indent=2, sort_keys=True),
        metrics_rows=_metric_rows(metrics, noise), metrics_step=metrics.get("step"),
        checkpoint_kind=checkpoint_kind(noise) if spec["family"] == "tarflow" or noise else "",
        reference_caption=spec["reference_caption"],
        left_out=left_out or [], training_rows=_training_rows(run),
        reference_results=spec.get("reference_results", []) if ds["name"] else [],
        ours=ours if spec.get("reference_results") else None, license=license,
        citation=spec.get("citation", ""))


#: (task_type, task_name) of the model-index: the Hub has no class-conditional image generation
#: task, so a class-conditional model gets a task of its own name (and no pipeline tag).
TASKS = {False: ("unconditional-image-generation", "Unconditional Image Generation"),
         True: ("class-conditional-image-generation", "Class-conditional Image Generation")}


def _eval_results(metrics: dict[str, Any], scored: dict[str, Any], noise_std: float,
                  num_classes: int = 0) -> list[Any]:
    """The ``model-index`` entries of measured metrics: bits/dim only for a likelihood
    checkpoint (a noise-trained one's is not a discrete-data bits/dim), FID for either, a
    class-conditional model's Bayes-rule accuracy."""
    from huggingface_hub import EvalResult

    local = scored.get("local_path")
    task_type, task_name = TASKS[bool(num_classes)]
    common = {"task_type": task_type, "task_name": task_name,
              "dataset_type": "imagefolder" if local else (scored.get("hub_id") or "unknown"),
              "dataset_name": local or scored["name"],
              "dataset_config": scored.get("hub_config")}
    results = []
    if "bpd" in metrics and noise_std == 0:
        results.append(EvalResult(**common, dataset_split=metrics.get("split", "test"),
                                  metric_type="bits_per_dim",
                                  metric_name=f"Bits per dimension ({metrics['bpd_estimator']})",
                                  metric_value=float(metrics["bpd"])))
    if "fid" in metrics:
        results.append(EvalResult(**common,
                                  dataset_split=metrics.get("fid_reference_split", "train"),
                                  metric_type="fid",
                                  metric_name=f"FID ({metrics['fid_num_samples']} samples)",
                                  metric_value=float(metrics["fid"])))
    if "bayes_accuracy" in metrics:
        results.append(EvalResult(**common, dataset_split=metrics.get("split", "test"),
                                  metric_type="accuracy",
                                  metric_name="Bayes-rule accuracy (argmax_y log p(x | y))",
                                  metric_value=float(metrics["bayes_accuracy"])))
    return results


def _precision(train_config: dict[str, Any]) -> str:
    """The run's precision; older runs recorded CUDA autocast as ``amp`` ("none" = fp32)."""
    if "precision" in train_config:
        return str(train_config["precision"])
    amp = train_config.get("amp", "none")
    return "fp32" if amp == "none" else str(amp)
