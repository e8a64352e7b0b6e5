"""LMDB feature stores: release encodings, post-processing, lazy per-process opening, clear errors."""
import io
import multiprocessing
import os
import pickle

import lmdb
import msgpack
import msgpack_numpy
import numpy as np
import pytest

from utils import feature_stores
from utils.feature_stores import (FeatureStoreError, QueryFeatureStore, RanklistStore, StoreWriter,
                                  SubtitleFeatureStore, VideoFeatureStore, close_store, encode_npz_features,
                                  write_query_store, write_ranklist_store, write_subtitle_store, write_video_store)


def _features(seed, n, d):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _write_raw(path, values):
    """Write {key bytes: value bytes} with plain lmdb calls (not our writer)."""
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in values.items():
            txn.put(key, value)
    env.close()


def _reference_l2(x):
    return x / (np.sqrt((x.astype(np.float64) ** 2).sum(axis=1, keepdims=True)) + 1e-5)


def test_query_and_subtitle_round_trip_with_truncation(tmp_path):
    query = {90200: _features(0, 7, 6), 5: _features(1, 3, 6)}
    write_query_store(tmp_path / "q", query)
    store = QueryFeatureStore(tmp_path / "q")
    for desc_id, features in query.items():
        got = store.get(desc_id)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, features)  # no normalisation
    np.testing.assert_array_equal(QueryFeatureStore(tmp_path / "q", max_len=4).get(90200), query[90200][:4])

    subs = {"vid_a": _features(2, 9, 5)}
    write_subtitle_store(tmp_path / "s", subs.items())  # an iterable of pairs is accepted too
    np.testing.assert_array_equal(SubtitleFeatureStore(tmp_path / "s", max_len=4, dim=5).get("vid_a"),
                                  subs["vid_a"][:4])


def test_video_round_trip_normalises_after_truncation(tmp_path):
    features = _features(3, 10, 4) * 7
    features[9] *= 1000  # a row beyond the truncation must not matter
    write_video_store(tmp_path / "v", {"vid_a": features})
    got = VideoFeatureStore(tmp_path / "v", max_len=6).get("vid_a")
    assert got.shape == (6, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference_l2(features[:6]), rtol=1e-6)
    zero = np.zeros((2, 4), np.float32)
    write_video_store(tmp_path / "z", {"vid_z": zero})
    np.testing.assert_array_equal(VideoFeatureStore(tmp_path / "z").get("vid_z"), zero)  # eps: 0 stays 0


def test_ranklist_round_trip(tmp_path):
    ranklist = [(19614, 0.93), (19700, 0.5), (20001, -1.25)]
    write_ranklist_store(tmp_path / "r", {7: ranklist})
    got = RanklistStore(tmp_path / "r").get(7)
    assert got == ranklist
    assert all(isinstance(i, int) and isinstance(s, float) for i, s in got)


def test_release_encodings_written_without_our_writer(tmp_path):
    query, sub, visual = _features(4, 5, 3), _features(5, 4, 2), _features(6, 4, 3)
    npz = io.BytesIO()
    np.savez(npz, features=query)
    _write_raw(tmp_path / "q", {b"90200": npz.getvalue()})
    npz = io.BytesIO()
    np.savez(npz, features=sub)
    _write_raw(tmp_path / "s", {b"friends_s01e03_seg02_clip_19": npz.getvalue()})
    _write_raw(tmp_path / "v", {b"friends_s01e03_seg02_clip_19": msgpack_numpy.packb({"features": visual})})
    _write_raw(tmp_path / "r", {b"90200": msgpack.packb([[19614, 0.75], [19615, 0.5]])})

    np.testing.assert_array_equal(QueryFeatureStore(tmp_path / "q").get(90200), query)
    np.testing.assert_array_equal(SubtitleFeatureStore(tmp_path / "s").get("friends_s01e03_seg02_clip_19"), sub)
    np.testing.assert_allclose(VideoFeatureStore(tmp_path / "v").get("friends_s01e03_seg02_clip_19"),
                               _reference_l2(visual), rtol=1e-6)
    assert RanklistStore(tmp_path / "r").get("90200") == [(19614, 0.75), (19615, 0.5)]


def test_keys_len_contains(tmp_path):
    write_query_store(tmp_path / "q", {3: _features(0, 1, 2), 10: _features(1, 1, 2)})
    store = QueryFeatureStore(tmp_path / "q")
    assert sorted(store.keys()) == ["10", "3"] and len(store) == 2
    assert 3 in store and "10" in store and 4 not in store


