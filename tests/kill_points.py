"""Deterministic kill points for the tests that SIGKILL a training process (no sleeps, no timing)."""

# Runs train.py as __main__ and freezes it at a deterministic point: `write:NAME` N = inside the N-th atomic
# write of a file whose name contains NAME, at the fsync of the temporary file (the new bytes are written,
# the destination is not replaced yet); `step` N = before the N-th optimizer step of this process. Once
# frozen it creates the marker file and sleeps until killed. Arguments: MARKER POINT N TRAIN_ARGS...
FREEZE_HARNESS = r"""
import os, runpy, sys, time

from method.optimization import BertAdamW

marker, point, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.argv = ["train.py"] + sys.argv[4:]
count, real_fsync, real_step = 0, os.fsync, BertAdamW.step


def reached():
    global count
    count += 1
    if count == nth:
        open(marker, "w").close()
        time.sleep(3600)


def fsync(fd):
    name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    if name.startswith(".") and name.endswith(".tmp") and point[len("write:"):] in name:
        reached()
    real_fsync(fd)


def step(self, *args, **kwargs):
    reached()
    return real_step(self, *args, **kwargs)


if point == "step":
    BertAdamW.step = step
else:
    os.fsync = fsync
runpy.run_path("train.py", run_name="__main__")
"""
