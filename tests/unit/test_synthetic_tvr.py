"""utils/synthetic_tvr.py: layout, determinism, ranklist quality and the learnable planted signal."""
import filecmp
import json
import os
import time

import lmdb
import numpy as np
import pytest

from method.dataset import StartEndDataset
from utils import check_data, synthetic_tvr
from utils.data_config import PATH_KEYS, load_data_config
from utils.feature_stores import QueryFeatureStore, RanklistStore, SubtitleFeatureStore, VideoFeatureStore, close_store
from utils.errors import OptionError
from utils.io_utils import load_json, load_jsonl
from utils.run_dir import REPO_ROOT as REPO
from utils.tvr_format import DUMMY_TEST_PUBLIC_VIDEO, st_ed_label

SAMPLE_DIR = os.path.join(REPO, "tests", "data", "tvr_sample")
SPLITS = {"train": ("train_data_path", "train_first_VR_ranklist_path"),
          "val": ("eval_data_path", "eval_first_VR_ranklist_path_hero"),
          "test_public": ("test_data_path", "test_public_first_VR_ranklist_path_hero")}


def _gt_ranks(config, split):
    data_key, ranklist_key = SPLITS[split]
    video2idx = {name: v[1] for name, v in load_json(config.video_duration_idx_path)[split].items()}
    store = RanklistStore(config[ranklist_key])
    ranks = []
    for row in load_jsonl(config[data_key]):
        indices = [idx for idx, _ in store.get(row["desc_id"])]
        gt = video2idx[row["vid_name"]]
        ranks.append(indices.index(gt) if gt in indices else len(indices) + 10 ** 6)
    return np.array(ranks)


def test_layout_splits_and_sizes(tiny_corpus):
    config = load_data_config(tiny_corpus)
    release = json.load(open(os.path.join(REPO, "config", "tvr_data_config.json")))
    saved = json.load(open(tiny_corpus))
    assert saved == dict(release, root_path=os.path.dirname(tiny_corpus))
    assert all(os.path.exists(config[key]) for key in PATH_KEYS)

    splits = load_json(config.video_duration_idx_path)
    assert list(splits) == ["test_challenge", "test_public", "train", "val"]
    assert splits["test_challenge"][DUMMY_TEST_PUBLIC_VIDEO][1] == 0
    indices = [v[1] for split in splits.values() for v in split.values()]
    assert sorted(indices) == list(range(len(indices)))  # global and disjoint
    sizes = {split: len(videos) for split, videos in splits.items()}
    assert sizes == dict(test_challenge=1, test_public=16, train=24, val=20)

    train, val = load_jsonl(config.train_data_path), load_jsonl(config.eval_data_path)
    test = load_jsonl(config.test_data_path)
    assert (len(train), len(val), len(test)) == (48, 24, 12)
    assert set(val[0]) == {"vid_name", "duration", "ts", "desc", "type", "desc_id"}
    assert all(set(row) == {"desc", "desc_id"} for row in test)
    assert len({row["desc_id"] for row in train + val + test}) == 84

    durations = [v[0] for split in ("train", "val", "test_public") for v in splits[split].values()]
    assert 15.0 <= min(durations) and max(durations) <= 45.0
    video = VideoFeatureStore(config.vid_feat_path, dim=12)
    sub = SubtitleFeatureStore(config.sub_bert_path, dim=8)
    for name, (duration, _) in splits["val"].items():
        assert len(video.get(name)) == len(sub.get(name)) == int(np.ceil(duration / 1.5))
    assert QueryFeatureStore(config.desc_bert_path, dim=8).get(val[0]["desc_id"]).shape[1] == 8


def test_ranklists_have_release_shape_and_scores_descend(tiny_corpus):
    config = load_data_config(tiny_corpus)
    for split, (_, ranklist_key) in SPLITS.items():
        store = RanklistStore(config[ranklist_key])
        n_videos = len(load_json(config.video_duration_idx_path)[split])
        for desc_id in store.keys():
            ranklist = store.get(desc_id)
            assert len(ranklist) == min(100 if split != "train" else 2000, n_videos)
            scores = [score for _, score in ranklist]
            assert scores == sorted(scores, reverse=True)
    assert (_gt_ranks(config, "train") < 100).all()  # select100


def test_ranklist_quality_is_realistic(tmp_path):
    config = load_data_config(synthetic_tvr.generate_corpus(
        tmp_path, n_train_videos=20, n_val_videos=150, n_test_videos=10, n_train_queries=10, n_val_queries=1500,
        n_test_queries=5, visual_dim=4, text_dim=4, query_dim=4))
    ranks = _gt_ranks(config, "val")
    assert 0.15 < (ranks < 1).mean() < 0.25
    assert 0.42 < (ranks < 10).mean() < 0.58
    assert 0.94 < (ranks < 100).mean() < 1.0


