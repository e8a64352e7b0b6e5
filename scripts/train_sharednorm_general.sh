#!/usr/bin/env bash
# CONQUER, general similarity, shared-normalization training (3 negatives from an extended pool of 1000).
#   bash scripts/train_sharednorm_general.sh EXP_ID GPU|GPU,GPU,...|cpu [extra train.py flags, which override these]
set -euo pipefail
source "$(dirname "$0")/_common.sh"
start_training_script "$@"

exec "${LAUNCHER[@]}" train.py "${PAPER_FLAGS[@]}" --use_interal_vr_scores --bsz 16 --use_extend_pool 1000 --neg_video_num 3 \
  "${DEVICE_FLAGS[@]}" "${@:3}"
