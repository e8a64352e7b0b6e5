"""The bad-input battery: one case per test. Each runs an entry point's `main` the way its `__main__` does
(utils.errors.run_cli) and checks the three promises: exit status 2 (argparse's, for a bad command line),
an `error:` message naming the file, key or flag, and no output written (a failed training run leaves no run
directory; a failed inference or evaluation leaves the files it would write untouched). The last test runs
every entry point as a real subprocess to check the `__main__` wiring.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

import lmdb
import numpy as np
import pytest
import torch

import inference
import train
from method.checkpoint import build_model, load_checkpoint, save_checkpoint
from utils.errors import run_cli
from utils.feature_stores import StoreWriter, close_store, encode_npz_features, encode_ranklist, encode_video_features
from utils.io_utils import load_json, load_jsonl, save_json, save_jsonl
from utils.standalone_eval import main as standalone_eval_main

from utils.run_dir import REPO_ROOT
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1")


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------
# helpers

class Corpus:
    """A private copy of the tiny corpus that a test may break; `config` is its data config path."""

    def __init__(self, tiny_corpus, directory):
        self.root = str(shutil.copytree(os.path.dirname(tiny_corpus), directory))
        self.config = os.path.join(self.root, "tvr_data_config.json")
        self.layout = load_json(self.config)
        save_json(dict(self.layout, root_path=self.root), self.config, save_pretty=True)

    def path(self, key):
        return os.path.join(self.root, self.layout[key])

    def rows(self, key):
        return load_jsonl(self.path(key))

    def first_train_query(self):
        return self.rows("train_data_path")[0]

    def edit_config(self, **changes):
        config = load_json(self.config)
        config.update(changes)
        for key in [k for k, v in changes.items() if v is None]:
            del config[key]
        save_json(config, self.config)

    def edit_store(self, key, **values):
        """Rewrite the store of data config `key` with raw `values` (bytes, or None to delete the key)."""
        path = self.path(key)
        env = lmdb.open(path, readonly=True, lock=False)
        with env.begin() as txn:
            items = {k.decode(): bytes(v) for k, v in txn.cursor()}
        env.close()
        items.update(values)
        with StoreWriter(path, lambda value: value) as writer:
            for name, value in items.items():
                if value is not None:
                    writer.put(name, value)


@pytest.fixture
def corpus(tiny_corpus, tmp_path):
    return Corpus(tiny_corpus, tmp_path / "corpus")


def train_argv(tiny_train_flags, tmp_path, data_config=None, *extra):
    flags = list(tiny_train_flags)
    if data_config is not None:
        flags[flags.index("--dataset_config") + 1] = data_config
    return flags + ["--use_interal_vr_scores", "--stop_task", "SVMR", "--results_root", str(tmp_path / "results"),
                    "--exp_id", "bad", "--n_epoch", "1"] + list(extra)


def expect_cli_error(capsys, main, argv, *fragments):
    """Run `main(argv)` as its __main__ does; assert exit status 2 and an error naming every fragment."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    message = err[err.rindex("error: "):]
    for fragment in fragments:
        assert str(fragment) in message, (fragment, message)
    assert "Traceback" not in message
    return message


def expect_train_error(capsys, tmp_path, argv, *fragments):
    message = expect_cli_error(capsys, train.main, argv, *fragments)
    assert not glob.glob(str(tmp_path / "results" / "*")), "a failed start must leave no run directory"
    return message


def snapshot(directory):
    return {os.path.relpath(path, directory): (os.path.getsize(path), os.path.getmtime(path))
            for path in glob.glob(os.path.join(directory, "**"), recursive=True) if os.path.isfile(path)}


@pytest.fixture(scope="module")
def trained_run(tiny_train_flags, tmp_path_factory):
    """A run directory with opt.json and model.ckpt (untrained weights of epoch -1: enough for inference)."""
    root = tmp_path_factory.mktemp("bad_inputs_run")
    return train.main(tiny_train_flags + ["--use_interal_vr_scores", "--results_root", str(root), "--exp_id", "run",
                                          "--n_epoch", "0", "--disable_eval"])


@pytest.fixture
def run_copy(trained_run, tmp_path):
    return str(shutil.copytree(trained_run, tmp_path / "run"))