def _store_items(path):
    env = lmdb.open(path, readonly=True, lock=False)
    with env.begin() as txn:
        items = list(txn.cursor().iternext())
    env.close()
    return items


def test_generation_is_deterministic_under_seed(tmp_path, tiny_corpus, tiny_corpus_kwargs):
    again = synthetic_tvr.generate_corpus(tmp_path / "again", **tiny_corpus_kwargs)
    other = synthetic_tvr.generate_corpus(tmp_path / "other", **dict(tiny_corpus_kwargs, seed=1))
    first, second, third = (load_data_config(path) for path in (tiny_corpus, again, other))
    for key in ("train_data_path", "eval_data_path", "test_data_path", "video_duration_idx_path"):
        assert filecmp.cmp(first[key], second[key], shallow=False), key
    for key in ("desc_bert_path", "vid_feat_path", "sub_bert_path", "train_first_VR_ranklist_path"):
        close_store(first[key])
        assert _store_items(first[key]) == _store_items(second[key]), key
        assert _store_items(first[key]) != _store_items(third[key]), key


def _ridge_localiser_recall(config, rng_seed=0):
    """SVMR R1@IoU0.5 on val of a linear map fitted on train (GT clip features -> mean query token),
    localising by the best span of clips scored against the query; and of random spans."""
    video, sub = VideoFeatureStore(config.vid_feat_path), SubtitleFeatureStore(config.sub_bert_path)
    query = QueryFeatureStore(config.desc_bert_path)

    def clips(name):
        return np.concatenate([video.get(name), sub.get(name)], axis=1)

    inputs, targets = [], []
    for row in load_jsonl(config.train_data_path):
        features = clips(row["vid_name"])
        st, ed = st_ed_label(row["ts"], len(features), 1.5)
        inputs.append(features[st:ed + 1].mean(0))
        targets.append(query.get(row["desc_id"]).mean(0))
    inputs, targets = np.array(inputs), np.array(targets)
    weights = np.linalg.solve(inputs.T @ inputs + np.eye(inputs.shape[1]), inputs.T @ targets)

    def iou(a, b):
        union = max(a[1], b[1]) - min(a[0], b[0])
        return max(0.0, min(a[1], b[1]) - max(a[0], b[0])) / union

    rng = np.random.default_rng(rng_seed)
    rows = load_jsonl(config.eval_data_path)
    hits = random_hits = 0
    for row in rows:
        scores = clips(row["vid_name"]) @ weights @ query.get(row["desc_id"]).mean(0)
        z = (scores - scores.mean()) / (scores.std() + 1e-9) - 0.5
        prefix = np.concatenate([[0.0], np.cumsum(z)])
        span_sums = prefix[None, 1:] - prefix[:-1, None]  # [st, ed] -> sum of z[st..ed]
        span_sums[np.tril_indices(len(z), -1)] = -np.inf
        st, ed = np.unravel_index(np.argmax(span_sums), span_sums.shape)
        hits += iou((st * 1.5, (ed + 1) * 1.5), row["ts"]) >= 0.5
        rst = int(rng.integers(len(z)))
        random_hits += iou((rst * 1.5, (min(len(z) - 1, rst + int(rng.integers(1, 8))) + 1) * 1.5), row["ts"]) >= 0.5
    return hits / len(rows), random_hits / len(rows)


def test_planted_signal_is_learnable_and_noise_tunable(tmp_path):
    sizes = dict(n_train_videos=100, n_val_videos=40, n_test_videos=10, n_train_queries=400, n_val_queries=120,
                 n_test_queries=5)
    clean = load_data_config(synthetic_tvr.generate_corpus(tmp_path / "clean", **sizes))
    recall, random_recall = _ridge_localiser_recall(clean)
    assert recall > 0.35 and recall > 4 * random_recall
    assert recall < 0.95  # not trivial for a linear model
    noisy = load_data_config(synthetic_tvr.generate_corpus(tmp_path / "noisy", noise=8.0, **sizes))
    assert _ridge_localiser_recall(noisy)[0] < recall - 0.15


