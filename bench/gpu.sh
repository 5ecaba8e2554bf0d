#!/usr/bin/env bash
# The GPU serving benchmark as one script, for a lent GPU machine that has PyTorch with CUDA
# but not the serving stack. Wheels for what is missing (fastapi, uvicorn, pydantic,
# pydantic-settings, faiss-cpu, ...) travel in .whl/ (see bench/README.md); results go to
# bench/results/serve-gpu.{json,png} and, when $OUT is set, are copied there too.
#
#     bash bench/gpu.sh                  # run time: bench/README.md
#     bash bench/gpu.sh --repeats 1      # extra flags go to bench/serve.py
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/llave-site .whl/*.whl
    export PYTHONPATH=/tmp/llave-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
status=0
# 1. the sweep: one input per request, text and image, the naive server and two GIL
#    switch intervals as variants, two interleaved repeats
timeout "${LLAVE_GPU_BENCH_TIMEOUT:-400}" python3 bench/serve.py --gpu-quick --tag gpu \
    --kinds text,image --naive-kinds text --concurrency 1,8,32,64 --naive-concurrency 1,64 \
    --offline-batches 1,4,16,32,64 --repeats 2 \
    --variant "si0.5=--gil-switch-interval-ms 0.5" --variant "si0.1=--gil-switch-interval-ms 0.1" \
    "$@" || status=$?
# 2. requests of 8 inputs each: the server's batching without per-request HTTP cost
timeout 150 python3 bench/serve.py --gpu-quick --tag gpu-ipr8 --kinds text --naive-kinds "" \
    --concurrency 8,64 --inputs-per-request 8 --offline-batches 1,16,32,64 || status=$?
if [ -n "${OUT:-}" ]; then
    cp bench/results/serve-gpu*.json bench/results/serve-gpu*.png "$OUT"/ 2>/dev/null || true
fi
exit "$status"
