#!/usr/bin/env bash
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \
  || { echo "WARNING: installing .whl/*.whl failed (was .whl carried?); going on with what is installed"; \
       export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1; }
# Every GPU figure of the GPU-decode issue (15), in two parts that each fit one device call of at most 10 minutes.
# Run it from the repository root (the device tool's working directory), with .whl carried:
#
#   bench/gpu_suite.sh part1   correctness: bench/gpu_check.py (captured == eager token for token, logits equal,
#                              bare and routed; no host sync in a step; fused vs plain routing);
#                              decode table of the Qwen2.5-0.5B shape (bench/routing_overhead.py: HF bare, PEFT
#                              mixed-batch LoRA, routed before, bare/routed eager and captured, batch 1/16/64) with
#                              plug latency at 8 and 256 plugged and memory per expert;
#                              the server (bench/serve_load.py, Qwen2.5-0.5B shape): routed / off at 1, 16 and 64
#                              clients, against HF generate with a static batch of 64, ITL p99 during plugs
#   bench/gpu_suite.sh part2   decode tables (and plug latency) of the Llama-3.2-1B and Qwen2.5-7B shapes; then,
#                              with whatever time is left, the GPT-2-124M shape
#
# Robust by construction: each section runs in its own process under `timeout` (its children too), a failing or
# timed-out section is reported and the next one runs, and the whole part keeps within SUITE_BUDGET_S seconds
# (default 570, counted from the start, the wheel install included): a section gets at most what is left, and is
# skipped when under 45 s is left. Output: everything is shown as it runs and teed to $OUT/<section>.log ($OUT
# defaults to ./gpu-logs); the key lines of every section are gathered in $OUT/summary.txt, printed last.
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-$PWD/gpu-logs}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
BUDGET=${SUITE_BUDGET_S:-570}
export PY=${PYTHON:-python3} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# the lines worth keeping from each log (tables, PASS/FAIL, figures)
KEY='^(PASS|FAIL|INFO|ALL PASS|[0-9]+ FAILED|\| |  batch|memory per|during|shape|model:|  [0-9]+ clients|  HF generate|load average|torch|peft|server deps|NVIDIA|Traceback|[A-Za-z]*Error)'

section() {  # section NAME LIMIT_S 'COMMAND': run COMMAND (a bash line) under timeout, tee its log
  local name=$1 limit=$2 command=$3 left start rc
  left=$((BUDGET - SECONDS - 15))
  if [ "$left" -lt 45 ]; then
    echo "== $name SKIPPED: ${left}s left of the ${BUDGET}s budget" | tee -a "$SUMMARY"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  start=$SECONDS
  echo "== $name (limit ${limit}s, at ${start}s): $command" | tee -a "$SUMMARY"
  timeout --kill-after=10 "$limit" bash -c "$command" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  echo "   $name: exit $rc after $((SECONDS - start))s$( [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo ' (TIMED OUT)')" \
    | tee -a "$SUMMARY"
  grep -E "$KEY" "$OUT/$name.log" >>"$SUMMARY"
  [ "$rc" -eq 0 ] || tail -n 15 "$OUT/$name.log" | sed 's/^/   | /' >>"$SUMMARY"
}

overhead() {  # overhead SHAPE LIMIT: the decode table at batch 1, 16, 64; plug latency at 8 and 256; memory
  section "overhead_$1" "$2" "\$PY bench/routing_overhead.py --device cuda --dtype bfloat16 --shape $1 \
    --batches 1 16 64 --prompt 128 --new 32 --repeats 3 --plug-counts 8 256 --plug-trials 10"
}

echo "gpu_suite ${1:-} at $(date -u +%FT%TZ), budget ${BUDGET}s, logs in $OUT" | tee "$SUMMARY"
case "${1:-}" in
  part1)
    section info 40 "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
      \$PY -c 'import torch, transformers; print(\"torch\", torch.__version__, \"transformers\", transformers.__version__, torch.cuda.get_device_name())'; \
      \$PY -c 'import peft; print(\"peft\", peft.__version__)' || echo 'peft missing: the PEFT column is skipped'; \
      \$PY -c 'import llguidance, fastapi, uvicorn; print(\"server deps ok\")' || echo 'server deps missing: the serve section fails'"
    section gpu_check 130 "\$PY bench/gpu_check.py --shape qwen2.5-0.5b --dtype bfloat16 --steps 64 --batch 16"
    overhead qwen2.5-0.5b 190
    # 8 experts route every token, 247 never win: 255 plugged, and the plug-during-load expert is the 256th (a 257th
    # would double the slot capacity, which re-captures every graph: measured by the overhead section instead)
    section serve_qwen2.5-0.5b 240 "\$PY bench/serve_load.py --shape qwen2.5-0.5b --device cuda --dtype bfloat16 \
      --clients 1,16,64 --max-batch-size 64 --experts 8 --closed-experts 247 --prompt-tokens 32 --new-tokens 64 \
      --requests-per-client 2 --hf-repeats 2 --plug-every 0.5 --log $OUT/server.log"
    ;;
  part2)
    overhead llama-3.2-1b 200
    overhead qwen2.5-7b 280
    overhead gpt2-124m 120
    ;;
  *)
    echo "usage: bench/gpu_suite.sh part1|part2" >&2
    exit 2
    ;;
esac
echo
echo "==================== summary ($OUT/summary.txt) ===================="
cat "$SUMMARY"
