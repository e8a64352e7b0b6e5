"""utils.build_corpus: the stores hold exactly the inputs, the layout loads and checks, bad input stops cleanly."""
import json
import os
import shutil

import h5py
import numpy as np
import pytest

from config.options import BaseOptions
from utils import build_corpus as build_corpus_module
from utils.build_corpus import build_corpus, main, training_flags
from utils.check_data import check_corpus
from utils.corpus_formats import CorpusInputError, subtitle_clip_features
from utils.data_config import load_data_config
from utils.feature_stores import QueryFeatureStore, SubtitleFeatureStore, decode_video_features, _open_env
from utils.io_utils import load_json
from utils.provenance import provenance, provenance_difference, read_recipe, write_recipe
from utils.synthetic_models import save_random_text_model
from utils.text_encoder import TextEncoder
from utils.run_dir import REPO_ROOT

CLIP = 1.5


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def raw_video(path, name, n_clips, dim, seed):
    features = np.random.default_rng(seed).normal(size=(n_clips, dim)).astype(np.float32)
    np.save(os.path.join(path, f"{name}.npy"), features)
    return features


def raw_tvr_corpus(root, dim=6, n_videos=(3, 2)):
    """TVR-format annotations, per-video .npy features, jsonl subtitles -> dict of paths and arrays."""
    feats = root / "feats"
    feats.mkdir()
    arrays, splits, subs = {}, {}, []
    desc_id = 0
    for split, n in zip(("train", "val"), n_videos):
        rows = []
        for v in range(n):
            name = f"{split}_{v}"
            arrays[name] = raw_video(feats, name, 4 + v, dim, seed=len(arrays))
            duration = (4 + v) * CLIP - 0.3
            for q in range(2):
                rows.append(dict(desc_id=desc_id, desc=f"the man opens door {q}", vid_name=name, duration=duration,
                                 ts=[0.5, 2.0 + q], type="v"))
                desc_id += 1
            subs.append(dict(vid_name=name, sub=[dict(text="hello there", start=0.2, end=1.4),
                                                 dict(text="how are you", start=1.0, end=3.2)]))
        splits[split] = write_jsonl(root / f"{split}.jsonl", rows)
    return dict(annotations=splits, feats=str(feats), arrays=arrays, subtitles=write_jsonl(root / "subs.jsonl", subs))


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return save_random_text_model(tmp_path_factory.mktemp("tiny_roberta"))


def stored_video(store_path, name):
    with _open_env(os.path.realpath(store_path)).begin() as txn:
        return decode_video_features(txn.get(name.encode()))


def test_text_corpus_stores_equal_inputs_and_encoder(tmp_path, text_model):
    raw = raw_tvr_corpus(tmp_path)
    out = tmp_path / "corpus"
    summary = build_corpus(str(out), "tvr", raw["annotations"], [raw["feats"]], CLIP, subtitles=raw["subtitles"],
                           text_encoder=text_model, text_encoder_device="cpu", l2_normalize=False, progress=False)
    config = load_data_config(summary["data_config"])
    assert config.root_path == str(out) and config.ctx_mode == "visual_sub"
    assert config.text_encoder["name_or_path"] == text_model
    for name, array in raw["arrays"].items():  # bitwise, as given
        stored = stored_video(config.vid_feat_path, name)
        assert stored.dtype == np.float32 and np.array_equal(stored, array)

    encoder = TextEncoder(text_model, device="cpu")
    query_store = QueryFeatureStore(config.desc_bert_path)
    rows = [json.loads(line) for line in open(config.train_data_path)]
    assert rows[0] == dict(desc_id=0, desc="the man opens door 0", vid_name="train_0", duration=5.7, ts=[0.5, 2.0],
                           type="v")
    texts = [r["desc"] for r in rows]
    expected = encoder.encode_tokens(texts)
    for row, tokens in zip(rows, expected):
        assert np.array_equal(query_store.get(row["desc_id"]), tokens)
    direct = encoder.model(**encoder.tokenizer(texts[0], return_tensors="pt")).last_hidden_state[0]
    assert np.allclose(expected[0], direct.detach().numpy(), atol=1e-5)

    sub_store = SubtitleFeatureStore(config.sub_bert_path)
    sentence_tokens = encoder.encode_tokens(["hello there", "how are you"])
    for name, array in raw["arrays"].items():
        sentences = [dict(start=0.2, end=1.4), dict(start=1.0, end=3.2)]
        assert np.array_equal(sub_store.get(name), subtitle_clip_features(sentences, sentence_tokens, len(array), CLIP))
        assert not sub_store.get(name)[3:].any()  # no subtitle after 3.2 s

    video2dur = json.load(open(config.video_duration_idx_path))
    assert video2dur["val"] == {"val_0": [5.7, 3], "val_1": [7.2, 4]} and video2dur["test_public"] == {}
    assert summary["dims"] == dict(visual=6, text=16, query=16)
    counts, problems, _ = check_corpus(summary["data_config"], ranklists=False)
    assert problems == [] and counts["train"]["queries"] == 6 and counts["val"]["videos"] == 2
    assert training_flags(summary)[-6:] == ["--visual_dim", "6", "--query_dim", "16", "--text_dim", "16"]


