#!/usr/bin/env bash
# Train the first stage (the video retriever whose ranklists CONQUER re-ranks) with train.py's loop: the kept
# checkpoint and early stopping follow validation VR R@10 + R@100 (what a first stage hands on to CONQUER), run
# directory, --resume, torchrun, --amp as for CONQUER.
#   bash scripts/train_first_stage.sh EXP_ID GPU|GPU,GPU,...|cpu [extra train.py flags, which override these]
# Then: bash scripts/rank_first_stage.sh RUN_DIR GPU|cpu
set -euo pipefail
source "$(dirname "$0")/_common.sh"
start_training_script "$@"
exec "${LAUNCHER[@]}" train.py \
  --model first_stage \
  --model_config config/first_stage_config.json \
  --dataset_config config/tvr_data_config.json \
  --exp_id "$1" \
  --hidden_dim 256 \
  --stop_task VR --eval_tasks_at_training VR \
  --lr 1e-3 --bsz 128 --n_epoch 30 --max_es_cnt 5 \
  --num_workers 4 \
  "${DEVICE_FLAGS[@]}" \
  "${@:3}"
