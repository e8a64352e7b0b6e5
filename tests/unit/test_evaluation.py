"""method/evaluation.py: files and layout, the quirks Q4-Q7/Q24, the video-encoding cache, brute-force checks."""
import json
import logging
import os

import numpy as np
import pytest
import torch
from easydict import EasyDict
from torch import nn
from torch.utils.data import Dataset

from method.evaluation import (compute_predictions, eval_epoch, nms_submission, ranked_rows_needed,
                               top_n_submission)
from utils.temporal_nms import apply_nms
from utils.run_dir import REPO_ROOT

DUMMY = "dummy_video"
SUBMISSION = "latest_tvr_val_predictions_VCMR_SVMR_VR.json"


def make_opt(results_dir, **overrides):
    opt = EasyDict(similarity_measure="general", use_interal_vr_scores=True, eval_query_bsz=3, num_workers=0,
                   min_pred_l=0, max_pred_l=6, max_before_nms=200, clip_length=1.5, results_dir=str(results_dir),
                   eval_split_name="val", dset_name="tvr", debug=False, nms_thd=0.7, nms_input_full=False,
                   video_cache=True, device=torch.device("cpu"))
    opt.update(overrides)
    return opt


class FakeEvalDataset(Dataset):
    """In-memory evaluation dataset with the StartEndDataset interface (items, cache methods, attributes)."""
    window_stride = 0

    def __init__(self, n_queries=8, n_videos=9, k=4, length=12, dim=5, has_gt=True, seed=0):
        rng = np.random.default_rng(seed)
        self.has_gt, self.inference_top_k, self.length = has_gt, k, length
        names = [f"video_{i}" for i in range(n_videos)]
        self.video2idx = {name: 100 + i for i, name in enumerate(names)}
        n_clips = {name: int(n) for name, n in zip(names, rng.integers(1, length + 1, size=n_videos))}
        n_clips[names[0]] = 1  # a one-clip video: most of its pairs score exactly 0
        n_clips[DUMMY] = 2
        self.video_feats = {name: rng.normal(size=(n, dim)).astype(np.float32) for name, n in n_clips.items()}
        self.query_data, self.ranklists, self.query_feats = [], {}, {}
        for i in range(n_queries):
            gt = names[i % n_videos]
            st = float(rng.integers(0, n_clips[gt])) * 1.5
            self.query_data.append(dict(desc_id=500 + i, desc=f"query {i}", vid_name=gt, duration=30.0,
                                        ts=[st, st + 1.5], type=("v", "t", "vt")[i % 3]))
            candidates = list(rng.choice(names, size=k, replace=False))
            scores = np.round(np.sort(rng.random(k))[::-1], 1)  # ties between first-stage scores
            self.ranklists[500 + i] = list(zip(candidates, scores.tolist()))
            self.query_feats[500 + i] = rng.normal(size=(int(rng.integers(1, 6)), dim)).astype(np.float32)

    def __len__(self):
        return len(self.query_data)

    def eval_video_names(self, index):
        row = self.query_data[index]
        return [row["vid_name"] if self.has_gt else DUMMY] + [n for n, _ in self.ranklists[row["desc_id"]]]

    @property
    def eval_candidates(self):
        return [(self.eval_video_names(i), torch.tensor([s for _, s in self.ranklists[row["desc_id"]]]))
                for i, row in enumerate(self.query_data)]

    def get_query_item(self, index):
        row = self.query_data[index]
        names = self.eval_video_names(index)
        feat = np.zeros((6, self.query_feats[row["desc_id"]].shape[1]), dtype=np.float32)
        feat[:len(self.query_feats[row["desc_id"]])] = self.query_feats[row["desc_id"]]
        query = dict(feat=torch.from_numpy(feat), feat_mask=torch.from_numpy((np.abs(feat).sum(1) > 0).astype(np.int64)),
                     feat_pos_id=torch.arange(6), feat_token_id=torch.ones(6, dtype=torch.long))
        scores = torch.tensor([s for _, s in self.ranklists[row["desc_id"]]], dtype=torch.float32)
        meta = dict(desc_id=row["desc_id"], desc=row["desc"], vid_name=names[0], ts=row["ts"],
                    sample_vid_name_list=names[1:])
        return dict(meta=meta, model_inputs=dict(query=query, inference_vr_scores=scores))

    def get_video_inputs(self, name, start=0):
        feats = self.video_feats[name][start:start + self.length]
        feat = np.zeros((self.length, feats.shape[1]), dtype=np.float32)
        feat[:len(feats)] = feats
        mask = (np.arange(self.length) < len(feats)).astype(np.int64)
        visual = dict(feat=torch.from_numpy(feat), feat_mask=torch.from_numpy(mask),
                      feat_pos_id=torch.arange(self.length), feat_token_id=torch.zeros(self.length, dtype=torch.long))
        sub = dict(visual, feat=torch.from_numpy(feat[:, ::-1].copy()), feat_token_id=torch.ones(self.length,
                                                                                                  dtype=torch.long))
        return {"visual": visual, "sub": sub}

    def __getitem__(self, index):
        item = self.get_query_item(index)
        videos = [self.get_video_inputs(name) for name in self.eval_video_names(index)]
        for modality in ("visual", "sub"):
            item["model_inputs"][modality] = {key: torch.stack([v[modality][key] for v in videos])
                                              for key in videos[0][modality]}
        return item