def test_feature_sets_are_normalised_resampled_and_concatenated(tmp_path):
    raw = raw_tvr_corpus(tmp_path, n_videos=(1, 1))
    half = tmp_path / "half_second"
    half.mkdir()
    queries = tmp_path / "queries"
    queries.mkdir()
    second = {name: raw_video(half, name, 3 * len(a), 3, seed=10 + i) for i, (name, a) in enumerate(raw["arrays"].items())}
    for desc_id in range(4):
        raw_video(queries, str(desc_id), 5, 7, seed=desc_id)
    summary = build_corpus(str(tmp_path / "c"), "tvr", raw["annotations"], [raw["feats"], str(half)], CLIP,
                           video_feature_clip_lengths=[CLIP, 0.5], query_features=str(queries), progress=False)
    config = load_data_config(summary["data_config"])
    for name, first in raw["arrays"].items():
        # 0.5-s rows -> 1.5-s clips: the mean of each run of three rows; then each set L2-normalised.
        coarse = second[name].astype(np.float64).reshape(len(first), 3, 3).mean(axis=1)
        expected = np.concatenate([first / (np.linalg.norm(first, axis=1, keepdims=True) + 1e-5),
                                   coarse / (np.linalg.norm(coarse, axis=1, keepdims=True) + 1e-5)], axis=1)
        assert np.allclose(stored_video(config.vid_feat_path, name), expected, atol=1e-6)
    assert np.array_equal(QueryFeatureStore(config.desc_bert_path).get(3), np.load(queries / "3.npy"))
    assert summary["ctx_mode"] == "visual" and "--text_dim" not in training_flags(summary)


def didemo_raw(tmp_path):
    feats = tmp_path / "resnet.h5"
    rows = {"train": [dict(annotation_id=10, description="a dog", video="a.mp4", times=[[1, 1], [1, 2], [1, 2], [0, 0]])],
            "val": [dict(annotation_id=11, description="a cat", video="b.mp4", times=[[0, 1], [5, 5], [0, 1], [2, 2]]),
                    dict(annotation_id=12, description="a car", video="b.mp4", times=[[1, 1], [1, 1], [2, 2]])]}
    with h5py.File(feats, "w") as f:
        f.create_dataset("a.mp4", data=np.ones((12, 4), dtype=np.float32))
        f.create_dataset("b.mp4", data=np.ones((9, 4), dtype=np.float32))  # 22.5 s: segment 5 (25-30 s) is outside
    paths = {}
    for split, split_rows in rows.items():
        paths[split] = str(tmp_path / f"{split}_data.json")
        json.dump(split_rows, open(paths[split], "w"))
    queries = tmp_path / "queries.h5"
    with h5py.File(queries, "w") as f:
        for desc_id in (10, 11, 12):
            f.create_dataset(str(desc_id), data=np.full((3, 5), desc_id, dtype=np.float32))
    return paths, str(feats), str(queries)


