#!/usr/bin/env bash
# The default training recipe: shared-normalization training with the general similarity measure
# (same flags as scripts/train_sharednorm_general.sh).
#   bash scripts/train.sh EXP_ID GPU|cpu [extra train.py flags, which override these]
#   bash scripts/train.sh EXP_ID 0,1,2,3 [...]   # 4 GPUs: torchrun, DistributedDataParallel; --bsz stays the
#                                                # global batch, --num_workers is per process
# Several nodes: set TORCHRUN_ARGS on every node (see scripts/_common.sh), or run torchrun yourself.
set -euo pipefail
exec bash "$(dirname "$0")/train_sharednorm_general.sh" "$@"
