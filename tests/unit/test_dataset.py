"""Data config loading and StartEndDataset items, sampling, collate and errors."""
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from method.dataset import (DUMMY_TEST_PUBLIC_VIDEO, DatasetError, StartEndDataset, prepare_batch_inputs,
                            st_ed_label, start_end_collate)
from utils.data_config import PATH_KEYS, DataConfigError, load_data_config
from utils.feature_stores import write_query_store, write_ranklist_store, write_subtitle_store, write_video_store
from utils.io_utils import save_json, save_jsonl
from utils.run_dir import REPO_ROOT

RELEASE_LAYOUT = json.load(open(os.path.join(REPO_ROOT, "config", "tvr_data_config.json")))


def _features(seed, n, d):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _row(desc_id, vid_name, duration, ts, query_type="v"):
    return dict(vid_name=vid_name, duration=duration, ts=ts, desc=f"query {desc_id}", type=query_type,
                desc_id=desc_id)


def base_spec():
    """Hand-made two-video corpus: vid_a 10 clips (15 s), vid_b 6 clips (9 s); subtitles of vid_a have 9 rows."""
    return dict(
        video_splits={"test_challenge": {DUMMY_TEST_PUBLIC_VIDEO: [91.56, 0]},
                      "test_public": {"tp_a": [15.0, 50], "tp_b": [9.0, 51]},
                      "train": {"vid_a": [15.0, 100], "vid_b": [9.0, 101]},
                      "val": {"vid_a": [15.0, 200], "vid_b": [9.0, 201]}},
        visual={"vid_a": _features(0, 10, 6) * 3, "vid_b": _features(1, 6, 6),
                "tp_a": _features(2, 10, 6), "tp_b": _features(3, 6, 6)},
        sub={"vid_a": _features(4, 9, 4), "vid_b": _features(5, 6, 4),
             "tp_a": _features(6, 10, 4), "tp_b": _features(7, 6, 4)},
        query={1: _features(8, 5, 3), 2: _features(9, 40, 3), 7: _features(10, 4, 3)},
        annotations={"train": [_row(1, "vid_a", 15.0, [3.2, 7.6]), _row(2, "vid_b", 9.0, [0.5, 8.9], "t")],
                     "val": [_row(1, "vid_a", 15.0, [3.2, 7.6]), _row(2, "vid_b", 9.0, [0.5, 8.9], "vt")],
                     "test_public": [dict(desc="query 7", desc_id=7)]},
        ranklists={"train": {1: [(101, 0.9), (100, 0.5)], 2: [(101, 0.8), (100, 0.7)]},
                   "val": {1: [(201, 0.9), (200, 0.5)], 2: [(201, 0.8), (200, 0.7)]},
                   "test_public": {7: [(51, 0.6), (50, 0.25)]}},
    )


def build_corpus(root, spec):
    """Write `spec` in the release layout under `root` -> loaded data config."""
    root = str(root)
    path = {key: os.path.join(root, RELEASE_LAYOUT[key]) for key in PATH_KEYS}
    write_video_store(path["vid_feat_path"], spec["visual"])
    write_subtitle_store(path["sub_bert_path"], spec["sub"])
    write_query_store(path["desc_bert_path"], spec["query"])
    for split, data_key, ranklist_key in (("train", "train_data_path", "train_first_VR_ranklist_path"),
                                          ("val", "eval_data_path", "eval_first_VR_ranklist_path_hero"),
                                          ("test_public", "test_data_path", "test_public_first_VR_ranklist_path_hero")):
        save_jsonl(spec["annotations"][split], path[data_key])
        write_ranklist_store(path[ranklist_key], spec["ranklists"][split])
    save_json(spec["video_splits"], path["video_duration_idx_path"])
    config_path = os.path.join(root, "data_config.json")
    save_json(dict(RELEASE_LAYOUT, root_path=root), config_path)
    return load_data_config(config_path)


@pytest.fixture
def corpus(tmp_path):
    return build_corpus(tmp_path, base_spec())