def test_real_annotations_mode(tmp_path):
    config_path = synthetic_tvr.generate_corpus(tmp_path, real_annotations=SAMPLE_DIR, n_train_videos=12,
                                                n_train_queries=30)
    config = load_data_config(config_path)
    assert load_jsonl(config.eval_data_path) == load_jsonl(os.path.join(SAMPLE_DIR, "tvr_val_release.jsonl"))
    assert load_jsonl(config.test_data_path) == load_jsonl(os.path.join(SAMPLE_DIR, "tvr_test_public_release.jsonl"))
    real = load_json(os.path.join(SAMPLE_DIR, "tvr_video2dur_idx.json"))
    written = load_json(config.video_duration_idx_path)
    assert written["val"] == real["val"] and written["test_public"] == real["test_public"]
    assert written["test_challenge"] == {DUMMY_TEST_PUBLIC_VIDEO: real["test_challenge"][DUMMY_TEST_PUBLIC_VIDEO]}
    assert list(written["train"].items()) == sorted(real["train"].items(), key=lambda kv: kv[1][1])[:12]
    train_ids = {row["desc_id"] for row in load_jsonl(config.train_data_path)}
    real_ids = {row["desc_id"] for row in load_jsonl(config.eval_data_path) + load_jsonl(config.test_data_path)}
    assert len(train_ids) == 30 and not train_ids & real_ids
    counts, problems, _ = check_data.check_corpus(config_path)
    assert problems == [] and counts["val"]["queries"] == 50
    item = StartEndDataset(config, mode="test_public", is_eval=True)[0]
    assert item["model_inputs"]["visual"]["feat_mask"][0].sum() == 62  # the dummy (91.56 s) is stored


def test_long_videos_have_moments_anywhere_and_are_fast(tmp_path):
    """5-15 minute videos (200-600 clips): the moments start uniformly over the whole video, not only in its
    first clips; ~70 videos take a few seconds."""
    start = time.time()
    config = load_data_config(synthetic_tvr.generate_corpus(
        tmp_path, n_train_videos=40, n_val_videos=20, n_test_videos=10, n_train_queries=1000, n_val_queries=1000,
        n_test_queries=5, visual_dim=4, text_dim=4, query_dim=4, min_duration=300.0, max_duration=900.0,
        max_clips=600))
    assert time.time() - start < 10
    durations = {name: duration for split in ("train", "val", "test_public")
                 for name, (duration, _) in load_json(config.video_duration_idx_path)[split].items()}
    assert 300.0 <= min(durations.values()) and max(durations.values()) <= 900.0
    assert max(durations.values()) > 800.0
    video = VideoFeatureStore(config.vid_feat_path)
    assert all(len(video.get(name)) == int(np.ceil(d / 1.5)) for name, d in list(durations.items())[:5])

    rows = load_jsonl(config.train_data_path) + load_jsonl(config.eval_data_path)
    position = np.array([row["ts"][0] / row["duration"] for row in rows])  # start, as a fraction of the video
    quarters = np.histogram(position, bins=4, range=(0, 1))[0] / len(rows)
    assert np.all(np.abs(quarters - 0.25) < 0.05), quarters  # ~2000 moments: the standard error is ~0.01
    # Past the first 100 clips (150 s): 1 - E[150 / duration] = 1 - 150 ln(3) / 600, about 0.73.
    assert 0.65 < np.mean([row["ts"][0] >= 150.0 for row in rows]) < 0.8
    assert all(row["ts"][1] <= row["duration"] for row in rows)


def test_cli_prints_window_flags_for_long_videos(tmp_path, capsys):
    sizes = ["--n_train_videos", "10", "--n_val_videos", "10", "--n_test_videos", "10", "--n_train_queries", "10",
             "--n_val_queries", "10", "--n_test_queries", "2", "--visual_dim", "4"]
    synthetic_tvr.main(["--out_dir", str(tmp_path / "long"), "--min_duration", "300", "--max_duration", "900",
                        "--max_clips", "600"] + sizes)
    out = capsys.readouterr().out
    assert "longer than --max_ctx_len 100: --window_stride 50 reads them as overlapping windows" in out
    assert out.rstrip().endswith("--query_dim 32 --window_stride 50")
    synthetic_tvr.main(["--out_dir", str(tmp_path / "short")] + sizes)
    assert "--window_stride" not in capsys.readouterr().out  # TVR-length videos fit in 100 clips


def test_durations_beyond_the_clip_cap_are_a_flag_error(tmp_path):
    with pytest.raises(OptionError, match=r"^--min_duration 300: expected in \(0, 150\], the --max_duration 900 s "
                                          r"capped at --max_clips 100 x --clip_length 1.5 s \(raise --max_clips"):
        synthetic_tvr.generate_corpus(tmp_path, min_duration=300.0, max_duration=900.0)