class FakeModel(nn.Module):
    """Follows the CONQUER interface; elementwise ops only, so every video row is computed independently."""

    def __init__(self, measure="general", dim=5):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-1.0, 1.5, dim))
        self.measure = measure

    def encode_query(self, query_inputs):
        return query_inputs["feat"] * self.weight

    def encode_videos(self, video_inputs):
        return {m: torch.tanh(video_inputs[m]["feat"] * self.weight) for m in ("visual", "sub")}

    def score_encoded(self, query_feat, query_mask, encoded_videos, video_mask, n_videos_per_query):
        b, n = query_feat.shape[0], n_videos_per_query
        query = (query_feat * query_mask.unsqueeze(-1)).sum(1).repeat_interleave(n, dim=0)  # (M, D)
        fused = encoded_videos["visual"] + 0.5 * encoded_videos["sub"]  # (M, L, D)
        begin = (fused * query.unsqueeze(1)).sum(-1).masked_fill(video_mask == 0, -1e4)
        end = (fused.flip(-1) * query.unsqueeze(1)).sum(-1).masked_fill(video_mask == 0, -1e4)
        scores = begin.max(-1).values.view(b, n) if self.measure == "exclusive" else None
        return scores, begin.view(b, n, -1), end.view(b, n, -1)

    def get_pred_from_raw_query(self, model_inputs):
        b, n = model_inputs["visual"]["feat"].shape[:2]
        videos = {m: {k: v.flatten(0, 1) for k, v in model_inputs[m].items()} for m in ("visual", "sub")}
        return self.score_encoded(self.encode_query(model_inputs["query"]), model_inputs["query"]["feat_mask"],
                                  self.encode_videos(videos), videos["visual"]["feat_mask"], n)


def read_texts(paths):
    return {os.path.basename(p): open(p).read() for p in paths}


def run(tmp_path, name="run", dataset=None, model=None, tasks=("VCMR", "SVMR", "VR"), filename=SUBMISSION, **opt):
    opt = make_opt(tmp_path / name, **opt)
    model = model or FakeModel(opt.similarity_measure)
    return eval_epoch(model, dataset or FakeEvalDataset(), opt, filename, tasks=tasks)


# ---------------------------------------------------------------------------------------------------

