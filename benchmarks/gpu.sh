#!/usr/bin/env bash
# One prepared benchmark run for a lent GPU machine (issue 9): finishes in under 5 minutes.
#
#   bash benchmarks/gpu.sh            # from the repository root; figures go to $OUT (default ./gpu-out)
#
# What it measures (all through `python -m benchmarks`, the same code as the CPU table):
#   - build pairs/s per GPU: the `paper` VQ-VAE-2 at 1024 crops (LR 256), bf16 autocast, png and zst, against the
#     forward pass alone on the same GPU (benchmarks/bench_gpu.py);
#   - the colour module's CIEDE2000 on the GPU against skimage on one CPU thread (benchmarks/bench_color.py);
#   - the streaming consumer feeding a HAT fine-tune step: GPU busy fraction (benchmarks/bench_gpu.py).
# The machine has no internet: packages come from what is installed or from a local wheel index.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"

# Install only what is missing (a fresh machine may have torch already; reinstalling would cost minutes).
if ! python -c "import torch" 2>/dev/null; then
    pip install torch==2.14.1 torchvision==0.29.1
fi
if ! python -c "import factory, ray, skimage, webdataset" 2>/dev/null; then
    pip install -e .
fi

python - <<'PY' | tee "$OUT/environment.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for index in range(torch.cuda.device_count()):
    print(index, torch.cuda.get_device_name(index))
PY
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to measure')"

# 280 s: leaves room under the 5-minute budget for the installs' checks above; --quick sizes fit it.
timeout 280 python -m benchmarks --quick --only colour gpu --json "$OUT/gpu.json" 2>"$OUT/gpu.log" | tee "$OUT/gpu.txt"
