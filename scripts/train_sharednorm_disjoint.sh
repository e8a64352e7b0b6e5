#!/usr/bin/env bash
# CONQUER, disjoint similarity (raw begin + end logits), shared-normalization training.
#   bash scripts/train_sharednorm_disjoint.sh EXP_ID GPU|GPU,GPU,...|cpu [extra train.py flags, which override these]
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
  --bsz 16 \
  --use_extend_pool 1000 \
  --neg_video_num 3 \
  --exp_id "$1" \
  --eval_query_bsz 5 \
  --max_vcmr_video 10 \
  --num_workers 8 \
  --similarity_measure disjoint \
  "${DEVICE_FLAGS[@]}" \
  "${@:3}"