def test_files_names_and_layout(tmp_path):
    metrics, metrics_nms, paths = run(tmp_path)
    stem = str(tmp_path / "run" / SUBMISSION)[:-len(".json")]
    assert paths == [stem + ".json", stem + "_metrics.json", stem + "_nms_thd_0.7.json",
                     stem + "_nms_thd_0.7_metrics.json"]
    texts = read_texts(paths)
    submission, nms = json.loads(texts[os.path.basename(paths[0])]), json.loads(texts[os.path.basename(paths[2])])
    assert texts[os.path.basename(paths[0])] == json.dumps(submission)  # compact
    assert list(submission) == ["video2idx", "VCMR", "SVMR", "VR"]
    assert list(nms) == ["video2idx", "VR", "SVMR", "VCMR"]
    assert nms["VR"] == submission["VR"]
    for task in ("VCMR", "SVMR", "VR"):
        assert [q["desc_id"] for q in submission[task]] == list(range(500, 508))
        assert all(list(q) == ["desc_id", "desc", "predictions"] and len(q["predictions"]) <= 100
                   for q in submission[task])
    assert all(len(q["predictions"]) == 100 for q in submission["VCMR"])
    assert all(len(q["predictions"]) == 4 for q in submission["VR"])  # k candidates
    assert texts[os.path.basename(paths[1])] == json.dumps(metrics, indent=4)
    assert json.loads(texts[os.path.basename(paths[3])]) == metrics_nms
    assert list(metrics) == ["VCMR", "SVMR", "VR", "VCMR_by_type", "SVMR_by_type", "VR_by_type"]
    assert list(metrics_nms) == list(metrics)


CACHE_CASES = [("general", True), ("exclusive", False), ("exclusive", True), ("disjoint", False)]


@pytest.mark.parametrize("measure,use_internal", CACHE_CASES)
def test_cache_on_equals_cache_off_fake_model(tmp_path, measure, use_internal):
    kwargs = dict(similarity_measure=measure, use_interal_vr_scores=use_internal)
    _, _, on = run(tmp_path, "on", video_cache=True, **kwargs)
    _, _, off = run(tmp_path, "off", video_cache=False, **kwargs)
    assert read_texts(on) == read_texts(off)