def test_didemo_corpus_labels_durations_and_clipping(tmp_path):
    paths, feats, queries = didemo_raw(tmp_path)
    summary = build_corpus(str(tmp_path / "didemo"), "didemo", paths, [feats], 2.5, query_features=queries,
                           progress=False)
    config = load_data_config(summary["data_config"])
    assert config.dset_name == "didemo" and config.ctx_mode == "visual" and config.text_encoder is None
    train = [json.loads(line) for line in open(config.train_data_path)]
    val = [json.loads(line) for line in open(config.eval_data_path)]
    assert train[0]["ts"] == [5.0, 15.0] and train[0]["duration"] == 30.0  # most agreed (1, 2); 12 clips x 2.5 s
    assert val[0]["duration"] == 22.5
    assert val[0]["ts"] == [[0.0, 10.0], [22.5, 22.5], [0.0, 10.0], [10.0, 15.0]]  # all 4, most agreed first, clipped
    assert val[1]["ts"] == [5.0, 10.0]  # 3 annotators: the most agreed one
    assert summary["warnings"] == ["warning: 1 moments outside their video, clipped to it "
                                   "(first: desc_id 11: [25.0, 30.0] on 22.5 s)"]
    counts, problems, _ = check_corpus(summary["data_config"], ranklists=False, ctx_mode="visual")
    assert problems == [] and counts["val"] == dict(queries=2, videos=1, problems=0, long_videos=0, longest_clips=9)


def test_concurrent_builds_of_one_out_dir_keep_each_others_work(tmp_path, monkeypatch):
    """A second build of the same --out_dir runs while the first is writing (a fixed DIR.partial made it delete
    the first one's folder): it publishes its corpus, and the first stops with an error and removes only its own."""
    paths, feats, queries = didemo_raw(tmp_path)
    out = str(tmp_path / "didemo")
    write_query_store = build_corpus_module._write_query_store
    first_folder_during_second = []

    def second_build_meanwhile(store_path, *args):
        monkeypatch.setattr(build_corpus_module, "_write_query_store", write_query_store)
        first_folder = os.path.dirname(os.path.dirname(store_path))
        build_corpus(out, "didemo", paths, [feats], 2.5, query_features=queries, progress=False)
        first_folder_during_second.append(os.listdir(first_folder))
        return write_query_store(store_path, *args)

    monkeypatch.setattr(build_corpus_module, "_write_query_store", second_build_meanwhile)
    with pytest.raises(CorpusInputError, match="another build created it meanwhile"):
        build_corpus(out, "didemo", paths, [feats], 2.5, query_features=queries, progress=False)
    assert first_folder_during_second == [["video_feature"]]  # the first build's video store was untouched
    _, problems, _ = check_corpus(os.path.join(out, "data_config.json"), ranklists=False, ctx_mode="visual")
    assert problems == [] and [name for name in os.listdir(tmp_path) if name.startswith("didemo")] == ["didemo"]


