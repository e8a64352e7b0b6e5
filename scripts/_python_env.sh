# Sourced by test.sh and demo.sh: picks a Python and installs what the project needs (idempotent).
#   install_project [EXTRA]   e.g. install_project test  ->  pip install -e ".[test]"
# Sets PYTHON. Uses the active Python when it has pip, else creates .venv (gitignored).

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
  [ -d .venv ] || python3 -m venv .venv
  PYTHON=.venv/bin/python
fi
export PYTHON

install_project() {
  local target="."
  [ -n "${1:-}" ] && target=".[$1]"
  # torch is pinned only when it is missing: on this project's machines 2.13.0 is a local CPU wheel,
  # while an unpinned request would download a multi-GB CUDA build. An existing torch is kept as is.
  if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
  fi
  # Skip pip when everything is already importable from this checkout (a second run starts at once).
  if ! "$PYTHON" - "${1:-}" >/dev/null 2>&1 <<'PY'
import importlib, os, sys
for name in ["numpy", "lmdb", "msgpack", "msgpack_numpy", "easydict", "tqdm", "tensorboard"] + (["pytest"] if sys.argv[1:] == ["test"] else []):
    importlib.import_module(name)
import method
assert os.path.dirname(os.path.dirname(os.path.abspath(method.__file__))) == os.getcwd()
PY
  then
    "$PYTHON" -m pip install --quiet --disable-pip-version-check -e "$target"
  fi
}
