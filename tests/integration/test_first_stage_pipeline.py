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


def test_existing_out_dir_is_an_error(run_dir, ranked):
    result = subprocess.run([sys.executable, "-m", "method.rank_first_stage", "--model_dir", run_dir, "--out_dir", ranked],
                            cwd=REPO_ROOT, env=CHILD_ENV, capture_output=True, text=True)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].endswith("exists; remove it or pass "
                                                                                    "another --out_dir")
