#!/usr/bin/env bash
# GPU check: pretraining images/s and peak GPU memory of the simclr_mnist recipe (cnn and resnet18),
# bf16, torch.compile off and on, on 1 GPU and (when there are several) on all of them under torchrun;
# plus the memory pipeline's data share of a step. Meant to finish within 5 minutes on one modern GPU.
#
#   TRANSFERCTL_DATA_DIR=/path/to/data bash benchmarks/gpu_check.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-300}
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 1 ]; then echo "no CUDA device here" >&2; exit 2; fi
data=mnist; [ -n "${TRANSFERCTL_DATA_DIR:-}" ] || data=mnist_sample
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT

run() {  # run NPROC MODEL COMPILE -> one table row
  local nproc=$1 model=$2 compile=$3 launcher=(python -m transferctl)
  [ "$nproc" -gt 1 ] && launcher=(torchrun --nproc_per_node="$nproc" -m transferctl)
  local out
  out=$("${launcher[@]}" pretrain -c configs/simclr_mnist.yaml model.name="$model" data.name="$data" \
        train.precision=bf16 train.compile="$compile" train.max_steps="$steps" train.log_every=100 \
        data.val_fraction=0.02 --runs-dir "$runs" --json --quiet)
  python - "$nproc" "$model" "$compile" "$out" <<'PY'
import json, sys
nproc, model, compile_, out = sys.argv[1:]
m = json.loads(out)["metrics"]
print(f"| {model} | {nproc} | bf16 | {compile_} | {m['images_per_s']:,.0f} | {m.get('peak_gpu_memory_mb', 0):,.0f} |")
PY
}

echo "| model | GPUs | precision | compile | images/s (whole run, incl. warm-up and compile) | peak GPU memory (MB) |"
echo "| --- | ---: | --- | --- | ---: | ---: |"
for model in cnn resnet18; do
  for compile in false true; do
    run 1 "$model" "$compile"
    [ "$gpus" -gt 1 ] && run "$gpus" "$model" "$compile"
  done
done
echo
python benchmarks/throughput.py --device cuda --models cnn resnet18 --precisions bf16 --pipelines memory loader --steps 30
