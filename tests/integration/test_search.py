"""method/search.py end to end on the tiny synthetic corpus: the moments equal inference's, the index
(build, update, bad folders), the learned first stage (a stand-in that follows the first-stage contract),
queries by text / features / desc_id, the CLI, the HTTP endpoint under concurrent clients, and the search
page in a headless browser. Then long videos read as windows (--window_stride), on a corpus of videos up to
2.5 windows long: the index rows, inference's moments, the learned first stage's best window, updates, runs
whose windows disagree, and the page playing a moment past the first window."""
import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch

import inference
import train
from method import search, search_index
from method.checkpoint import build_model, save_checkpoint
from method.dataset import prepare_batch_inputs, query_inputs
from method.rank_first_stage import load_first_stage
from method.search import QueryError, Searcher
from method.search_index import SearchIndex, SearchIndexError, build_index
from utils.data_config import load_data_config
from utils.feature_stores import VideoFeatureStore, write_ranklist_store
from utils.io_utils import load_json, load_jsonl, save_json
from utils.run_dir import CKPT_FILENAME, OPT_FILENAME, REPO_ROOT
from utils.synthetic_models import save_random_text_model
from utils.synthetic_tvr import generate_corpus
from utils.windows import Window, window_clip_count, window_starts

from tests.conftest import TINY_MODEL_CONFIG

pytestmark = pytest.mark.usefixtures("one_thread")

MEASURES = ("exclusive", "general")


@pytest.fixture(scope="module")
def runs(trained_runs):
    return {measure: trained_runs[measure] for measure in MEASURES}


