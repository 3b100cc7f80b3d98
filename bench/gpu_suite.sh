#!/usr/bin/env bash
# Every GPU figure of the GPU-decode issue, in two parts that each fit one ~9-minute device call:
#
#   bench/gpu_suite.sh part1   correctness (bench/gpu_check.py: captured == eager, no sync in a step) and the decode
#                              tables of the Qwen2.5-0.5B and GPT-2-124M shapes (bench/routing_overhead.py)
#   bench/gpu_suite.sh part2   the decode tables of the Llama-3.2-1B and Qwen2.5-7B shapes, and the server under
#                              load with 256 experts plugged and plugs during load (bench/serve_load.py)
#
# Each section runs under its own `timeout`, so one failure or overrun does not stop the rest. Logs: $OUT/<section>.log
# (default ./gpu-logs); the key lines of every section are gathered in $OUT/summary.txt and printed at the end.
# On the device: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1; bench/gpu_suite.sh part1
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-logs}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

section() {  # section NAME SECONDS COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee -a "$SUMMARY"
  timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "   exit $rc after $(($(date +%s) - start))s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')" | tee -a "$SUMMARY"
  grep -E '^(PASS|FAIL|INFO|ALL|[0-9]+ FAILED|\| |  batch|memory per|during|shape|model:|  [0-9]+ clients)' \
    "$OUT/$name.log" >>"$SUMMARY"
  [ $rc -eq 0 ] || tail -n 25 "$OUT/$name.log" | sed 's/^/   | /' >>"$SUMMARY"
}

overhead() {  # overhead SHAPE: the decode table at batch 1, 16, 64, plug latency at 8 and 256 plugged
  $PY bench/routing_overhead.py --device cuda --dtype bfloat16 --shape "$1" --batches 1 16 64 --prompt 128 \
    --new 32 --repeats 3 --plug-counts 8 256 --plug-trials 10
}

info() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  $PY -c "import peft; print('peft', peft.__version__)" || echo "peft missing: the PEFT column is skipped"
}

case "${1:-}" in
  part1)
    section info 60 info
    section gpu_check 210 $PY bench/gpu_check.py --shape qwen2.5-0.5b --steps 64 --batch 16
    section overhead_qwen2.5-0.5b 200 overhead qwen2.5-0.5b
    section overhead_gpt2-124m 100 overhead gpt2-124m
    ;;
  part2)
    section overhead_llama-3.2-1b 150 overhead llama-3.2-1b
    section overhead_qwen2.5-7b 190 overhead qwen2.5-7b
    section serve_qwen2.5-0.5b 190 $PY bench/serve_load.py --shape qwen2.5-0.5b --device cuda --dtype bfloat16 \
      --clients 1,16,64 --max-batch-size 64 --experts 8 --closed-experts 248 --new-tokens 64 \
      --requests-per-client 2 --hf-repeats 2 --plug-every 0.5 --log "$OUT/server.log"
    ;;
  *)
    echo "usage: bench/gpu_suite.sh part1|part2" >&2
    exit 2
    ;;
esac
echo
cat "$SUMMARY"
