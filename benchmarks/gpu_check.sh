#!/usr/bin/env bash
# The prepared GPU check of distillation memory: the layer-reduced cases of bench_distill_memory.py measured on the
# GPU in bfloat16, and each 7B language model measured whole at distill's defaults beside its projection.
# Needs torch, transformers, peft and numpy (no project install); about 2-4 minutes on one H200.
# Run from the repository root: bash benchmarks/gpu_check.sh [OUT_DIR]   (writes OUT_DIR/distill_memory_cuda.json)
set -euo pipefail
out="${1:-${OUT:-.}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print(torch.cuda.get_device_name(0))"
python3 benchmarks/bench_distill_memory.py --device cuda --full-depth | tee "$out/distill_memory_cuda.json"
