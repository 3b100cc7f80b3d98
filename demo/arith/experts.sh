#!/usr/bin/env bash
# The research's table on the arith backbone (demo/arith/README.md): a math expert trained on raw math text, and
# math experts trained on the backbone's own correct solutions (`plugmoe distill`) in question/answer format and,
# as the ablation, in problem/solution format; each evaluated alone beside the backbone. Seeded; one CPU thread.
#
#   bash demo/arith/experts.sh            # every step (about 1 h 20 min on a loaded 2-core machine)
#   python -m demo.arith table            # the table, from the eval reports this writes
set -euxo pipefail
M=demo/arith/model
D=demo/arith/data
E=demo/arith/experts
RUN=${RUN:-nice python -m experts}
mkdir -p $E/raw $E/distilled-qa $E/distilled-ps

# 1. self-distillation: 4 samples per problem at temperature 0.7 on 1000 problems (none in math_heldout), keep the
#    samples whose `#### N` matches the gold one (at most 2 distinct solutions per problem)
$RUN distill --model $M --problems $D/math_problems.jsonl --out $E/math_distilled.jsonl --k 4 --temperature 0.7 \
  --max-new-tokens 64 --max-per-problem 2 --seed 0 --threads 1 --report $E/distill_report.json

# 2. raw math text: the same number of records from math_train, questions and solutions as separate documents
python - <<'PY'
import json
n = sum(1 for _ in open("demo/arith/experts/math_distilled.jsonl"))
records = [json.loads(line) for line in open("demo/arith/data/math_train.jsonl")][:n]
with open("demo/arith/experts/math_raw.jsonl", "w") as f:
    f.writelines(json.dumps({"text": t}) + "\n" for r in records for t in (r["question"], r["answer"]))
PY

# 3. the experts: same rank, steps and learning rate; the gate learns to reject general text and code
COMMON=(--model $M --name math --calibration demo/data/calibration_general.txt --negatives demo/data/code_train.jsonl
  --rank 32 --lr 5e-3 --steps 300 --eval-every 100 --eval-examples 64 --max-new-tokens 48 --seed 0 --threads 1)
$RUN train-expert "${COMMON[@]}" --data $E/math_raw.jsonl --out $E/raw/math.safetensors \
  --description "Arith word problems: raw math text (questions and solutions as separate documents)"
$RUN train-expert "${COMMON[@]}" --data $E/math_distilled.jsonl --out $E/distilled-qa/math.safetensors \
  --description "Arith word problems: the backbone's own correct solutions, question/answer format"
$RUN train-expert "${COMMON[@]}" --data $E/math_distilled.jsonl --out $E/distilled-ps/math.safetensors \
  --template $'Problem: {question}\nSolution: {answer}' \
  --description "Arith word problems: the backbone's own correct solutions, problem/solution format (ablation)"

# 4. a behavioural probe in each file (64 problems of math_probe, none in math_heldout): what admission checks
for x in raw distilled-qa distilled-ps; do
  $RUN add-probe --expert $E/$x/math.safetensors --data $D/math_probe.jsonl --out $E/$x/math.safetensors \
    --max-new-tokens 48
done

# 5. evaluation: held-out problems (accuracy off / pinned / sequence / token, perplexity) and 300 general texts;
#    every run on all 2500 held-out problems (about 4 min each on an idle core)
for x in raw:2500 distilled-qa:2500 distilled-ps:2500; do
  $RUN eval --model $M --experts $E/${x%%:*} --data general=demo/data/general_heldout.jsonl math=$D/math_heldout.jsonl \
    --base general --limit ${x##*:} --behaviour-limit ${x##*:} --max-new-tokens 48 --seed 0 --threads 1 \
    --out $E/${x%%:*}/eval.json
done
python -m demo.arith table