def _l2(x):
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-5)


# ----------------------------------------------------------------------------------------------------
# Data config

def test_data_config_joins_paths_with_root(tmp_path):
    (tmp_path / "release").mkdir()
    save_json(dict(RELEASE_LAYOUT, root_path=str(tmp_path / "release")), tmp_path / "c.json")
    config = load_data_config(tmp_path / "c.json")
    assert config.root_path == str(tmp_path / "release") and config.dset_name == "tvr"
    assert config.vid_feat_path == os.path.join(str(tmp_path / "release"), "video_feature/resnet_slowfast_1.5")
    assert all(os.path.isabs(config[key]) for key in PATH_KEYS)


def test_data_config_errors_name_file_and_key(tmp_path):
    with pytest.raises(DataConfigError, match="missing.json: file not found"):
        load_data_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataConfigError, match="bad.json: invalid JSON"):
        load_data_config(tmp_path / "bad.json")
    layout = dict(RELEASE_LAYOUT, root_path=str(tmp_path))
    del layout["vid_feat_path"]
    save_json(layout, tmp_path / "nokey.json")
    with pytest.raises(DataConfigError, match="nokey.json: missing key 'vid_feat_path'"):
        load_data_config(tmp_path / "nokey.json")
    save_json(RELEASE_LAYOUT, tmp_path / "release.json")  # root_path of the original authors' machine
    with pytest.raises(DataConfigError, match=r"root_path '/home/zjhou3/tvr_feature_release'.*edit `root_path` in "
                                              r"config/tvr_data_config.json"):
        load_data_config(tmp_path / "release.json")
    assert issubclass(DataConfigError, ValueError)


# ----------------------------------------------------------------------------------------------------
# Items

def test_training_item_matches_spec(corpus):
    spec = base_spec()
    dataset = StartEndDataset(corpus, mode="train", neg_video_num=1)
    assert len(dataset) == 2 and dataset.has_gt and dataset.video2idx == {"vid_a": 100, "vid_b": 101}
    assert dataset.idx2video == {100: "vid_a", 101: "vid_b"}
    item = dataset[0]
    assert item["meta"] == dict(desc_id=1, desc="query 1", vid_name="vid_a", ts=[3.2, 7.6],
                                sample_vid_name_list=["vid_b"])
    inputs = item["model_inputs"]
    assert set(inputs) == {"query", "visual", "sub", "st_ed_indices"}

    query = inputs["query"]
    assert query["feat"].shape == (30, 3) and query["feat"].dtype == torch.float32
    np.testing.assert_array_equal(query["feat"][:5].numpy(), spec["query"][1])
    assert not query["feat"][5:].any()
    assert query["feat_mask"].dtype == torch.int64 and query["feat_mask"].tolist() == [1] * 5 + [0] * 25
    assert query["feat_pos_id"].tolist() == list(range(30)) and query["feat_token_id"].tolist() == [1] * 30

    visual = inputs["visual"]
    assert visual["feat"].shape == (2, 100, 6) and visual["feat"].dtype == torch.float32
    np.testing.assert_allclose(visual["feat"][0, :10].numpy(), _l2(spec["visual"]["vid_a"]), rtol=1e-6)
    np.testing.assert_allclose(visual["feat"][1, :6].numpy(), _l2(spec["visual"]["vid_b"]), rtol=1e-6)
    assert not visual["feat"][0, 10:].any() and not visual["feat"][1, 6:].any()
    assert visual["feat_mask"].dtype == torch.int64
    assert visual["feat_mask"].sum(1).tolist() == [10, 6]
    assert visual["feat_pos_id"].tolist() == [list(range(100))] * 2
    assert visual["feat_token_id"].tolist() == [[0] * 100] * 2

    sub = inputs["sub"]
    assert sub["feat"].shape == (2, 100, 4)
    np.testing.assert_array_equal(sub["feat"][0, :9].numpy(), spec["sub"]["vid_a"])  # not normalised
    assert sub["feat_mask"].sum(1).tolist() == [9, 6]  # its own row count, not the visual one
    assert sub["feat_token_id"].tolist() == [[1] * 100] * 2 and sub["feat_pos_id"].tolist() == [list(range(100))] * 2

    assert inputs["st_ed_indices"].dtype == torch.int64 and inputs["st_ed_indices"].tolist() == [2, 5]


