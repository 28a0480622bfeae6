#!/usr/bin/env bash
# The real-size path on one GPU, in one go (~7 min on an H100/H200): the Qwen-Image architecture
# (20B, random bf16 weights, 1024px) behind our backbone, then one shared base distilling with
# student + fake + teacher adapters, then teacher offloading. Writes the tables to $OUT (or ./cuda_check) for results/.
#   bash bench/cuda_check.sh
# Needs torch with CUDA, diffusers and peft (requirements.txt's versions). On a GPU box without network,
# download their wheels here (pip download --no-deps diffusers==... peft==... importlib_metadata -d .whl),
# copy .whl over and first run: pip install --no-index --no-deps --target /tmp/site .whl/*.whl;
# export PYTHONPATH=/tmp/site. results/cuda_h200.md is its output on one H200.
set -o pipefail
out="${OUT:-cuda_check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
  git rev-parse --short HEAD 2>/dev/null || true
} 2>&1 | tee "$out/env.txt"
timeout 200 python3 bench/backbone.py --cuda-only --quick 2>&1 | tee "$out/backbone_cuda.md"
timeout 330 python3 bench/distill.py --cuda --iters 4 2>&1 | tee "$out/distill_cuda.md"
timeout 200 python3 bench/teacher_offload.py --cuda --teachers 8 2>&1 | tee "$out/teacher_offload_cuda.md"
