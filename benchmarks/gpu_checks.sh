#!/usr/bin/env bash
# Every GPU check in one run (< 10 minutes on one H100/H200), results as JSON in $OUT
# (or ./gpu_results): the GPU tests (bf16/compile correctness, one-rank NCCL DDP), the training
# throughput table against the fp32-eager batch-1 baseline (paper model, 256x256), the same
# with data loading, and FID Inception throughput per precision.
#
#   bash benchmarks/gpu_checks.sh            # on the GPU machine, from the repository root
#
# The GPU image has torch but not this project's other dependencies: carry wheels for
# mlflow/kfp-free parts only; the checks below import no MLflow except the DDP test.
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
run() { echo "== $*"; "$@" || { echo "!! failed: $*"; status=1; }; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

run $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py --junitxml="$OUT/gpu_tests.xml"
run $PY benchmarks/train_throughput.py --size 256 --batch 1 4 16 --precision bf16 \
  --channels-last --compile reduce-overhead --steps 30 --warmup 10 --json "$OUT/train_throughput.json"
run $PY -m cyclegan prepare --set data.synthetic.image_size=256 --set data.load_size=286 \
  --set data.synthetic.n_train_a=256 --set data.synthetic.n_train_b=256 --set data.synthetic.n_test=8 \
  --raw-dir /tmp/gpu_raw --prepared-dir /tmp/gpu_prepared
run $PY benchmarks/train_throughput.py --size 256 --batch 16 --precision bf16 --channels-last \
  --compile reduce-overhead --steps 30 --warmup 10 --data /tmp/gpu_prepared --workers 8 \
  --json "$OUT/train_throughput_data.json"
run $PY benchmarks/fid_throughput.py --n 1000 --json "$OUT/fid_throughput.json"
exit $status
