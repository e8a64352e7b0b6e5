"""train.py end to end on the tiny synthetic corpus (CPU, tiny model), resume, and the training scripts."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from config.options import OptionError
from method.checkpoint import load_checkpoint
from method.dataset import build_training_datasets
from kill_points import FREEZE_HARNESS

from utils.run_dir import REPO_ROOT
# One thread: fast on a shared 2-core machine, and the same numerics in this process and in subprocesses.
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
LOSS_LINE = re.compile(r"^\d{4}(_\d\d){5} \[Epoch\] (\d{3}) \[Loss\] moment_ce_loss (\d+\.\d{4}) "
                       r"video_ce_loss (\d+\.\d{4}) loss_overall (\d+\.\d{4})$")
EVAL_LINE = re.compile(r"^\d{4}(_\d\d){5} \[Epoch\] (-01|\d{3}) \[Metrics\] (\{.*\})$")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_args(tiny_train_flags):
    # SVMR R@1 is the stop score: on this corpus it is positive from the start, so model.ckpt gets written.
    return tiny_train_flags + ["--use_interal_vr_scores", "--stop_task", "SVMR"]


@pytest.fixture(scope="module")
def full_run(base_args, tmp_path_factory):
    """An uninterrupted 3-epoch run (epochs -1..2, all evaluated)."""
    # "latest" in the path: only the file names may change from latest_* to best_* [Q23].
    root = tmp_path_factory.mktemp("latest")
    return train.main(base_args + ["--results_root", str(root / "results"), "--exp_id", "full", "--n_epoch", "3"])


def read_lines(path):
    with open(path) as f:
        return f.read().split("\n")


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_final_state(run_a, run_b):
    last_a = load_checkpoint(os.path.join(run_a, "last.ckpt"))
    last_b = load_checkpoint(os.path.join(run_b, "last.ckpt"))
    assert last_a["epoch"] == last_b["epoch"]
    assert_same_tensors(last_a["model"], last_b["model"])
    for index, state in last_a["optimizer"]["state"].items():
        other = last_b["optimizer"]["state"][index]
        assert state["step"] == other["step"]
        assert torch.equal(state["exp_avg"], other["exp_avg"]) and torch.equal(state["exp_avg_sq"], other["exp_avg_sq"])
    assert (last_a["best_score"], last_a["es_cnt"]) == (last_b["best_score"], last_b["es_cnt"])
    best_a = load_checkpoint(os.path.join(run_a, "model.ckpt"))
    best_b = load_checkpoint(os.path.join(run_b, "model.ckpt"))
    assert best_a["epoch"] == best_b["epoch"]
    assert_same_tensors(best_a["model"], best_b["model"])
    # Same logs apart from the time stamps: no epoch missing or written twice.
    for name in ("train.log.txt", "eval.log.txt"):
        strip = [[line[19:] for line in read_lines(os.path.join(run, name))] for run in (run_a, run_b)]
        assert strip[0] == strip[1], name


def test_full_run_writes_the_run_directory(full_run):
    names = set(os.listdir(full_run))
    submission = "tvr_val_predictions_VCMR_SVMR_VR"
    for name in ("opt.json", "code.zip", "model.ckpt", "last.ckpt", "train.log.txt", "eval.log.txt", "run.log",
                 f"best_{submission}.json", f"best_{submission}_metrics.json", f"latest_{submission}.json",
                 f"latest_{submission}_metrics.json"):
        assert name in names, name
    assert glob.glob(os.path.join(full_run, "tensorboard_log", "events.out.tfevents.*"))

    opt = json.load(open(os.path.join(full_run, "opt.json")))
    assert opt["n_epoch"] == 3 and opt["results_dir"] == full_run

    train_lines = read_lines(os.path.join(full_run, "train.log.txt"))
    assert train_lines[-1] == ""  # newline-terminated
    matches = [LOSS_LINE.match(line) for line in train_lines[:-1]]
    assert all(matches) and [m.group(2) for m in matches] == ["000", "001", "002"]
    losses = [float(m.group(5)) for m in matches]
    assert losses[2] < losses[0], losses

    eval_matches = [EVAL_LINE.match(line) for line in read_lines(os.path.join(full_run, "eval.log.txt"))[:-1]]
    assert all(eval_matches) and [m.group(2) for m in eval_matches] == ["-01", "000", "001", "002"]
    metrics = [json.loads(m.group(3)) for m in eval_matches]
    assert list(metrics[0]) == ["VCMR", "SVMR", "VR", "VCMR_by_type", "SVMR_by_type", "VR_by_type"]

    # model.ckpt is the evaluation with the best SVMR 0.5-r1 + 0.7-r1 (first one on ties), as best_* are.
    scores = [m["SVMR"]["0.5-r1"] + m["SVMR"]["0.7-r1"] for m in metrics]
    best_epoch = scores.index(max(scores)) - 1
    best = load_checkpoint(os.path.join(full_run, "model.ckpt"))
    assert sorted(best) == ["epoch", "model", "model_cfg"] and best["epoch"] == best_epoch
    best_metrics = json.load(open(os.path.join(full_run, f"best_{submission}_metrics.json")))
    assert best_metrics["SVMR"] == metrics[best_epoch + 1]["SVMR"]

    last = load_checkpoint(os.path.join(full_run, "last.ckpt"))
    assert last["epoch"] == 2 and last["global_step"] == 3 * 6 and not last["stopped_early"]
    assert last["best_score"] == max(scores)


def test_full_run_tensorboard_scalars(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(full_run, "tensorboard_log")).Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("moment_ce_loss", "video_ce_loss", "loss_overall"):
        assert f"Train/{name}" in tags and f"Eval_Loss/{name}" in tags
        assert [e.step for e in events.Scalars(f"Eval_Loss/{name}")] == [-1, 0, 1, 2]
    assert [e.step for e in events.Scalars("Train/LR_top")] == list(range(18))
    for tag in ("Train/LR_top", "Train/LR_pretrain"):
        assert [e.value for e in events.Scalars(tag)] == pytest.approx([1e-3] * 18)
    grouped = {os.path.basename(d) for d in glob.glob(os.path.join(full_run, "tensorboard_log", "Eval_*"))}
    assert {"Eval_VCMR-0.5_0.5-r1", "Eval_SVMR-0.7_0.7-r100", "Eval_VR_r10"} <= grouped


def test_resume_equals_uninterrupted_run(full_run, base_args, tmp_path):
    partial = train.main(base_args + ["--results_root", str(tmp_path / "results"), "--exp_id", "part",
                                      "--n_epoch", "1"])
    assert load_checkpoint(os.path.join(partial, "last.ckpt"))["epoch"] == 0
    assert train.main(["--resume", partial, "--n_epoch", "3"]) == partial
    assert_same_final_state(full_run, partial)
    assert json.load(open(os.path.join(partial, "opt.json")))["n_epoch"] == 1  # opt.json is the run's start


def test_resume_after_sigkill_mid_epoch(full_run, base_args, tmp_path):
    args = base_args + ["--results_root", str(tmp_path / "results"), "--exp_id", "killed", "--n_epoch", "3"]
    marker = tmp_path / "frozen"
    # Frozen before the 10th training step (epoch 1 of epochs 0..2, 6 steps each), then killed.
    process = subprocess.Popen([sys.executable, "-c", FREEZE_HARNESS, str(marker), "step", "10"] + args,
                               cwd=REPO_ROOT, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert process.poll() is None and time.time() < deadline, "train.py ended before the kill point"
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    (run_dir,) = glob.glob(str(tmp_path / "results" / "*"))
    assert load_checkpoint(os.path.join(run_dir, "last.ckpt"))["epoch"] == 0

    subprocess.run([sys.executable, "train.py", "--resume", run_dir], cwd=REPO_ROOT, env=SUBPROCESS_ENV,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert_same_final_state(full_run, run_dir)


def test_evaluation_does_not_change_training(full_run, base_args, tmp_path):
    run_dir = train.main(base_args + ["--results_root", str(tmp_path / "results"), "--exp_id", "noeval",
                                      "--n_epoch", "3", "--disable_eval"])
    assert_same_tensors(load_checkpoint(os.path.join(full_run, "last.ckpt"))["model"],
                        load_checkpoint(os.path.join(run_dir, "last.ckpt"))["model"])
    assert load_checkpoint(os.path.join(run_dir, "model.ckpt"))["epoch"] == 2  # saved every epoch
    assert not os.path.exists(os.path.join(run_dir, "eval.log.txt"))


def test_early_stop_and_resume_of_a_stopped_run(base_args, tmp_path):
    # VR R@1 with --use_interal_vr_scores is the first-stage ranking: it never improves after epoch -1.
    run_dir = train.main(base_args + ["--results_root", str(tmp_path / "results"), "--exp_id", "es",
                                      "--n_epoch", "5", "--stop_task", "VR", "--max_es_cnt", "0"])
    eval_lines = [EVAL_LINE.match(line) for line in read_lines(os.path.join(run_dir, "eval.log.txt"))[:-1]]
    best, count, stop_epoch = 0.0, 0, None
    for m in eval_lines:  # early stopping: after max_es_cnt + 1 evaluations without improvement
        score = json.loads(m.group(3))["VR"]["r1"]
        best, count = (score, 0) if score > best else (best, count + 1)
        if count > 0:
            stop_epoch = int(m.group(2))
            break
    assert stop_epoch is not None and int(eval_lines[-1].group(2)) == stop_epoch
    with open(os.path.join(run_dir, "train.log.txt")) as f:
        train_log = f.read()
    assert train_log.endswith(f"\nEarly Stop at epoch {stop_epoch}") or train_log == f"Early Stop at epoch {stop_epoch}"
    assert load_checkpoint(os.path.join(run_dir, "last.ckpt"))["stopped_early"]

    train.main(["--resume", run_dir])  # nothing left to do
    with open(os.path.join(run_dir, "train.log.txt")) as f:
        assert f.read() == train_log


def test_resume_errors(tmp_path, base_args):
    with pytest.raises(OptionError, match="not a run directory"):
        train.main(["--resume", str(tmp_path)])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "opt.json").write_text(json.dumps(dict(exp_id="x", results_dir=str(run_dir))))
    with pytest.raises(OptionError, match="no last.ckpt"):
        train.main(base_args + ["--resume", str(run_dir)])


def test_encoder_pretrain_is_copied(full_run, base_args, tmp_path):
    # The trained weights of the last epoch (model.ckpt may hold the untrained epoch -1).
    source_path = os.path.join(full_run, "last.ckpt")
    source = load_checkpoint(source_path)["model"]
    run_dir = train.main(base_args + ["--results_root", str(tmp_path / "results"), "--exp_id", "pretrained",
                                      "--similarity_measure", "exclusive", "--disable_eval", "--n_epoch", "0",
                                      "--encoder_pretrain_ckpt_filepath", source_path])
    # --disable_eval saves model.ckpt every epoch, including the untrained epoch -1.
    model = load_checkpoint(os.path.join(run_dir, "model.ckpt"))["model"]
    copied = [k for k in model if k.startswith(("encoder.", "query_weight."))]
    assert len(copied) == 52 + 5
    for key in copied:
        assert torch.equal(model[key], source[key]), key
    fresh = [k for k in model if k.startswith("moment_localization_head.") and k.endswith("weight")
             and "LayerNorm" not in k]
    assert fresh and not any(torch.equal(model[k], source[k]) for k in fresh)
    assert any(k.startswith("video_scoring_head.") for k in model)


def test_debug_run_is_small_and_real(base_args, tmp_path):
    # Also exercises worker processes, bf16 autocast on the CPU and the LR warmup.
    run_dir = train.main(base_args + ["--results_root", str(tmp_path / "results"), "--exp_id", "dbg", "--debug",
                                      "--n_epoch", "50", "--bsz", "4", "--lr_warmup_fraction", "0.5",
                                      "--num_workers", "2", "--amp", "bf16"])
    assert os.path.dirname(run_dir) == str(tmp_path / "debug_results")
    assert len(read_lines(os.path.join(run_dir, "train.log.txt"))) == 2 + 1  # 2 epochs
    assert len(read_lines(os.path.join(run_dir, "eval.log.txt"))) == 3 + 1  # epochs -1, 0, 1
    predictions = json.load(open(glob.glob(os.path.join(run_dir, "*_predictions_VCMR_SVMR_VR.json"))[0]))
    assert len(predictions["VCMR"]) == train.DEBUG_EVAL_QUERIES

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "tensorboard_log")).Reload()
    # 2 epochs x 3 batches, warmup over half of the 6 steps, from LR 0.
    assert [e.value for e in events.Scalars("Train/LR_top")] == pytest.approx([0, 1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3,
                                                                               1e-3])


ORIGINAL_TRAIN_SET = dict(max_ctx_len=100, max_desc_len=30, clip_length=1.5, ctx_mode="visual_sub")
NON_DEFAULT = ["--max_ctx_len", "100", "--max_desc_len", "8", "--clip_length", "3.0"]


@pytest.mark.parametrize("extra, expected", [
    (NON_DEFAULT, ORIGINAL_TRAIN_SET),
    (NON_DEFAULT + ["--train_set_honours_options"], dict(max_ctx_len=100, max_desc_len=8, clip_length=3.0,
                                                         ctx_mode="visual_sub")),
    (["--ctx_mode", "visual", "--max_ctx_len", "30"], ORIGINAL_TRAIN_SET),
    # visual_sub with another max_ctx_len crashes in the original: the options are used.
    (["--max_ctx_len", "30", "--max_desc_len", "8"], dict(max_ctx_len=30, max_desc_len=8, clip_length=1.5,
                                                          ctx_mode="visual_sub")),
])
def test_training_set_options_as_the_original(base_args, tmp_path, extra, expected):
    opt = train.BaseOptions().parse(base_args + ["--results_root", str(tmp_path), "--exp_id", "ts"] + extra)
    train_dataset, eval_loss_dataset, eval_dataset = build_training_datasets(opt)
    assert {name: getattr(train_dataset, name) for name in expected} == expected
    for dataset in (eval_loss_dataset, eval_dataset):
        assert (dataset.max_ctx_len, dataset.max_desc_len, dataset.ctx_mode) == (opt.max_ctx_len, opt.max_desc_len,
                                                                                 opt.ctx_mode)


def test_visual_training_on_the_original_train_set_and_unused_warmup_proportion(base_args, tmp_path):
    """--ctx_mode visual trains on the original's visual_sub training set (L 100) and evaluates with the
    options; --lr_warmup_proportion is recorded but, as in the original, leaves the LR constant."""
    run_dir = train.main(base_args + ["--results_root", str(tmp_path), "--exp_id", "vis", "--ctx_mode", "visual",
                                      "--n_epoch", "1", "--no_eval_untrained", "--lr_warmup_proportion", "0.5",
                                      "--max_vcmr_video", "3"])
    assert json.load(open(os.path.join(run_dir, "opt.json")))["lr_warmup_proportion"] == 0.5

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "tensorboard_log")).Reload()
    assert [e.value for e in events.Scalars("Train/LR_top")] == pytest.approx([1e-3] * len(
        events.Scalars("Train/LR_top")))
    assert len(events.Scalars("Train/LR_top")) > 1


def test_training_needs_val(base_args, tmp_path):
    with pytest.raises(OptionError, match="--eval_split_name val"):
        train.main(base_args + ["--results_root", str(tmp_path), "--exp_id", "x", "--eval_split_name", "test_public"])
    assert os.listdir(tmp_path) == [], "no run directory is created for rejected options"


def run_script(name, *args):
    return subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", name)] + list(args), env=SUBPROCESS_ENV,
                          capture_output=True, text=True)


def test_paper_scripts_run_end_to_end(full_run, tiny_train_flags, tmp_path):
    extra = tiny_train_flags + [
        "--results_root", str(tmp_path / "results"), "--n_epoch", "1", "--no_eval_untrained", "--max_vcmr_video", "5"]
    pretrain = os.path.join(full_run, "last.ckpt")
    expected = {
        "train_general.sh": dict(neg_video_num=0, use_extend_pool=500, use_interal_vr_scores=True,
                                 similarity_measure="general"),
        "train_sharednorm_general.sh": dict(neg_video_num=3, use_extend_pool=1000, use_interal_vr_scores=True,
                                            similarity_measure="general"),
        "train_sharednorm_disjoint.sh": dict(neg_video_num=3, use_extend_pool=1000, use_interal_vr_scores=False,
                                             similarity_measure="disjoint"),
        "train_sharednorm_exclusive_pretrain.sh": dict(neg_video_num=3, use_extend_pool=1000,
                                                       use_interal_vr_scores=False, similarity_measure="exclusive",
                                                       encoder_pretrain_ckpt_filepath=pretrain),
    }
    processes = {}
    for script in expected:
        script_extra = extra + (["--encoder_pretrain_ckpt_filepath", pretrain] if "exclusive" in script else [])
        processes[script] = subprocess.Popen(
            ["bash", os.path.join(REPO_ROOT, "scripts", script), script[len("train_"):-len(".sh")], "cpu"]
            + script_extra, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for script, values in expected.items():
        _, stderr = processes[script].communicate(timeout=300)
        assert processes[script].returncode == 0, stderr[-3000:]
        (run_dir,) = glob.glob(os.path.join(tmp_path, "results", f"tvr-{script[len('train_'):-len('.sh')]}-*"))
        opt = json.load(open(os.path.join(run_dir, "opt.json")))
        for key, value in values.items():
            assert opt[key] == value, (script, key)
        # Extra flags come last and override the script's (--bsz, --max_vcmr_video), --device -1 from "cpu".
        assert (opt["bsz"], opt["max_vcmr_video"], opt["device"], opt["stop_task"]) == (8, 5, -1, "VCMR")
        assert opt["eval_query_bsz"] == 8 and opt["num_workers"] == 0
        assert len(read_lines(os.path.join(run_dir, "train.log.txt"))) == 2
        assert len(read_lines(os.path.join(run_dir, "eval.log.txt"))) == 2
        assert os.path.isfile(os.path.join(run_dir, "last.ckpt"))


def test_scripts_reject_bad_arguments(tmp_path):
    result = run_script("train_general.sh", "only_exp_id")
    assert result.returncode == 2 and "usage: bash" in result.stderr
    result = run_script("train_sharednorm_general.sh", "x", "0,gpu1")
    assert result.returncode == 2 and "expected comma-separated CUDA device ids" in result.stderr
    result = run_script("train.sh", "x", "gpu0")
    assert result.returncode == 2 and "expected a CUDA device id" in result.stderr
    result = run_script("train_sharednorm_exclusive_pretrain.sh", "x", "cpu", "--n_epoch", "1")
    assert result.returncode == 2 and "--encoder_pretrain_ckpt_filepath" in result.stderr
