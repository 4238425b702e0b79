#!/usr/bin/env bash
# One prepared run on a machine with a CUDA GPU whose Python already has torch, Lightning, torchvision, timm,
# TensorBoard, matplotlib and pytest (no virtual environment, no registry): the cuda-marked tests, then the
# benchmarks on the GPU, each part under its own time limit. Run from the repository root:
#   bash benchmarks/gpu_report.sh
set -u
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY -c "import torch, lightning, torchvision; print('torch', torch.__version__, 'lightning', lightning.__version__, 'torchvision', torchvision.__version__)"
echo "== make test-gpu"
timeout "${TESTS_S:-170}" $PY -m pytest -q -m cuda tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -25
cd benchmarks
echo "== bench_real.py --device cuda"
timeout "${REAL_S:-100}" $PY bench_real.py --source torchvision --device cuda --repeats 3 2>/dev/null
echo "== bench_zoo.py --device cuda"
timeout "${ZOO_S:-120}" $PY bench_zoo.py --device cuda --repeats 2 2>/dev/null
echo "== bench_callback.py --device cuda --model resnet18"
timeout "${CALLBACK_S:-110}" $PY bench_callback.py --device cuda --model resnet18 --epochs 3 --samples 2048 --repeats 2 2>/dev/null
echo "== check_zoo.py --device cuda"
timeout "${CHECK_S:-90}" $PY check_zoo.py --device cuda 2>&1 | tail -45
