#!/usr/bin/env bash
# CONQUER, general similarity (first-stage video scores), no shared normalization (neg_video_num 0).
#   bash scripts/train_general.sh EXP_ID GPU|GPU,GPU,...|cpu [extra train.py flags, which override these]
set -euo pipefail
source "$(dirname "$0")/_common.sh"
require_exp_and_gpu "$@"
use_devices "$2"
cd "$REPO_ROOT"

exec "${LAUNCHER[@]}" train.py \
  --dataset_config config/tvr_data_config.json \
  --model_config config/model_config.json \
  --stop_task VCMR \
  --eval_tasks_at_training VCMR SVMR VR \
  --use_interal_vr_scores \
  --bsz 64 \
  --use_extend_pool 500 \
  --neg_video_num 0 \
  --exp_id "$1" \
  --eval_query_bsz 5 \
  --max_vcmr_video 10 \
  --num_workers 8 \
  "${DEVICE_FLAGS[@]}" \
  "${@:3}"
