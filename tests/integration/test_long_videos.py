"""Long videos read as windows (--window_stride): training, evaluation and inference end to end on tiny
corpora, against a per-window reference and against runs without windows."""
import os

import numpy as np
import pytest
import torch
from easydict import EasyDict

import inference
import train
from config.options import OptionError
from method import evaluation
from method.checkpoint import load_trained_model
from method.dataset import build_eval_dataset, prepare_batch_inputs
from method.oracle import rank_windowed_reference
from utils.io_utils import load_json
from utils.synthetic_tvr import generate_corpus
from utils.windows import window_clip_count

from tests.conftest import TINY_MODEL_CONFIG

pytestmark = pytest.mark.usefixtures("one_thread")

LONG_CORPUS_KWARGS = dict(n_train_videos=16, n_val_videos=10, n_test_videos=10, n_train_queries=48,
                          n_val_queries=16, n_test_queries=6, visual_dim=12, text_dim=8, query_dim=8,
                          min_duration=60.0, max_duration=120.0, max_clips=80, seed=3)
MAX_CTX_LEN, STRIDE = 20, 10


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
    return generate_corpus(tmp_path_factory.mktemp("long_corpus"), **LONG_CORPUS_KWARGS)


def flags(data_config, max_ctx_len):
    k = LONG_CORPUS_KWARGS
    return ["--dataset_config", data_config, "--model_config", TINY_MODEL_CONFIG, "--visual_dim", str(k["visual_dim"]),
            "--text_dim", str(k["text_dim"]), "--query_dim", str(k["query_dim"]), "--hidden_dim", "32",
            "--max_ctx_len", str(max_ctx_len), "--device", "-1", "--num_workers", "0", "--bsz", "8",
            "--eval_query_bsz", "4", "--lr", "1e-3", "--n_epoch", "1", "--disable_eval", "--no_eval_untrained"]


@pytest.fixture(scope="module")
def windowed_runs(long_corpus, tmp_path_factory):
    """{measure: run dir} trained 1 epoch on the long corpus with windows."""
    root = tmp_path_factory.mktemp("long_runs")
    measures = {"general": ["--use_interal_vr_scores"], "exclusive": ["--similarity_measure", "exclusive"]}
    return {measure: train.main(flags(long_corpus, MAX_CTX_LEN) + extra + [
        "--window_stride", str(STRIDE), "--results_root", str(root), "--exp_id", measure])
        for measure, extra in measures.items()}


def infer(run_dir, data_config, *extra):
    opt = inference.TestOptions().parse(["--model_dir", run_dir, "--dataset_config", data_config, "--device", "-1",
                                         "--num_workers", "0", "--eval_query_bsz", "4", "--max_vcmr_video", "3",
                                         *extra])
    return opt, inference.run_inference(opt)


def test_windows_change_nothing_when_every_video_fits(tiny_corpus, tmp_path):
    """A corpus of videos no longer than a window trains and evaluates identically with and without windows."""
    runs = {stride: train.main(flags(tiny_corpus, 30) + ["--use_interal_vr_scores", "--window_stride", str(stride),
                                                         "--results_root", str(tmp_path), "--exp_id", f"s{stride}"])
            for stride in (0, 15)}
    weights = {stride: torch.load(os.path.join(run, "model.ckpt"), map_location="cpu", weights_only=False)["model"]
               for stride, run in runs.items()}
    for name, value in weights[0].items():
        assert torch.equal(value, weights[15][name]), name
    files = {}
    for stride, run in runs.items():
        _, (_, _, paths) = infer(run, tiny_corpus, "--nms_thd", "0.5")
        files[stride] = [open(path, "rb").read() for path in paths]
    assert files[0] == files[15]


