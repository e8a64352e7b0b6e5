"""method.search build on the corpus given, checked against the runs: a search-only corpus (every video in split
test_public, no queries, no ranklists, as utils.build_corpus writes one without annotations) answers text and
feature queries as an index of the same videos in an annotated corpus does; a corpus the runs were not trained for
(another feature recipe, feature dims, a modality a run reads missing) is refused in one line before any model
loads, also by --update; a visual CONQUER with a visual_sub first stage indexes the features each reads."""
import logging
import os
import re
import shutil

import numpy as np
import pytest

import train
from method import search, search_index
from method.search import QueryError, Searcher
from method.search_index import SearchIndex, SearchIndexError, build_index
from test_search import copy_corpus, save_first_stage_run
from utils import build_corpus
from utils.data_config import load_data_config
from utils.errors import ConquerError
from utils.feature_stores import SubtitleFeatureStore, VideoFeatureStore, write_query_store
from utils.io_utils import load_json, save_json, save_jsonl
from utils.provenance import provenance
from utils.run_dir import OPT_FILENAME
from utils.synthetic_models import save_random_text_model
from utils.tvr_format import SPLIT_FILE_KEYS

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ("a man opens the door", "the dog runs into the room", "a woman walks with a cat")
RECIPE = dict(backbones=[dict(model="resnet", weights="pretrained")], frames_per_clip=8, dim=12, dtype="float32")


def write_search_only_corpus(tiny_corpus, target, **settings):
    """The val videos of the tiny corpus (their features, in their order) as a search-only corpus at `target`, laid
    out as utils.build_corpus writes one without annotations: every video in split test_public, an empty annotation
    file per split, an empty query store, no ranklists, a data config with search_split, video_dir, text_encoder and
    video_feature_sets (`settings` replace or add entries) -> its data config path."""
    config_path, config = copy_corpus(os.path.dirname(tiny_corpus), target)
    paths = load_data_config(config_path)
    table = load_json(paths.video_duration_idx_path)
    save_json({"train": {}, "val": {}, "test_public": table["val"]}, paths.video_duration_idx_path)
    for annotation_key, ranklist_key in SPLIT_FILE_KEYS.values():
        save_jsonl([], paths[annotation_key])
        shutil.rmtree(paths[ranklist_key])
    write_query_store(paths.desc_bert_path, {})
    config.update(search_split="test_public", ctx_mode="visual_sub", clip_length=1.5, video_dir=str(target / "videos"),
                  video_feature_sets=[dict(path=str(target / "features"), recipe=None)])
    config.update(settings)
    save_json(config, config_path)
    return config_path


def copy_run(run_dir, target, **changes):
    """A copy of a run dir whose opt.json has `changes` -> its path."""
    shutil.copytree(run_dir, target)
    save_json(dict(load_json(target / OPT_FILENAME), **changes), target / OPT_FILENAME)
    return str(target)


@pytest.fixture(scope="module")
def corpus(trained_runs, tiny_corpus, tiny_corpus_kwargs, tmp_path_factory):
    """Runs (CONQUER exclusive, a visual_sub first stage trained on the tiny corpus), a search-only corpus of the tiny
    corpus's val videos with a text encoder, and an index of the val split of the tiny corpus (the reference)."""
    root = tmp_path_factory.mktemp("search_corpus")
    text_encoder = dict(name_or_path=save_random_text_model(root / "text_model", hidden_size=8), dtype="float32",
                        max_length=38)
    first_stage = root / "first_stage"
    save_first_stage_run(first_stage, tiny_corpus_kwargs, dataset_config=tiny_corpus)
    conquer = trained_runs["exclusive"]
    search_only = write_search_only_corpus(tiny_corpus, root / "search_only", text_encoder=text_encoder)
    reference = build_index(root / "reference", conquer, str(first_stage), tiny_corpus)["out_dir"]
    return dict(conquer=conquer, first_stage=str(first_stage), search_only=search_only, text_encoder=text_encoder,
                reference=Searcher(reference))


def build_search_only_corpus(tiny_corpus, root, text_encoder):
    """utils.build_corpus without annotations on the stored features and durations of the tiny corpus's val videos
    -> its data config."""
    paths = load_data_config(tiny_corpus)
    durations = load_json(paths.video_duration_idx_path)["val"]
    for kind, store in (("visual", VideoFeatureStore(paths.vid_feat_path)),
                        ("sub", SubtitleFeatureStore(paths.sub_bert_path))):
        os.makedirs(root / kind)
        for name in durations:
            np.save(root / kind / f"{name}.npy", store._read_array(name))  # as stored: the reader normalises
    save_json({name: duration for name, (duration, _) in durations.items()}, root / "durations.json")
    return build_corpus.main(["--out_dir", str(root / "corpus"), "--video_features", str(root / "visual"),
                              "--sub_features", str(root / "sub"), "--no_l2_normalize", "--clip_length", "1.5",
                              "--durations", str(root / "durations.json"), "--text_encoder",
                              text_encoder["name_or_path"], "--text_encoder_device", "cpu"])["data_config"]


