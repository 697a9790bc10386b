#!/usr/bin/env bash
# The device-machine check, in one call: the CUDA tests, then `gpt2hub bench` on CUDA for 124M and 1558M.
# Everything it writes lands in $OUT (benchmarks/results/gpu-local when run by hand).
#
# The device image has PyTorch, transformers, safetensors, tiktoken, filelock, tqdm, huggingface_hub and matplotlib,
# but not google-crc32c or platformdirs: carry them as wheels (`.whl`, excluded from git), prepared here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl google-crc32c platformdirs
# and run as: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-local}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 GPT2HUB_DISABLE_PROGRESS_BARS=1
export GPT2HUB_CACHE=/tmp/gpt2hub-cache
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
status=0
timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py tests/test_cuda_generate.py 2>&1 | tee "$OUT/cuda-tests.log" || status=1
timeout 200 python3 -m gpt2hub bench --model gpt2-small --device cuda --dtype float32 bfloat16 \
    --batch-sizes 1 2 4 8 16 32 64 --prompt-lengths 16 --new-tokens 128 --repeats 3 --no-notebook --no-plots \
    --out "$OUT/small" 2>&1 | tail -40 | tee "$OUT/bench-small.log" || status=1
timeout 200 python3 -m gpt2hub bench --model gpt2-xl --device cuda --dtype bfloat16 \
    --batch-sizes 1 8 64 --prompt-lengths 16 --new-tokens 64 --repeats 3 --no-notebook --no-plots \
    --out "$OUT/xl" 2>&1 | tail -20 | tee "$OUT/bench-xl.log" || status=1
# int8/int4 on CUDA run their plain path (dequantize + F.linear per call): correct, not fast; this measures how slow
timeout 90 python3 -m gpt2hub bench --model gpt2-small --device cuda --dtype int8 int4 --quick \
    --out "$OUT/quant" 2>&1 | tail -20 | tee "$OUT/bench-quant.log" || status=1
exit $status
