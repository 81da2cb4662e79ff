#!/usr/bin/env bash
# The GPU check, in one go, for a person with a GPU (and, ideally, a checkpoint):
#   1. keep-all = stock generate, token for token, in the dtype given (python -m ptp_ros_bench.equivalence)
#   2. the efficiency table at this size: FLOPs, latency, memory per selector and keep ratio (ptp-bench), and the
#      encode of 2 camera views in one batch against 2 single encodes (ptp-bench --views 2: OUT/bench/views.md)
#   3. ptp-eval --data on the bundled frames (bench/data/frames: 4 proxy scenes, 28 questions), with latency
#
#   bash bench/gpu_check.sh [MODEL] [OUT]
#     MODEL  a checkpoint directory (LLaVA-NeXT, InternVL -hf, Qwen2.5-VL) or a real-size name built with random
#            weights (llava-next-7b, llava-next-13b: timings and memory are real, answers are not); default llava-next-7b
#     OUT    folder for everything (default gpu_check_out); commit OUT/bench into docs/benchmarks with --merge
#   env: DEVICE (default cuda), DTYPE (default float16), RATIOS (default "0.5 0.25 0.111 0.056"),
#        METHODS (default "ptp fastv divprune hired random"), LIMIT (first N frames' questions; default all),
#        SKIP_BENCH=1 to skip step 2 (~10–20 min at 7B), BENCH_ARGS extra ptp-bench flags (e.g. "--repetitions 1")
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-llava-next-7b}
OUT=${2:-gpu_check_out}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-float16}
RATIOS=${RATIOS:-0.5 0.25 0.111 0.056}
METHODS=${METHODS:-ptp fastv divprune hired random}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(0 if '$DEVICE' == 'cpu' or torch.cuda.is_available() else 'gpu_check: CUDA is not available (set DEVICE=cpu to run it anyway)')"
python - <<'PY' > "$OUT/machine.json"
import json, platform, torch, transformers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print(json.dumps({"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
                  "transformers": transformers.__version__, "python": platform.python_version()}))
PY

echo "== 1/3 keep-all = stock generate ($MODEL, $DEVICE, $DTYPE)"
status=0
python -m ptp_ros_bench.equivalence --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --frames 3 \
  --max-new-tokens 16 --out "$OUT/equivalence.json" || status=$?

if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
  echo "== 2/3 efficiency table (ptp-bench)"
  # shellcheck disable=SC2086
  ptp-bench --out "$OUT/bench" --model "$MODEL" --device "$DEVICE" --keep-ratios "1.0,${RATIOS// /,}" ${BENCH_ARGS:-}
  ptp-bench --out "$OUT/bench" --model "$MODEL" --device "$DEVICE" --views 2
fi

echo "== 3/3 ptp-eval --data on the bundled frames"
# shellcheck disable=SC2086
ptp-eval --data bench/data/frames/data.jsonl --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
  --ratios $RATIOS --methods $METHODS --max-new-tokens 8 \
  --prompt "{question} Answer the question using a single word or phrase." --out "$OUT/eval" \
  ${LIMIT:+--limit "$LIMIT"}

echo "gpu_check: wrote $OUT (equivalence.json, bench/, eval/); keep-all = stock generate: $([[ $status == 0 ]] && echo yes || echo NO)"
exit $status
