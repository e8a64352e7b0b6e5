"""Fault tolerance: a training process killed with SIGKILL (mid-epoch; while writing a checkpoint; during
evaluation) never leaves a corrupt model.ckpt, last.ckpt, opt.json or metrics file, and
--resume finishes the run exactly as an uninterrupted one; runs started in the same second get their own run
directories; inference on a read-only run directory fails cleanly, or writes to --output_dir.
"""
import contextlib
import glob
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import utils.run_dir
import inference
import train
from config.options import BaseOptions
from method.checkpoint import load_checkpoint
from utils.errors import run_cli
from kill_points import FREEZE_HARNESS

from utils.run_dir import REPO_ROOT
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1")
N_EPOCH = 2  # epochs -1 (evaluation of the untrained model), 0 and 1; 6 batches each



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_args(tiny_train_flags):
    return tiny_train_flags + ["--use_interal_vr_scores", "--stop_task", "SVMR", "--n_epoch", str(N_EPOCH)]


@pytest.fixture(scope="module")
def reference_run(base_args, tmp_path_factory):
    """The same run, uninterrupted."""
    return train.main(base_args + ["--results_root", str(tmp_path_factory.mktemp("reference")), "--exp_id", "ref"])


# ----------------------------------------------------------------------------------------------------
# helpers

def start_training(argv, log_path, freeze=None, marker=None):
    """train.py as a child process; `freeze` = ("write:NAME", n) runs it under FREEZE_HARNESS."""
    command = [sys.executable, "train.py"] if freeze is None else [
        sys.executable, "-c", FREEZE_HARNESS, str(marker), freeze[0], str(freeze[1])]
    with open(log_path, "w") as log:
        return subprocess.Popen(command + argv, cwd=REPO_ROOT, env=SUBPROCESS_ENV, stdout=log, stderr=log)


def log_tail(log_path):
    with open(log_path) as f:
        return f.read()[-3000:]


def wait_for(condition, process, log_path, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"train.py ended (status {process.returncode}) too early:\n{log_tail(log_path)}"
        assert time.time() < deadline, f"timed out:\n{log_tail(log_path)}"
        time.sleep(0.01)


def sigkill(process):
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)


def kill_when_frozen(process, marker, log_path):
    try:
        wait_for(marker.exists, process, log_path)
    finally:
        sigkill(process)
    assert process.returncode == -signal.SIGKILL


def assert_intact(run_dir):
    """Every checkpoint loads and every JSON file parses -> epoch of last.ckpt (None if there is none)."""
    for path in glob.glob(os.path.join(run_dir, "*.json")):  # opt.json, predictions, metrics
        with open(path) as f:
            json.load(f)
    assert os.path.isfile(os.path.join(run_dir, "opt.json"))
    for name in ("model.ckpt", "last.ckpt"):
        if os.path.exists(os.path.join(run_dir, name)):
            load_checkpoint(os.path.join(run_dir, name))
    last = os.path.join(run_dir, "last.ckpt")
    return load_checkpoint(last)["epoch"] if os.path.exists(last) else None


def temp_files(run_dir):
    return [name for name in os.listdir(run_dir) if name.endswith(".tmp")]


def read_file(path):
    with open(path) as f:
        return f.read()


def assert_same_run(run_a, run_b):
    """Same final weights, optimizer state, best checkpoint, metrics and logs (apart from time stamps)."""
    last_a, last_b = (load_checkpoint(os.path.join(run, "last.ckpt")) for run in (run_a, run_b))
    assert (last_a["epoch"], last_a["best_score"], last_a["es_cnt"]) == (last_b["epoch"], last_b["best_score"],
                                                                         last_b["es_cnt"])
    best_a, best_b = (load_checkpoint(os.path.join(run, "model.ckpt")) for run in (run_a, run_b))
    assert best_a["epoch"] == best_b["epoch"]
    for a, b in ((last_a["model"], last_b["model"]), (best_a["model"], best_b["model"])):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    for state_a, state_b in zip(last_a["optimizer"]["state"].values(), last_b["optimizer"]["state"].values()):
        assert torch.equal(state_a["exp_avg_sq"], state_b["exp_avg_sq"])
    for name in ("train.log.txt", "eval.log.txt"):
        lines_a, lines_b = ([line[19:] for line in read_file(os.path.join(run, name)).split("\n")]
                            for run in (run_a, run_b))
        assert lines_a == lines_b, name
    metrics = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_a, "*_metrics.json")))
    assert metrics and metrics == sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_b, "*_metrics.json")))
    for name in metrics:
        assert read_file(os.path.join(run_a, name)) == read_file(os.path.join(run_b, name)), name


# ----------------------------------------------------------------------------------------------------
# SIGKILL and --resume

