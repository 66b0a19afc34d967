#!/usr/bin/env bash
# Training, inference and optimizer benchmarks on CUDA under AMP (bf16 and fp16) and channels_last, into one markdown file.
#   bash benchmarks/gpu.sh [out.md]      (default benchmarks/gpu.md; about 10 minutes on one GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/gpu.md}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "benchmarks/gpu.sh: no CUDA device visible to torch; run it on a machine with an NVIDIA GPU" >&2; exit 1; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
tmp=$(mktemp); trap 'rm -f "$tmp"' EXIT
gpu=$(python -c "import torch; print(torch.cuda.get_device_name())")
bf16=$(python -c "import torch; print(torch.cuda.is_bf16_supported(including_emulation=False))")
precs=fp32,fp16; [ "$bf16" = True ] && precs=fp32,bf16,fp16 # emulated bf16 (T4, V100) is not worth timing
run() { echo; echo "\`$*\`"; echo; "$@" 2>/dev/null | grep -v '^plot'; }
{
  echo "# GPU benchmarks: $gpu ($(date -u +%F), torch $(python -c 'import torch; print(torch.__version__)'))"
  echo; echo "## Training step (autocast, channels_last and NCHW)"
  run python benchmarks/train_step.py --device cuda --precision $precs --channels-last --bs 64 --png ''
  run python benchmarks/train_step.py --device cuda --precision $precs --bs 64 --png ''
  echo; echo "## Inference"
  for p in ${precs//,/ }; do run python benchmarks/inference.py --device cuda --precision $p --arch xresnet50 xresnet18 --bs 64 --png ''; done
  echo; echo "## Optimizer step"
  run python benchmarks/optimizer_step.py --device cuda
} > "$tmp"
mv "$tmp" "$out"; trap - EXIT
echo "tables written to $out"
