#!/usr/bin/env bash
# lmms-eval 0.7.3 for `lmms-eval --model ptp_ros` (ptp_ros/integrations/lmms.py), into the active Python
# environment, after ptp_ros itself (README).  Offline-safe apart from the package index; rerunning is cheap.
#
# lmms-eval declares torchvision, sentence-transformers, wandb, timm, ... as dependencies.  Installed as
# declared they would replace this environment's torch (pulling a multi-GB CUDA build onto a CPU machine)
# and could move transformers.  So lmms-eval goes in with --no-deps, and only what its CLI imports on the
# ptp_ros path comes from setup.py's `eval` extra, under constraints that hold torch, transformers and numpy
# at their installed versions.  Benchmark tasks with extra needs (an LLM judge: openai) name them when run.
set -euo pipefail
cd "$(dirname "$0")/../.."
LMMS_EVAL_VERSION=0.7.3

if ! python -c "import torch, transformers" 2>/dev/null; then
  echo "bench/lmms/install.sh: install ptp_ros first (README: torch, then pip install -e .)" >&2
  exit 1
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
python - >"$constraints" <<'PY'
from importlib.metadata import version
for name in ("torch", "transformers", "numpy"):
    print(f"{name}=={version(name)}")
PY
# --no-warn-conflicts: lmms-eval's declared-but-skipped dependencies are not conflicts worth a warning
pip install -q --no-warn-conflicts -c "$constraints" -e ".[eval]"
pip install -q --no-warn-conflicts --no-deps "lmms-eval==$LMMS_EVAL_VERSION"
python -c "import lmms_eval.evaluator, ptp_ros.integrations.lmms" \
  || { echo "bench/lmms/install.sh: lmms-eval does not import (see above)" >&2; exit 1; }
echo "bench/lmms/install.sh: lmms-eval $LMMS_EVAL_VERSION ready: lmms-eval --model ptp_ros --model_args pretrained=DIR,keep_ratio=0.111 --tasks ..."
