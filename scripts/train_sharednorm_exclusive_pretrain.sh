#!/usr/bin/env bash
# CONQUER, exclusive similarity (video-scoring head), shared-normalization training, with the query and
# video encoders initialised from a first-stage checkpoint.
#   bash scripts/train_sharednorm_exclusive_pretrain.sh EXP_ID GPU|GPU,GPU,...|cpu \
#        --encoder_pretrain_ckpt_filepath FIRST_STAGE_RUN/model.ckpt [extra train.py flags]
# (or edit PRETRAIN_CKPT below). Unlike the original script, extra flags do reach train.py.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
start_training_script "$@"

PLACEHOLDER_CKPT=path/to/first_stage_trained_model/model.ckpt
PRETRAIN_CKPT=${PRETRAIN_CKPT:-$PLACEHOLDER_CKPT}
pretrain_given=no
for arg in "${@:3}"; do
  [[ "$arg" == --encoder_pretrain_ckpt_filepath || "$arg" == --encoder_pretrain_ckpt_filepath=* ]] && pretrain_given=yes
done
if [[ $pretrain_given == no && "$PRETRAIN_CKPT" == "$PLACEHOLDER_CKPT" ]]; then
  die "no first-stage checkpoint: pass --encoder_pretrain_ckpt_filepath PATH/model.ckpt (or set PRETRAIN_CKPT)"
fi

exec "${LAUNCHER[@]}" train.py "${PAPER_FLAGS[@]}" --bsz 16 --use_extend_pool 1000 --neg_video_num 3 \
  --similarity_measure exclusive --encoder_pretrain_ckpt_filepath "$PRETRAIN_CKPT" \
  "${DEVICE_FLAGS[@]}" "${@:3}"
