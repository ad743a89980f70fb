#!/usr/bin/env bash
# The first look at a GPU, in one call (issue 23): on a machine with one NVIDIA GPU, in under
# 8 minutes (the timeouts below add up to 480 s), with nothing installed beyond the project's own
# set-up (`python3 -m jobs.bootstrap`):
#   1. the `gpu` tests (bf16 autocast against fp32, the flash-attention paths, DeepSpeed over NCCL);
#   2. bf16 training of `base` and `big`, compiled, against a dropout-matched compiled bf16
#      torch.nn.Transformer, with MFU against the device's datasheet peak (jobs/metrics.py),
#      at a token budget like the paper's (~25k target tokens per step);
#   3. translation at fixed length, `base` with random weights and the shipped Multi30K's tokenizer
#      and test sources (`aiayn prepare` first): ours in bf16 against CTranslate2 float16 and bfloat16.
#
#   bash bench/gpu_check.sh [OUT_DIR]      # default: $OUT if set, else bench/results/gpu-<date>
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results/gpu-$(date +%F)}}
mkdir -p "$out"
run() { python3 -m jobs.bootstrap -- "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia-smi.csv"
run python -c "import torch; assert torch.cuda.is_available(), 'this torch build has no CUDA'; print(torch.__version__, torch.version.cuda)"
timeout 110 python3 -m jobs.bootstrap -- pytest -m gpu tests/gpu -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.txt" || true
peak=$(run python -c "import torch; from jobs.metrics import device_peak_flops; print(device_peak_flops(torch.device('cuda'), 'bf16')[0] / 1e12)")
echo "bf16 dense peak: $peak TFLOP/s"
for model in base big; do
  timeout 110 python3 -m jobs.bootstrap -- python bench/model_throughput.py --preset "$model" --device cuda \
    --dtype bfloat16 --compile --peak-tflops "$peak" --batch 1000 --src-len 25 --tgt-len 25 --steps 10 --rounds 3 \
    | tee "$out/model_throughput_${model}_bf16_compiled.json" || echo "$model: failed or ran out of time"
done
timeout 90 python3 -m jobs.bootstrap -- aiayn prepare > "$out/prepare.txt" 2>&1 || echo "prepare failed: $out/prepare.txt"
timeout 60 python3 -m jobs.bootstrap -- python bench/translation_speed.py --random-preset base \
  --data data/multi30k-en-de --device cuda --dtype bfloat16 --ct2-types float16 bfloat16 --threads 4 \
  | tee "$out/translation_speed_base_random_cuda.json" || echo "translation: failed or ran out of time"
echo "results in $out"
