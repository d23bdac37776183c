"""A/B: this checkout's attnflow_zoo against another checkout's, side by side in one process.

The other checkout's package is imported under another name (``--base`` is a folder that holds
an ``attnflow_zoo`` package, e.g. ``git worktree add /tmp/base main``), the same preset is
built from both with the same weights (the state dict is copied), and training steps
(forward + backward + Adamax) and sampling calls are timed in interleaved rounds. Reported:
median and range of the per-round ratios new/base, for each precision asked.

    python benchmarks/ab.py --base /tmp/base --threads 1 --precisions fp32 bf16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _import_as(src: Path, name: str):  # noqa: ANN202
    """Import the package at ``src`` under the top-level name ``name`` (a copy in a temp dir;
    the package uses relative imports only)."""
    tmp = Path(tempfile.mkdtemp(prefix="ab_"))
    shutil.copytree(src, tmp / name)
    spec = importlib.util.spec_from_file_location(name, tmp / name / "__init__.py",
                                                  submodule_search_locations=[str(tmp / name)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="folder holding the base attnflow_zoo")
    parser.add_argument("--model", default="marflow_cifar10_small")
    parser.add_argument("--set", default='{"num_steps": 2, "hidden_channels": 256}')
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args()

    import torch

    import attnflow_zoo as new

    old = _import_as(Path(args.base) / "attnflow_zoo", "attnflow_zoo_base")
    torch.set_num_threads(args.threads)
    overrides = json.loads(args.set)
    models = {"new": new.create_model(args.model, **overrides),
              "base": old.create_model(args.model, **overrides)}
    g = torch.Generator().manual_seed(0)
    x_u8 = torch.randint(0, 256, (args.batch_size, *models["new"].input_shape), generator=g,
                         dtype=torch.uint8)
    models["new"].initialize_from_data(x_u8, torch.Generator().manual_seed(1))
    models["base"].load_state_dict(models["new"].state_dict())
    opts = {k: torch.optim.Adamax(m.parameters(), lr=1e-6) for k, m in models.items()}

    def train(key: str, precision: str):  # noqa: ANN202
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = models[key].bits_per_dim(x_u8, generator=g, grad=True).mean()
            opts[key].zero_grad(set_to_none=True)
            loss.backward()
            opts[key].step()
        return run

    def sample(key: str, precision: str):  # noqa: ANN202
        def run() -> None:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                 enabled=precision == "bf16"):
                models[key].generate(16, generator=g)
        return run

    print(f"new: {new.__file__}\nbase: {args.base}\n{args.model} {overrides}, batch "
          f"{args.batch_size}, {args.threads} thread(s), {args.rounds} rounds")
    print("| precision | what | new s (median) | base s (median) | new/base median | range |")
    print("|---|---|---|---|---|---|")
    for precision in args.precisions:
        for what, make in (("train step", train), ("sample 16", sample)):
            fns = {k: make(k, precision) for k in models}
            for fn in fns.values():
                fn()
            times: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(args.rounds):
                for key, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - start)
            ratios = [a / b for a, b in zip(times["new"], times["base"], strict=True)]
            print(f"| {precision} | {what} | {statistics.median(times['new']):.3f} | "
                  f"{statistics.median(times['base']):.3f} | {statistics.median(ratios):.3f} | "
                  f"{min(ratios):.3f}–{max(ratios):.3f} |", flush=True)


if __name__ == "__main__":
    main()