def test_st_ed_label_rule():
    assert st_ed_label([3.2, 7.6], 100, 1.5) == (2, 5)  # the documented example
    assert st_ed_label([0, 1.5], 100, 1.5) == (0, 0)
    assert st_ed_label([10.0, 14.0], 8, 1.5) == (6, 7)  # clamped to the truncated video
    assert st_ed_label([13.0, 14.0], 8, 1.5) == (7, 7)
    with pytest.raises(DatasetError, match=r"\(st, ed\) = \(2, 1\)"):
        st_ed_label([3.0, 3.0], 100, 1.5)


def test_options_are_honoured_truncation_and_clip_length(tmp_path):
    spec = base_spec()
    spec["annotations"]["train"].append(_row(3, "vid_a", 15.0, [10.0, 14.0]))
    spec["ranklists"]["train"][3] = [(100, 0.9), (101, 0.5)]
    spec["query"][3] = _features(11, 2, 3)
    config = build_corpus(tmp_path, spec)

    dataset = StartEndDataset(config, max_ctx_len=8, max_desc_len=4, clip_length=1.5, neg_video_num=1)
    item = dataset[2]["model_inputs"]
    assert item["visual"]["feat"].shape == (2, 8, 6) and item["visual"]["feat_mask"].sum(1).tolist() == [8, 6]
    np.testing.assert_allclose(item["visual"]["feat"][0].numpy(), _l2(spec["visual"]["vid_a"][:8]), rtol=1e-6)
    assert item["sub"]["feat_mask"].sum(1).tolist() == [8, 6]
    assert item["visual"]["feat_pos_id"].tolist() == [list(range(8))] * 2
    assert item["st_ed_indices"].tolist() == [6, 7]  # n = 8 visual rows after truncation
    long_query = dataset[1]["model_inputs"]["query"]
    assert long_query["feat"].shape == (4, 3) and long_query["feat_mask"].tolist() == [1, 1, 1, 1]
    np.testing.assert_array_equal(long_query["feat"].numpy(), spec["query"][2][:4])

    coarse = StartEndDataset(config, clip_length=2.0, neg_video_num=1)
    assert coarse[0]["model_inputs"]["st_ed_indices"].tolist() == [1, 3]

    visual_only = StartEndDataset(config, ctx_mode="visual", neg_video_num=1)[0]["model_inputs"]
    assert "sub" not in visual_only


def test_visual_mode_does_not_need_the_subtitle_store(corpus):
    shutil.rmtree(corpus.sub_bert_path)
    assert "sub" not in StartEndDataset(corpus, ctx_mode="visual", neg_video_num=1)[0]["model_inputs"]


def test_eval_item(corpus):
    dataset = StartEndDataset(corpus, mode="val", is_eval=True, inference_top_k=2)
    item = dataset[0]
    assert item["meta"]["vid_name"] == "vid_a" and item["meta"]["sample_vid_name_list"] == ["vid_b", "vid_a"]
    inputs = item["model_inputs"]
    assert set(inputs) == {"query", "visual", "sub", "inference_vr_scores"}
    assert inputs["inference_vr_scores"].dtype == torch.float32
    assert inputs["inference_vr_scores"].tolist() == pytest.approx([0.9, 0.5])
    assert inputs["visual"]["feat"].shape == (3, 100, 6)
    assert inputs["visual"]["feat_mask"].sum(1).tolist() == [10, 6, 10]  # GT also ranked: read twice
    assert torch.equal(inputs["visual"]["feat"][0], inputs["visual"]["feat"][2])
    assert StartEndDataset(corpus, mode="val", is_eval=True, inference_top_k=1)[1]["model_inputs"][
        "inference_vr_scores"].tolist() == pytest.approx([0.8])


