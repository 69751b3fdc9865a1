#!/usr/bin/env bash
# One GPU lease, prepared: the full recipe and its levers at full length, then the training-speed benchmark.
#
#   python benchmarks/device_kit.py                 # here, once: wheels and data into .device_kit/ (ignored)
#   device run: command "bash benchmarks/device_session.sh", carry [".device_kit"], timeout_s 600
#
# Everything it reports lands in $OUT (at most 8 files come back): session.log, summary.json (the recipe's report
# and every lever's numbers), throughput.json, logs.tar.gz (each run's log, training log and evaluation reports)
# and the recipe's phase-2 model in fp16 as model.tar.part-* (no file over 16 MiB comes back). Here: `cat
# model.tar.part-* | tar -x`, then save it in fp32 for the CPU (`GPT2LMHeadModel.from_pretrained(d,
# dtype=torch.float32).save_pretrained(d32)`, and copy the other files) before `run_eval.py` or the benchmarks.
# Each stage is bounded by what is left of DEADLINE_S, so a slow stage costs the later ones, never the report.
# By default phase 1 is the recipe's alone: a run beside it slows both (170K tokens/s each on an H100; ~500K
# alone on an H200), which would cut 3 epochs short of full length within a 10-minute call.
# Those speeds are of the 6-layer shape; the recipe trains 12 layers since the sixteenth session (1.3x the FLOPs per
# token, more kernel launches): where PHASE1_MINUTES is too short for 3 epochs, the report says how far phase 1 got.
# Knobs, set before the command ("PHASE2_RUNS=lr_1e-3 bash benchmarks/device_session.sh"): PHASE1_RUNS,
# PHASE2_RUNS (names in benchmarks/full_length_levers.py), PHASE1_MINUTES, PHASE2_MINUTES, EVAL_LIMIT, BLIMP_PAIRS
# (per paradigm; all 1,000 by default), DEADLINE_S; for a dry run on a CPU: USE_CPU=true OUT=DIR
# PYTHON=.venv/bin/python.
set -uo pipefail
cd "$(dirname "$0")/.."
KIT=.device_kit
OUT=${OUT:?set OUT to the folder that comes back}
mkdir -p "$OUT" || exit 1
DEADLINE_S=${DEADLINE_S:-585}  # inside the run's timeout_s of 600
WORK=outputs/device_session
DATA=outputs/device_data  # unpacked outside the kit, which travels
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # nothing there reaches the network: never wait for it

left() { echo $((DEADLINE_S - SECONDS)); }
stage() { echo "== $(date -u +%H:%M:%S) +${SECONDS}s: $*"; }

stage "checking the kit"
(cd "$KIT" && sha256sum --quiet -c SHA256SUMS) || { echo "the kit does not match its SHA256SUMS: rebuild it"; exit 1; }
if [ "${USE_CPU:-false}" != true ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$KIT"/wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/site
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
PYTHON=${PYTHON:-python3}
$PYTHON -c "import torch, transformers, datasets, evaluate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__, 'cuda', torch.cuda.is_available())" || exit 1
rm -rf "$DATA" && mkdir -p "$DATA" && tar -xJf "$KIT/data.tar.xz" -C "$DATA" || exit 1
$PYTHON benchmarks/shared_data_splits.py "$DATA" "$DATA/splits" || exit 1

stage "the recipe and its levers ($(left) s left)"
timeout --signal=INT --kill-after=20 $(( $(left) - 45 )) $PYTHON benchmarks/full_length_levers.py \
    --shared "$DATA" --alpaca_file "$DATA/splits/alpaca_merged.json" --output_dir "$WORK" \
    --use_cpu "${USE_CPU:-false}" --phase1_minutes "${PHASE1_MINUTES:-3.2}" --phase2_minutes "${PHASE2_MINUTES:-1.5}" \
    --phase1_runs "${PHASE1_RUNS-}" --phase2_runs "${PHASE2_RUNS:-passage_conversations}" \
    --eval_limit "${EVAL_LIMIT:-400}" ${BLIMP_PAIRS:+--blimp_pairs_per_paradigm "$BLIMP_PAIRS"} > "$WORK.log" 2>&1
echo "full_length_levers exit status $?"
cp "$WORK/summary.json" "$OUT/" 2>/dev/null || echo "no summary.json: see logs.tar.gz"

stage "the recipe's phase-2 model in fp16 ($(left) s left)"
if [ -f "$WORK/recipe/phase2/model.safetensors" ]; then
    $PYTHON - "$WORK/recipe/phase2" "$WORK/phase2_fp16" <<'EOF'
import shutil, sys
from pathlib import Path
import torch
from transformers import GPT2LMHeadModel
source, target = Path(sys.argv[1]), Path(sys.argv[2])
GPT2LMHeadModel.from_pretrained(source, dtype=torch.float16).save_pretrained(target)
for path in source.iterdir():
    if path.is_file() and path.suffix in {".json", ".jinja", ".md"} and not (target / path.name).exists():
        shutil.copy(path, target / path.name)
EOF
    tar -cf - -C "$WORK" phase2_fp16 | split -b 15M - "$OUT/model.tar.part-"
fi

stage "training speed ($(left) s left)"
if [ "${USE_CPU:-false}" != true ] && [ "$(left)" -gt 60 ]; then
    timeout --kill-after=10 $(( $(left) - 25 )) $PYTHON benchmarks/train_throughput.py --device cuda --phase 1 \
        --batch_size 32 --reps 1 --steps 20 --setups trm,trm-compile --peak_tflops 989 \
        --profile "$WORK/profile.txt" --json "$OUT/throughput.json" > "$WORK/throughput.log" 2>&1
    echo "train_throughput exit status $?"
fi

stage "packing the logs"
find "$WORK.log" "$WORK" -maxdepth 3 -not -path '*/checkpoint-*' \( -name '*.log' -o -name profile.txt -o -name 'training_log.json' \
    -o -name lever_eval.json -o -name final_eval.json -o -name grounding.json -o -name time_plan.json -o -name report.json \
    -o -name README.md -o -path '*/stages/*.json' \) -print0 2>/dev/null | tar -czf "$OUT/logs.tar.gz" --null -T -
stage "done"