def test_missing_store_directory_names_the_path(tmp_path):
    with pytest.raises(FeatureStoreError, match="video store .*nowhere.*data.mdb"):
        VideoFeatureStore(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatureStoreError, match="without data.mdb"):
        RanklistStore(tmp_path / "empty")


def test_missing_key_names_store_and_key(tmp_path):
    write_video_store(tmp_path / "v", {"vid_a": _features(0, 2, 3)})
    with pytest.raises(FeatureStoreError, match=r"video store .*/v: key 'vid_b' not found"):
        VideoFeatureStore(tmp_path / "v").get("vid_b")
    write_ranklist_store(tmp_path / "r", {1: [(0, 1.0)]})
    with pytest.raises(FeatureStoreError, match=r"ranklist store .*/r: key '2' not found"):
        RanklistStore(tmp_path / "r").get(2)


@pytest.mark.parametrize("store_class,value", [
    (QueryFeatureStore, b"not an npz archive"),
    (SubtitleFeatureStore, msgpack_numpy.packb({"features": np.zeros((2, 2))})),  # video encoding in a sub store
    (VideoFeatureStore, b"\xc1garbage"),
    (VideoFeatureStore, msgpack_numpy.packb({"feats": np.zeros((2, 2))})),  # no `features`
    (RanklistStore, msgpack.packb({"a": 1})),
    (RanklistStore, msgpack.packb([[1, 0.5, 3]])),
])
def test_undecodable_value_names_store_key_and_expected_encoding(tmp_path, store_class, value):
    _write_raw(tmp_path / "s", {b"k1": value})
    store = store_class(tmp_path / "s")
    with pytest.raises(FeatureStoreError, match=rf"{store.kind} store .*: key 'k1': value cannot be decoded as"):
        store.get("k1")


def test_bad_feature_arrays_are_reported(tmp_path):
    bad = {"dim5": _features(0, 3, 5), "nan": _features(1, 4, 4), "inf_late": _features(2, 6, 4),
           "empty": np.zeros((0, 4), np.float32), "one_d": np.zeros(4, np.float32)}
    bad["nan"][2, 1] = np.nan
    bad["inf_late"][5, 0] = np.inf
    write_video_store(tmp_path / "v", bad)
    store = VideoFeatureStore(tmp_path / "v", dim=4)
    with pytest.raises(FeatureStoreError, match="key 'dim5': expected feature dim 4, found 5"):
        store.get("dim5")
    with pytest.raises(FeatureStoreError, match="key 'nan': expected finite values, found NaN/inf in row 2"):
        store.get("nan")
    assert store.get("empty").shape == (0, 4)  # accepted, as by the original
    with pytest.raises(FeatureStoreError, match="key 'one_d': expected a numeric 2-d"):
        store.get("one_d")
    with pytest.raises(FeatureStoreError, match="row 5"):
        store.get("inf_late")
    # Rows cut by max_len are never used, so they are not checked either.
    assert VideoFeatureStore(tmp_path / "v", max_len=5).get("inf_late").shape == (5, 4)


def test_readers_share_one_lazily_opened_env_per_path(tmp_path):
    write_query_store(tmp_path / "q", {1: _features(0, 2, 2)})
    key = (os.getpid(), os.path.realpath(tmp_path / "q"))
    first, second = QueryFeatureStore(tmp_path / "q"), QueryFeatureStore(str(tmp_path / "q") + "/")
    assert key not in feature_stores._envs  # nothing opened by construction
    first.get(1)
    second.get(1)  # a second lmdb.open of the path would raise in py-lmdb 3
    assert sum(k == key for k in feature_stores._envs) == 1
    close_store(tmp_path / "q")
    assert key not in feature_stores._envs
    np.testing.assert_array_equal(first.get(1), _features(0, 2, 2))  # reopens


def test_rewriting_an_open_store_is_seen_by_its_readers(tmp_path):
    write_query_store(tmp_path / "q", {1: _features(0, 2, 2)})
    reader = QueryFeatureStore(tmp_path / "q")
    reader.get(1)
    write_query_store(tmp_path / "q", {1: _features(1, 3, 2)})
    np.testing.assert_array_equal(reader.get(1), _features(1, 3, 2))
    assert os.listdir(tmp_path) == ["q"]  # neither the temporary folder nor the previous store is left