def test_cache_encodes_each_distinct_video_once(tmp_path, caplog):
    dataset = FakeEvalDataset(n_queries=8, n_videos=40, k=4)
    model = FakeModel()
    chunks = []
    original = model.encode_videos
    model.encode_videos = lambda inputs: chunks.append(inputs["visual"]["feat"].shape[0]) or original(inputs)
    with caplog.at_level(logging.INFO, logger="method.evaluation"):
        run(tmp_path, dataset=dataset, model=model, tasks=("VCMR",), eval_query_bsz=3)
    distinct = {name for i in range(len(dataset)) for name in dataset.eval_video_names(i)}
    chunk = 3 * (1 + dataset.inference_top_k)  # rows of a full uncached batch; the last chunk is padded to it
    assert chunks == [chunk] * -(-len(distinct) // chunk) and len(chunks) > 1
    assert any(f"{len(distinct)} distinct videos" in r.message and "MiB" in r.message for r in caplog.records)


def plain_best(dataset, model, index, measure="general", min_l=0, max_l=6):
    """Brute force over one item: best (video, st, ed, score) over the candidates and on the GT video."""
    item = dataset[index]
    inputs = {key: ({k: v.unsqueeze(0) for k, v in value.items()} if isinstance(value, dict) else value.unsqueeze(0))
              for key, value in item["model_inputs"].items()}
    with torch.no_grad():
        _, begin, end = model.get_pred_from_raw_query(inputs)
    first_stage = item["model_inputs"]["inference_vr_scores"].numpy()
    best, best_gt = None, None
    for v in range(begin.shape[1]):
        p_b, p_e = torch.softmax(begin[0, v], 0).numpy(), torch.softmax(end[0, v], 0).numpy()
        for st in range(len(p_b)):
            for ed in range(st + min_l, min(st + max_l, len(p_b))):
                if v == 0:
                    score = np.float32(p_b[st] * p_e[ed])
                    best_gt = max(best_gt or (score, st, ed), (score, st, ed), key=lambda x: x[0])
                else:
                    score = np.float32(np.float32(p_b[st] * first_stage[v - 1]) * p_e[ed])
                    name = item["meta"]["sample_vid_name_list"][v - 1]
                    candidate = (score, dataset.video2idx[name], st, ed)
                    best = max(best or candidate, candidate, key=lambda x: x[0])
    return best, best_gt


def test_predictions_match_brute_force(tmp_path):
    dataset, model = FakeEvalDataset(), FakeModel()
    results = compute_predictions(model, dataset, make_opt(tmp_path), ("VCMR", "SVMR", "VR"))
    assert list(results) == ["VCMR", "SVMR", "VR", "video2idx"]
    for i in range(len(dataset)):
        (score, video, st, ed), (gt_score, gt_st, gt_ed) = plain_best(dataset, model, i)
        assert results["VCMR"][i]["predictions"][0] == [video, st * 1.5, (ed + 1) * 1.5, float(score)]
        gt_video = dataset.video2idx[dataset.query_data[i]["vid_name"]]
        assert results["SVMR"][i]["predictions"][0] == [gt_video, gt_st * 1.5, (gt_ed + 1) * 1.5, float(gt_score)]
        ranklist = dataset.ranklists[dataset.query_data[i]["desc_id"]]
        assert results["VR"][i]["predictions"] == [[dataset.video2idx[n], 0, 0, float(np.float32(s))]
                                                    for n, s in ranklist]
        assert len(results["VCMR"][i]["predictions"]) == 200


def test_general_without_internal_scores_evaluates_svmr(tmp_path):
    """(VR and VCMR need the first-stage scores under `general`: an option error, tested with the options.)"""
    metrics, _, _ = run(tmp_path, tasks=("SVMR",), use_interal_vr_scores=False,
                        filename="latest_tvr_val_predictions_SVMR.json")
    assert list(metrics) == ["SVMR", "SVMR_by_type"]


def test_vcmr_alone(tmp_path):
    filename = "inference_tvr_val_None_predictions_VCMR_hero.json"
    metrics, _, paths = run(tmp_path, tasks=("VCMR",), filename=filename, nms_thd=-1)
    assert [os.path.basename(p) for p in paths] == [filename, filename.replace(".json", "_metrics.json")]
    assert list(json.load(open(paths[0]))) == ["video2idx", "VCMR"]
    full, _, _ = run(tmp_path, "full", nms_thd=-1)
    assert metrics["VCMR"] == full["VCMR"]


def test_split_without_gt_skips_svmr_and_lists_both_files(tmp_path, caplog):
    filename = "inference_tvr_test_public_None_predictions_VCMR_SVMR_VR_hero.json"
    with caplog.at_level(logging.INFO, logger="method.evaluation"):
        metrics, metrics_nms, paths = run(tmp_path, dataset=FakeEvalDataset(has_gt=False), filename=filename,
                                          eval_split_name="test_public")
    assert metrics is None and metrics_nms is None
    assert [os.path.basename(p) for p in paths] == [filename, filename.replace(".json", "_nms_thd_0.7.json")]
    assert list(json.load(open(paths[0]))) == ["video2idx", "VCMR", "VR"]
    assert any("Skipping SVMR" in r.message for r in caplog.records)


def test_nms_reads_truncated_list_unless_nms_input_full(tmp_path):
    dataset, model = FakeEvalDataset(), FakeModel()
    raw = compute_predictions(model, dataset, make_opt(tmp_path), ("VCMR", "SVMR", "VR"))
    truncated = [dict(q, predictions=q["predictions"][:100]) for q in raw["VCMR"]]
    for full_input, source in ((False, truncated), (True, raw["VCMR"])):
        _, _, paths = run(tmp_path, f"nms_{full_input}", dataset=dataset, model=model, nms_thd=0.3,
                          nms_input_full=full_input)
        nms = json.load(open(paths[2]))
        assert nms["VCMR"] == apply_nms(source, 0.3, max_before_nms=200, max_after_nms=100)
        assert json.load(open(paths[0]))["VCMR"] == truncated  # ranking only the rows needed changes nothing
    faithful = json.load(open(tmp_path / "nms_False" / SUBMISSION.replace(".json", "_nms_thd_0.3.json")))
    full = json.load(open(tmp_path / "nms_True" / SUBMISSION.replace(".json", "_nms_thd_0.3.json")))
    assert faithful["VCMR"] != full["VCMR"]  # the extra 100 rows refill the lists after suppression


def test_disjoint_ignores_internal_vr_scores(tmp_path):
    _, _, with_flag = run(tmp_path, "with", similarity_measure="disjoint", use_interal_vr_scores=True)
    _, _, without = run(tmp_path, "without", similarity_measure="disjoint", use_interal_vr_scores=False)
    assert read_texts(with_flag) == read_texts(without)


# ---------------------------------------------------------------------------------------------------
# Real dataset and model: the cache must not change a single byte

@pytest.mark.parametrize("measure,use_internal", [("general", True), ("exclusive", False), ("disjoint", False)])
def test_cache_on_equals_cache_off_real_model(tmp_path, tiny_corpus, measure, use_internal):
    from conftest import TINY_CORPUS_KWARGS
    from method.conquer import CONQUER
    from method.dataset import StartEndDataset
    from utils.data_config import load_data_config

    max_ctx_len = 32
    dataset = StartEndDataset(load_data_config(tiny_corpus), max_ctx_len=max_ctx_len, is_eval=True, mode="val",
                              inference_top_k=10)
    with open(os.path.join(REPO_ROOT, "config", "model_config_tiny.json")) as f:
        config = json.load(f)
    torch.manual_seed(0)
    model = CONQUER(config, visual_dim=TINY_CORPUS_KWARGS["visual_dim"], text_dim=TINY_CORPUS_KWARGS["text_dim"],
                    query_dim=TINY_CORPUS_KWARGS["query_dim"], hidden_dim=config["bert_config"]["hidden_size"],
                    video_len=max_ctx_len, similarity_measure=measure)
    kwargs = dict(similarity_measure=measure, use_interal_vr_scores=use_internal, eval_query_bsz=5, max_pred_l=24)
    on = run(tmp_path, "on", dataset=dataset, model=model, video_cache=True, **kwargs)
    off = run(tmp_path, "off", dataset=dataset, model=model, video_cache=False, **kwargs)
    assert read_texts(on[2]) == read_texts(off[2])
    assert on[0] == off[0] and on[0]["VCMR"]["0.5-r100"] >= 0


@pytest.mark.parametrize("max_before_nms,nms_input_full,nms_thd", [
    (200, False, 0.3), (200, True, 0.3), (50, False, 0.3), (50, True, 0.3), (200, True, -1), (150, False, -1)])
def test_ranking_only_the_rows_read_writes_the_files_of_full_ranking(tmp_path, max_before_nms, nms_input_full,
                                                                     nms_thd):
    """eval_epoch ranks ranked_rows_needed rows; its files equal those of ranking max_before_nms rows first."""
    dataset, model = FakeEvalDataset(), FakeModel()
    opt = make_opt(tmp_path / "full", max_before_nms=max_before_nms, nms_input_full=nms_input_full, nms_thd=nms_thd)
    full = compute_predictions(model, dataset, opt, ("VCMR", "SVMR", "VR"))
    assert len(full["VCMR"][0]["predictions"]) == max_before_nms  # more than the 100 kept, where it is 150 or 200
    assert ranked_rows_needed(opt, 100) == (max_before_nms if nms_input_full and nms_thd != -1
                                            else min(max_before_nms, 100))
    expected = json.loads(json.dumps(top_n_submission(full, 100)))
    _, _, paths = run(tmp_path, "ranked", dataset=dataset, model=model, max_before_nms=max_before_nms,
                      nms_input_full=nms_input_full, nms_thd=nms_thd)
    assert json.load(open(paths[0])) == expected
    if nms_thd != -1:
        source = full if nms_input_full else top_n_submission(full, 100)
        expected_nms = nms_submission(expected, source, nms_thd, max_before_nms, 100)
        assert json.load(open(paths[2])) == json.loads(json.dumps(expected_nms))
