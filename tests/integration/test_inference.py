"""inference.py end to end on run directories trained on the tiny synthetic corpus, for every measure."""
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

import inference
from config.options import OptionError
from method.oracle import apply_nms_reference
from utils.io_utils import load_json, load_jsonl, save_jsonl
from utils.standalone_eval import GroundTruthError, eval_retrieval

from utils.run_dir import REPO_ROOT

MEASURES = ("general", "exclusive", "disjoint")  # the runs of the trained_runs fixture


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dirs(trained_runs):
    return trained_runs


def infer(run_dir, tiny_train_flags, *extra):
    data_config = tiny_train_flags[tiny_train_flags.index("--dataset_config") + 1]
    argv = ["--model_dir", run_dir, "--dataset_config", data_config, "--device", "-1", "--num_workers", "0",
            "--eval_query_bsz", "5", "--max_vcmr_video", "5"] + list(extra)
    opt = inference.TestOptions().parse(argv)
    return opt, inference.run_inference(opt)


@pytest.mark.parametrize("measure", MEASURES)
def test_each_measure_with_and_without_nms(run_dirs, tiny_train_flags, measure):
    run_dir = run_dirs[measure]
    opt, (metrics, metrics_nms, paths) = infer(run_dir, tiny_train_flags, "--nms_thd", "0.7", "--tasks",
                                               "VCMR", "SVMR", "VR")
    stem = os.path.join(run_dir, "inference_tvr_val_None_predictions_VCMR_SVMR_VR_hero")
    assert paths == [stem + ".json", stem + "_metrics.json", stem + "_nms_thd_0.7.json",
                     stem + "_nms_thd_0.7_metrics.json"]
    submission = load_json(stem + ".json")
    assert list(submission) == ["video2idx", "VCMR", "SVMR", "VR"]
    assert list(load_json(stem + "_nms_thd_0.7.json")) == ["video2idx", "VR", "SVMR", "VCMR"]
    n_queries = len(submission["VCMR"])
    assert all(len(q["predictions"]) <= 100 for task in ("VCMR", "SVMR") for q in submission[task])
    # Metrics written next to the checkpoint equal a fresh evaluation of the written submission.
    gt = load_jsonl(load_json(opt.dataset_config)["root_path"] + "/data/tvr_val_release.jsonl")[:n_queries]
    assert metrics == json.loads(json.dumps(eval_retrieval(submission, gt, use_desc_type=True)))
    assert load_json(stem + "_metrics.json") == metrics
    # NMS: the list-popping reference on the written (top-100) submission, then a fresh evaluation.
    nms_reference = {"video2idx": submission["video2idx"], "VR": submission["VR"]}
    for task in ("SVMR", "VCMR"):
        nms_reference[task] = apply_nms_reference(submission[task], 0.7, opt.max_before_nms, 100)
    expected_nms = json.loads(json.dumps(eval_retrieval(nms_reference, gt, use_desc_type=True)))
    assert metrics_nms == expected_nms == load_json(stem + "_nms_thd_0.7_metrics.json")
    assert load_json(stem + "_nms_thd_0.7.json") == json.loads(json.dumps(nms_reference))
    # VR: the candidates, re-ranked only by exclusive/disjoint; general keeps the first-stage order.
    vr_rows = submission["VR"][0]["predictions"]
    assert len(vr_rows) == 5 and all(row[1:3] == [0, 0] for row in vr_rows)


def test_vcmr_alone_and_output_names(run_dirs, tiny_train_flags):
    # [Q5]: the original needed VR for VCMR; here VCMR alone works.
    _, (metrics, metrics_nms, paths) = infer(run_dirs["exclusive"], tiny_train_flags, "--tasks", "VCMR",
                                             "--eval_id", "only_vcmr")
    assert list(metrics) == ["VCMR", "VCMR_by_type"] and metrics_nms is None
    assert os.path.basename(paths[0]) == "inference_tvr_val_only_vcmr_predictions_VCMR_hero.json"


def test_test_public_writes_the_submission_only(run_dirs, tiny_train_flags):
    # SVMR needs the GT video, which test_public lacks: it is skipped (the original crashes), and the file
    # names list the tasks written, in the order given.
    _, (metrics, metrics_nms, paths) = infer(run_dirs["general"], tiny_train_flags, "--eval_split_name",
                                             "test_public", "--nms_thd", "0.7", "--tasks", "VR", "SVMR", "VCMR")
    assert metrics is None and metrics_nms is None
    assert [os.path.basename(p) for p in paths] == [
        "inference_tvr_test_public_None_predictions_VR_VCMR_hero.json",
        "inference_tvr_test_public_None_predictions_VR_VCMR_hero_nms_thd_0.7.json"]
    # Where the original runs (--tasks VCMR VR), its name.
    _, (_, _, paths) = infer(run_dirs["general"], tiny_train_flags, "--eval_split_name", "test_public",
                             "--tasks", "VCMR", "VR", "--eval_id", "tp")
    assert [os.path.basename(p) for p in paths] == ["inference_tvr_test_public_tp_predictions_VCMR_VR_hero.json"]
    submission = load_json(paths[0])
    assert "SVMR" not in submission and len(submission["VCMR"]) > 0
    test_video_indices = set(submission["video2idx"].values())
    assert all(row[0] in test_video_indices for q in submission["VCMR"] for row in q["predictions"])