def assert_fails_cleanly(tmp_path, match, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(CorpusInputError, match=match):
        build_corpus(str(out), progress=False, **kwargs)
    assert not [name for name in os.listdir(tmp_path) if name.startswith("out")]  # no corpus, no temporary folder


def test_bad_inputs_stop_with_file_and_key(tmp_path):
    raw = raw_tvr_corpus(tmp_path)
    queries = tmp_path / "queries"
    queries.mkdir()
    for desc_id in range(10):
        raw_video(queries, str(desc_id), 3, 4, seed=desc_id)
    base = dict(annotation_format="tvr", annotations=raw["annotations"], video_features=[raw["feats"]],
                clip_length=CLIP, query_features=str(queries))
    feats = raw["feats"]

    os.rename(f"{feats}/val_1.npy", f"{tmp_path}/val_1.npy")
    assert_fails_cleanly(tmp_path, "feats: no features for video 'val_1', named in the annotations", **base)
    np.save(f"{feats}/val_1.npy", np.zeros((5, 7), dtype=np.float32))
    assert_fails_cleanly(tmp_path, "key 'val_1': expected feature dim 6 .* found 7", **base)
    bad = np.zeros((5, 6), dtype=np.float32)
    bad[2, 1] = np.nan
    np.save(f"{feats}/val_1.npy", bad)
    assert_fails_cleanly(tmp_path, "key 'val_1': NaN or infinite value in row 2", **base)
    np.save(f"{feats}/val_1.npy", np.zeros((5, 6), dtype=np.float32))
    with open(f"{feats}/val_1.npy", "r+b") as f:
        f.truncate(100)
    assert_fails_cleanly(tmp_path, "val_1.npy: cannot read features of key 'val_1'", **base)
    np.save(f"{feats}/val_1.npy", np.zeros((5, 6), dtype=np.float32))

    rows = [json.loads(line) for line in open(raw["annotations"]["val"])]
    rows[1]["desc_id"] = 0
    duplicate = dict(base, annotations=dict(train=raw["annotations"]["train"],
                                            val=write_jsonl(tmp_path / "dup.jsonl", rows)))
    assert_fails_cleanly(tmp_path, "dup.jsonl: desc_id 0 appears twice", **duplicate)
    os.remove(queries / "9.npy")
    assert_fails_cleanly(tmp_path, "queries: no query features for desc_id 9", **base)

    (tmp_path / "out").mkdir()
    with pytest.raises(CorpusInputError, match="out: already exists"):
        build_corpus(str(tmp_path / "out"), progress=False, **base)


def test_cli_prints_counts_and_training_flags(tmp_path, capsys):
    paths, feats, queries = didemo_raw(tmp_path)
    main(["--out_dir", str(tmp_path / "c"), "--annotation_format", "didemo", "--annotations",
          f"train={paths['train']}", f"val={paths['val']}", "--video_features", feats, "--clip_length", "2.5",
          "--query_features", queries])
    printed = capsys.readouterr().out
    assert "val: 2 queries, 1 videos" in printed
    flags = "--dset_name didemo --train_set_honours_options --ctx_mode visual --clip_length 2.5 --max_ctx_len 12 " \
            "--visual_dim 4 --query_dim 5"
    # The first stage comes next; CONQUER's --dataset_config is the one ranking prints, so none is given here.
    assert printed.splitlines()[-5:] == [
        "No first-stage ranklists in this corpus; the first stage comes next:",
        f"  bash scripts/train_first_stage.sh fs GPU|cpu --dataset_config {tmp_path}/c/data_config.json {flags}",
        "  bash scripts/rank_first_stage.sh RUN_DIR GPU|cpu   # its last line: the --dataset_config to train CONQUER on",
        f"Corpus flags (first stage and CONQUER): {flags}",
        f"  (the same in {tmp_path}/c/options.json: pass --config {tmp_path}/c/options.json)"]
    # The options file, given to train.py's --config, sets exactly the printed flags.
    parser = BaseOptions()
    parser.initialize()
    from_file = vars(parser._parse_with_config(["--config", str(tmp_path / "c" / "options.json")]))
    assert from_file == vars(parser._parse_with_config(flags.split()))
    assert from_file != vars(parser._parse_with_config([]))
    assert "Train with" not in printed
    note = json.load(open(tmp_path / "c" / "data_config.json"))["first_stage_ranklists"]
    assert note.startswith("none in this corpus: scripts/rank_first_stage.sh writes them with the data config")
    assert "--window_stride" not in printed and "note:" not in printed  # every video fits: no windows


def long_video_corpus(tmp_path, n_clips):
    """A TVR-format corpus whose val videos have `n_clips` clips each; the training video has 4."""
    feats, queries = tmp_path / "feats", tmp_path / "queries"
    feats.mkdir()
    queries.mkdir()
    annotations = {}
    for split, clip_counts in (("train", [4]), ("val", n_clips)):
        rows = []
        for v, n in enumerate(clip_counts):
            name = f"{split}_{v}"
            raw_video(feats, name, n, 3, seed=v)
            desc_id = len(list(queries.iterdir()))
            raw_video(queries, str(desc_id), 2, 4, seed=desc_id)
            rows.append(dict(desc_id=desc_id, desc="q", vid_name=name, duration=n * CLIP, ts=[0.0, 3.0], type="v"))
        annotations[split] = write_jsonl(tmp_path / f"{split}.jsonl", rows)
    return ["--annotation_format", "tvr", "--annotations", f"train={annotations['train']}",
            f"val={annotations['val']}", "--video_features", str(feats), "--clip_length", str(CLIP),
            "--query_features", str(queries)]


def test_cli_prints_window_flags_for_videos_longer_than_the_model_limit(tmp_path, capsys):
    inputs = long_video_corpus(tmp_path, [250, 100, 130])
    summary = main(["--out_dir", str(tmp_path / "c")] + inputs)
    printed = capsys.readouterr().out
    assert ("note: 2 videos have more than 100 clips, the model's limit (longest: 'val_0', 250 clips = 375 s); they "
            "are read as overlapping windows of 100 clips every 50 clips (--window_stride 50 below") in printed
    assert "--max_ctx_len 100 --window_stride 50 --visual_dim 3 --query_dim 4" in printed
    assert summary["longest_video"] == dict(name="val_0", clips=250, seconds=375.0) and summary["n_long_videos"] == 2

    main(["--out_dir", str(tmp_path / "c20"), "--window_stride", "20"] + inputs)
    assert "--max_ctx_len 100 --window_stride 20 --visual_dim" in capsys.readouterr().out
    main(["--out_dir", str(tmp_path / "c0"), "--window_stride", "0"] + inputs)
    printed = capsys.readouterr().out
    assert "--window_stride" not in printed.split("Corpus flags (first stage and CONQUER): ")[1]
    assert "with --window_stride 0 training and evaluation see their first 100 clips only" in printed


def test_bad_window_stride_stops_before_building(tmp_path):
    inputs = long_video_corpus(tmp_path, [120])
    for stride in ("-1", "101"):
        with pytest.raises(CorpusInputError, match=rf"--window_stride {stride}: expected 0 .* \[1, --max_ctx_len 100\]"):
            main(["--out_dir", str(tmp_path / "c"), "--window_stride", stride] + inputs)
        assert not [name for name in os.listdir(tmp_path) if name.startswith("c.") or name == "c"]


@pytest.mark.parametrize("name, clip_length", [("didemo", 2.5), ("anet", 3.0)])
def test_presets_match_the_layout_the_builder_writes(name, clip_length):
    from utils.build_corpus import release_layout

    repo = REPO_ROOT
    preset = json.load(open(os.path.join(repo, "config", f"{name}_data_config.json")))
    assert {k: preset[k] for k in release_layout(name, clip_length)} == release_layout(name, clip_length)
    assert preset["dset_name"] == name and preset["clip_length"] == clip_length and preset["ctx_mode"] == "visual"
    script = open(os.path.join(repo, "scripts", f"train_{name}.sh")).read()
    assert f"--clip_length {clip_length:g}" in script.replace("3.0", "3") and "--ctx_mode visual" in script


def with_recipe(folder, clip_length, dim, **settings):
    """Write a feature recipe (as utils.extract_video_features writes it) into `folder` -> the recipe read back."""
    recipe = dict(clip_length=clip_length, frames_per_clip=3, full_frame=False, l2_normalize=False, dtype="fp32",
                  backbones=[dict(name="resnet18", model="microsoft/resnet-18", weights="none", seed=0, dim=dim)],
                  dim=dim) | settings
    write_recipe(folder, recipe)
    return read_recipe(folder)


def test_recipes_and_text_encoder_make_the_provenance_of_the_corpus(tmp_path, text_model):
    raw = raw_tvr_corpus(tmp_path, n_videos=(1, 1))
    recipe = with_recipe(raw["feats"], CLIP, 6)
    h5_path = tmp_path / "other.h5"
    with h5py.File(h5_path, "w") as f:
        for name, array in raw["arrays"].items():
            f.create_dataset(name, data=array[:, :2])
    summary = build_corpus(str(tmp_path / "c"), "tvr", raw["annotations"], [raw["feats"], str(h5_path)], CLIP,
                           text_encoder=text_model, text_encoder_device="cpu", progress=False)
    data_config = load_json(summary["data_config"])
    assert [s["recipe"] for s in data_config["video_feature_sets"]] == [recipe, None]
    assert provenance(data_config) == dict(ctx_mode="visual", clip_length=CLIP, video_features=[recipe, None],
                                           text_encoder=dict(name_or_path=text_model, max_length=38))
    # Another corpus from features of another recipe differs in provenance, naming the entry.
    other = tmp_path / "other_feats"
    shutil.copytree(raw["feats"], other)
    with_recipe(other, CLIP, 6, frames_per_clip=4)
    summary = build_corpus(str(tmp_path / "c2"), "tvr", raw["annotations"], [str(other), str(h5_path)], CLIP,
                           text_encoder=text_model, text_encoder_device="cpu", progress=False)
    assert provenance_difference(provenance(data_config), provenance(load_json(summary["data_config"]))) == \
        "video feature set 0 recipe frames_per_clip: 3 -> 4"


def test_clip_lengths_default_to_the_recipes_and_must_agree_with_them(tmp_path):
    raw = raw_tvr_corpus(tmp_path, n_videos=(1, 1))
    half = tmp_path / "half_second"
    half.mkdir()
    for i, (name, array) in enumerate(raw["arrays"].items()):
        raw_video(half, name, 3 * len(array), 3, seed=10 + i)
    queries = tmp_path / "queries"
    queries.mkdir()
    for desc_id in range(4):
        raw_video(queries, str(desc_id), 5, 7, seed=desc_id)
    base = dict(annotation_format="tvr", annotations=raw["annotations"], video_features=[raw["feats"], str(half)],
                query_features=str(queries))
    assert_fails_cleanly(tmp_path, r"--clip_length is needed: .*feats has no recipe.json to take it from",
                         clip_length=None, **base)
    with_recipe(raw["feats"], CLIP, 6)
    assert_fails_cleanly(tmp_path, r"--clip_length is needed: .*half_second has no recipe.json", clip_length=None,
                         **base)
    with_recipe(half, 0.5, 3)
    assert_fails_cleanly(tmp_path, r"^--video_feature_clip_lengths 1.5 for .*half_second: its recipe.json says the "
                                   r"features have clip_length 0.5$",
                         clip_length=None, video_feature_clip_lengths=[CLIP, CLIP], **base)

    from_recipes = build_corpus(str(tmp_path / "from_recipes"), clip_length=None, progress=False, **base)
    explicit = build_corpus(str(tmp_path / "explicit"), clip_length=CLIP, video_feature_clip_lengths=[CLIP, 0.5],
                            progress=False, **base)
    configs = [load_json(summary["data_config"]) for summary in (from_recipes, explicit)]
    assert configs[0]["clip_length"] == CLIP
    assert [s["clip_length"] for s in configs[0]["video_feature_sets"]] == [CLIP, 0.5]
    for name in raw["arrays"]:  # the second set resampled from its recipe's 0.5 s to the corpus's 1.5 s
        stored = [stored_video(load_data_config(s["data_config"]).vid_feat_path, name)
                  for s in (from_recipes, explicit)]
        assert stored[0].shape == (len(raw["arrays"][name]), 9) and np.array_equal(*stored)


def durations_file(path, durations):
    path.write_text(json.dumps(durations))
    return str(path)


def test_search_only_corpus_holds_every_video_and_no_queries(tmp_path, text_model, capsys):
    raw = raw_tvr_corpus(tmp_path)
    recipe = with_recipe(raw["feats"], CLIP, 6)
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ["train_0", "train_1", "val_0"]:  # val_1 and train_2 have no video file
        (videos / f"{name}.webm").write_bytes(b"")
    durations = durations_file(tmp_path / "durations.json", {name: 1.0 + i for i, name in enumerate(raw["arrays"])})
    summary = main(["--out_dir", str(tmp_path / "search"), "--video_features", raw["feats"], "--subtitles",
                    raw["subtitles"], "--text_encoder", text_model, "--text_encoder_device", "cpu", "--durations",
                    durations, "--video_dir", os.path.relpath(videos)])
    printed = capsys.readouterr().out.splitlines()
    config_path = str(tmp_path / "search" / "data_config.json")
    assert printed[-1] == (f"  python -m method.search build --first_stage RUN --conquer RUN --dataset_config "
                           f"{config_path} --out_dir INDEX")
    assert "warning: 2 videos without a file in --video_dir" in printed[0] and "(first: train_2)" in printed[0]
    assert "test_public: 5 videos, no queries (a search-only corpus)" in printed
    assert "3 of 5 videos have a file in --video_dir" in printed

    config = load_data_config(config_path)
    names = sorted(raw["arrays"])
    assert config.search_split == "test_public" and config.video_dir == str(videos)
    assert config.dset_name == "videos" and config.ctx_mode == "visual_sub" and "first_stage_ranklists" not in config
    assert config.video_feature_sets[0]["recipe"] == recipe and config.text_encoder["name_or_path"] == text_model
    video2dur = load_json(config.video_duration_idx_path)
    assert video2dur["train"] == video2dur["val"] == {}
    assert video2dur["test_public"] == {name: [1.0 + i, i] for i, name in enumerate(names)}
    for key in ("train_data_path", "eval_data_path", "test_data_path"):
        assert open(config[key]).read() == ""
    query_store = QueryFeatureStore(config.desc_bert_path)
    assert len(query_store) == 0 and query_store.keys() == []
    for name, array in raw["arrays"].items():
        assert np.allclose(stored_video(config.vid_feat_path, name), array / (
            np.linalg.norm(array, axis=1, keepdims=True) + 1e-5), atol=1e-6)
        assert SubtitleFeatureStore(config.sub_bert_path).get(name).shape == (len(array), 16)
    assert summary["dims"] == dict(visual=6, text=16, query=16) and summary["clip_length"] == CLIP
    assert not any(os.path.exists(config[key]) for key in ("train_first_VR_ranklist_path",
                                                          "eval_first_VR_ranklist_path_hero",
                                                          "test_public_first_VR_ranklist_path_hero"))


def test_search_only_corpus_durations_come_from_the_features_without_files(tmp_path, text_model):
    raw = raw_tvr_corpus(tmp_path, n_videos=(2, 1))
    # Named with a video extension (DiDeMo style): the corpus names the video by its stem.
    os.rename(os.path.join(raw["feats"], "val_0.npy"), os.path.join(raw["feats"], "val_0.mp4.npy"))
    durations = durations_file(tmp_path / "durations.json", {"train_1": 2.5})
    summary = build_corpus(str(tmp_path / "s"), None, None, [raw["feats"]], CLIP, text_encoder=text_model,
                           text_encoder_device="cpu", durations=durations, progress=False)
    video2dur = load_json(load_data_config(summary["data_config"]).video_duration_idx_path)["test_public"]
    assert video2dur == {"train_0": [4 * CLIP, 0], "train_1": [2.5, 1], "val_0": [4 * CLIP, 2]}
    assert "video_dir" not in load_json(summary["data_config"])
    # The videos to hold may be named (e.g. those of a video folder, which lost one): the others are left out.
    summary = build_corpus(str(tmp_path / "named"), None, None, [raw["feats"]], CLIP, text_encoder=text_model,
                           text_encoder_device="cpu", video_names=["val_0", "train_1"], progress=False)
    video2dur = load_json(load_data_config(summary["data_config"]).video_duration_idx_path)["test_public"]
    assert video2dur == {"val_0": [4 * CLIP, 0], "train_1": [5 * CLIP, 1]}


def test_search_only_corpus_bad_inputs(tmp_path, text_model):
    raw = raw_tvr_corpus(tmp_path, n_videos=(2, 1))
    second = tmp_path / "second"
    shutil.copytree(raw["feats"], second)
    os.remove(second / "train_1.npy")
    base = dict(annotation_format=None, annotations=None, clip_length=CLIP, text_encoder=text_model,
                text_encoder_device="cpu")
    assert_fails_cleanly(tmp_path, r"second: no features for video 'train_1', a video of the first --video_features "
                                   r"set .*feats \(1 videos missing\)",
                         video_features=[raw["feats"], str(second)], **base)
    assert_fails_cleanly(tmp_path, r"^--text_encoder is needed for a search-only corpus \(no --annotations\)",
                         video_features=[raw["feats"]], **(base | dict(text_encoder=None)))
    assert_fails_cleanly(tmp_path, r"^--annotations and --annotation_format go together",
                         video_features=[raw["feats"]], **(base | dict(annotation_format="tvr")))
    assert_fails_cleanly(tmp_path, r"^--video_dir .*nowhere: not a folder", video_features=[raw["feats"]],
                         video_dir=str(tmp_path / "nowhere"), **base)
    assert_fails_cleanly(tmp_path, r"^--query_features: a search-only corpus", video_features=[raw["feats"]],
                         query_features=raw["feats"], **base)
    assert_fails_cleanly(tmp_path, r"feats: no features for video 'gone', one of the videos the corpus is to hold",
                         video_features=[raw["feats"]], video_names=["train_0", "gone"], **base)


def test_annotated_corpus_records_its_video_dir(tmp_path):
    paths, feats, queries = didemo_raw(tmp_path)
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"")
    summary = build_corpus(str(tmp_path / "didemo"), "didemo", paths, [feats], 2.5, query_features=queries,
                           video_dir=str(tmp_path / "videos"), progress=False)
    assert load_json(summary["data_config"])["video_dir"] == str(tmp_path / "videos")
    assert summary["video_files"] == 1 and summary["warnings"] == [
        f"warning: 1 videos without a file in --video_dir {tmp_path / 'videos'} (the search page cannot play "
        f"them) (first: b)", "warning: 1 moments outside their video, clipped to it (first: desc_id 11: [25.0, "
        "30.0] on 22.5 s)"]