def test_search_only_corpus_answers_as_an_annotated_index_of_its_videos(corpus, tiny_corpus, tmp_path):
    config_path = build_search_only_corpus(tiny_corpus, tmp_path, corpus["text_encoder"])
    out = str(tmp_path / "index")
    search.main(["build", "--first_stage", corpus["first_stage"], "--conquer", corpus["conquer"], "--dataset_config",
                 config_path, "--out_dir", out])
    searcher, reference = Searcher(out), corpus["reference"]
    manifest = searcher.index.manifest
    assert (manifest["corpus"]["split"], reference.index.manifest["corpus"]["split"]) == ("test_public", "val")
    assert manifest["corpus"]["provenance"] == provenance(load_json(config_path))
    assert sorted(searcher.index.video_names) == sorted(reference.index.video_names)
    features = searcher.text_encoder.encode_tokens(list(TEXTS))
    by_text = searcher.search_many(list(TEXTS), top_k=20)
    assert all(len(moments) == 20 for moments in by_text)
    assert by_text == searcher.search_many(features, top_k=20)
    for got, want in zip(by_text, reference.search_many(features, top_k=20)):
        assert [m[:3] + m[4:] for m in got] == [m[:3] + m[4:] for m in want]
        np.testing.assert_allclose([m.score for m in got], [m.score for m in want], rtol=1e-5)
    with pytest.raises(QueryError) as error:
        search.main(["query", "--index", out, "--desc_id", "3"])
    assert str(error.value) == (f"desc_id 3: split 'test_public' of {config_path} has no stored queries (a "
                                "search-only corpus); query by text or token features")
    wide = save_random_text_model(tmp_path / "wide_text_model", hidden_size=16)
    save_json(dict(load_json(config_path), text_encoder=dict(corpus["text_encoder"], name_or_path=wide)), config_path)
    with pytest.raises(SearchIndexError) as error:
        Searcher(out)
    assert str(error.value) == (f"text encoder {wide} of {config_path} gives 16-dim token features but the CONQUER "
                                f"run {corpus['conquer']} takes --query_dim 8; the corpus's text encoder must be the "
                                "one the run was trained with")


def test_visual_conquer_with_a_visual_sub_first_stage(corpus, tiny_train_flags, tiny_corpus, tmp_path):
    """Each stage reads its own modalities: CONQUER's rows are those the visual run gives alone (with the ranklist
    first stage), the first stage's those it gives with a visual_sub CONQUER."""
    visual = train.main(tiny_train_flags + ["--ctx_mode", "visual", "--similarity_measure", "exclusive",
                                            "--train_set_honours_options", "--results_root", str(tmp_path / "runs"),
                                            "--exp_id", "visual", "--n_epoch", "1", "--disable_eval",
                                            "--no_eval_untrained"])
    index = SearchIndex.open(build_index(tmp_path / "index", visual, corpus["first_stage"], tiny_corpus)["out_dir"])
    alone = SearchIndex.open(build_index(tmp_path / "alone", visual, "ranklist", tiny_corpus)["out_dir"])
    reference = corpus["reference"].index
    assert index.video_names == alone.video_names == reference.video_names
    assert sorted(index.arrays) == sorted(set(alone.arrays) | {n for n in reference.arrays if "first_stage." in n})
    rows = np.arange(len(index.windows))
    for name, array in index.arrays.items():
        expected = reference if name.startswith("first_stage.") else alone
        np.testing.assert_array_equal(array.gather(rows), expected.arrays[name].gather(rows), err_msg=name)
    queries = list(np.random.default_rng(0).normal(size=(3, 5, 8)).astype(np.float32))
    assert all(len(moments) == 10 for moments in Searcher(index.path).search_many(queries))


def refused(argv, tmp_path, monkeypatch):
    """The one-line error of `search.main(["build"] + argv + --out_dir)`, which must load no model and leave no
    index folder."""
    def no_model(*args):
        raise AssertionError("a model was loaded before the corpus was checked")

    monkeypatch.setattr(search_index, "load_trained_model", no_model)
    monkeypatch.setattr(search_index, "load_first_stage_model", no_model)
    out = tmp_path / "index"
    with pytest.raises(ConquerError) as error:
        search.main(["build"] + argv + ["--out_dir", str(out)])
    assert "\n" not in str(error.value) and not os.path.exists(out)
    return str(error.value)