def test_sigkill_at_several_points_then_resume(base_args, reference_run, tmp_path):
    results_root = tmp_path / "results"

    # 1. A new run, killed in the middle of epoch 0 (before its 4th of 6 training steps), after epoch -1
    #    (the untrained evaluation) was saved.
    log, marker = tmp_path / "mid_epoch.log", tmp_path / "frozen_mid_epoch"
    argv = base_args + ["--results_root", str(results_root), "--exp_id", "killed"]
    kill_when_frozen(start_training(argv, log, ("step", 4), marker), marker, log)
    (run_dir,) = glob.glob(str(results_root / "*"))
    saved_epoch = assert_intact(run_dir)
    assert saved_epoch == -1
    resume = ["--resume", run_dir]

    # 2. While writing last.ckpt at the end of the next epoch: the previous last.ckpt stays in place.
    log, marker = tmp_path / "checkpoint_write.log", tmp_path / "frozen_in_checkpoint_write"
    kill_when_frozen(start_training(resume, log, ("write:last.ckpt", 1), marker), marker, log)
    assert assert_intact(run_dir) == saved_epoch
    assert any(name.startswith(".last.ckpt.") for name in temp_files(run_dir)), "not killed inside the write"

    # 3. During the evaluation of that epoch (it runs again), while its metrics file is written.
    log, marker = tmp_path / "evaluation.log", tmp_path / "frozen_in_evaluation"
    kill_when_frozen(start_training(resume, log, ("write:_metrics.json", 1), marker), marker, log)
    assert assert_intact(run_dir) == saved_epoch
    assert not any(name.startswith(".last.ckpt.") for name in temp_files(run_dir)), "stale temp files are removed"

    # 4. Resume to the end: the same run as the uninterrupted one, and no temporary files left.
    log = tmp_path / "final.log"
    process = start_training(resume, log)
    assert process.wait(timeout=300) == 0, log_tail(log)
    assert assert_intact(run_dir) == N_EPOCH - 1
    assert not temp_files(run_dir)
    assert_same_run(reference_run, run_dir)
    # TensorBoard: the points of the epochs that ran again (their training steps, the eval-loss point the
    # evaluation kill left) are not duplicated.
    assert tensorboard_scalars(run_dir) == tensorboard_scalars(reference_run)


def tensorboard_scalars(run_dir):
    """{(event dir, tag): [(step, value)]} of every event file of the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for directory in sorted({os.path.dirname(p) for p in glob.glob(os.path.join(run_dir, "tensorboard_log", "**",
                                                                                "events.out.tfevents.*"),
                                                                      recursive=True)}):
        events = EventAccumulator(directory, purge_orphaned_data=False).Reload()
        for tag in events.Tags()["scalars"]:
            scalars[(os.path.relpath(directory, run_dir), tag)] = [(e.step, pytest.approx(e.value, abs=1e-6))
                                                                   for e in events.Scalars(tag)]
    return scalars


# ----------------------------------------------------------------------------------------------------
# concurrent runs

def test_runs_started_in_the_same_second_get_their_own_run_dirs(base_args, tmp_path, monkeypatch):
    n_runs = 4
    argv = base_args + ["--results_root", str(tmp_path / "results"), "--exp_id", "same"]
    monkeypatch.setattr(utils.run_dir.time, "strftime", lambda *args: "2021_07_01_12_00_00")
    context = multiprocessing.get_context("fork")
    barrier, run_dirs = context.Barrier(n_runs), context.Queue()

    def start_run():
        barrier.wait()
        run_dirs.put(BaseOptions().parse(argv).results_dir)

    processes = [context.Process(target=start_run) for _ in range(n_runs)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    names = sorted(os.path.basename(run_dirs.get(timeout=10)) for _ in range(n_runs))
    assert names == ["tvr-same-2021_07_01_12_00_00"] + [f"tvr-same-2021_07_01_12_00_00_{i}" for i in range(1, n_runs)]
    for name in names:
        with open(tmp_path / "results" / name / "opt.json") as f:
            assert json.load(f)["results_dir"] == str(tmp_path / "results" / name)


# ----------------------------------------------------------------------------------------------------
# read-only run directory

@contextlib.contextmanager
def read_only(directory):
    """Make `directory` read-only for this process (root ignores permission bits: the immutable attribute)."""
    os.chmod(directory, 0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", directory], capture_output=True).returncode == 0
    try:
        with contextlib.suppress(OSError), open(os.path.join(directory, "probe"), "w"):
            pytest.skip("cannot make a directory read-only here")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", directory], check=True)
        os.chmod(directory, 0o755)


def snapshot(directory):
    return {name: (os.path.getsize(os.path.join(directory, name)), os.path.getmtime(os.path.join(directory, name)))
            for name in os.listdir(directory)}


def test_inference_on_a_read_only_run_dir(reference_run, tiny_train_flags, tmp_path, capsys):
    run_dir = str(shutil.copytree(reference_run, tmp_path / "run"))
    data_config = tiny_train_flags[tiny_train_flags.index("--dataset_config") + 1]
    argv = ["--model_dir", run_dir, "--force_model_dir", "--dataset_config", data_config, "--device", "-1",
            "--num_workers", "0", "--eval_id", "ro"]
    before = snapshot(run_dir)
    with read_only(run_dir):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(inference.main, argv)
        error = capsys.readouterr().err.split("\n")[-2]
        assert exit_info.value.code == 2
        assert error.startswith(f"error: output directory '{run_dir}' is not writable") and "--output_dir" in error

        elsewhere = tmp_path / "elsewhere"
        run_cli(inference.main, argv + ["--output_dir", str(elsewhere)])
    assert snapshot(run_dir) == before
    written = os.listdir(elsewhere)
    assert {"inference_tvr_val_ro_predictions_VCMR_SVMR_VR_hero.json",
            "inference_tvr_val_ro_predictions_VCMR_SVMR_VR_hero_metrics.json"} <= set(written)
    assert not [name for name in written if name.startswith(".")]
    for name in written:
        with open(elsewhere / name) as f:
            json.load(f)