def test_eval_loss_set_samples_like_training_without_top100_assertion(tmp_path):
    spec = base_spec()
    spec["ranklists"]["val"][1] = [(201, 0.9)]  # GT absent: location 100, allowed outside mode train
    dataset = StartEndDataset(build_corpus(tmp_path, spec), mode="val", neg_video_num=1)
    assert dataset[0]["meta"]["sample_vid_name_list"] == ["vid_b"]
    assert dataset[0]["model_inputs"]["st_ed_indices"].tolist() == [2, 5]


def test_test_public_without_dummy_uses_a_one_row_zero_placeholder(corpus):
    dataset = StartEndDataset(corpus, mode="test_public", is_eval=True, inference_top_k=2)
    assert not dataset.has_gt and dataset.video2idx == {"tp_a": 50, "tp_b": 51}
    item = dataset[0]
    assert item["meta"]["vid_name"] == DUMMY_TEST_PUBLIC_VIDEO and item["meta"]["ts"] is None
    assert item["meta"]["sample_vid_name_list"] == ["tp_b", "tp_a"]
    for modality, dim in (("visual", 6), ("sub", 4)):
        inputs = item["model_inputs"][modality]
        assert inputs["feat"].shape == (3, 100, dim)
        assert not inputs["feat"][0].any()
        assert inputs["feat_mask"][0].tolist() == [1] + [0] * 99
    assert item["model_inputs"]["inference_vr_scores"].tolist() == pytest.approx([0.6, 0.25])


def test_test_public_reads_the_dummy_where_stored(tmp_path):
    spec = base_spec()
    spec["visual"][DUMMY_TEST_PUBLIC_VIDEO] = _features(12, 7, 6)  # only in the visual store
    dataset = StartEndDataset(build_corpus(tmp_path, spec), mode="test_public", is_eval=True, inference_top_k=2)
    inputs = dataset[0]["model_inputs"]
    np.testing.assert_allclose(inputs["visual"]["feat"][0, :7].numpy(), _l2(spec["visual"][DUMMY_TEST_PUBLIC_VIDEO]),
                               rtol=1e-6)
    assert inputs["visual"]["feat_mask"][0].sum() == 7
    assert inputs["sub"]["feat_mask"][0].tolist() == [1] + [0] * 99


def test_data_ratio_keeps_the_first_lines(corpus):
    assert [row["desc_id"] for row in StartEndDataset(corpus, data_ratio=0.5).query_data] == [1]


# ----------------------------------------------------------------------------------------------------
# Negative sampling

@pytest.fixture
def pool_corpus(tmp_path):
    """30 one-clip videos; query 1's GT v05 is ranked 6th and again 11th."""
    names = [f"v{i:02d}" for i in range(30)]
    spec = base_spec()
    spec["video_splits"]["train"] = {name: [1.5, 100 + i] for i, name in enumerate(names)}
    spec["visual"] = {name: _features(i, 1, 2) for i, name in enumerate(names)}
    spec["sub"] = {name: _features(i, 1, 2) for i, name in enumerate(names)}
    spec["annotations"]["train"] = [_row(1, "v05", 1.5, [0.2, 1.0])]
    ranked = list(range(30))
    ranked.insert(10, 5)
    spec["ranklists"]["train"] = {1: [(100 + i, 1.0 - r / 100) for r, i in enumerate(ranked)]}
    return build_corpus(tmp_path, spec)


def test_negatives_exclude_gt_and_stay_within_the_pool(pool_corpus):
    dataset = StartEndDataset(pool_corpus, neg_video_num=3, use_extend_pool=3)
    pool = {"v00", "v01", "v02", "v03", "v04", "v06", "v07", "v08"}  # first location(5) + 3 non-GT names
    seen = set()
    for _ in range(200):
        item = dataset[0]
        negatives = item["meta"]["sample_vid_name_list"]
        assert len(negatives) == 3 == len(set(negatives)) and "v05" not in negatives
        seen.update(negatives)
        assert item["model_inputs"]["visual"]["feat"].shape[0] == 4
    assert seen == pool