@pytest.fixture(scope="module")
def ranklist_indexes(runs, tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("indexes")
    return {measure: build_index(root / measure, run, "ranklist", tiny_corpus, "val", batch_size=7,
                                 chunk_videos=8)["out_dir"] for measure, run in runs.items()}


def inference_vcmr(run_dir, data_config, out_dir, nms_thd):
    argv = ["--model_dir", run_dir, "--dataset_config", data_config, "--device", "-1", "--num_workers", "0",
            "--tasks", "VCMR", "--output_dir", str(out_dir), "--nms_thd", str(-1 if nms_thd is None else nms_thd)]
    _, _, paths = inference.run_inference(inference.TestOptions().parse(argv))
    submission = load_json([path for path in paths if not path.endswith("_metrics.json")][-1])
    idx2video = {idx: name for name, idx in submission["video2idx"].items()}
    return {query["desc_id"]: [(idx2video[v], st, ed, score) for v, st, ed, score in query["predictions"]]
            for query in submission["VCMR"]}


@pytest.mark.parametrize("measure", MEASURES)
def test_moments_equal_inference_predictions(runs, ranklist_indexes, tiny_corpus, tmp_path, measure):
    searcher = Searcher(ranklist_indexes[measure], conquer=runs[measure], first_stage="ranklist")
    desc_ids = [row["desc_id"] for row in searcher.dataset.query_data]
    for nms_thd in (None, 0.5):
        expected = inference_vcmr(runs[measure], tiny_corpus, tmp_path / str(nms_thd), nms_thd)
        found = searcher.search_many(desc_ids, top_k=100, nms_thd=nms_thd, batch_size=5)
        for desc_id, moments in zip(desc_ids, found):
            rows = expected[desc_id]
            assert [(m.video_name, m.start, m.end) for m in moments] == [row[:3] for row in rows]
            np.testing.assert_allclose([m.score for m in moments], [row[3] for row in rows], rtol=1e-5, atol=1e-9)
        assert any(len(expected[d]) < 100 for d in desc_ids) == (nms_thd is not None)
    ranklist = searcher.dataset.eval_candidates[0][0][1:]
    first = searcher.search(desc_ids[0], top_k=7)
    assert len(first) == 7 and all(ranklist[m.first_stage_rank - 1] == m.video_name for m in first)


def copy_corpus(corpus_dir, target, **settings):
    """A copy of the corpus folder at `target` whose data config points at it (plus `settings`) -> (its data config
    path, the config)."""
    shutil.copytree(corpus_dir, target)
    config_path = str(target / "tvr_data_config.json")
    config = dict(load_json(config_path), root_path=str(target), **settings)
    save_json(config, config_path)
    return config_path, config


def save_first_stage_run(run_dir, corpus_kwargs, **options):
    """A first-stage run dir for the tiny corpus with random weights (seed 0): opt.json (the dims of `corpus_kwargs`,
    ctx_mode visual_sub, max_ctx_len 30; `options` replace or add entries) and model.ckpt -> the model."""
    os.makedirs(run_dir)
    k = corpus_kwargs
    opt = dict(model="first_stage", query_dim=k["query_dim"], visual_dim=k["visual_dim"], text_dim=k["text_dim"],
               hidden_dim=16, max_ctx_len=30, ctx_mode="visual_sub")
    opt.update(options)
    model_cfg = load_json(os.path.join(REPO_ROOT, "config", "first_stage_config.json"))
    torch.manual_seed(0)
    model = build_model(model_cfg, opt).eval()
    save_json(opt, os.path.join(run_dir, OPT_FILENAME))
    save_checkpoint(os.path.join(run_dir, CKPT_FILENAME), model.state_dict(), model_cfg, epoch=0)
    return model


@pytest.fixture(scope="module")
def learned(runs, tiny_corpus, tiny_corpus_kwargs, tmp_path_factory):
    """A corpus copy with a text encoder and a video folder, a first-stage run dir (random weights), and its index."""
    root = tmp_path_factory.mktemp("learned")
    corpus = root / "corpus"
    shutil.copytree(os.path.dirname(tiny_corpus), corpus)
    config = load_json(tiny_corpus)
    config.update(root_path=str(corpus), video_dir="videos",
                  text_encoder=dict(name_or_path=save_random_text_model(root / "text_model", hidden_size=8),
                                    dtype="float32", max_length=38))
    save_json(config, corpus / "tvr_data_config.json")
    first_run = root / "first_stage_run"
    model = save_first_stage_run(first_run, tiny_corpus_kwargs)
    out = build_index(root / "index", runs["exclusive"], str(first_run), str(corpus / "tvr_data_config.json"),
                      "val", chunk_videos=6)["out_dir"]
    searcher = Searcher(out)
    return dict(searcher=searcher, model=model, corpus=corpus, run=str(first_run), index=out)


def test_learned_first_stage_ranks_every_video_and_reranks_like_a_ranklist(learned, runs, tmp_path):
    searcher, model = learned["searcher"], learned["model"]
    dataset = searcher.dataset
    names = list(dataset.video2idx)
    videos = torch.utils.data.default_collate([dataset.get_video_inputs(name) for name in names])
    desc_ids = [row["desc_id"] for row in dataset.query_data]
    queries = torch.utils.data.default_collate([query_inputs(dataset.query_store.get(d), dataset.max_desc_len)
                                                for d in desc_ids])
    with torch.no_grad():
        scores = model.score(model.encode_queries(queries["feat"], queries["feat_mask"]), model.encode_videos(videos))
    best_scores, best = torch.sort(scores, dim=1, descending=True, stable=True)
    # A corpus whose stored ranklists are the plain brute-force ranking: the ranklist first stage must agree.
    assert_equals_ranklist_search(searcher, learned["corpus"], runs["exclusive"], dataset, names, desc_ids, best,
                                  best_scores, tmp_path, top_k=20)


def assert_equals_ranklist_search(searcher, corpus_dir, conquer_run, dataset, names, desc_ids, best, best_scores,
                                  tmp_path, top_k):
    """`searcher` answers as a ranklist-first-stage index of a copy of the corpus whose val ranklists are the
    given ranking (best (Q, V) positions in `names`, best_scores)."""
    corpus = tmp_path / "corpus"
    _, config = copy_corpus(corpus_dir, corpus, text_encoder=None)
    ranklist_path = corpus / config["eval_first_VR_ranklist_path_hero"]
    shutil.rmtree(ranklist_path)
    write_ranklist_store(str(ranklist_path), {
        desc_id: [(dataset.video2idx[names[v]], float(s)) for v, s in zip(row.tolist(), row_scores.tolist())]
        for desc_id, row, row_scores in zip(desc_ids, best, best_scores)})
    reference = Searcher(build_index(tmp_path / "index", conquer_run, "ranklist",
                                     str(corpus / "tvr_data_config.json"), "val")["out_dir"])
    for got, want in zip(searcher.search_many(desc_ids, top_k=top_k), reference.search_many(desc_ids, top_k=top_k)):
        assert [m[:3] + m[4:] for m in got] == [m[:3] + m[4:] for m in want]
        np.testing.assert_allclose([m.score for m in got], [m.score for m in want], rtol=1e-5)


def test_text_and_feature_queries(learned):
    searcher = learned["searcher"]
    text = "a man opens the door"
    features = searcher.text_encoder.encode_tokens([text])[0]
    by_text = searcher.search(text, top_k=5)
    assert by_text == searcher.search(features, top_k=5) and len(by_text) == 5
    long = np.tile(features, (6, 1))  # 42 tokens > max_desc_len 30
    with pytest.raises(QueryError, match="has 42 tokens but the model takes at most 30"):
        searcher.search(long)
    assert searcher.search(long, truncate=True) == searcher.search(long[:30])
    for bad, message in (("  ", "empty query text"), (np.zeros((3, 5)), r"shape \(n_tokens >= 1, 8\)"),
                         (10 ** 9, "desc_id 1000000000 is not a query of split 'val'")):
        with pytest.raises(QueryError, match=message):
            searcher.search(bad)
    for top_k in (0, 101, 2.5):
        with pytest.raises(QueryError, match=r"top_k must be an integer in \[1, 100\]"):
            searcher.search(features, top_k=top_k)


def test_text_query_needs_a_text_encoder_and_ranklists_need_desc_ids(ranklist_indexes):
    searcher = Searcher(ranklist_indexes["general"])
    with pytest.raises(QueryError, match="has no text encoder"):
        searcher.search("a man")
    with pytest.raises(QueryError, match="answers desc_id queries only"):
        searcher.search(np.ones((4, 8)))


def test_index_build_update_and_interruption(runs, tiny_corpus, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    config_path, config = copy_corpus(os.path.dirname(tiny_corpus), corpus)
    video_table = corpus / config["video_duration_idx_path"]
    val_file = corpus / config["eval_data_path"]
    full_table, full_val = load_json(video_table), load_jsonl(val_file)
    kept = dict(list(full_table["val"].items())[:12])
    save_json(dict(full_table, val=kept), video_table)
    with open(val_file, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in full_val if row["vid_name"] in kept)
    out = tmp_path / "index"
    assert build_index(out, runs["general"], "ranklist", config_path, chunk_videos=5)["n_encoded"] == 12
    serving = Searcher(out)
    assert not serving.refresh()
    shutil.copy(os.path.dirname(tiny_corpus) + "/" + config["video_duration_idx_path"], video_table)
    shutil.copy(os.path.dirname(tiny_corpus) + "/" + config["eval_data_path"], val_file)
    with pytest.raises(SearchIndexError, match="already holds a search index; pass --update"):
        build_index(out, runs["general"], "ranklist", config_path)
    with pytest.raises(SearchIndexError, match=r"built from other inputs \(conquer\.checkpoint"):
        build_index(out, runs["exclusive"], "ranklist", config_path, update=True)
    old_version = SearchIndex.open(out).version_dir
    summary = build_index(out, runs["general"], "ranklist", config_path, update=True, chunk_videos=5)
    assert (summary["n_videos"], summary["n_encoded"]) == (20, 8)
    updated = SearchIndex.open(out)
    assert not os.path.exists(old_version) and updated.video_names[:12] == list(kept)
    fresh = SearchIndex.open(build_index(tmp_path / "fresh", runs["general"], "ranklist", config_path)["out_dir"])
    rows = [updated.row_of[name] for name in fresh.video_names]
    for name, array in fresh.arrays.items():
        np.testing.assert_allclose(updated.arrays[name].gather(rows), array.gather(np.arange(20)), rtol=1e-5,
                                   atol=1e-6)
    # A searcher loaded before the update takes the new version, and answers as one loaded after it.
    assert serving.refresh() and serving.index.video_names == updated.video_names
    new_query = next(row["desc_id"] for row in full_val if row["vid_name"] not in kept)
    assert serving.search(new_query, top_k=20) == Searcher(out).search(new_query, top_k=20)
    # A version built from another CONQUER run is not taken by a loaded searcher: its model would not match.
    build_index(out, runs["exclusive"], "ranklist", config_path, overwrite=True)
    assert not serving.refresh() and serving.index.version_dir == updated.version_dir
    build_index(out, runs["general"], "ranklist", config_path, overwrite=True)
    updated = SearchIndex.open(out)
    # An interrupted rebuild leaves the index as it was, and no partial folder.
    monkeypatch.setattr(search_index, "_write_chunk", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        build_index(out, runs["general"], "ranklist", config_path, overwrite=True)
    assert SearchIndex.open(out).version_dir == updated.version_dir
    assert sorted(os.listdir(out)) == ["CURRENT", os.path.basename(updated.version_dir)]


def test_update_after_videos_left_the_split_and_overwrite_of_missing_or_empty_folders(runs, ranklist_indexes,
                                                                                        tiny_corpus, tmp_path):
    corpus = tmp_path / "corpus"
    config_path, config = copy_corpus(os.path.dirname(tiny_corpus), corpus)
    video_table, val_file = corpus / config["video_duration_idx_path"], corpus / config["eval_data_path"]
    full_table, full_val = load_json(video_table), load_jsonl(val_file)
    names = list(full_table["val"])

    def use_videos(chosen):
        save_json(dict(full_table, val={name: full_table["val"][name] for name in chosen}), video_table)
        with open(val_file, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in full_val if row["vid_name"] in chosen)

    umask = os.umask(0o022)
    try:
        use_videos(names[:12])
        out = tmp_path / "index"
        build_index(out, runs["general"], "ranklist", config_path, chunk_videos=5)
        # 4 videos leave (chunk 0 keeps 1 of its 5 rows), 8 arrive: only those are encoded.
        use_videos(names[4:])
        summary = build_index(out, runs["general"], "ranklist", config_path, update=True, chunk_videos=5)
        index = SearchIndex.open(out)
        assert (summary["n_videos"], summary["n_encoded"]) == (16, 8)
        assert index.video_names == names[4:12] + names[12:] and index.manifest["chunks"] == [1, 5, 2, 5, 3]
        reference = SearchIndex.open(ranklist_indexes["general"])
        for name, array in reference.arrays.items():
            np.testing.assert_allclose(index.arrays[name].gather(np.arange(16)),
                                       array.gather([reference.row_of[v] for v in index.video_names]),
                                       rtol=1e-5, atol=1e-6)
        assert {os.stat(path).st_mode & 0o777 for path in (out, index.version_dir)} == {0o755}
        # --overwrite of a folder that is missing or empty builds it.
        empty = tmp_path / "empty"
        empty.mkdir()
        for folder in (tmp_path / "missing", empty):
            assert build_index(folder, runs["general"], "ranklist", config_path, overwrite=True)["n_videos"] == 16
            assert os.stat(SearchIndex.open(folder).version_dir).st_mode & 0o777 == 0o755
    finally:
        os.umask(umask)


def test_bad_index_folders_give_one_line_errors(runs, ranklist_indexes, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(ranklist_indexes["general"], index)
    with pytest.raises(SearchIndexError, match="the index was built from .*, not from this run"):
        Searcher(index, conquer=runs["exclusive"])
    with pytest.raises(SearchIndexError, match="the index was built with --first_stage ranklist"):
        Searcher(index, first_stage=runs["general"])
    version_dir = SearchIndex.open(index).version_dir
    manifest_path = os.path.join(version_dir, "manifest.json")
    manifest = load_json(manifest_path)
    for key, broken in (("conquer.sha256", dict(manifest, conquer={"run_dir": "r", "checkpoint": "c"})),
                        ("chunks", {k: v for k, v in manifest.items() if k != "chunks"})):
        save_json(broken, manifest_path)
        with pytest.raises(SearchIndexError) as error:
            SearchIndex.open(index)
        assert str(error.value) == f"search index file {manifest_path}: no key {key!r}: corrupt index; rebuild it"
    save_json(manifest, manifest_path)
    chunk = os.path.join(version_dir, "conquer.visual.00001.npy")
    with open(chunk, "r+b") as f:
        f.truncate(os.path.getsize(chunk) - 100)
    with pytest.raises(SearchIndexError, match=r"conquer\.visual\.00001\.npy: unreadable"):
        SearchIndex.open(index)
    os.remove(chunk)
    with pytest.raises(SearchIndexError, match=r"conquer\.visual\.00001\.npy is missing: the index is partial"):
        SearchIndex.open(index)
    with open(os.path.join(version_dir, "manifest.json"), "w") as f:
        f.write("{")
    with pytest.raises(SearchIndexError, match="manifest.json: invalid JSON"):
        SearchIndex.open(index)
    os.remove(index / "CURRENT")
    with pytest.raises(SearchIndexError, match="no CURRENT file"):
        SearchIndex.open(index)
    with pytest.raises(SearchIndexError, match="no such folder"):
        SearchIndex.open(tmp_path / "nothing")


def test_cli_build_and_query(runs, tiny_corpus, tmp_path, capsys):
    out = str(tmp_path / "index")
    search.main(["build", "--first_stage", "ranklist", "--conquer", runs["general"], "--dataset_config", tiny_corpus,
                 "--split", "val", "--out_dir", out])
    desc_id = load_jsonl(os.path.join(os.path.dirname(tiny_corpus), "data", "tvr_val_release.jsonl"))[0]["desc_id"]
    capsys.readouterr()
    search.main(["query", "--index", out, "--desc_id", str(desc_id), "--top_k", "3", "--json"])
    rows = json.loads(capsys.readouterr().out)
    expected = Searcher(out).search(desc_id, top_k=3)
    assert rows == [m._asdict() for m in expected]
    assert list(rows[0]) == ["video_name", "start", "end", "score", "first_stage_rank"]
    search.main(["query", "--index", out, "--desc_id", str(desc_id), "--top_k", "3"])
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 4 and table[1].split()[1] == expected[0].video_name


@pytest.fixture(scope="module")
def server(learned):
    from method.search_server import make_server
    searcher = learned["searcher"]
    videos = learned["corpus"] / "videos"
    videos.mkdir()
    for name in searcher.index.video_names:
        write_webm(videos / f"{name}.webm", seconds=40)
    httpd = make_server(searcher, host="127.0.0.1", port=0, threads=8, max_queue=6)  # 6 clients below: no 503
    thread = threading.Thread(target=httpd.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.effective_port}"
    httpd.close()


def write_webm(path, seconds, fps=2):
    import av
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for i in range(seconds * fps):
            frame = av.VideoFrame.from_ndarray(np.full((24, 32, 3), i % 255, dtype=np.uint8), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_http_endpoint_concurrent_and_validated(server, learned):
    searcher = learned["searcher"]
    desc_ids = [row["desc_id"] for row in searcher.dataset.query_data][:8]
    texts = ["a man opens the door", "the dog runs into the room", "a woman walks with a cat"]
    requests_ = [{"desc_id": d, "top_k": 5} for d in desc_ids] + [{"text": t, "nms_thd": 0.5} for t in texts]
    expected = [searcher.search(r.get("desc_id", r.get("text")), top_k=r.get("top_k", 10), nms_thd=r.get("nms_thd"))
                for r in requests_]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda body: requests.post(server + "/search", json=body, timeout=60), requests_ * 2))
    for answer, moments in zip(answers, expected * 2):
        assert answer.status_code == 200
        assert answer.json()["results"] == [m._asdict() for m in moments]
    bad = [({"text": ""}, "empty query text"), ({"text": "a", "top_k": 10 ** 6}, "'top_k' must be an integer"),
           ({"features": [[0.0] * 5] * 3}, r"shape (n_tokens >= 1, 8), got (3, 5)"),
           ({"features": [[0.0] * 8, [1.0]]}, "rectangular"), ({}, "give exactly one of"),
           ({"text": "a", "desc_id": 1}, "give exactly one of"), ({"query": "a"}, "unknown field"),
           ({"desc_id": 10 ** 9}, "is not a query of split")]
    for body, message in bad:
        answer = requests.post(server + "/search", json=body, timeout=60)
        assert answer.status_code == 400 and message in answer.json()["error"], (body, answer.text)
    assert requests.post(server + "/search", data="not json", timeout=60).status_code == 400
    assert requests.get(server + "/search", timeout=60).status_code == 405
    assert requests.get(server + "/video/not_a_video", timeout=60).status_code == 404
    info = requests.get(server + "/info", timeout=60).json()
    assert "/" not in json.dumps(info)  # names and ids, no server paths
    assert (info["index"], info["conquer"]["run"], info["first_stage"]["run"]) == (
        os.path.basename(learned["index"]), os.path.basename(searcher.index.manifest["conquer"]["run_dir"]),
        os.path.basename(learned["run"]))
    assert info["desc_id_queries"] and info["text_queries"]
    assert requests.get(server + "/health", timeout=60).json()["status"] == "ok"


def test_http_body_over_the_limit_is_refused_by_waitress(server):
    """A body over 8 MiB is refused from its Content-Length, before waitress buffers it (its default is 1 GiB)."""
    import socket
    host, port = server.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 100000000\r\n\r\n{")
        assert connection.recv(100).split(b"\r\n")[0] == b"HTTP/1.1 413 Request Entity Too Large"


def post(client, body, **kwargs):
    return client.post("/search", data=body if isinstance(body, str) else json.dumps(body),
                       content_type="application/json", **kwargs)


def test_http_server_side_failures_are_5xx_and_bad_bodies_400(learned, monkeypatch):
    from method.search_server import create_app
    from utils.feature_stores import FeatureStoreError
    searcher = learned["searcher"]
    client = create_app(searcher).test_client()
    desc_id = searcher.dataset.query_data[0]["desc_id"]
    assert post(client, "[" * 100000 + "]" * 100000).status_code == 400
    answer = post(client, {"features": [[[[0.0]]]]})
    assert answer.status_code == 400 and "features" in answer.json["error"]
    for error in (FeatureStoreError("/srv/store: unreadable"), SearchIndexError("/srv/index: out of date"),
                  OSError("/srv/disk: I/O error")):
        def fail(*args, error=error):
            raise error
        monkeypatch.setattr(searcher.dataset.query_store, "get", fail)
        answer = post(client, {"desc_id": desc_id})
        assert answer.status_code == 500 and type(error).__name__ in answer.json["error"], answer.json
        assert "/srv" not in answer.json["error"]
    assert client.get("/health").json["status"] == "ok"


def test_http_queue_is_bounded_in_length_and_time(learned, monkeypatch):
    """One search holds the model; one request may wait (--max_queue 1), for 0.5 s (--request_timeout): a third
    gets 503 at once, the waiting one 503 after 0.5 s, both with Retry-After; /health answers meanwhile."""
    from method.search_server import create_app
    searcher = learned["searcher"]
    client = create_app(searcher, max_queue=1, request_timeout=0.5).test_client()
    desc_id = searcher.dataset.query_data[0]["desc_id"]
    release, search_batch = threading.Event(), searcher.search_batch
    monkeypatch.setattr(searcher, "search_batch", lambda *args: release.wait(30) and search_batch(*args))

    def wait_for(**state):
        for _ in range(300):
            health = client.get("/health").json
            if all(health[key] == value for key, value in state.items()):
                return health
            threading.Event().wait(0.01)
        raise AssertionError(f"server never reached {state}: {health}")

    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, client, {"desc_id": desc_id})
        wait_for(searching=True, waiting=0)
        waiting = pool.submit(post, client, {"desc_id": desc_id})
        assert wait_for(waiting=1)["max_queue"] == 1
        refused = post(client, {"desc_id": desc_id})
        assert refused.status_code == 503 and "--max_queue 1" in refused.json["error"]
        timed_out = waiting.result(timeout=30)
        assert timed_out.status_code == 503 and "--request_timeout 0.5" in timed_out.json["error"]
        assert all(int(answer.headers["Retry-After"]) >= 1 for answer in (refused, timed_out))
        release.set()
        assert running.result(timeout=30).status_code == 200
    assert wait_for(searching=False, waiting=0)["status"] == "ok"
    assert post(client, {"desc_id": desc_id}).json["results"] == [m._asdict() for m in search_batch([desc_id])[0][0]]


def test_serve_flags_are_checked_before_the_model_loads(tmp_path):
    from utils.errors import OptionError
    with pytest.raises(OptionError, match=r"^--threads 8 must be at least --max_queue 7 \+ 2"):
        search.main(["serve", "--index", str(tmp_path / "nothing"), "--max_queue", "7"])
    with pytest.raises(OptionError, match=r"^--request_timeout 0.0: must be > 0 seconds$"):
        search.main(["serve", "--index", str(tmp_path / "nothing"), "--request_timeout", "0"])


def headless_chromium():
    from selenium import webdriver
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")),
                            options=options)


def test_search_page_in_a_headless_browser(server, learned):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver = headless_chromium()
    try:
        driver.get(server + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: "20 videos" in d.find_element(By.ID, "about").text)
        driver.find_element(By.ID, "query").send_keys("a man opens the door")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.moment")) == 10)
        expected = learned["searcher"].search("a man opens the door")
        cells = driver.find_elements(By.CSS_SELECTOR, "tr.moment")[1].find_elements(By.TAG_NAME, "td")
        assert [c.text for c in cells[1:4]] == [expected[1].video_name, f"{expected[1].start:.2f}",
                                                f"{expected[1].end:.2f}"]
        driver.find_elements(By.CSS_SELECTOR, "tr.moment")[1].click()
        player = driver.find_element(By.ID, "player")
        wait.until(lambda d: d.execute_script("return arguments[0].readyState >= 1 && "
                                              "arguments[0].currentTime >= arguments[1] - 0.01", player,
                                              expected[1].start))
        assert expected[1].video_name in player.get_attribute("src")
        assert abs(driver.execute_script("return arguments[0].currentTime", player) - expected[1].start) < 1.0
        driver.find_element(By.ID, "query").clear()
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.ID, "error").text == "empty query text")
    finally:
        driver.quit()