def didemo_style_copy(tiny_train_flags, tmp_path):
    """The tiny corpus as a DiDeMo-style corpus: no query types, several GT moments per val query (ending
    after the video where the first moment does), no durations."""
    data_config = tiny_train_flags[tiny_train_flags.index("--dataset_config") + 1]
    corpus = shutil.copytree(os.path.dirname(data_config), tmp_path / "didemo")
    config = load_json(corpus / os.path.basename(data_config))
    config.update(root_path=str(corpus), dset_name="didemo")
    json.dump(config, open(corpus / "didemo_config.json", "w"))
    val_path = corpus / config["eval_data_path"]
    rows = load_jsonl(val_path)
    for row in rows:
        del row["type"], row["duration"]
        st, ed = row["ts"]
        row["ts"] = [[st, ed], [st, ed + 1.0], [st, ed + 2.0], [st + 0.5, ed + 1e4]]
    save_jsonl(rows, val_path)
    return str(corpus / "didemo_config.json")


def test_didemo_style_corpus_with_nms(run_dirs, tiny_train_flags, tmp_path):
    """Without query types the NMS metrics fail as in the original, naming the flag that fixes them."""
    data_config = didemo_style_copy(tiny_train_flags, tmp_path)
    run_dir = shutil.copytree(run_dirs["general"], tmp_path / "run")
    saved = load_json(run_dir / "opt.json")
    saved["dset_name"] = "didemo"
    json.dump(saved, open(run_dir / "opt.json", "w"))
    argv = ["--model_dir", str(run_dir), "--dataset_config", data_config, "--device", "-1", "--num_workers", "0",
            "--max_vcmr_video", "5", "--nms_thd", "0.7", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(GroundTruthError, match="missing key 'type'.*--nms_metrics_by_dset"):
        inference.run_inference(inference.TestOptions().parse(argv))
    shutil.rmtree(tmp_path / "out")
    metrics, metrics_nms, _ = inference.run_inference(inference.TestOptions().parse(argv + ["--nms_metrics_by_dset"]))
    assert list(metrics) == list(metrics_nms) == ["VCMR", "SVMR", "VR"]


def test_general_without_internal_scores_is_rejected(run_dirs, tiny_train_flags, tmp_path):
    run_dir = shutil.copytree(run_dirs["general"], tmp_path / "run")
    saved = load_json(run_dir / "opt.json")
    saved["use_interal_vr_scores"] = False
    json.dump(saved, open(run_dir / "opt.json", "w"))
    with pytest.raises(OptionError, match="use_interal_vr_scores"):
        infer(str(run_dir), tiny_train_flags)
    _, (metrics, _, _) = infer(str(run_dir), tiny_train_flags, "--tasks", "SVMR")
    assert list(metrics) == ["SVMR", "SVMR_by_type"]


def test_moved_run_dir_and_read_only_run_dir(run_dirs, tiny_train_flags, tmp_path, monkeypatch):
    # [Q8]: a renamed copy (like the published run dir) reads its own checkpoint and writes beside it.
    moved = shutil.copytree(run_dirs["disjoint"], tmp_path / "tvr-conquer_moved")
    opt, _ = infer(str(moved), tiny_train_flags, "--tasks", "SVMR")
    assert opt.results_dir == run_dirs["disjoint"], "the saved results_dir holds a checkpoint: it is used"
    opt, _ = infer(str(moved), tiny_train_flags, "--tasks", "SVMR", "--force_model_dir")
    assert opt.results_dir == str(moved)
    saved = load_json(moved / "opt.json")
    saved["results_dir"] = "/machine/of/the/authors/results/tvr-conquer"
    json.dump(saved, open(moved / "opt.json", "w"))
    opt, (_, _, paths) = infer(str(moved), tiny_train_flags, "--tasks", "SVMR")
    assert opt.results_dir == str(moved) and all(p.startswith(str(moved)) for p in paths)

    before = sorted(os.listdir(moved))
    os.chmod(moved, stat.S_IRUSR | stat.S_IXUSR)
    real_access = os.access
    # root may write into read-only directories; make the check see what any other user would.
    monkeypatch.setattr(os, "access", lambda path, mode: False if os.path.samefile(path, moved) and mode == os.W_OK
                        else real_access(path, mode))
    try:
        with pytest.raises(OptionError, match="--output_dir"):
            infer(str(moved), tiny_train_flags, "--tasks", "SVMR")
        out = tmp_path / "elsewhere"
        _, (_, _, paths) = infer(str(moved), tiny_train_flags, "--tasks", "SVMR", "--output_dir", str(out))
        assert paths and all(p.startswith(str(out)) for p in paths)
    finally:
        os.chmod(moved, stat.S_IRWXU)
    assert sorted(os.listdir(moved)) == before


def test_inference_script_passes_flags_through(run_dirs, tiny_train_flags):
    data_config = tiny_train_flags[tiny_train_flags.index("--dataset_config") + 1]
    result = subprocess.run(
        ["bash", os.path.join(REPO_ROOT, "scripts", "inference.sh"), run_dirs["general"], "cpu",
         "--dataset_config", data_config, "--num_workers", "0", "--max_vcmr_video", "5", "--nms_thd", "0.7"],
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "VCMR 0.5-r1" in result.stdout and "NMS 0.7" in result.stdout
    assert os.path.isfile(os.path.join(run_dirs["general"],
                                       "inference_tvr_val_None_predictions_VR_SVMR_VCMR_hero_nms_thd_0.7_metrics.json"))
