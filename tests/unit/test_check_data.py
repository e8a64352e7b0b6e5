"""utils/check_data.py: a clean corpus passes, every planted problem is found with its file and key."""
import json
import os
import re
import shutil
import subprocess
import sys

import lmdb
import numpy as np
import pytest

from utils import check_data, synthetic_tvr
from utils.data_config import load_data_config
from utils.feature_stores import close_store, encode_npz_features, encode_ranklist, encode_video_features
from utils.io_utils import load_json, load_jsonl, save_jsonl
from utils.run_dir import REPO_ROOT as REPO

SAMPLE_DIR = os.path.join(REPO, "tests", "data", "tvr_sample")
SPLITS = {"train": ("train_data_path", "train_first_VR_ranklist_path"),
          "val": ("eval_data_path", "eval_first_VR_ranklist_path_hero"),
          "test_public": ("test_data_path", "test_public_first_VR_ranklist_path_hero")}


def test_cli_writes_a_corpus_that_the_checker_passes(tmp_path, capsys):
    synthetic_tvr.main(["--out_dir", str(tmp_path), "--n_train_videos", "12", "--n_val_videos", "12",
                        "--n_test_videos", "12", "--n_train_queries", "10", "--n_val_queries", "10",
                        "--n_test_queries", "10", "--visual_dim", "5", "--seed", "3"])
    out = capsys.readouterr().out
    assert f"--dataset_config {tmp_path}/tvr_data_config.json --visual_dim 5 --text_dim 32 --query_dim 32" in out
    result = subprocess.run([sys.executable, "-m", "utils.check_data", "--dataset_config",
                             str(tmp_path / "tvr_data_config.json")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "val: 10 queries, 12 videos, 0 problems" in result.stdout and "OK" in result.stdout


def test_checker_passes_the_clean_tiny_corpus(tiny_corpus, capsys):
    assert check_data.main(["--dataset_config", tiny_corpus]) == 0
    assert "train: 48 queries" in capsys.readouterr().out


@pytest.fixture
def broken_corpus(tmp_path, tiny_corpus):
    """A copy of the tiny corpus with one planted problem of each kind -> (config path, expected messages)."""
    root = tmp_path / "broken"
    shutil.copytree(os.path.dirname(tiny_corpus), root)
    config_path = str(root / "tvr_data_config.json")
    with open(config_path) as f:
        saved = json.load(f)
    saved["root_path"] = str(root)
    with open(config_path, "w") as f:
        json.dump(saved, f)
    config = load_data_config(config_path)
    train, val = load_jsonl(config.train_data_path), load_jsonl(config.eval_data_path)
    splits = load_json(config.video_duration_idx_path)

    def edit_store(path, edit):
        close_store(path)
        env = lmdb.open(path)
        with env.begin(write=True) as txn:
            edit(txn)
        env.close()

    no_query, no_ranklist, foreign, short = val[0]["desc_id"], val[1]["desc_id"], val[2]["desc_id"], val[3]["desc_id"]
    nan_video = train[0]["vid_name"]
    wrong_dim_video = next(name for name in splits["val"] if name not in {row["vid_name"] for row in val[:4]})
    edit_store(config.desc_bert_path, lambda txn: txn.delete(str(no_query).encode()))
    edit_store(config.eval_first_VR_ranklist_path_hero, lambda txn: (
        txn.delete(str(no_ranklist).encode()),
        txn.put(str(foreign).encode(), encode_ranklist([(0, 1.0)] + [(idx, 0.5) for _, idx in splits["val"].values()])),
        txn.put(str(short).encode(), encode_ranklist([(idx, 0.5) for _, idx in list(splits["val"].values())[:3]]))))
    nan_features = np.ones((4, 12), np.float32)
    nan_features[1, 2] = np.nan
    edit_store(config.vid_feat_path, lambda txn: (
        txn.put(nan_video.encode(), encode_video_features(nan_features)),
        txn.put(wrong_dim_video.encode(), encode_video_features(np.ones((4, 13), np.float32)))))
    # Accepted with a warning, as the original accepts them: a moment past the video's end, no duration.
    train[2]["ts"] = [1.0, train[2]["duration"] + 5]
    del train[3]["duration"]
    # A zero-length moment on a clip boundary: labels st 2 > ed 1, which training cannot use.
    train[1]["ts"] = [3.0, 3.0]
    save_jsonl(train, config.train_data_path)
    expected = [
        rf"query store .*: key '{no_query}' not found",
        rf"ranklist store .*tvr_val_top100_hero: key '{no_ranklist}' not found",
        rf"key '{foreign}': 1 video indices are not videos of split 'val' \(first: \[0\]\)",
        rf"key '{short}': 3 entries, expected at least max_vcmr_video=10",
        rf"video store .*: key '{nan_video}': expected finite values, found NaN/inf in row 1",
        rf"video store .*: key '{wrong_dim_video}' has feature dim 13, while \d+ keys have dim 12",
        rf"tvr_train_select100_release.jsonl: row 1 \(desc_id {train[1]['desc_id']}\): training cannot label it: "
        rf"ts \[3.0, 3.0\] with clip_length 1.5 on \d+ clips gives \(st, ed\) = \(2, 1\)",
    ]
    return config_path, expected


def test_checker_finds_every_planted_problem(broken_corpus, capsys):
    config_path, expected = broken_corpus
    counts, problems, warnings = check_data.check_corpus(config_path)
    assert len(problems) == len(expected), "\n".join(problems)
    assert {re.sub(r".*: ", "", w): n for w, (n, _) in warnings.items()} == {
        "rows without a positive 'duration'": 1,
        "moments ending after the video's duration (clip labels are clipped to the video)": 1}
    for pattern in expected:
        assert any(re.search(pattern, p) for p in problems), (pattern, problems)
    assert counts["train"]["problems"] == 2 and counts["val"]["problems"] == 4
    assert check_data.main(["--dataset_config", config_path, "--max_problems", "2"]) == 2
    out = capsys.readouterr().out
    assert "7 problem(s); the first 2:" in out and out.count("\n  - ") == 2 + len(warnings)
    assert f"rows without a positive 'duration': 1 (first: {train_desc_id(config_path, 3)!r})" in out


def train_desc_id(config_path, row):
    return load_jsonl(load_data_config(config_path).train_data_path)[row]["desc_id"]


def test_zero_row_features_are_a_warning(tmp_path, tiny_corpus, capsys):
    root = tmp_path / "copy"
    shutil.copytree(os.path.dirname(tiny_corpus), root)
    saved = json.load(open(root / "tvr_data_config.json"))
    json.dump(dict(saved, root_path=str(root)), open(root / "tvr_data_config.json", "w"))
    config = load_data_config(str(root / "tvr_data_config.json"))
    val_video = load_jsonl(config.eval_data_path)[0]["vid_name"]
    close_store(config.sub_bert_path)
    env = lmdb.open(config.sub_bert_path)
    with env.begin(write=True) as txn:
        txn.put(val_video.encode(), encode_npz_features(np.zeros((0, 8), np.float32)))
    env.close()
    assert check_data.main(["--dataset_config", str(root / "tvr_data_config.json"), "--splits", "val"]) == 0
    assert f"keys with zero feature rows (training cannot label a GT video without visual rows): 1 (first: " \
           f"{val_video!r})" in capsys.readouterr().out


def test_checker_reports_a_missing_store_and_a_bad_config(tmp_path, tiny_corpus):
    root = tmp_path / "copy"
    shutil.copytree(os.path.dirname(tiny_corpus), root)
    saved = json.load(open(root / "tvr_data_config.json"))
    json.dump(dict(saved, root_path=str(root)), open(root / "tvr_data_config.json", "w"))
    shutil.rmtree(root / "video_feature")
    counts, problems, _ = check_data.check_corpus(str(root / "tvr_data_config.json"), splits=["val"])
    assert len(problems) == 1 and "video store" in problems[0] and "resnet_slowfast_1.5" in problems[0]
    missing = tmp_path / "nope.json"
    assert check_data.check_corpus(str(missing))[1] == [f"data config {missing}: file not found"]


@pytest.fixture(scope="module")
def long_video_corpus(tmp_path_factory):
    """A corpus of 40-80-clip videos (60-120 s at 1.5 s) with moments anywhere in them -> data config path."""
    return synthetic_tvr.generate_corpus(
        tmp_path_factory.mktemp("long_videos"), n_train_videos=10, n_val_videos=10, n_test_videos=10,
        n_train_queries=20, n_val_queries=20, n_test_queries=4, visual_dim=4, text_dim=4, query_dim=4,
        min_duration=60.0, max_duration=120.0, seed=0)


def clip_counts(config_path, split):
    return [int(np.ceil(duration / 1.5)) for duration, _ in
            load_json(load_data_config(config_path).video_duration_idx_path)[split].values()]


def test_videos_longer_than_max_ctx_len_are_counted_per_split(long_video_corpus, capsys):
    counts, problems, _ = check_data.check_corpus(long_video_corpus, max_ctx_len=60)
    assert problems == []
    for split in ("train", "val", "test_public"):
        clips = clip_counts(long_video_corpus, split)
        assert counts[split]["long_videos"] == sum(n > 60 for n in clips) > 0
        assert counts[split]["longest_clips"] == max(clips)
    longest = counts["val"]["longest_clips"]

    assert check_data.main(["--dataset_config", long_video_corpus, "--max_ctx_len", "60"]) == 0
    out = capsys.readouterr().out
    assert (f"  val: {counts['val']['long_videos']} of 10 videos are longer than --max_ctx_len 60 clips (longest "
            f"{longest} clips = {longest * 1.5:g} s): read as overlapping windows with train.py --window_stride N, "
            f"truncated to their first 60 clips without it") in out
    assert check_data.main(["--dataset_config", long_video_corpus, "--max_ctx_len", "60", "--window_stride", "30"]) == 0
    assert "read as overlapping windows of 60 clips with --window_stride 30" in capsys.readouterr().out
    assert check_data.main(["--dataset_config", long_video_corpus]) == 0  # max_ctx_len 100: every video fits
    assert "longer than" not in capsys.readouterr().out


def test_windows_label_moments_on_the_whole_video(tmp_path, long_video_corpus):
    """A zero-length moment on a clip boundary past the first max_ctx_len clips: truncation clamps it to the last
    clip read (a usable label), windows label it on the whole video, where it is st > ed."""
    root = tmp_path / "copy"
    shutil.copytree(os.path.dirname(long_video_corpus), root)
    saved = json.load(open(root / "tvr_data_config.json"))
    json.dump(dict(saved, root_path=str(root)), open(root / "tvr_data_config.json", "w"))
    config_path = str(root / "tvr_data_config.json")
    config = load_data_config(config_path)
    val = load_jsonl(config.eval_data_path)
    val[0]["ts"] = [30 * 1.5, 30 * 1.5]  # clip boundary 30; every video has at least 40 clips
    save_jsonl(val, config.eval_data_path)
    assert check_data.check_corpus(config_path, splits=["val"], max_ctx_len=20, ranklists=False)[1] == []
    _, problems, _ = check_data.check_corpus(config_path, splits=["val"], max_ctx_len=20, ranklists=False,
                                             window_stride=10)
    assert len(problems) == 1 and f"(desc_id {val[0]['desc_id']}): training cannot label it: ts [45.0, 45.0]" in \
        problems[0] and "gives (st, ed) = (30, 29)" in problems[0]


def test_bad_window_stride_is_a_one_line_error():
    result = subprocess.run([sys.executable, "-m", "utils.check_data", "--dataset_config", "unused.json",
                             "--max_ctx_len", "60", "--window_stride", "61"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("error: --window_stride 61: expected 0 (read only the first --max_ctx_len clips, as the "
                             "original) or a clip count in [1, --max_ctx_len 60]\n")


def test_a_corpus_without_any_ranklist_says_the_first_stage_comes_next(tmp_path, tiny_corpus, capsys):
    root = tmp_path / "no_lists"
    shutil.copytree(os.path.dirname(tiny_corpus), root)
    saved = dict(load_json(root / "tvr_data_config.json"), root_path=str(root))
    with open(root / "tvr_data_config.json", "w") as f:
        json.dump(saved, f)
    shutil.rmtree(root / saved["eval_first_VR_ranklist_path_hero"])
    assert check_data.main(["--dataset_config", str(root / "tvr_data_config.json")]) == 2  # one list missing
    assert "ranklist store" in capsys.readouterr().out
    for key in ("train_first_VR_ranklist_path", "test_public_first_VR_ranklist_path_hero"):
        shutil.rmtree(root / saved[key])
    assert check_data.main(["--dataset_config", str(root / "tvr_data_config.json")]) == 0
    out = capsys.readouterr().out
    assert ("No first-stage ranklists yet (not checked): the first stage comes next, scripts/train_first_stage.sh "
            "then scripts/rank_first_stage.sh, whose last line names the data config to check and train on") in out
    assert "ranklist store" not in out and "OK: no problems found" in out


def test_a_search_only_corpus_is_checked_by_its_stores(tmp_path, capsys):
    from utils.build_corpus import build_corpus
    from utils.synthetic_models import save_random_text_model

    feats = tmp_path / "feats"
    feats.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.save(feats / f"v{i}.npy", rng.normal(size=(3 + i, 5)).astype(np.float32))
    summary = build_corpus(str(tmp_path / "search"), None, None, [str(feats)], 1.5,
                           text_encoder=save_random_text_model(tmp_path / "text"), text_encoder_device="cpu",
                           progress=False)
    config_path = summary["data_config"]
    # The default --ctx_mode visual_sub would ask for a subtitle store: a search-only corpus's own ctx_mode decides.
    assert check_data.main(["--dataset_config", config_path]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["A search-only corpus: 4 videos and no queries, to be indexed with `python -m method.search "
                       "build` (its splits, ranklists and labels are not checked)", "OK: no problems found"]

    config = load_data_config(config_path)
    table = load_json(config.video_duration_idx_path)
    table["test_public"]["v9"] = [3.0, 4]
    with open(config.video_duration_idx_path, "w") as f:
        json.dump(table, f)
    close_store(config.vid_feat_path)
    env = lmdb.open(config.vid_feat_path)
    with env.begin(write=True) as txn:
        txn.put(b"v2", encode_video_features(np.ones((5, 6), np.float32)))
    env.close()
    n_videos, problems, _ = check_data.check_search_corpus(config_path)
    assert n_videos == 5 and len(problems) == 2
    assert re.search(r"video store .*: key 'v9' not found", problems[0])
    assert re.search(r"video store .*: key 'v2' has feature dim 6, while 3 keys have dim 5", problems[1])
    # --ctx_mode visual_sub asks for the subtitle store, which this visual corpus does not have.
    assert check_data.main(["--dataset_config", config_path, "--ctx_mode", "visual_sub"]) == 2
    out = capsys.readouterr().out
    assert "3 problem(s)" in out and re.search(r"subtitle store .*: expected an LMDB directory holding data.mdb", out)