def inference_argv(run_dir, data_config, *extra):
    # --force_model_dir: read this copy's checkpoint, not the one of the results_dir saved in opt.json.
    return ["--model_dir", run_dir, "--force_model_dir", "--dataset_config", data_config, "--device", "-1",
            "--num_workers", "0", "--eval_id", "bad"] + list(extra)


def expect_inference_error(capsys, run_dir, argv, *fragments):
    before = snapshot(run_dir)
    message = expect_cli_error(capsys, inference.main, argv, *fragments)
    assert snapshot(run_dir) == before, "a failed inference must not write into the run directory"
    return message


# ----------------------------------------------------------------------------------------------------
# data config

def test_data_config_missing_file(capsys, tiny_train_flags, tmp_path):
    missing = str(tmp_path / "nowhere" / "tvr_data_config.json")
    expect_train_error(capsys, tmp_path, train_argv(tiny_train_flags, tmp_path, missing), missing, "file not found")


def test_data_config_invalid_json(capsys, tiny_train_flags, tmp_path):
    path = tmp_path / "tvr_data_config.json"
    path.write_text('{"dset_name": "tvr",\n')
    expect_train_error(capsys, tmp_path, train_argv(tiny_train_flags, tmp_path, str(path)), path, "invalid JSON")


def test_data_config_missing_key(capsys, corpus, tiny_train_flags, tmp_path):
    corpus.edit_config(vid_feat_path=None)
    expect_train_error(capsys, tmp_path, train_argv(tiny_train_flags, tmp_path, corpus.config), corpus.config,
                       "missing key 'vid_feat_path'")


def test_data_config_root_path_does_not_exist(capsys, corpus, tiny_train_flags, tmp_path):
    corpus.edit_config(root_path=str(tmp_path / "not_downloaded"))
    expect_train_error(capsys, tmp_path, train_argv(tiny_train_flags, tmp_path, corpus.config), corpus.config,
                       "not_downloaded", "edit `root_path` in config/tvr_data_config.json")


# ----------------------------------------------------------------------------------------------------
# feature stores

def test_store_directory_missing(capsys, corpus, tiny_train_flags, tmp_path):
    shutil.rmtree(corpus.path("vid_feat_path"))
    expect_train_error(capsys, tmp_path, train_argv(tiny_train_flags, tmp_path, corpus.config),
                       f"video store {corpus.path('vid_feat_path')}", "expected an LMDB directory")


def test_store_key_missing(capsys, corpus, tiny_train_flags, tmp_path):
    desc_id = corpus.first_train_query()["desc_id"]
    corpus.edit_store("desc_bert_path", **{str(desc_id): None})
    expect_train_error(capsys, tmp_path, train_argv(tiny_train_flags, tmp_path, corpus.config),
                       f"query store {corpus.path('desc_bert_path')}", f"key '{desc_id}' not found")


def test_store_value_not_decodable(capsys, corpus, tiny_train_flags, tmp_path):
    video = corpus.first_train_query()["vid_name"]
    corpus.edit_store("vid_feat_path", **{video: b"\x00not msgpack"})
    expect_train_error(capsys, tmp_path, train_argv(tiny_train_flags, tmp_path, corpus.config),
                       corpus.path("vid_feat_path"), repr(video), "cannot be decoded")


@pytest.mark.parametrize("flag, store", [("--visual_dim", "video"), ("--text_dim", "subtitle"),
                                         ("--query_dim", "query")])
def test_feature_dim_disagrees_with_option(capsys, flag, store, tiny_train_flags, tmp_path):
    argv = train_argv(tiny_train_flags, tmp_path)
    argv[argv.index(flag) + 1] = "13"
    expect_train_error(capsys, tmp_path, argv, f"{store} store", f"{flag} 13", "features have dim")


def test_nan_in_video_features(capsys, corpus, tiny_train_flags, tmp_path):
    video = corpus.first_train_query()["vid_name"]
    features = np.ones((5, 12), dtype=np.float32)
    features[3, 2] = np.nan
    corpus.edit_store("vid_feat_path", **{video: encode_video_features(features)})
    expect_train_error(capsys, tmp_path, train_argv(tiny_train_flags, tmp_path, corpus.config),
                       corpus.path("vid_feat_path"), repr(video), "NaN/inf in row 3")