def test_negative_sampling_is_reproducible_under_a_seed(pool_corpus):
    dataset = StartEndDataset(pool_corpus, neg_video_num=3, use_extend_pool=20)

    def draw():
        random.seed(1234)
        return [dataset[0]["meta"]["sample_vid_name_list"] for _ in range(5)]

    first = draw()
    assert first == draw() and len({tuple(x) for x in first}) > 1


def test_neg_video_num_zero_gives_the_gt_alone(pool_corpus):
    item = StartEndDataset(pool_corpus, neg_video_num=0)[0]
    assert item["meta"]["sample_vid_name_list"] == [] and item["model_inputs"]["visual"]["feat"].shape[0] == 1


# ----------------------------------------------------------------------------------------------------
# Collate, device transfer, DataLoader workers

def test_collate_and_prepare_batch_inputs(corpus):
    dataset = StartEndDataset(corpus, mode="val", is_eval=True, inference_top_k=2)
    meta, batch = start_end_collate([dataset[0], dataset[1]])
    assert [m["desc_id"] for m in meta] == [1, 2]
    assert batch["query"]["feat"].shape == (2, 30, 3) and batch["visual"]["feat"].shape == (2, 3, 100, 6)
    assert batch["sub"]["feat_mask"].shape == (2, 3, 100) and batch["inference_vr_scores"].shape == (2, 2)
    moved = prepare_batch_inputs(batch, torch.device("cpu"))
    assert moved is not batch and set(moved) == set(batch)
    assert torch.equal(moved["visual"]["feat"], batch["visual"]["feat"])
    assert moved["visual"]["feat_mask"].dtype == torch.int64

    train_meta, train_batch = start_end_collate([StartEndDataset(corpus, neg_video_num=1)[i] for i in range(2)])
    assert train_batch["st_ed_indices"].shape == (2, 2) and train_batch["st_ed_indices"].dtype == torch.int64
    assert train_batch["visual"]["feat"].shape == (2, 2, 100, 6)


def test_cache_interface_matches_items(corpus):
    """eval_candidates / get_query_item / get_video_inputs (used by the evaluation video cache) slice items."""
    for mode in ("val", "test_public"):
        dataset = StartEndDataset(corpus, mode=mode, is_eval=True, inference_top_k=2)
        item = dataset[0]
        names = dataset.eval_candidates[0][0]
        assert names == [item["meta"]["vid_name"]] + item["meta"]["sample_vid_name_list"]
        query_item = dataset.get_query_item(0)
        assert query_item["meta"] == item["meta"]
        _assert_same_tensors(query_item["model_inputs"],
                             {key: item["model_inputs"][key] for key in ("query", "inference_vr_scores")})
        for i, name in enumerate(names):  # on test_public name 0 is the dummy, absent from the stores
            video = dataset.get_video_inputs(name)
            expected = {modality: {key: value[i] for key, value in item["model_inputs"][modality].items()}
                        for modality in ("visual", "sub")}
            _assert_same_tensors(video, expected)
    with pytest.raises(DatasetError, match="is_eval=True"):
        StartEndDataset(corpus, neg_video_num=1).get_query_item(0)


def _batches(dataset, num_workers):
    loader = DataLoader(dataset, batch_size=4, shuffle=False, num_workers=num_workers, collate_fn=start_end_collate)
    return list(loader)


def _assert_same_tensors(a, b):
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], dict):
            _assert_same_tensors(a[key], b[key])
        else:
            assert torch.equal(a[key], b[key]), key