# ----------------------------------------------------------------------------------------------------
# Long videos read as windows: L = 20 clips of 1.5 s (30 s) every 10 clips; videos of 15-75 s, so some fit in
# one window and the others have 2-4.

LONG_CORPUS_KWARGS = dict(n_train_videos=16, n_val_videos=12, n_test_videos=10, n_train_queries=32,
                          n_val_queries=12, n_test_queries=4, visual_dim=12, text_dim=8, query_dim=8,
                          min_duration=15.0, max_duration=75.0, max_clips=50, seed=5)
MAX_CTX_LEN, STRIDE, CLIP_LENGTH = 20, 10, 1.5
WINDOW_FLAGS = ["--max_ctx_len", str(MAX_CTX_LEN), "--window_stride", str(STRIDE)]


def long_run_flags(data_config, results_root, exp_id):
    k = LONG_CORPUS_KWARGS
    return ["--dataset_config", data_config, "--visual_dim", str(k["visual_dim"]), "--text_dim", str(k["text_dim"]),
            "--query_dim", str(k["query_dim"]), "--device", "-1", "--num_workers", "0", "--bsz", "8", "--lr", "1e-3",
            "--n_epoch", "1", "--disable_eval", "--no_eval_untrained", "--results_root", str(results_root),
            "--exp_id", exp_id] + WINDOW_FLAGS


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """The long corpus, a CONQUER run (exclusive: its video scores are merged over windows) and a first stage,
    each trained 1 epoch with windows, and an index of the val split for each first stage."""
    root = tmp_path_factory.mktemp("windowed")
    corpus = generate_corpus(root / "corpus", **LONG_CORPUS_KWARGS)
    save_json(dict(load_json(corpus), video_dir="videos"), corpus)  # the page test writes the video files
    conquer = train.main(long_run_flags(corpus, root / "runs", "conquer") + [
        "--model_config", TINY_MODEL_CONFIG, "--hidden_dim", "32", "--similarity_measure", "exclusive"])
    first_stage = train.main(long_run_flags(corpus, root / "runs", "first_stage") + [
        "--model", "first_stage", "--model_config", os.path.join(REPO_ROOT, "config", "first_stage_config.json"),
        "--hidden_dim", "16"])
    indexes = {kind: build_index(root / kind, conquer, kind if kind == "ranklist" else first_stage, corpus, "val",
                                 batch_size=6, chunk_videos=5)["out_dir"] for kind in ("ranklist", "learned")}
    return dict(corpus=corpus, conquer=conquer, first_stage=first_stage, indexes=indexes,
                ranklist=Searcher(indexes["ranklist"]), learned=Searcher(indexes["learned"]))