def test_inf_in_query_features(capsys, corpus, tiny_train_flags, tmp_path):
    desc_id = corpus.first_train_query()["desc_id"]
    features = np.ones((6, 8), dtype=np.float32)
    features[0, 0] = np.inf
    corpus.edit_store("desc_bert_path", **{str(desc_id): encode_npz_features(features)})
    expect_train_error(capsys, tmp_path, train_argv(tiny_train_flags, tmp_path, corpus.config),
                       corpus.path("desc_bert_path"), f"'{desc_id}'", "NaN/inf in row 0")


def test_zero_length_features(capsys, corpus, tiny_train_flags, tmp_path):
    """Subtitles without rows train as in the original; a GT video without visual rows cannot be labelled
    (the original's assertion), named with its desc_id."""
    query = corpus.first_train_query()
    corpus.edit_store("sub_bert_path", **{query["vid_name"]: encode_npz_features(np.zeros((0, 8), dtype=np.float32))})
    argv = train_argv(tiny_train_flags, tmp_path, corpus.config, "--disable_eval", "--no_eval_untrained")
    run_dir = train.main(argv)
    assert os.path.isfile(os.path.join(run_dir, "model.ckpt"))
    shutil.rmtree(tmp_path / "results")
    close_store(corpus.path("vid_feat_path"))
    corpus.edit_store("vid_feat_path", **{query["vid_name"]: encode_video_features(np.zeros((0, 12), np.float32))})
    message = expect_train_error(capsys, tmp_path, argv, "on 0 clips", "expected 0 <= st <= ed <= -1")
    same_video = {row["desc_id"] for row in corpus.rows("train_data_path") if row["vid_name"] == query["vid_name"]}
    assert int(message.split("(desc_id ")[1].split(")")[0]) in same_video


def test_bad_features_read_in_a_dataloader_worker(capsys, corpus, tiny_train_flags, tmp_path):
    # Not the video of the first query (checked at start-up): the error is raised inside the worker process.
    rows = corpus.rows("train_data_path")
    video = next(row["vid_name"] for row in rows[::-1] if row["vid_name"] != rows[0]["vid_name"])
    features = np.full((4, 12), np.nan, dtype=np.float32)
    corpus.edit_store("vid_feat_path", **{video: encode_video_features(features)})
    argv = train_argv(tiny_train_flags, tmp_path, corpus.config, "--num_workers", "1", "--disable_eval",
                      "--no_eval_untrained")
    message = expect_train_error(capsys, tmp_path, argv, corpus.path("vid_feat_path"), repr(video), "NaN/inf")
    assert "DataLoader worker" not in message


# ----------------------------------------------------------------------------------------------------
# annotations

def edit_train_rows(corpus, edit):
    rows = corpus.rows("train_data_path")
    edit(rows)
    save_jsonl(rows, corpus.path("train_data_path"))


def test_annotation_malformed_json_line(capsys, corpus, tiny_train_flags, tmp_path):
    path = corpus.path("train_data_path")
    lines = open(path).read().split("\n")
    lines[2] = lines[2][:-5]
    open(path, "w").write("\n".join(lines))
    expect_train_error(capsys, tmp_path, train_argv(tiny_train_flags, tmp_path, corpus.config), path,
                       "line 3 is not valid JSON")


def test_annotation_missing_field(capsys, corpus, tiny_train_flags, tmp_path):
    edit_train_rows(corpus, lambda rows: rows[4].pop("ts"))
    expect_train_error(capsys, tmp_path, train_argv(tiny_train_flags, tmp_path, corpus.config),
                       corpus.path("train_data_path"), "row 4", "missing field(s) ['ts']")


def test_annotation_end_before_start(capsys, corpus, tiny_train_flags, tmp_path):
    edit_train_rows(corpus, lambda rows: rows[1].update(ts=[6.0, 2.5]))
    expect_train_error(capsys, tmp_path, train_argv(tiny_train_flags, tmp_path, corpus.config),
                       corpus.path("train_data_path"), "row 1", "0 <= start <= end", "[6.0, 2.5]")


def test_annotation_moment_beyond_duration_trains(corpus, tiny_train_flags, tmp_path):
    # As the original: the label is clipped to the video, and no duration is needed.
    edit_train_rows(corpus, lambda rows: (rows[2].update(ts=[1.0, rows[2]["duration"] + 10]), rows[3].pop("duration")))
    run_dir = train.main(train_argv(tiny_train_flags, tmp_path, corpus.config, "--disable_eval", "--no_eval_untrained"))
    assert os.path.isfile(os.path.join(run_dir, "model.ckpt"))


