# Shared by the training scripts (sourced, not run). Run the scripts from anywhere; they cd to the
# repository root, so relative paths in their flags are relative to it.
#
#   use_device GPU   GPU is a CUDA device id (exported as CUDA_VISIBLE_DEVICES, then --device 0)
#                    or `cpu` (--device -1); sets the array DEVICE_FLAGS.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

use_device() {
  local gpu="$1"
  if [[ "$gpu" == "cpu" ]]; then
    DEVICE_FLAGS=(--device -1)
  elif [[ "$gpu" =~ ^[0-9]+$ ]]; then
    export CUDA_VISIBLE_DEVICES="$gpu"
    DEVICE_FLAGS=(--device 0)
  elif [[ "$gpu" == *,* ]]; then
    die "GPU '$gpu': a list of GPUs (multi-GPU training) is not supported yet; give one CUDA id or 'cpu'"
  else
    die "GPU '$gpu': expected a CUDA device id (e.g. 0) or 'cpu'"
  fi
}

# require_exp_and_gpu "$@": the first two arguments must be given.
require_exp_and_gpu() {
  if [[ $# -lt 2 ]]; then
    die "usage: bash $0 EXP_ID GPU|cpu [extra train.py flags]"
  fi
}
