#!/usr/bin/env bash
# GPU benchmark (issue 14): one table of train / sample img/s and peak memory for the reference
# configuration (L=3, K=2, C=256, affine) and attnflow_imap_cifar10, at fp32, bf16, bf16 with the
# step and the sampler captured by CUDA graphs, and bf16 compiled (first-call cost included).
# Runs in under 5 minutes on one GPU: every row is a subprocess with its share of a 270 s
# budget (compilation included); a row that fails or overruns prints its reason instead.
# No downloads. Usage: bash benchmarks/gpu.sh [extra gpu_bench.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, installed or not
PY=${PYTHON:-python}
"$PY" - <<'PYCHECK' || exit 2
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu.sh: no CUDA device visible to torch; nothing to measure")
import attnflow_zoo as az
az.create_model("marflow_tiny")  # every import a row needs (fails here, fast, if one is missing)
print(f"gpu.sh: {torch.cuda.get_device_name()}, torch {torch.__version__}", file=sys.stderr)
PYCHECK
exec timeout --kill-after=10 285 "$PY" benchmarks/gpu_bench.py --budget 270 "$@"