def test_corpora_the_runs_were_not_trained_for_are_refused(corpus, tiny_corpus, tiny_corpus_kwargs, tmp_path,
                                                           monkeypatch):
    def trained_on(name, **settings):
        path = tmp_path / f"{name}.json"
        save_json(dict(load_json(tiny_corpus), **settings), path)
        return str(path)

    runs = ["--conquer", corpus["conquer"], "--first_stage", corpus["first_stage"]]
    recipe_run = copy_run(corpus["conquer"], tmp_path / "recipe_run",
                          dataset_config=trained_on("recipe", video_feature_sets=[dict(path="f", recipe=RECIPE)]))
    other_recipe = write_search_only_corpus(
        tiny_corpus, tmp_path / "other_recipe", text_encoder=corpus["text_encoder"],
        video_feature_sets=[dict(path="f", recipe=dict(RECIPE, frames_per_clip=16))])
    assert refused(["--conquer", recipe_run, "--first_stage", corpus["first_stage"], "--dataset_config",
                    other_recipe], tmp_path, monkeypatch) == (
        f"--conquer {recipe_run} was trained on the corpus of {tmp_path / 'recipe.json'}, whose features differ from "
        f"those of --dataset_config {other_recipe} (video feature set 0 recipe frames_per_clip: 8 -> 16); index a "
        "corpus made as the training corpus was, or train on this one")

    encoder_run = tmp_path / "encoder_run"
    save_first_stage_run(encoder_run, tiny_corpus_kwargs, dataset_config=trained_on(
        "encoder", text_encoder=dict(corpus["text_encoder"], name_or_path="roberta-base")))
    message = refused(["--conquer", corpus["conquer"], "--first_stage", str(encoder_run), "--dataset_config",
                       corpus["search_only"]], tmp_path, monkeypatch)
    assert message.startswith(f"--first_stage {encoder_run} was trained on the corpus of {tmp_path / 'encoder.json'}")
    assert "(text_encoder: {'name_or_path': 'roberta-base', 'max_length': 38} -> {'name_or_path': '" in message

    wide_run = copy_run(corpus["conquer"], tmp_path / "wide_run", visual_dim=16)
    message = refused(["--conquer", wide_run, "--first_stage", corpus["first_stage"], "--dataset_config",
                       corpus["search_only"]], tmp_path, monkeypatch)
    video_store = load_data_config(corpus["search_only"]).vid_feat_path
    assert message.startswith(f"--conquer {wide_run}: video store {video_store}: features have dim 12 (key ")
    assert "but the model expects --visual_dim 16" in message

    visual_only = write_search_only_corpus(tiny_corpus, tmp_path / "visual_only", ctx_mode="visual",
                                           text_encoder=corpus["text_encoder"])
    shutil.rmtree(load_data_config(visual_only).sub_bert_path)
    assert refused(runs + ["--dataset_config", visual_only], tmp_path, monkeypatch) == (
        f"--conquer {corpus['conquer']} reads visual_sub features but the corpus {visual_only} has ctx_mode 'visual' "
        "(no 'sub' features); index it with runs trained with --ctx_mode visual")

    assert refused(["--conquer", corpus["conquer"], "--first_stage", "ranklist", "--dataset_config",
                    corpus["search_only"]], tmp_path, monkeypatch) == (
        f"--first_stage ranklist answers the stored queries of the split from its ranklists, and split 'test_public' "
        f"of {corpus['search_only']} has no queries (a search-only corpus); build the index with a learned "
        "--first_stage")


def test_update_is_checked_against_the_runs_and_the_index(corpus, tiny_corpus, tmp_path, caplog):
    trained = tmp_path / "trained.json"
    save_json(dict(load_json(tiny_corpus), video_feature_sets=[dict(path="features", recipe=RECIPE)]), trained)
    conquer = copy_run(corpus["conquer"], tmp_path / "conquer", dataset_config=str(trained))
    config_path = write_search_only_corpus(tiny_corpus, tmp_path / "corpus", text_encoder=corpus["text_encoder"],
                                           video_feature_sets=[dict(path="features", recipe=RECIPE)])

    def use_recipe(**changes):
        save_json(dict(load_json(config_path), video_feature_sets=[dict(path="features",
                                                                         recipe=dict(RECIPE, **changes))]), config_path)

    out = tmp_path / "index"
    build_index(out, conquer, corpus["first_stage"], config_path)
    version = SearchIndex.open(out).version_dir
    use_recipe(frames_per_clip=16)
    with pytest.raises(SearchIndexError, match=rf"^--conquer {re.escape(conquer)} was trained on the corpus of "
                                               rf"{re.escape(str(trained))}, .* \(video feature set 0 recipe "
                                               r"frames_per_clip: 8 -> 16\)"):
        build_index(out, conquer, corpus["first_stage"], config_path, update=True)
    os.remove(trained)
    with caplog.at_level(logging.WARNING, logger="method.search_index"), \
            pytest.raises(SearchIndexError) as error:
        build_index(out, conquer, corpus["first_stage"], config_path, update=True)
    assert f"--conquer {conquer}: its training data config {trained} no longer exists" in caplog.text
    assert str(error.value) == (f"--update {out}: the index was built from other inputs (corpus.provenance video "
                                "feature set 0 recipe frames_per_clip: 8 -> 16); pass --overwrite to rebuild it, or "
                                "another --out_dir")
    assert SearchIndex.open(out).version_dir == version and sorted(os.listdir(out)) == [
        "CURRENT", os.path.basename(version)]
    use_recipe(dtype="float16")  # features of the same recipe in another dtype differ by rounding only
    assert build_index(out, conquer, corpus["first_stage"], config_path, update=True)["n_encoded"] == 0