def test_annotation_unknown_type(capsys, corpus, tiny_train_flags, tmp_path):
    edit_train_rows(corpus, lambda rows: rows[3].update(type="audio"))
    expect_train_error(capsys, tmp_path, train_argv(tiny_train_flags, tmp_path, corpus.config),
                       corpus.path("train_data_path"), "row 3", "unknown type 'audio'")


def test_annotation_duplicated_desc_id(capsys, corpus, tiny_train_flags, tmp_path):
    edit_train_rows(corpus, lambda rows: rows[5].update(desc_id=rows[0]["desc_id"]))
    expect_train_error(capsys, tmp_path, train_argv(tiny_train_flags, tmp_path, corpus.config),
                       corpus.path("train_data_path"), "row 5", "duplicated desc_id")


# ----------------------------------------------------------------------------------------------------
# ranklists

def test_ranklist_missing_desc_id(capsys, corpus, run_copy):
    desc_id = corpus.rows("eval_data_path")[3]["desc_id"]
    corpus.edit_store("eval_first_VR_ranklist_path_hero", **{str(desc_id): None})
    expect_inference_error(capsys, run_copy, inference_argv(run_copy, corpus.config),
                           corpus.path("eval_first_VR_ranklist_path_hero"), f"key '{desc_id}' not found")


def test_ranklist_shorter_than_max_vcmr_video(capsys, tiny_corpus, run_copy):
    expect_inference_error(capsys, run_copy, inference_argv(run_copy, tiny_corpus, "--max_vcmr_video", "50"),
                           "ranklist", "holds 20 videos, expected at least inference_top_k=50")


def test_ranklist_index_not_in_split(capsys, corpus, run_copy):
    desc_id = corpus.rows("eval_data_path")[0]["desc_id"]
    train_video_idx = load_json(corpus.path("video_duration_idx_path"))["train"]
    foreign = next(iter(train_video_idx.values()))[1]
    corpus.edit_store("eval_first_VR_ranklist_path_hero",
                      **{str(desc_id): encode_ranklist([(foreign, 0.9)] + [(foreign, 0.8)] * 10)})
    expect_inference_error(capsys, run_copy, inference_argv(run_copy, corpus.config),
                           corpus.path("eval_first_VR_ranklist_path_hero"), f"video index {foreign}",
                           "not a video of split 'val'")


def test_training_gt_beyond_top_100(capsys, corpus, tiny_train_flags, tmp_path):
    rows = corpus.rows("train_data_path")
    train_videos = load_json(corpus.path("video_duration_idx_path"))["train"]
    video2idx = {name: dur_idx[1] for name, dur_idx in train_videos.items()}
    gt = video2idx[rows[7]["vid_name"]]
    others = [idx for idx in video2idx.values() if idx != gt]
    ranklist = [(others[i % len(others)], 1.0 - i / 200) for i in range(120)] + [(gt, 0.1)]
    corpus.edit_store("train_first_VR_ranklist_path", **{str(rows[7]["desc_id"]): encode_ranklist(ranklist)})
    argv = train_argv(tiny_train_flags, tmp_path, corpus.config, "--disable_eval", "--no_eval_untrained")
    expect_train_error(capsys, tmp_path, argv, corpus.path("train_first_VR_ranklist_path"),
                       f"desc_id {rows[7]['desc_id']}", "not in the first 100 entries")


# ----------------------------------------------------------------------------------------------------
# options

def test_unknown_similarity_measure(capsys, tiny_train_flags, tmp_path):
    expect_train_error(capsys, tmp_path, train_argv(tiny_train_flags, tmp_path, None, "--similarity_measure", "cos"),
                       "--similarity_measure", "invalid choice: 'cos'")


def test_unknown_ctx_mode_in_config_file(capsys, tiny_train_flags, tmp_path):
    config = tmp_path / "options.json"
    config.write_text(json.dumps({"ctx_mode": "visual_audio"}))
    expect_train_error(capsys, tmp_path, train_argv(tiny_train_flags, tmp_path, None, "--config", str(config)),
                       config, "'ctx_mode' must be one of", "'visual_audio'")


def test_hidden_dim_disagrees_with_model_config(capsys, tiny_train_flags, tmp_path):
    argv = train_argv(tiny_train_flags, tmp_path)
    argv[argv.index("--hidden_dim") + 1] = "64"
    expect_train_error(capsys, tmp_path, argv, "model_config_tiny.json", "--hidden_dim", "is 64")