def test_dataloader_workers_give_the_same_batches(tiny_corpus):
    config = load_data_config(tiny_corpus)
    dataset = StartEndDataset(config, mode="val", is_eval=True)
    dataset[0]  # the main process opens the stores before the workers fork
    serial, parallel = _batches(dataset, 0), _batches(dataset, 2)
    assert len(serial) == len(parallel) == 6
    for (meta_a, inputs_a), (meta_b, inputs_b) in zip(serial, parallel):
        assert meta_a == meta_b
        _assert_same_tensors(inputs_a, inputs_b)

    train = StartEndDataset(config, mode="train")
    for (meta_a, inputs_a), (meta_b, inputs_b) in zip(_batches(train, 0), _batches(train, 2)):
        assert [m["vid_name"] for m in meta_a] == [m["vid_name"] for m in meta_b]
        assert torch.equal(inputs_a["st_ed_indices"], inputs_b["st_ed_indices"])
        assert torch.equal(inputs_a["visual"]["feat"][:, 0], inputs_b["visual"]["feat"][:, 0])


# ----------------------------------------------------------------------------------------------------
# Errors

def _construction_error(tmp_path, edit, match, **kwargs):
    spec = base_spec()
    edit(spec)
    config = build_corpus(tmp_path, spec)
    with pytest.raises(DatasetError, match=match):
        StartEndDataset(config, **kwargs)


def _item_error(tmp_path, edit, match, **kwargs):
    spec = base_spec()
    edit(spec)
    dataset = StartEndDataset(build_corpus(tmp_path, spec), **kwargs)
    with pytest.raises(DatasetError, match=match):
        dataset[0]


@pytest.mark.parametrize("edit,match", [
    (lambda s: s["annotations"]["train"][0].update(ts=[5.0, 3.0]),
     r"tvr_train_select100_release.jsonl: row 0 \(desc_id 1\): ts expected 0 <= start <= end, found \[5.0, 3.0\]"),
    (lambda s: s["annotations"]["train"][0].update(ts=[3.0]), r"desc_id 1\): ts expected \[start, end\] seconds"),
    (lambda s: s["annotations"]["train"][1].pop("ts"), r"row 1 \(desc_id 2\): missing field\(s\) \['ts'\]"),
    (lambda s: s["annotations"]["train"][0].update(type="x"), r"desc_id 1\): unknown type 'x'"),
    (lambda s: s["annotations"]["train"][1].update(desc_id=1), r"row 1 \(desc_id 1\): duplicated desc_id 1"),
    (lambda s: s["annotations"]["train"][0].update(vid_name="vid_z"),
     r"vid_name 'vid_z' is not a video of split 'train'"),
    (lambda s: s["video_splits"].pop("train"), r"tvr_video2dur_idx.json: no split 'train'"),
])
def test_bad_annotations_fail_at_construction(tmp_path, edit, match):
    _construction_error(tmp_path, edit, match)


def test_bad_arguments_fail_at_construction(corpus):
    with pytest.raises(DatasetError, match="mode must be one of .*found 'test'"):
        StartEndDataset(corpus, mode="test")
    with pytest.raises(DatasetError, match="test_public' has no ground truth"):
        StartEndDataset(corpus, mode="test_public")
    with pytest.raises(DatasetError, match="max_ctx_len must be a positive int"):
        StartEndDataset(corpus, max_ctx_len=0)
    assert issubclass(DatasetError, ValueError)


def test_ranklist_shorter_than_k(tmp_path):
    _item_error(tmp_path, lambda s: None,
                r"val item 0 \(desc_id 1\): ranklist .*tvr_val_top100_hero: key '1' holds 2 videos, expected at "
                r"least inference_top_k=3", mode="val", is_eval=True, inference_top_k=3)


def test_missing_ranklist(tmp_path):
    _item_error(tmp_path, lambda s: s["ranklists"]["val"].pop(1),
                r"val item 0 \(desc_id 1\): ranklist store .*tvr_val_top100_hero: key '1' not found",
                mode="val", is_eval=True, inference_top_k=2)


def test_missing_features_name_store_key_and_desc_id(tmp_path):
    _item_error(tmp_path, lambda s: s["visual"].pop("vid_b"),
                r"train item 0 \(desc_id 1\): video store .*resnet_slowfast_1.5: key 'vid_b' not found",
                neg_video_num=1)


