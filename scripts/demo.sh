#!/usr/bin/env bash
# The main job end to end, offline, on 2 CPU cores in a few minutes:
#   synthesise a BraTS-like cohort → train fold 0 → evaluate it on its validation subjects, then on a
#   held-out set → predict one subject.
# Small on purpose, to finish in minutes on 2 cores: 32³ inputs (real runs use 128), 40 subjects, 16 epochs.
# The ResNet-50 of the real recipe, from MedicalNet's weights where `medcli weights fetch` put them (train's
# default --pretrained-path auto finds the release for --depth), else from random initialization (a warning
# says so); it learns from scratch here because each residual block starts as its shortcut
# (`--zero-init-last`, the default).  DEMO_DEPTH=10 is ~5x quicker.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
DEMO=${DEMO_DIR:-demo}
SUBJECTS=${DEMO_SUBJECTS:-40}
HELDOUT=${DEMO_HELDOUT:-20}
SIZE=${DEMO_SIZE:-32}
EPOCHS=${DEMO_EPOCHS:-16}
DEPTH=${DEMO_DEPTH:-50}
export MEDCLI_CACHE=$DEMO/cache NO_COLOR=${NO_COLOR:-1}

rm -rf "$DEMO"
mkdir -p "$DEMO"
start=$(date +%s)

echo "== 1. a synthetic cohort: $SUBJECTS subjects, BraTS 2020 layout =="
$BIN/medcli data synth "$DEMO/data" --subjects "$SUBJECTS" --small --seed 0

echo "== 2. train fold 0 of 3: ResNet-$DEPTH (MedicalNet topology) on T1ce+T2+FLAIR, Adam, cosine, EMA =="
$BIN/medcli train --data "$DEMO/data" --out "$DEMO/runs" --name demo --fold 0 --folds 3 \
    --depth "$DEPTH" --modalities t1ce,t2,flair --input-size "$SIZE" \
    --epochs "$EPOCHS" --batch_size 4 --gradient_accumulation_steps 1 --lr "${DEMO_LR:-3e-4}" --optimizer adam \
    --loss "${DEMO_LOSS:-weighted-ce}" --scheduler cosine --warmup-epochs 1 --dropout 0.2 --grad_clip 1.0 \
    --ema_decay 0.9 --select raw --seed 0

echo "== 3. evaluate the fold (bootstrap CIs over patients, plots) =="
$BIN/medcli eval "$DEMO/runs/demo/fold0"

echo "== 4. a held-out set: $HELDOUT new subjects (BraTS 2019 layout, another seed), scored by the fold =="
$BIN/medcli data synth "$DEMO/heldout" --subjects "$HELDOUT" --small --layout 2019 --seed 1
$BIN/medcli eval "$DEMO/runs/demo/fold0" --test "$DEMO/heldout"

echo "== 5. predict one held-out subject folder (its T1ce, T2 and FLAIR scans) with the fold's best checkpoint =="
subject=$(ls -d "$DEMO"/heldout/*/*/ | head -n 1)
$BIN/medcli predict "$subject" --model "$DEMO/runs/demo/fold0"

echo "== done in $(( $(date +%s) - start )) s: see $DEMO/runs/demo/fold0/ (metrics.csv, curves.png, best.pt) =="