def test_stop_task_not_evaluated(capsys, tiny_train_flags, tmp_path):
    argv = train_argv(tiny_train_flags, tmp_path, None, "--stop_task", "VR", "--eval_tasks_at_training", "SVMR")
    expect_train_error(capsys, tmp_path, argv, "--stop_task VR", "--eval_tasks_at_training")


def test_exclusive_script_without_pretrain_checkpoint(tmp_path):
    result = subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", "train_sharednorm_exclusive_pretrain.sh"),
                             "x", "cpu", "--results_root", str(tmp_path)], capture_output=True, text=True,
                            env=SUBPROCESS_ENV, timeout=60)
    assert result.returncode == 2 and "--encoder_pretrain_ckpt_filepath" in result.stderr
    assert not os.listdir(tmp_path)


def test_encoder_pretrain_checkpoint_missing(capsys, tiny_train_flags, tmp_path):
    missing = str(tmp_path / "first_stage" / "model.ckpt")
    argv = train_argv(tiny_train_flags, tmp_path, None, "--similarity_measure", "exclusive",
                      "--encoder_pretrain_ckpt_filepath", missing)
    expect_train_error(capsys, tmp_path, argv, missing, "checkpoint file not found")


def test_general_without_internal_vr_scores(capsys, tiny_train_flags, tmp_path):
    argv = train_argv(tiny_train_flags, tmp_path)
    argv.remove("--use_interal_vr_scores")
    expect_train_error(capsys, tmp_path, argv, "--similarity_measure general", "--use_interal_vr_scores")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_gpu(capsys, tiny_train_flags, tmp_path):
    argv = train_argv(tiny_train_flags, tmp_path)
    argv[argv.index("--device") + 1] = "0"
    expect_train_error(capsys, tmp_path, argv, "--device 0", "no CUDA device", "--device -1")


def test_model_config_missing(capsys, tiny_train_flags, tmp_path):
    argv = train_argv(tiny_train_flags, tmp_path)
    argv[argv.index("--model_config") + 1] = missing = str(tmp_path / "model_config.json")
    expect_train_error(capsys, tmp_path, argv, missing, "file not found")


# ----------------------------------------------------------------------------------------------------
# checkpoints

def test_checkpoint_missing(capsys, tiny_corpus, run_copy):
    os.remove(os.path.join(run_copy, "model.ckpt"))
    expect_inference_error(capsys, run_copy, inference_argv(run_copy, tiny_corpus), f"--model_dir {run_copy}",
                           "no model.ckpt found")


def test_resume_without_last_checkpoint(capsys, run_copy):
    os.remove(os.path.join(run_copy, "last.ckpt"))
    before = snapshot(run_copy)
    expect_cli_error(capsys, train.main, ["--resume", run_copy], f"--resume {run_copy}", "no last.ckpt there")
    assert snapshot(run_copy) == before


