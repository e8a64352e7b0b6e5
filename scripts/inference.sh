#!/usr/bin/env bash
# Evaluate a trained run directory (opt.json + model.ckpt).
#   bash scripts/inference.sh MODEL_DIR GPU|cpu [extra inference.py flags, e.g. --nms_thd 0.7 --tasks VCMR VR]
#   bash scripts/inference.sh MODEL_DIR 0,1,2,3 [...]   # 4 GPUs (torchrun): the queries are split across them,
#                                                      # the files are those of one process
# MODEL_DIR is a path to the run directory, or its name under results/ (as in the original).
# Test split: add --eval_split_name test_public --tasks VCMR VR (writes the submission, no metrics).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
if [[ $# -lt 2 ]]; then
  die "usage: bash $0 MODEL_DIR GPU|GPU,GPU,...|cpu [extra inference.py flags]"
fi
model_dir="$1"
[[ -d "$model_dir" ]] && model_dir="$(cd "$model_dir" && pwd)"
use_devices "$2"
cd "$REPO_ROOT"

exec "${LAUNCHER[@]}" inference.py \
  --dataset_config config/tvr_data_config.json \
  --max_vcmr_video 10 \
  --eval_query_bsz 5 \
  --model_dir "$model_dir" \
  --tasks VR SVMR VCMR \
  "${DEVICE_FLAGS[@]}" \
  "${@:3}"