def test_negative_pool_smaller_than_neg_video_num(tmp_path):
    _item_error(tmp_path, lambda s: None,
                r"desc_id 1\).*train_select100_top2000: key '1' leaves a negative pool of 1 videos, expected at "
                r"least neg_video_num=2", neg_video_num=2)


def test_training_gt_outside_the_top_100(tmp_path):
    _item_error(tmp_path, lambda s: s["ranklists"]["train"].update({1: [(101, 0.9)]}),
                r"GT video 'vid_a' of desc_id 1 is not in the first 100 entries", neg_video_num=1)


def test_ranklist_index_outside_the_split(tmp_path):
    _item_error(tmp_path, lambda s: s["ranklists"]["val"].update({1: [(201, 0.9), (999, 0.1)]}),
                r"tvr_val_top100_hero: key '1' references video index 999, which is not a video of split 'val'",
                mode="val", is_eval=True, inference_top_k=2)


def test_data_the_original_accepts(tmp_path):
    """Moments past the video's end (DiDeMo's 5 s segments), rows without duration, zero feature rows and
    multi-moment GT in the eval-loss set: accepted, labels clipped to the video as the original does."""
    spec = base_spec()
    spec["annotations"]["train"][1]["ts"] = [7.5, 12.0]  # vid_b: 6 clips, 9 s
    spec["annotations"]["train"][0].pop("duration")
    spec["annotations"]["val"][0]["ts"] = [[3.2, 7.6], [0.0, 20.0], [1.0, 2.0], [4.0, 5.0]]
    spec["annotations"]["val"][1].pop("duration")
    spec["sub"]["vid_b"] = np.zeros((0, 4), np.float32)
    config = build_corpus(tmp_path, spec)
    train_set = StartEndDataset(config, mode="train", neg_video_num=1)
    assert train_set[1]["model_inputs"]["st_ed_indices"].tolist() == [5, 5]
    assert train_set[0]["model_inputs"]["st_ed_indices"].tolist() == [2, 5]
    assert train_set[1]["model_inputs"]["sub"]["feat_mask"][0].sum() == 0  # vid_b's subtitles: no rows
    eval_loss_set = StartEndDataset(config, mode="val", neg_video_num=1)
    assert eval_loss_set[0]["model_inputs"]["st_ed_indices"].tolist() == [2, 5]  # the first moment
    eval_set = StartEndDataset(config, mode="val", is_eval=True, inference_top_k=2)
    assert eval_set[0]["meta"]["ts"] == spec["annotations"]["val"][0]["ts"]


def test_label_outside_the_clips(tmp_path):
    _item_error(tmp_path, lambda s: s["annotations"]["train"][0].update(ts=[3.0, 3.0]),
                r"train item 0 \(desc_id 1\): ts \[3.0, 3.0\].*expected 0 <= st <= ed", neg_video_num=1)


def test_feature_dims_differing_between_videos(tmp_path):
    _item_error(tmp_path, lambda s: s["visual"].update(vid_b=_features(1, 6, 5)),
                r"video store .*: video 'vid_b' has feature dim 5, expected 6", neg_video_num=1)


# ----------------------------------------------------------------------------------------------------
# Windows (--window_stride)

def long_video_spec():
    """vid_long: 40 clips (60 s); vid_b: 6 clips; vid_c: 23 clips. Windows of 10 clips every 5."""
    spec = base_spec()
    spec["video_splits"]["train"] = {"vid_long": [60.0, 100], "vid_b": [9.0, 101], "vid_c": [34.5, 102]}
    spec["visual"].update(vid_long=_features(20, 40, 6), vid_c=_features(21, 23, 6))
    spec["sub"].update(vid_long=_features(22, 40, 4), vid_c=_features(23, 23, 4))
    spec["annotations"]["train"] = [_row(1, "vid_long", 60.0, [33.2, 35.0]), _row(2, "vid_long", 60.0, [1.0, 50.0])]
    spec["ranklists"]["train"] = {1: [(101, 0.9), (102, 0.8), (100, 0.5)], 2: [(102, 0.8), (100, 0.7), (101, 0.1)]}
    return spec


