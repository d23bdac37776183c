"""Does a class-conditional digits model use its class? Two numbers per checkpoint (SPEC §7,
issue 20):

- Bayes-rule accuracy on the held-out digits: ŷ = argmax_y log p(x | y) (uniform p(y)), the
  same dequantisation noise for every y (``attnflow_zoo``'s ``bayes_accuracy``, what
  ``attnflow evaluate`` reports);
- sample recognition: ``--per-class`` samples of every class at temperature ``--temperature``
  (seeded ``--seed``, guidance ``--guidance``), each classified by an RBF SVM on raw pixels
  fitted to the real training digits (``digits_classifiers.pixel_svm``; its own held-out
  accuracy is printed as the ceiling); the share recognised as the class they were drawn for.

    OMP_NUM_THREADS=1 python benchmarks/conditional.py runs/cond [runs/other ...] \\
        [--temperature 0.7] [--per-class 100] [--seed 0] [--guidance 0] [--json out.json]

A checkpoint is a folder written by ``save_pretrained`` or a training ``--out`` folder (its
newest checkpoint). Needs scikit-learn (a benchmark dependency, not the library's).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import digits_classifiers as dc  # noqa: E402

import attnflow_zoo as az  # noqa: E402
from attnflow_zoo.data.quantize import from_model_space  # noqa: E402
from attnflow_zoo.hub import resolve_checkpoint  # noqa: E402
from attnflow_zoo.metrics import bayes_accuracy  # noqa: E402


@torch.no_grad()
def recognised(model, svm, per_class: int, temperature: float, seed: int, guidance: float
               ) -> dict[str, object]:
    """Sample ``per_class`` images of every class; the SVM's verdicts."""
    k = model.num_classes
    y = torch.arange(k).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(seed)
    kwargs = {"guidance": guidance} if guidance else {}
    x = torch.cat([model.generate(len(part), temperature=temperature, generator=g, y=part,
                                  **kwargs) for part in y.split(250)])
    finite = torch.isfinite(x.flatten(1)).all(1)
    images = from_model_space(torch.where(torch.isfinite(x), x, torch.zeros(())))
    pred = torch.as_tensor(dc.svm_predict(svm, images))
    hit = pred == y
    return {"samples": len(y), "recognised": float(hit.double().mean()),
            "per_class": [round(float(hit[y == c].double().mean()), 3) for c in range(k)],
            "nonfinite": int((~finite).sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    heldout, labels = dc.digits("test")
    svm = dc.pixel_svm()
    svm_acc = float(np.mean(dc.svm_predict(svm, heldout) == labels.numpy()))
    print(f"SVM (RBF, raw pixels) on the real held-out digits: {svm_acc:.4f} "
          f"({len(heldout)} images)")
    rows = []
    for path in args.checkpoints:
        model = az.load_model(resolve_checkpoint(path)).eval()
        if not model.num_classes:
            print(f"{path}: unconditional, skipped")
            continue
        g = torch.Generator().manual_seed(args.seed)
        bayes = bayes_accuracy(model, heldout, labels, args.batch_size, g, show_progress=False)
        rec = recognised(model, svm, args.per_class, args.temperature, args.seed, args.guidance)
        row = {"checkpoint": str(path), "bayes_accuracy": bayes["accuracy"],
               "bayes_predicted_counts": bayes["predicted_counts"],
               "temperature": args.temperature, "guidance": args.guidance, **rec}
        rows.append(row)
        print(f"{path}: Bayes-rule accuracy {bayes['accuracy']:.4f} on {len(heldout)} held-out "
              f"digits (predicted counts {bayes['predicted_counts']}); samples at T = "
              f"{args.temperature}, guidance {args.guidance}: {rec['recognised']:.4f} of "
              f"{rec['samples']} recognised (per class {rec['per_class']}; "
              f"{rec['nonfinite']} non-finite)")
    if args.json is not None:
        args.json.write_text(json.dumps({"svm_heldout_accuracy": svm_acc, "seed": args.seed,
                                         "per_class": args.per_class, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
