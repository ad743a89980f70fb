#!/usr/bin/env bash
# The first look at a GPU, in one call (issue 23): on a machine with one NVIDIA GPU, in under
# 10 minutes (the timeouts below cap it at 825 s), with nothing installed beyond the project's own
# set-up (`python3 -m jobs.bootstrap`):
#   1. the `gpu` tests (bf16 autocast against fp32, the compiled loss against the eager one, the
#      flash-attention paths, DeepSpeed over NCCL, translation on the GPU against the CPU);
#   2. bf16 training of `base` and `big` at a token budget like the paper's (~25k target tokens per
#      step, its 37k vocabulary), eager, and compiled last (compiling takes the longest), against
#      a dropout-matched bf16 torch.nn.Transformer, with MFU against the device's datasheet peak
#      (jobs/report/metrics.py), beside it a bf16 8192^3 matrix multiply's rate on this device, and the
#      15 kernels that take most of one step's time; compiled, also with the loss left eager;
#   3. translation at fixed length, `base` with random weights and the shipped Multi30K's tokenizer
#      and test sources (`aiayn prepare` first, unless data/multi30k-en-de is there): ours in bf16
#      against CTranslate2 float16 and bfloat16.
# Each step runs under its own timeout and a failed one does not stop the next. On an H200 (torch
# 2.11, 16 cores) the whole took 397 s, 251 of them in the two compiled runs
# (bench/results/gpu-2026-12-04/), before the compiled loss and two more gpu tests.
#
#   bash bench/gpu_check.sh [OUT_DIR]      # default: $OUT if set, else bench/results/gpu-<date>
#   AIAYN_PYTHON=python3 bash bench/gpu_check.sh   # an environment that already holds torch with
#                                                  # CUDA and the project's dependencies (no set-up)
# AIAYN_COMMIT names the commit in the results where the tree's .git is missing or stale.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results/gpu-$(date +%F)}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py() {  # timeout SECONDS, then a python command line; its wall time goes to stderr
  local seconds=$1 started=$SECONDS status; shift
  if [[ -n ${AIAYN_PYTHON:-} ]]; then
    PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout "$seconds" "$AIAYN_PYTHON" "$@"
  else
    timeout "$seconds" python3 -m jobs.bootstrap -- python "$@"
  fi
  status=$?
  echo "[gpu_check] $((SECONDS - started)) s, exit $status: ${*:1:3}" >&2
  return $status
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
[[ -n ${AIAYN_PYTHON:-} ]] || python3 -m jobs.bootstrap || exit 1
py 30 -c "import torch; assert torch.cuda.is_available(), 'this torch build has no CUDA'; print(torch.__version__, torch.version.cuda)" || exit 1
py 150 -m pytest -m gpu tests/gpu -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.txt"
peak=$(py 30 -c "import torch; from jobs.report.metrics import device_peak_flops; print(device_peak_flops(torch.device('cuda'), 'bf16')[0] / 1e12)")
py 30 -c "
import json, torch
a, b = (torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16) for _ in range(2))
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
for _ in range(3): a @ b
rates = []
for _ in range(5):
    start.record(); [a @ b for _ in range(10)]; end.record(); torch.cuda.synchronize()
    rates.append(10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12)
print(json.dumps({'datasheet_bf16_tflops': $peak, 'matmul_8192_bf16_tflops_best_of_5': round(max(rates), 1)}))
" | tee "$out/matmul_peak.json"
throughput() {  # PRESET SECONDS [--compile]
  local name=$1 seconds=$2; shift 2
  py "$seconds" bench/model_throughput.py --preset "$name" --device cuda --dtype bfloat16 --peak-tflops "$peak" \
    --vocab-size 37000 --batch 1000 --src-len 25 --tgt-len 25 --steps 10 --rounds 3 --no-marian --top-ops 15 "$@" \
    > "$out/model_throughput_${name}_bf16${1:+_compiled}.json" || echo "$name $*: failed or ran out of time"
  cat "$out/model_throughput_${name}_bf16${1:+_compiled}.json"
}
throughput base 40
throughput big 40
if [[ ! -d data/multi30k-en-de ]]; then
  py 90 -m jobs.cli prepare > "$out/prepare.txt" 2>&1 || echo "prepare failed: $out/prepare.txt"
fi
py 75 bench/translation_speed.py --random-preset base --data data/multi30k-en-de --device cuda \
  --dtype bfloat16 --ct2-types float16 bfloat16 --max-tokens 32768 \
  | tee "$out/translation_speed_base_random_cuda.json" || echo "translation: failed or ran out of time"
throughput big 170 --compile
throughput base 170 --compile
echo "results in $out"