def test_checkpoint_truncated(capsys, tiny_corpus, run_copy):
    path = os.path.join(run_copy, "model.ckpt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    expect_inference_error(capsys, run_copy, inference_argv(run_copy, tiny_corpus), path, "truncated or corrupt")


def test_checkpoint_of_another_variant(capsys, tiny_corpus, run_copy):
    path = os.path.join(run_copy, "model.ckpt")
    checkpoint = load_checkpoint(path)
    exclusive = build_model(checkpoint["model_cfg"], dict(load_json(os.path.join(run_copy, "opt.json")),
                                                         similarity_measure="exclusive"))
    save_checkpoint(path, exclusive.state_dict(), checkpoint["model_cfg"], 0)
    message = expect_inference_error(capsys, run_copy, inference_argv(run_copy, tiny_corpus), path,
                                     "unexpected in the weights", "video_scoring_head.",
                                     "--similarity_measure exclusive")
    assert "0 missing" in message


def test_checkpoint_needing_globals_outside_the_allow_list(capsys, tiny_corpus, run_copy, tmp_path):
    marker = tmp_path / "pwned"

    class CreatesAFileWhenUnpickled:
        def __reduce__(self):
            return open, (str(marker), "w")

    path = os.path.join(run_copy, "model.ckpt")
    checkpoint = load_checkpoint(path)
    torch.save(dict(checkpoint, payload=CreatesAFileWhenUnpickled()), path)
    expect_inference_error(capsys, run_copy, inference_argv(run_copy, tiny_corpus), path, "refused to load",
                           f"{open.__module__}.open", "nothing was executed")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------
# submissions for the evaluator

@pytest.fixture
def evaluator_files(tiny_corpus, tmp_path):
    gt_rows = load_jsonl(os.path.join(os.path.dirname(tiny_corpus), "data", "tvr_val_release.jsonl"))
    video2idx = {name: dur_idx[1] for name, dur_idx in
                 load_json(os.path.join(os.path.dirname(tiny_corpus), "data", "tvr_video2dur_idx.json"))["val"].items()}
    gt_path, save_path = tmp_path / "gt.jsonl", tmp_path / "metrics.json"
    save_jsonl(gt_rows, gt_path)
    save_path.write_text("previous metrics")

    def evaluate(capsys, predictions, *fragments):
        submission_path = tmp_path / "submission.json"
        save_json({"video2idx": video2idx, "SVMR": [{"desc_id": d, "desc": "", "predictions": rows}
                                                     for d, rows in predictions.items()]}, submission_path)
        expect_cli_error(capsys, standalone_eval_main, ["--submission_path", str(submission_path), "--gt_path",
                                                        str(gt_path), "--save_path", str(save_path)], *fragments)
        assert save_path.read_text() == "previous metrics"

    return evaluate, [(row["desc_id"], video2idx[row["vid_name"]]) for row in gt_rows]


def test_submission_missing_desc_ids(capsys, evaluator_files):
    evaluate, queries = evaluator_files
    predictions = {desc_id: [[video, 0.0, 3.0, 1.0]] for desc_id, video in queries[:-1]}
    evaluate(capsys, predictions, "SVMR", f"no predictions for GT desc_id {queries[-1][0]}")


def test_submission_rows_not_int_float_float_float(capsys, evaluator_files):
    evaluate, queries = evaluator_files
    predictions = {desc_id: [[video, 0.0, 3.0, 1.0]] for desc_id, video in queries}
    predictions[queries[2][0]] = [[queries[2][1], 0.0, 3.0, 1.0], ["video", 0.0, 3.0]]
    evaluate(capsys, predictions, f"desc_id {queries[2][0]}", "prediction row 1",
             "expected [video_idx, st, ed, ...] with three numbers first")


# ----------------------------------------------------------------------------------------------------
# every entry point's __main__, as a real process

ENTRY_POINTS = {
    "train.py": (["train.py", "--resume", "/nonexistent/run"], "--resume /nonexistent/run: not a run directory"),
    "inference.py": (["inference.py", "--model_dir", "/nonexistent/run"], "--model_dir /nonexistent/run: no opt.json"),
    "standalone_eval": (["-m", "utils.standalone_eval", "--submission_path", "/nonexistent/s.json", "--gt_path",
                         "/nonexistent/gt.jsonl", "--save_path", "/nonexistent/m.json"], "/nonexistent/s.json: file"),
    "check_data": (["-m", "utils.check_data", "--dataset_config", "/nonexistent/c.json"],
                   "data config /nonexistent/c.json: file not found"),
    "synthetic_tvr": (["-m", "utils.synthetic_tvr", "--out_dir", "{tmp}", "--real_annotations", "/nonexistent/tvr"],
                      "/nonexistent/tvr/tvr_video2dur_idx.json: file not found"),
    "param_count": (["-m", "method.param_count", "--model_config", os.path.join(REPO_ROOT, "config",
                                                                                "model_config_tiny.json"),
                     "--hidden_dim", "64"], "--hidden_dim"),
}


def test_every_entry_point_exits_2_with_a_one_line_error(tmp_path):
    processes = {name: subprocess.Popen([sys.executable] + [arg.format(tmp=tmp_path) for arg in argv], cwd=REPO_ROOT,
                                        env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name, (argv, _) in ENTRY_POINTS.items()}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=120)
        fragment = ENTRY_POINTS[name][1]
        if name == "check_data":  # reports every problem it finds on stdout, then exits 2
            assert process.returncode == 2 and fragment in stdout, (name, stdout, stderr)
            continue
        assert process.returncode == 2, (name, process.returncode, stderr)
        assert "Traceback" not in stderr and stderr.startswith("error: ") and fragment in stderr, (name, stderr)
