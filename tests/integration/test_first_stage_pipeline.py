"""The pipeline without a given first stage, on a copy of the tiny corpus with its ranklists removed: first-stage
training through train.py (resume, torchrun), ranking with method.rank_first_stage (release layout, select100,
data config, check_data, bad inputs), then CONQUER trained and evaluated on the new lists."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from method.checkpoint import load_checkpoint
from method.rank_first_stage import load_first_stage, main as rank_main
from utils import check_data
from utils.data_config import load_data_config
from utils.errors import ConquerError
from utils.feature_stores import RanklistStore, write_video_store
from utils.io_utils import load_json, load_jsonl, save_json, save_jsonl
from utils.run_dir import REPO_ROOT
from utils.synthetic_tvr import generate_corpus
from utils.tvr_format import SPLIT_FILE_KEYS

pytestmark = pytest.mark.usefixtures("one_thread")
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1")
RANKLIST_KEYS = [key for _, key in SPLIT_FILE_KEYS.values()]


@pytest.fixture(scope="module")
def corpus(tiny_corpus, tmp_path_factory):
    """The tiny corpus without ranklists (its config still names them: they are what the first stage writes)."""
    root = tmp_path_factory.mktemp("no_ranklists") / "corpus"
    shutil.copytree(os.path.dirname(tiny_corpus), root)
    config = load_json(root / "tvr_data_config.json")
    config["root_path"] = str(root)
    for key in RANKLIST_KEYS:
        shutil.rmtree(root / config[key])
    save_json(config, root / "tvr_data_config.json")
    return str(root / "tvr_data_config.json")


@pytest.fixture(scope="module")
def model_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("first_stage_config") / "config.json"
    save_json(dict(load_json(os.path.join(REPO_ROOT, "config", "first_stage_config.json")), dropout=0.0), path)
    return str(path)


def first_stage_flags(corpus, model_config, tiny_corpus_kwargs, results_root, n_epoch=2):
    k = tiny_corpus_kwargs
    return ["--model", "first_stage", "--model_config", model_config, "--dataset_config", corpus,
            "--visual_dim", str(k["visual_dim"]), "--text_dim", str(k["text_dim"]), "--query_dim", str(k["query_dim"]),
            "--hidden_dim", "16", "--max_ctx_len", "30", "--device", "-1", "--num_workers", "0", "--bsz", "8",
            "--lr", "1e-3", "--stop_task", "VR", "--eval_tasks_at_training", "VR", "--max_es_cnt", "-1",
            "--n_epoch", str(n_epoch), "--exp_id", "fs", "--results_root", str(results_root)]


@pytest.fixture(scope="module")
def run_dir(corpus, model_config, tiny_corpus_kwargs, tmp_path_factory):
    return train.main(first_stage_flags(corpus, model_config, tiny_corpus_kwargs, tmp_path_factory.mktemp("runs")))


@pytest.fixture(scope="module")
def ranked(run_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ranked") / "lists"
    rank_main(["--model_dir", run_dir, "--out_dir", str(out_dir)])
    return str(out_dir)


def test_training_writes_a_first_stage_run(run_dir):
    opt = load_json(os.path.join(run_dir, "opt.json"))
    assert opt["model"] == "first_stage" and list(opt)[list(opt).index("gate_per_query") + 1] == "model"
    with open(os.path.join(run_dir, "eval.log.txt")) as f:
        logged = [json.loads(line.split(" [Metrics] ")[1]) for line in f]
    assert len(logged) == 3 and all(set(m) == {"VR"} for m in logged)  # epochs -1, 0, 1
    assert "query_to_video_nce" in open(os.path.join(run_dir, "train.log.txt")).read()
    names = os.listdir(run_dir)
    assert {"model.ckpt", "last.ckpt", "tensorboard_log"} <= set(names)
    assert any(n.startswith("best_") and n.endswith("_metrics.json") for n in names)
    # The kept checkpoint is the first epoch of the best R@10 + R@100 (a first stage's stop metric), not R@1.
    scores = [m["VR"]["r10"] + m["VR"]["r100"] for m in logged]
    assert load_checkpoint(os.path.join(run_dir, "model.ckpt"))["epoch"] == scores.index(max(scores)) - 1


def test_resume_equals_uninterrupted_run(run_dir, corpus, model_config, tiny_corpus_kwargs, tmp_path):
    partial = train.main(first_stage_flags(corpus, model_config, tiny_corpus_kwargs, tmp_path, n_epoch=1))
    train.main(["--resume", partial, "--n_epoch", "2"])
    resumed, full = (load_checkpoint(os.path.join(d, "last.ckpt")) for d in (partial, run_dir))
    for name, weight in full["model"].items():
        assert torch.equal(resumed["model"][name], weight), name
    assert open(os.path.join(partial, "eval.log.txt")).read().count("[Epoch]") == 3


def test_torchrun_step_equals_one_process_step(corpus, model_config, tiny_corpus_kwargs, tmp_path):
    """One optimizer step of a global batch of 8 on 2 ranks (in-batch negatives gathered across the ranks)."""
    flags = first_stage_flags(corpus, model_config, tiny_corpus_kwargs, tmp_path / "ddp", n_epoch=1) + [
        "--disable_eval", "--data_ratio", "0.2", "--no_eval_untrained"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py"]
    result = subprocess.run(command + flags, cwd=REPO_ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    (ddp_dir,) = [os.path.join(tmp_path / "ddp", d) for d in os.listdir(tmp_path / "ddp")]
    single_dir = train.main([str(tmp_path / "single") if f == str(tmp_path / "ddp") else f for f in flags])
    ddp, single = (load_checkpoint(os.path.join(d, "last.ckpt")) for d in (ddp_dir, single_dir))
    assert ddp["global_step"] == single["global_step"] == 1
    for name, weight in single["model"].items():
        assert torch.allclose(ddp["model"][name], weight, rtol=0, atol=1e-6), name


def brute_force_ranking(run_dir, config_path, split):
    """Every (query, video) pair scored on its own, in plain Python loops over the clips."""
    model, opt = load_first_stage(run_dir, torch.device("cpu"))
    from method.first_stage import QueryItems, VideoItems, split_queries, split_videos
    config = load_data_config(config_path)
    rows, video2idx = split_queries(config, split), split_videos(config, split)
    videos = VideoItems(config, list(video2idx), opt["max_ctx_len"], opt["ctx_mode"])
    queries = QueryItems(config, rows, opt["max_desc_len"])
    ranking = {}
    with torch.no_grad():
        video_embs = [model.encode_videos({m: {k: v[None] for k, v in t.items()} for m, t in videos[i].items()})
                      for i in range(len(videos))]
        for i, row in enumerate(rows):
            item = queries[i]
            q = model.encode_queries(item["feat"][None], item["feat_mask"][None])
            scores = []
            for name, emb in zip(videos.names, video_embs):
                valid = emb["clip_mask"][0]
                score = sum(float(q["modality_weights"][0, m]) * float((emb["clips"][0, m, valid] @ q["query"][0, m]).max())
                            for m in range(q["query"].shape[1]))
                scores.append((video2idx[name], score))
            ranking[row["desc_id"]] = scores
    return rows, ranking


def test_ranklists_in_the_release_layout_equal_brute_force(ranked, run_dir, corpus, tiny_corpus_kwargs):
    config = load_json(os.path.join(ranked, "data_config.json"))
    for split, top in (("val", 100), ("train", 2000), ("test_public", 100)):
        store = RanklistStore(config[SPLIT_FILE_KEYS[split][1]])
        rows, ranking = brute_force_ranking(run_dir, corpus, split)
        assert sorted(store.keys()) == sorted(str(row["desc_id"]) for row in rows)
        for row in rows:
            written = store.get(row["desc_id"])
            expected = sorted(ranking[row["desc_id"]], key=lambda pair: -pair[1])[:top]
            assert len(written) == min(top, len(expected))
            assert [s for _, s in written] == pytest.approx([s for _, s in expected], abs=1e-5)
            assert all(a[1] >= b[1] for a, b in zip(written, written[1:]))
            by_idx = dict(ranking[row["desc_id"]])
            assert all(abs(by_idx[idx] - score) < 1e-5 for idx, score in written)


def test_select100_config_and_metrics(ranked, corpus):
    config = load_json(os.path.join(ranked, "data_config.json"))
    original = load_json(corpus)
    changed = {key for key in original if config[key] != original[key]}
    assert changed == set(RANKLIST_KEYS) | {"train_data_path"} and list(config) == list(original)
    store = RanklistStore(config["train_first_VR_ranklist_path"])
    train_rows = load_jsonl(load_data_config(corpus).train_data_path)
    video2idx = {name: idx for name, (_, idx) in load_json(load_data_config(corpus).video_duration_idx_path)["train"].items()}
    expected = [row for row in train_rows
                if video2idx[row["vid_name"]] in [idx for idx, _ in store.get(row["desc_id"])[:100]]]
    assert load_jsonl(config["train_data_path"]) == expected
    metrics = load_json(os.path.join(ranked, "metrics.json"))
    assert metrics["train"]["select100"] == {"kept": len(expected), "dropped": len(train_rows) - len(expected)}
    assert set(metrics["val"]["first_stage"]) >= {"r1", "r5", "r10", "r100", "gt_in_top_max_vcmr_video"}
    assert metrics["val"]["input_ranklist"] is None  # the corpus had no lists
    assert metrics["val"]["first_stage"]["r100"] == 100.0  # 20 val videos: all are in the list
    assert check_data.main(["--dataset_config", os.path.join(ranked, "data_config.json")]) == 0


def test_conquer_trains_and_evaluates_on_the_new_lists(ranked, tiny_train_flags, tmp_path):
    flags = [f for f in tiny_train_flags]
    flags[flags.index("--dataset_config") + 1] = os.path.join(ranked, "data_config.json")
    run = train.main(flags + ["--n_epoch", "1", "--use_interal_vr_scores", "--exp_id", "conquer", "--results_root",
                              str(tmp_path), "--no_eval_untrained"])
    logged = open(os.path.join(run, "eval.log.txt")).read()
    assert '"VCMR"' in logged and '"VR"' in logged


def test_rank_input_ranklist_metrics_sit_beside(run_dir, tiny_corpus, tmp_path):
    rank_main(["--model_dir", run_dir, "--dataset_config", tiny_corpus, "--splits", "val", "--out_dir",
               str(tmp_path / "out")])
    metrics = load_json(tmp_path / "out" / "metrics.json")
    assert metrics["val"]["input_ranklist"]["r100"] > 0 and list(metrics) == ["val"]
    config = load_json(tmp_path / "out" / "data_config.json")
    assert config["train_data_path"] == load_json(tiny_corpus)["train_data_path"]  # train not ranked: unchanged


def broken_corpus(corpus, tmp_path, edit):
    root = tmp_path / "broken"
    shutil.copytree(os.path.dirname(corpus), root)
    config = load_json(root / "tvr_data_config.json")
    config["root_path"] = str(root)
    save_json(config, root / "tvr_data_config.json")
    edit(root, config)
    return str(root / "tvr_data_config.json")


def rewrite_video(root, config, features):
    path = root / config["vid_feat_path"]
    video2idx = load_json(root / config["video_duration_idx_path"])["val"]
    names = list(video2idx)
    from utils.feature_stores import VideoFeatureStore
    store = VideoFeatureStore(str(path))
    stored = {name: store.get(name) for name in store.keys()}
    stored[names[0]] = features(stored[names[0]])
    write_video_store(str(path), stored)


@pytest.mark.parametrize("edit, message", [
    (lambda root, config: save_jsonl([], root / config["eval_data_path"]), "split 'val' has no queries"),
    (lambda root, config: save_jsonl(load_jsonl(root / config["eval_data_path"]) + [
        dict(load_jsonl(root / config["eval_data_path"])[0], desc_id=99999)], root / config["eval_data_path"]),
     "query desc_id 99999: query store .* key '99999' not found"),
    (lambda root, config: rewrite_video(root, config, lambda f: f[:, :5]), "expected feature dim 12, found 5"),
    (lambda root, config: rewrite_video(root, config, lambda f: np.where(np.arange(len(f))[:, None] == 1, np.nan, f)),
     "NaN/inf in row 1"),
])
def test_bad_inputs_stop_with_one_line_and_no_output(run_dir, corpus, tmp_path, edit, message):
    config = broken_corpus(corpus, tmp_path, edit)
    out_dir = tmp_path / "out"
    with pytest.raises(ConquerError, match=message) as error:
        rank_main(["--model_dir", run_dir, "--dataset_config", config, "--splits", "val", "--out_dir", str(out_dir)])
    assert "\n" not in str(error.value)
    assert not os.path.exists(out_dir) and not any(p.name.startswith("out.partial") for p in tmp_path.iterdir())


def test_default_splits_are_those_with_queries_and_the_last_line_names_the_config(run_dir, corpus, tmp_path, capsys):
    """A corpus without test_public queries (as utils/build_corpus.py writes one), FAISS with a sampled check."""
    config = broken_corpus(corpus, tmp_path, lambda root, config: save_jsonl([], root / config["test_data_path"]))
    out_dir = tmp_path / "out"
    rank_main(["--model_dir", run_dir, "--dataset_config", config, "--out_dir", str(out_dir), "--faiss",
               "--faiss_check_queries", "5", "--eval_top", "10"])
    metrics = load_json(out_dir / "metrics.json")
    assert list(metrics) == ["train", "val"]
    assert metrics["val"]["faiss_recall_vs_exact"]["queries_checked"] == 5
    assert metrics["val"]["faiss_recall_vs_exact"]["k"] == metrics["val"]["list_length"] == 10
    printed = capsys.readouterr().out.splitlines()
    assert "val          FAISS recall@10 vs exact (5 sampled queries)" in "\n".join(printed)
    assert printed[-1] == f"Train with: --dataset_config {out_dir}/data_config.json"


def test_existing_out_dir_is_an_error(run_dir, ranked):
    result = subprocess.run([sys.executable, "-m", "method.rank_first_stage", "--model_dir", run_dir, "--out_dir", ranked],
                            cwd=REPO_ROOT, env=CHILD_ENV, capture_output=True, text=True)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].endswith("exists; remove it or pass "
                                                                                    "another --out_dir")


# ----------------------------------------------------------------------------------------------------
# long videos read as windows (--window_stride)

WINDOW_L, WINDOW_STRIDE = 20, 10


@pytest.fixture(scope="module")
def long_corpus(tiny_corpus_kwargs, tmp_path_factory):
    """Videos of 40-80 clips (60-120 s): 3 to 7 windows of 20 clips every 10; twice the training queries of the
    tiny corpus and less query noise, so that a few seconds of training learn the planted signal."""
    kwargs = dict(tiny_corpus_kwargs, n_train_queries=96, min_duration=60.0, max_duration=120.0, noise=0.5)
    return generate_corpus(tmp_path_factory.mktemp("long_videos"), **kwargs)


def set_flag(flags, name, value):
    flags = list(flags)
    flags[flags.index(name) + 1] = value
    return flags


@pytest.fixture(scope="module")
def window_run(long_corpus, model_config, tiny_corpus_kwargs, tmp_path_factory):
    """10 epochs without evaluation (the kept checkpoint is the last: 20 val videos are too few to pick one)."""
    flags = first_stage_flags(long_corpus, model_config, tiny_corpus_kwargs, tmp_path_factory.mktemp("window_runs"),
                              n_epoch=10)
    for name, value in (("--max_ctx_len", str(WINDOW_L)), ("--hidden_dim", "32"), ("--lr", "3e-3")):
        flags = set_flag(flags, name, value)
    return train.main(flags + ["--window_stride", str(WINDOW_STRIDE), "--disable_eval"])


@pytest.fixture(scope="module")
def window_ranked(window_run, tmp_path_factory):
    """{"windows": lists ranked with the run's windows (--window_lists), "truncated": the same model reading only
    the first 20 clips of a video (its opt.json with window_stride 0), train split only}."""
    root = tmp_path_factory.mktemp("window_ranked")
    rank_main(["--model_dir", window_run, "--out_dir", str(root / "windows"), "--window_lists"])
    truncated_run = root / "truncated_run"
    shutil.copytree(window_run, truncated_run)
    save_json(dict(load_json(truncated_run / "opt.json"), window_stride=0), truncated_run / "opt.json")
    rank_main(["--model_dir", str(truncated_run), "--out_dir", str(root / "truncated"), "--splits", "train"])
    return {"windows": str(root / "windows"), "truncated": str(root / "truncated")}


def brute_force_windows(run_dir, config_path, split):
    """{desc_id: {video_idx: (score, best start)}}: every window of every video encoded alone (unpadded) and
    scored against each query on its own; a video's score is its best window's (the earliest on ties)."""
    from method.first_stage import QueryItems, VideoItems, split_queries, split_videos
    from utils.windows import window_starts
    model, opt = load_first_stage(run_dir, torch.device("cpu"))
    config = load_data_config(config_path)
    rows, video2idx = split_queries(config, split), split_videos(config, split)
    videos = VideoItems(config, list(video2idx), opt["max_ctx_len"], opt["ctx_mode"], window_stride=WINDOW_STRIDE)
    queries = QueryItems(config, rows, opt["max_desc_len"])
    with torch.no_grad():
        query_embs = [model.encode_queries(queries[i]["feat"][None], queries[i]["feat_mask"][None])
                      for i in range(len(rows))]
        best = {row["desc_id"]: {} for row in rows}
        for name in videos.names:
            features = videos.read_video(name)
            assert len(features["visual"]) > WINDOW_L  # every video is read as several windows
            for start in window_starts(len(features["visual"]), WINDOW_L, WINDOW_STRIDE):
                window = {m: torch.from_numpy(f[start:start + WINDOW_L])[None] for m, f in features.items()}
                mask = torch.ones(1, WINDOW_L, dtype=torch.int64)
                emb = model.encode_videos({m: {"feat": f, "feat_mask": mask} for m, f in window.items()})
                for row, q in zip(rows, query_embs):
                    score = float(model.score(q, emb))
                    if score > best[row["desc_id"]].get(video2idx[name], (float("-inf"), None))[0]:
                        best[row["desc_id"]][video2idx[name]] = (score, start)
    return rows, best


def test_window_ranklists_are_the_best_window_scores(window_ranked, window_run, long_corpus):
    assert load_json(os.path.join(window_run, "opt.json"))["window_stride"] == WINDOW_STRIDE
    out = window_ranked["windows"]
    config = load_json(os.path.join(out, "data_config.json"))
    rows, best = brute_force_windows(window_run, long_corpus, "val")
    store = RanklistStore(config[SPLIT_FILE_KEYS["val"][1]])
    window_lists = {line["desc_id"]: line["windows"]
                    for line in load_jsonl(os.path.join(out, "val_top100_windows.jsonl"))}
    assert sorted(window_lists) == sorted(row["desc_id"] for row in rows)
    for row in rows:
        written, expected = store.get(row["desc_id"]), best[row["desc_id"]]
        assert sorted(idx for idx, _ in written) == sorted(expected)  # one entry per video (20 val videos)
        assert [s for _, s in written] == pytest.approx(sorted((s for s, _ in expected.values()), reverse=True),
                                                         abs=1e-5)
        assert all(abs(expected[idx][0] - score) < 1e-5 for idx, score in written)
        windows = window_lists[row["desc_id"]]
        assert [[idx, score] for idx, _, score in windows] == [list(pair) for pair in written]
        assert all(start == expected[idx][1] for idx, start, _ in windows)
    metrics = load_json(os.path.join(out, "metrics.json"))
    assert metrics["val"]["window_list"] == os.path.join(out, "val_top100_windows.jsonl")
    assert {name for name in os.listdir(out) if name.endswith("_windows.jsonl")} == {
        "train_top2000_windows.jsonl", "val_top100_windows.jsonl", "test_public_top100_windows.jsonl"}
    assert check_data.main(["--dataset_config", os.path.join(out, "data_config.json")]) == 0


def test_windows_rank_videos_by_moments_past_the_first_window(window_ranked, long_corpus, window_run):
    """Training queries whose moment starts past clip 20: read truncated, their GT video is ranked by chance
    (mean rank ~11.5 of 24); read as windows it is found (mean rank ~3: 0.24-0.31 of the truncated one on three
    corpus seeds), and its best window mostly overlaps the moment."""
    config = load_data_config(long_corpus)
    video2idx = {name: idx for name, (_, idx) in load_json(config.video_duration_idx_path)["train"].items()}
    late = [row for row in load_jsonl(config.train_data_path) if row["ts"][0] // 1.5 >= WINDOW_L]
    assert len(late) > 30
    mean_rank = {}
    for kind, out in window_ranked.items():
        store = RanklistStore(load_json(os.path.join(out, "data_config.json"))[SPLIT_FILE_KEYS["train"][1]])
        ranks = [[idx for idx, _ in store.get(row["desc_id"])].index(video2idx[row["vid_name"]]) for row in late]
        mean_rank[kind] = sum(ranks) / len(ranks)
    assert mean_rank["windows"] < 0.6 * mean_rank["truncated"], mean_rank
    lists = {line["desc_id"]: line["windows"]
             for line in load_jsonl(os.path.join(window_ranked["windows"], "train_top2000_windows.jsonl"))}
    overlapping = 0
    for row in late:
        (start,) = [start for idx, start, _ in lists[row["desc_id"]] if idx == video2idx[row["vid_name"]]]
        overlapping += start <= row["ts"][1] // 1.5 and row["ts"][0] // 1.5 < start + WINDOW_L
    assert overlapping > 0.5 * len(late)