def every_window(data_config, names):
    """[Window] of every video of `names`, from the clip counts in the corpus's video store."""
    store = VideoFeatureStore(load_data_config(data_config).vid_feat_path)
    return [Window(name, start) for name in names
            for start in window_starts(store.clip_count(name), MAX_CTX_LEN, STRIDE)]


def test_windowed_index_rows_are_every_window(windowed):
    index = SearchIndex.open(windowed["indexes"]["learned"])
    val_videos = list(load_json(load_data_config(windowed["corpus"]).video_duration_idx_path)["val"])
    assert sorted(index.video_names) == sorted(val_videos)
    assert index.windows == every_window(windowed["corpus"], index.video_names)
    counts = np.diff(index.video_rows)
    assert counts.min() == 1 and counts.max() >= 3 and index.reads_windows
    manifest = index.manifest
    assert (manifest["corpus"]["window_stride"], manifest["corpus"]["max_ctx_len"]) == (STRIDE, MAX_CTX_LEN)
    assert (manifest["first_stage"]["window_stride"], manifest["n_windows"]) == (STRIDE, len(index.windows))
    # Each row holds its own window's encodings: the last window of the longest video, encoded on its own.
    searcher = windowed["learned"]
    row = int(index.video_rows[np.argmax(counts) + 1]) - 1
    name, start = index.windows[row]
    inputs = prepare_batch_inputs(torch.utils.data.default_collate([searcher.dataset.get_video_inputs(name, start)]),
                                  torch.device("cpu"))
    with torch.no_grad():
        encoded = searcher.model.encode_videos(inputs)
    n_clips = VideoFeatureStore(load_data_config(windowed["corpus"]).vid_feat_path).clip_count(name)
    assert start == n_clips - MAX_CTX_LEN > 0
    assert index.arrays["conquer.video_mask"].gather([row]).sum() == window_clip_count(n_clips, start, MAX_CTX_LEN)
    for modality in searcher.model.video_modality:
        np.testing.assert_allclose(index.arrays[f"conquer.{modality}"].gather([row]), encoded[modality].numpy(),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nms_thd", [None, 0.5])
def test_windowed_search_equals_inference(windowed, tmp_path, nms_thd):
    """The ranklist first stage gives videos; every window of each is re-ranked: the moments are inference's."""
    searcher = windowed["ranklist"]
    desc_ids = [row["desc_id"] for row in searcher.dataset.query_data]
    expected = inference_vcmr(windowed["conquer"], windowed["corpus"], tmp_path, nms_thd)
    found = searcher.search_many(desc_ids, top_k=100, nms_thd=nms_thd, batch_size=5)
    for desc_id, moments in zip(desc_ids, found):
        rows = expected[desc_id]
        assert [(m.video_name, m.start, m.end) for m in moments] == [row[:3] for row in rows]
        np.testing.assert_allclose([m.score for m in moments], [row[3] for row in rows], rtol=1e-5, atol=1e-9)
    first_window_seconds = MAX_CTX_LEN * CLIP_LENGTH
    late = [m for moments in found for m in moments if m.start >= first_window_seconds]  # past the first L clips
    assert late and max(m.end for m in late) > 2 * first_window_seconds
    ranklist = searcher.dataset.eval_candidates[0][0][1:]
    assert all(ranklist[m.first_stage_rank - 1] == m.video_name for m in found[0])


def test_windowed_learned_first_stage_scores_a_video_by_its_best_window(windowed, tmp_path):
    """Learned first stage over windows == the stored-ranklist first stage given the ranking of every video by
    its best window, each window embedded on its own."""
    searcher = windowed["learned"]
    dataset = searcher.dataset
    model = load_first_stage(windowed["first_stage"], "cpu")[0]
    names = list(dataset.video2idx)
    desc_ids = [row["desc_id"] for row in dataset.query_data]
    queries = torch.utils.data.default_collate([query_inputs(dataset.query_store.get(d), dataset.max_desc_len)
                                                for d in desc_ids])
    with torch.no_grad():
        query_emb = model.encode_queries(queries["feat"], queries["feat_mask"])
        scores = torch.stack([torch.cat([model.score(query_emb, model.encode_videos(torch.utils.data.default_collate(
            [dataset.get_video_inputs(name, start)]))) for start in dataset.window_starts(name)], dim=1).amax(dim=1)
            for name in names], dim=1)  # (Q, V): each video's best window
    best_scores, best = torch.sort(scores, dim=1, descending=True, stable=True)
    assert_equals_ranklist_search(searcher, os.path.dirname(windowed["corpus"]), windowed["conquer"], dataset, names,
                                  desc_ids, best, best_scores, tmp_path, top_k=30)
    # The first stage's own scores of the top videos are their best windows'.
    with torch.no_grad():
        positions, values = searcher.first_stage.candidates(searcher._prepare(desc_ids, truncate=False),
                                                            {"query": queries})
    np.testing.assert_allclose(values.numpy(), best_scores[:, :searcher.k].numpy(), rtol=1e-5, atol=1e-6)
    assert [[names[p] for p in row] for row in positions.tolist()] == \
        [[names[v] for v in row] for row in best[:, :searcher.k].tolist()]


def test_windowed_update_equals_a_fresh_build(windowed, tmp_path):
    corpus = tmp_path / "corpus"
    config_path, config = copy_corpus(os.path.dirname(windowed["corpus"]), corpus)
    video_table, val_file = corpus / config["video_duration_idx_path"], corpus / config["eval_data_path"]
    full_table, full_val = load_json(video_table), load_jsonl(val_file)
    kept = dict(list(full_table["val"].items())[:5])
    save_json(dict(full_table, val=kept), video_table)
    with open(val_file, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in full_val if row["vid_name"] in kept)
    out = tmp_path / "index"
    first = build_index(out, windowed["conquer"], windowed["first_stage"], config_path, chunk_videos=2, batch_size=4)
    save_json(full_table, video_table)
    with open(val_file, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in full_val)
    summary = build_index(out, windowed["conquer"], windowed["first_stage"], config_path, update=True,
                          chunk_videos=2, batch_size=4)
    updated, fresh = SearchIndex.open(out), SearchIndex.open(windowed["indexes"]["learned"])
    assert (summary["n_encoded"], summary["n_windows"]) == (12 - 5, len(fresh.windows)) and first["n_videos"] == 5
    assert updated.video_names[:5] == list(kept) and sorted(updated.windows) == sorted(fresh.windows)
    rows = [updated.windows.index(window) for window in fresh.windows]
    for name, array in fresh.arrays.items():
        np.testing.assert_allclose(updated.arrays[name].gather(rows), array.gather(np.arange(len(fresh.windows))),
                                   rtol=1e-5, atol=1e-6)
    desc_ids = [row["desc_id"] for row in full_val[:4]]
    assert Searcher(out).search_many(desc_ids, top_k=20) == windowed["learned"].search_many(desc_ids, top_k=20)


def test_runs_whose_windows_disagree_are_refused(windowed, tmp_path):
    def first_stage_copy(name, **changes):
        run = tmp_path / name
        shutil.copytree(windowed["first_stage"], run)
        save_json(dict(load_json(run / OPT_FILENAME), **changes), run / OPT_FILENAME)
        return str(run)

    for run, given in ((first_stage_copy("no_windows", window_stride=0), "--window_stride 0 --max_ctx_len 20"),
                       (first_stage_copy("stride_5", window_stride=5), "--window_stride 5 --max_ctx_len 20"),
                       (first_stage_copy("length_30", max_ctx_len=30), "--window_stride 10 --max_ctx_len 30")):
        argv = ["build", "--first_stage", run, "--conquer", windowed["conquer"], "--dataset_config",
                windowed["corpus"], "--out_dir", str(tmp_path / "index")]
        with pytest.raises(SearchIndexError) as error:
            search.main(argv)
        assert str(error.value) == (
            f"--first_stage {run} was trained with {given} but --conquer {windowed['conquer']} with --window_stride "
            "10 --max_ctx_len 20: the index holds one set of windows for both stages; use runs trained with the "
            "same --window_stride and --max_ctx_len")
    assert not os.path.exists(tmp_path / "index")


def test_an_index_of_the_previous_format_asks_for_a_rebuild(windowed, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(windowed["indexes"]["ranklist"], index)
    manifest_path = os.path.join(SearchIndex.open(index).version_dir, "manifest.json")
    save_json(dict(load_json(manifest_path), format_version=1), manifest_path)
    with pytest.raises(SearchIndexError, match=r"version 1, expected 'conquer-search-index' version 2 \(rows are "
                                               r"windows\); rebuild it \(build --overwrite\)$"):
        Searcher(index)


def test_search_page_plays_a_moment_past_the_first_window(windowed):
    """The page shows whole-video seconds and seeks the whole video file to a moment of a later window."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from waitress.server import create_server

    from method.search_server import create_app
    searcher = windowed["ranklist"]
    videos = os.path.join(os.path.dirname(windowed["corpus"]), "videos")
    os.makedirs(videos)
    for name, (duration, _) in load_json(load_data_config(windowed["corpus"]).video_duration_idx_path)["val"].items():
        write_webm(os.path.join(videos, f"{name}.webm"), seconds=int(np.ceil(duration)) + 2)
    desc_id, rank, moment = next((row["desc_id"], rank, m) for row in searcher.dataset.query_data
                                 for rank, m in enumerate(searcher.search(row["desc_id"], top_k=100))
                                 if m.start >= MAX_CTX_LEN * CLIP_LENGTH)
    httpd = create_server(create_app(searcher), host="127.0.0.1", port=0, threads=2)
    threading.Thread(target=httpd.run, daemon=True).start()
    driver = headless_chromium()
    try:
        driver.get(f"http://127.0.0.1:{httpd.effective_port}/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: "12 videos (28 windows)" in d.find_element(By.ID, "about").text)
        assert driver.find_element(By.ID, "kind").get_attribute("value") == "desc_id"
        driver.find_element(By.ID, "query").send_keys(str(desc_id))
        top_k = driver.find_element(By.ID, "top_k")
        top_k.clear()
        top_k.send_keys("100")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.moment")) > rank)
        row = driver.find_elements(By.CSS_SELECTOR, "tr.moment")[rank]
        assert [c.text for c in row.find_elements(By.TAG_NAME, "td")[1:4]] == [
            moment.video_name, f"{moment.start:.2f}", f"{moment.end:.2f}"]
        row.click()
        player = driver.find_element(By.ID, "player")
        wait.until(lambda d: d.execute_script("return arguments[0].readyState >= 1 && "
                                              "arguments[0].currentTime >= arguments[1] - 0.01", player, moment.start))
        assert moment.video_name in player.get_attribute("src")
        assert abs(driver.execute_script("return arguments[0].currentTime", player) - moment.start) < 1.0
    finally:
        driver.quit()
        httpd.close()


def test_search_page_shows_a_moment_past_the_first_window_on_the_whole_video(windowed, tmp_path):
    """A windowed index of the long corpus with its videos: the page marks a moment of a later window on the whole
    video's timeline, and its thumbnail is the sprite's tile of that time of the whole video."""
    from tests.integration.test_search_page import (READ_ROWS, assert_marker_is_the_moment, corpus_with_videos,
                                                    search_on_page, serve)
    from utils.thumbnails import SpriteLayout, tile_at, tile_position
    config_path, durations = corpus_with_videos(windowed["corpus"], tmp_path / "corpus")
    searcher = Searcher(build_index(tmp_path / "index", windowed["conquer"], "ranklist", config_path, "val",
                                    batch_size=6)["out_dir"])
    assert searcher.index.reads_windows and sorted(searcher.index.thumbnails) == sorted(durations)
    desc_id, rank, moment = next((row["desc_id"], rank, m) for row in searcher.dataset.query_data
                                 for rank, m in enumerate(searcher.search(row["desc_id"], top_k=100))
                                 if m.start >= MAX_CTX_LEN * CLIP_LENGTH)
    layout = SpriteLayout(**searcher.index.thumbnails[moment.video_name][1])
    tile = tile_at(layout, (moment.start + min(moment.end, durations[moment.video_name])) / 2)
    assert tile >= MAX_CTX_LEN and layout.seconds_per_tile == CLIP_LENGTH
    httpd, url = serve(searcher)
    driver = headless_chromium()
    try:
        search_on_page(driver, url, desc_id, 100)
        row = driver.execute_script(READ_ROWS)[rank]
        assert row["cells"] == [moment.video_name, f"{moment.start:.2f}", f"{moment.end:.2f}"]
        assert_marker_is_the_moment(row, moment, durations[moment.video_name])
        x, y = tile_position(layout, tile)
        assert row["thumb"]["position"] == f"{-x}px {-y}px"
    finally:
        driver.quit()
        httpd.close()
