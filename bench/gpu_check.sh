#!/usr/bin/env bash
# The GPU check, one command on a machine with an NVIDIA GPU: installs a CUDA build of torch beside the test
# requirements in a fresh venv, runs the test suite with the CUDA tests enabled (tests/model/test_cuda.py and
# every other test; they skip only when no GPU is present), and the decode / prefill benchmark of ours vs
# transformers on the GPU. Everything lands in one folder: ./gpu-check-results/ (or $1).
#   bash bench/gpu_check.sh [results-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-gpu-check-results}")
mkdir -p "$out"
nvidia-smi | tee "$out/nvidia-smi.txt"
python3 -m venv .venv-gpu
. .venv-gpu/bin/activate
pip install -q --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}" torch==2.13.0
pip install -q -r requirements-test.txt  # torch==2.13.0 is already met by the CUDA build
pip install -q --no-deps -e .
python -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print(torch.cuda.get_device_name())"
set +e
python -m pytest -q tests/model tests/server -rs 2>&1 | tee "$out/tests.txt"
tests=$?
set -e
python -m bench.gpu --out "$out" 2>&1 | tee "$out/bench.txt"
echo "tests exit $tests; results in $out"
exit $tests