def windowed_train_set(tmp_path, neg_video_num=2):
    config = build_corpus(tmp_path, long_video_spec())
    return StartEndDataset(config, max_ctx_len=10, clip_length=1.5, mode="train", neg_video_num=neg_video_num,
                           window_stride=5)


def test_window_starts_follow_the_video_clip_count(tmp_path):
    dataset = windowed_train_set(tmp_path)
    assert dataset.window_starts("vid_long") == [0, 5, 10, 15, 20, 25, 30]
    assert dataset.window_starts("vid_b") == [0]
    assert dataset.window_starts("vid_c") == [0, 5, 10, 13]


def test_windowed_training_item_gt_window_and_negatives(tmp_path):
    dataset = windowed_train_set(tmp_path)
    video_st, video_ed = st_ed_label([33.2, 35.0], 40, 1.5)  # (22, 23)
    stored = _l2(_features(20, 40, 6))
    seen_starts = set()
    random.seed(0)
    for _ in range(40):
        item = dataset[0]
        windows = item["meta"]["windows"]
        gt = windows[0]
        st, ed = item["model_inputs"]["st_ed_indices"].tolist()
        assert gt.video_name == "vid_long" and gt.start <= video_st and video_ed < gt.start + 10
        assert (gt.start + st, gt.start + ed) == (video_st, video_ed)
        seen_starts.add(gt.start)
        # The window's features are rows [start, start + 10) of the stored (L2-normalised) video.
        np.testing.assert_allclose(item["model_inputs"]["visual"]["feat"][0].numpy(), stored[gt.start:gt.start + 10],
                                   rtol=1e-6)
        # One negative is a window of the GT video that shares no clip with the moment; never an overlapping one.
        same_video = [w for w in windows[1:] if w.video_name == "vid_long"]
        assert len(same_video) == 1
        assert all(w.start + 10 <= video_st or w.start > video_ed for w in same_video)
        assert len(windows) == 3 and item["model_inputs"]["visual"]["feat"].shape[:2] == (3, 10)
        assert item["meta"]["sample_vid_name_list"] == [w.video_name for w in windows[1:]]
    assert seen_starts == {15, 20}  # every window holding the moment is used


def test_moment_longer_than_a_window_is_cut_and_counted(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        dataset = windowed_train_set(tmp_path)
    assert "1 of 2 train moments are longer than a window of 10 clips" in caplog.text
    item = dataset[1]
    gt = item["meta"]["windows"][0]
    st, ed = item["model_inputs"]["st_ed_indices"].tolist()
    assert (st, ed) == (max(0, 0 - gt.start), 9)  # clipped to the window covering most of [0, 33]
    assert gt.start == 0


def test_stride_zero_keeps_the_truncated_items(tmp_path):
    config = build_corpus(tmp_path, long_video_spec())
    random.seed(1)
    truncated = StartEndDataset(config, max_ctx_len=10, clip_length=1.5, mode="train", neg_video_num=2)[1]
    assert "windows" not in truncated["meta"]
    assert truncated["model_inputs"]["st_ed_indices"].tolist() == [0, 9]


def test_eval_video_inputs_of_a_window(tmp_path):
    config = build_corpus(tmp_path, long_video_spec())
    dataset = StartEndDataset(config, max_ctx_len=10, clip_length=1.5, mode="train", is_eval=True, window_stride=5,
                              inference_top_k=2)
    inputs = dataset.get_video_inputs("vid_c", 13)
    np.testing.assert_array_equal(inputs["sub"]["feat"].numpy(), _features(23, 23, 4)[13:23])
    assert inputs["visual"]["feat_mask"].tolist() == [1] * 10


@pytest.mark.parametrize("stride", [-1, 11])
def test_bad_window_stride(tmp_path, stride):
    config = build_corpus(tmp_path, long_video_spec())
    with pytest.raises(DatasetError, match="--window_stride"):
        StartEndDataset(config, max_ctx_len=10, mode="train", window_stride=stride)
