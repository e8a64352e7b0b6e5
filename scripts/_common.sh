# Sourced by every script (not run): the Python to use, the project install, and the device flags. The scripts
# cd to the repository root, so relative paths in their flags are relative to it.
#
#   PYTHON            the active python3 when it has pip, else the local .venv (created once, gitignored)
#   install_project [EXTRAS]   pip install -e ".[EXTRAS]" unless everything is importable already (idempotent);
#                     torch is installed only when missing, pinned to the version the project is tested with
#   use_device GPU    GPU is a CUDA device id (exported as CUDA_VISIBLE_DEVICES, then --device 0) or `cpu`
#                     (--device -1); sets the array DEVICE_FLAGS.
#   use_devices GPUS  as use_device, and GPUS may also be a comma-separated list of CUDA ids (e.g. 0,1,2,3):
#                     one process per GPU, started by torchrun. Sets DEVICE_FLAGS
#                     and LAUNCHER, the command that runs the Python script (python, or torchrun for a list).
#                     torchrun gets `--standalone` (one node), or the flags in $TORCHRUN_ARGS for several
#                     nodes, e.g. TORCHRUN_ARGS="--nnodes 2 --node_rank 0 --rdzv_backend c10d
#                     --rdzv_endpoint HOST:29500 --rdzv_id RUN".

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
  [ -d "$REPO_ROOT/.venv" ] || python3 -m venv "$REPO_ROOT/.venv"
  PYTHON="$REPO_ROOT/.venv/bin/python"
fi
export PYTHON
TESTED_TORCH_VERSION="2.13.0"

install_project() {
  local target="."
  [ -n "${1:-}" ] && target=".[$1]"
  if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet "torch==$TESTED_TORCH_VERSION"
  fi
  # Skip pip when everything is already importable from this checkout (a second run starts at once).
  if ! (cd "$REPO_ROOT" && "$PYTHON" - "${1:-}" >/dev/null 2>&1 <<'PY'
import importlib, os, sys
extras = {"test": ["pytest"], "corpus": ["transformers", "h5py"], "extract": ["av", "transformers"],
          "search": ["flask", "waitress", "transformers"], "search-test": ["requests", "selenium"],
          "faiss": ["faiss"]}
names = ["numpy", "lmdb", "msgpack", "msgpack_numpy", "easydict", "tqdm", "tensorboard"]
for extra in filter(None, sys.argv[1].split(",")):
    names += extras[extra]
for name in names:
    importlib.import_module(name)
import method
assert os.path.dirname(os.path.dirname(os.path.abspath(method.__file__))) == os.getcwd()
PY
  ); then
    (cd "$REPO_ROOT" && "$PYTHON" -m pip install --quiet --disable-pip-version-check -e "$target")
  fi
}

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
  else
    die "GPU '$gpu': expected a CUDA device id (e.g. 0) or 'cpu'"
  fi
}

use_devices() {
  local gpus="$1"
  LAUNCHER=("$PYTHON")
  if [[ "$gpus" != *,* ]]; then
    use_device "$gpus"
    return
  fi
  if [[ ! "$gpus" =~ ^[0-9]+(,[0-9]+)+$ ]]; then
    die "GPU list '$gpus': expected comma-separated CUDA device ids (e.g. 0,1,2,3)"
  fi
  local n_gpus
  n_gpus=$(tr ',' '\n' <<<"$gpus" | wc -l)
  export CUDA_VISIBLE_DEVICES="$gpus"
  DEVICE_FLAGS=(--device 0)  # process i (LOCAL_RANK i) runs on the i-th GPU of the list
  local torchrun_args
  read -r -a torchrun_args <<<"${TORCHRUN_ARGS:---standalone}"
  LAUNCHER=("$PYTHON" -m torch.distributed.run "${torchrun_args[@]}" --nproc_per_node "$n_gpus")
}

# require_exp_and_gpu "$@": the first two arguments must be given.
require_exp_and_gpu() {
  if [[ $# -lt 2 ]]; then
    die "usage: bash $0 EXP_ID GPU|GPU,GPU,...|cpu [extra train.py flags]"
  fi
}

# paper_recipe_flags EXP_ID: sets PAPER_FLAGS, the flags every training recipe of the paper passes (the
# scripts add their own recipe flags, then the device flags, then the user's extra flags, which win).
paper_recipe_flags() {
  PAPER_FLAGS=(--dataset_config config/tvr_data_config.json --model_config config/model_config.json
               --stop_task VCMR --eval_tasks_at_training VCMR SVMR VR --exp_id "$1" --eval_query_bsz 5
               --max_vcmr_video 10 --num_workers 8)
}

# start_training_script "$@": the checks and setup every training recipe starts with (usage, devices, cwd,
# PAPER_FLAGS).
start_training_script() {
  require_exp_and_gpu "$@"
  use_devices "$2"
  cd "$REPO_ROOT"
  paper_recipe_flags "$1"
}