@pytest.mark.parametrize("measure", ["general", "exclusive"])
def test_windowed_predictions_equal_a_per_window_reference(windowed_runs, long_corpus, measure):
    """compute_predictions over windows == every window of every candidate scored in one forward pass per query,
    ranked by the loop formulation (method/oracle.py), mapped to video seconds."""
    opt, _ = infer(windowed_runs[measure], long_corpus, "--tasks", "SVMR")  # options as inference restores them
    opt = EasyDict(opt, max_before_nms=40)
    dataset = build_eval_dataset(opt)
    model = load_trained_model(opt).eval()
    assert evaluation.reads_windows(dataset)
    tasks = ("VCMR", "SVMR", "VR")
    results = evaluation.compute_predictions(model, dataset, opt, tasks)
    k = dataset.inference_top_k
    late = 0
    for index, query in enumerate(results["VCMR"]):
        names, first_stage = dataset.eval_candidates[index]
        windows = [(video, name, start) for video, name in enumerate(names) for start in dataset.window_starts(name)]
        video_inputs = [dataset.get_video_inputs(name, start) for _, name, start in windows]
        batch = {modality: {key: torch.stack([inputs[modality][key] for inputs in video_inputs])[None]
                            for key in video_inputs[0][modality]} for modality in video_inputs[0]}
        batch["query"] = {key: value[None] for key, value in dataset.get_query_item(index)["model_inputs"]["query"].items()}
        with torch.no_grad():
            video_scores, begin, end = model.get_pred_from_raw_query(prepare_batch_inputs(batch, "cpu"))
        slot_video = np.array([[video for video, _, _ in windows]])
        slot_start = np.array([[start for _, _, start in windows]])
        slot_length = np.array([[window_clip_count(dataset.clip_count(name), start, MAX_CTX_LEN)
                                 for _, name, start in windows]])
        expected = rank_windowed_reference(opt.similarity_measure, begin, end, slot_video, slot_start, slot_length,
                                           tasks=tasks, max_before_nms=opt.max_before_nms, min_pred_l=opt.min_pred_l,
                                           max_pred_l=opt.max_pred_l, video_scores=video_scores,
                                           first_stage_scores=first_stage[None],
                                           use_internal_vr_scores=opt.use_interal_vr_scores)[0]
        video_idx = [dataset.video2idx[name] for name in names[1:]]
        rows = query["predictions"]
        assert [(row[0], row[1], row[2]) for row in rows] == [
            (video_idx[c], np.float32(st * 1.5), np.float32(ed * 1.5 + 1.5)) for c, st, ed, _ in expected["VCMR"]]
        np.testing.assert_allclose([row[3] for row in rows], [s for *_, s in expected["VCMR"]], rtol=1e-5)
        svmr = results["SVMR"][index]["predictions"]
        assert [(row[1], row[2]) for row in svmr] == [(st * 1.5, (ed + 1) * 1.5) for st, ed, _ in expected["SVMR"]]
        assert [row[0] for row in results["VR"][index]["predictions"]] == [video_idx[c] for c, _ in expected["VR"]]
        assert len({tuple(row[:3]) for row in rows}) == len(rows)  # overlapping windows merged
        late += sum(row[1] >= MAX_CTX_LEN * 1.5 for row in rows)
        assert len(names) == 1 + k
    assert late > 0  # moments after the first window are predicted


def test_window_groups_bound_the_cache_and_keep_the_predictions(windowed_runs, long_corpus, monkeypatch):
    opt, _ = infer(windowed_runs["general"], long_corpus, "--tasks", "SVMR")
    dataset = build_eval_dataset(opt)
    model = load_trained_model(opt).eval()
    whole = evaluation.compute_predictions(model, dataset, opt, ("VCMR", "SVMR", "VR"))
    row_bytes = MAX_CTX_LEN * opt.hidden_dim * 4 * 2
    monkeypatch.setattr(evaluation, "WINDOW_CACHE_BYTES", 12 * row_bytes)
    slots = evaluation.query_windows(dataset, include_gt=True)
    groups = evaluation._window_groups(slots, 12)
    assert len(groups) > 2 and groups[0][0] == 0 and groups[-1][1] == len(slots)
    for start, stop in groups:
        assert stop - start == 1 or len({w for query in slots[start:stop] for _, w in query}) <= 12
    grouped = evaluation.compute_predictions(model, dataset, opt, ("VCMR", "SVMR", "VR"))
    for task in ("VCMR", "SVMR", "VR"):
        for a, b in zip(whole[task], grouped[task]):
            assert [row[:3] for row in a["predictions"]] == [row[:3] for row in b["predictions"]]
            np.testing.assert_allclose([row[3] for row in a["predictions"]], [row[3] for row in b["predictions"]],
                                       rtol=1e-5)


def test_inference_writes_video_terms_and_the_evaluator_scores_them(windowed_runs, long_corpus):
    opt, (metrics, metrics_nms, paths) = infer(windowed_runs["general"], long_corpus, "--nms_thd", "0.5")
    submission = load_json(paths[0])
    durations = {idx: duration for duration, idx in load_json(os.path.join(
        load_json(long_corpus)["root_path"], "data", "tvr_video2dur_idx.json"))["val"].values()}
    ends = [row[2] for q in submission["VCMR"] for row in q["predictions"]]
    assert max(ends) > MAX_CTX_LEN * 1.5  # seconds of the whole video, past the first window
    assert all(row[2] <= durations[row[0]] + 1.5 for q in submission["VCMR"] for row in q["predictions"])
    assert set(metrics) == {"VCMR", "SVMR", "VR", "VCMR_by_type", "SVMR_by_type", "VR_by_type"} and metrics_nms


def test_window_option_errors(windowed_runs, long_corpus, tmp_path):
    with pytest.raises(OptionError, match=r"--window_stride 25: expected 0 .* \[1, --max_ctx_len 20\]"):
        train.main(flags(long_corpus, 20) + ["--window_stride", "25", "--results_root", str(tmp_path), "--exp_id", "x"])
    with pytest.raises(OptionError, match="--window_stride 5: .* was trained with --window_stride 10"):
        infer(windowed_runs["general"], long_corpus, "--window_stride", "5")
    with pytest.raises(OptionError, match="--window_stride 0: .* was trained with --window_stride 10"):
        infer(windowed_runs["general"], long_corpus, "--window_stride", "0")


def test_windows_longer_than_the_model_positions_are_refused(long_corpus, tmp_path):
    from method.layers import ModelConfigError
    with pytest.raises(ModelConfigError, match=r"--max_ctx_len\) 120 exceeds .* 100: .*--window_stride"):
        train.main(flags(long_corpus, 120) + ["--window_stride", "60", "--use_interal_vr_scores",
                                              "--results_root", str(tmp_path), "--exp_id", "x"])