def test_failed_write_leaves_the_previous_store(tmp_path):
    write_query_store(tmp_path / "q", {1: _features(0, 2, 2)})

    def items():
        yield 1, _features(1, 2, 2)
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError):
        write_query_store(tmp_path / "q", items())
    np.testing.assert_array_equal(QueryFeatureStore(tmp_path / "q").get(1), _features(0, 2, 2))
    assert os.listdir(tmp_path) == ["q"]


def test_two_writers_of_one_path_do_not_destroy_each_others_store(tmp_path):
    """A fixed `<path>.partial` made the second writer delete the first one's open store; now each builds in its
    own folder and the last to finish replaces the other's store."""
    with StoreWriter(tmp_path / "q", encode_npz_features) as first:
        first.put(1, _features(0, 2, 2))
        with StoreWriter(tmp_path / "q", encode_npz_features) as second:
            second.put(2, _features(1, 2, 2))
        first.put(3, _features(2, 2, 2))
    store = QueryFeatureStore(tmp_path / "q")
    assert sorted(store.keys()) == ["1", "3"]
    np.testing.assert_array_equal(store.get(3), _features(2, 2, 2))
    assert os.listdir(tmp_path) == ["q"]


def test_writer_grows_the_map(tmp_path, monkeypatch):
    monkeypatch.setattr(feature_stores.StoreWriter, "_CHUNK_BYTES", 1 << 20)
    big = {f"vid_{i}": np.full((256, 512), i, np.float32) for i in range(140)}  # ~73 MB > initial 64 MB map
    write_video_store(tmp_path / "v", big)
    store = VideoFeatureStore(tmp_path / "v")
    assert len(store) == 140
    np.testing.assert_allclose(store.get("vid_139")[0], np.full(512, 1 / np.sqrt(512)), rtol=1e-5)


def _read_in_child(reader, key, queue):
    queue.put(reader.get(key).tolist())


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_reader_works_in_child_processes_after_parent_opened(tmp_path, start_method):
    write_query_store(tmp_path / "q", {1: _features(0, 2, 3)})
    reader = QueryFeatureStore(tmp_path / "q")
    expected = reader.get(1).tolist()  # the parent has the env open
    context = multiprocessing.get_context(start_method)
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(reader, 1, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and got == expected
    assert reader.get(1).tolist() == expected  # the parent's env still works


def test_reader_pickles_without_its_environment(tmp_path):
    write_query_store(tmp_path / "q", {1: _features(0, 2, 3)})
    reader = QueryFeatureStore(tmp_path / "q", max_len=1)
    reader.get(1)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.max_len == 1 and clone.get(1).shape == (1, 3)


@pytest.mark.parametrize("n_entries, rows", [(40, 300), (20000, 0)])
def test_writer_sizes_the_map_from_the_data(tmp_path, n_entries, rows):
    """Large values (overflow pages) and many tiny ones: every value is stored, and the map is computed from
    the data (a few MiB over what the store uses), not a fixed guess."""
    features = {f"v{i}": np.full((rows, 64), i, dtype=np.float32) for i in range(n_entries)}
    write_query_store(tmp_path / "store", features)
    env = lmdb.open(str(tmp_path / "store"), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.stat()["entries"] == n_entries
        assert all(np.array_equal(feature_stores.decode_npz_features(txn.get(k.encode())), v)
                   for k, v in features.items())
    used = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    assert used <= env.info()["map_size"] <= 4 * used + (4 << 20)
    env.close()


def test_expect_dims_names_the_store_and_the_option_then_checks_every_read(tmp_path):
    from utils.feature_stores import expect_dims
    write_query_store(str(tmp_path / "q"), {1: np.zeros((3, 4), np.float32), 2: np.zeros((3, 5), np.float32)})
    store = QueryFeatureStore(str(tmp_path / "q"))
    with pytest.raises(FeatureStoreError, match=r"features have dim 4 \(key '1'\) but the model expects "
                                                r"--query_dim 6; pass --query_dim 4"):
        expect_dims([(store, 1, 6, "--query_dim")])
    expect_dims([(store, 1, 4, "--query_dim")])
    with pytest.raises(FeatureStoreError, match="key '2': expected feature dim 4, found 5"):
        store.get(2)
