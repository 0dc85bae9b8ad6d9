#!/usr/bin/env bash
# The GPU check as one command (under 10 minutes: its four steps time out at 60, 55, 330 and
# 125 s), for a lent machine without internet:
#   bench/device_check.sh [WHEELS_DIR]
# Installs the wheels in WHEELS_DIR (default .whl: transformers, peft and their small dependencies
# that the machine's image lacks; fetch them beforehand with `pip download --no-deps
# --only-binary=:all: --python-version 3.12 transformers==5.24.0 peft==0.21.2 regex orjson`) into a
# scratch site, then writes under $OUT (default ./device_out):
#   pytest.txt         the GPU-only tests (-k on_gpu: flash kernel, bf16 LoRA, no device syncs, the vision rotary, the process
#                      group's CPU and CUDA collectives), tracebacks included
#   pipeline.jsonl     pipeline_train.py                 (the Trainer's own steps at its defaults, synthetic domain at
#                      224 px; pipeline_embed.py, item embedding end to end, is run apart)
#   bench.jsonl        gpu_bench.py --profile --compile  (every figure, Beauty shapes, 3B; 1,024 items embedded a path,
#                      with a LoRA adapter too: in training form and merged; the vision rotary against HF's;
#                      profiles of a step, eager and compiled, and of an item batch)
#   bench_vary.jsonl   gpu_bench.py --vary --train-only --compile  (titles and histories of varying length: packed
#                      with and without shared prefixes under flash, the defaults eager and compiled)
#   targets.md         bench/targets.py: the issue's targets read off those figures, met or not, and the figures
#                      the open decisions rest on
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-.whl}
OUT=${OUT:-device_out}
mkdir -p "$OUT"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/site:.
else
    export PYTHONPATH=.
fi
export VLM2REC_CACHE=/tmp/vlm2rec_cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
if python3 -c "import pytest, pandas, pyarrow, PIL, tokenizers" 2>/dev/null; then
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_transfer.py tests/test_distributed.py tests/test_fused.py -m gpu -k on_gpu -rs --tb=short \
        >"$OUT/pytest.txt" 2>&1
    tail -4 "$OUT/pytest.txt"
    timeout 55 python3 bench/pipeline_train.py 2>"$OUT/pipeline.err" | tee "$OUT/pipeline.jsonl"
else
    echo "GPU tests skipped: this machine lacks pytest, pandas, pyarrow, Pillow or tokenizers" | tee "$OUT/pytest.txt"
fi
timeout 330 python3 bench/gpu_bench.py --profile --compile --project-items 1024 --users 256 2>"$OUT/bench.err" | tee "$OUT/bench.jsonl"
timeout 125 python3 bench/gpu_bench.py --vary --train-only --compile \
    --train-variants project_packed,project,project_paper,project_paper_probe \
    2>"$OUT/bench_vary.err" | tee "$OUT/bench_vary.jsonl"
python3 bench/targets.py "$OUT" | tee "$OUT/targets.md"
