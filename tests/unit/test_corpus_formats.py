"""Annotation converters, feature containers, resampling and the subtitle clip assignment."""
import json

import h5py
import numpy as np
import pytest
import torch

from utils.corpus_formats import (CorpusInputError, check_feature_array, convert_anet, convert_didemo,
                                  convert_qvhighlights, convert_tvr, didemo_segment_to_seconds, l2_normalize_rows,
                                  load_subtitles, most_agreed_segment, open_features, parse_srt, resample_rows,
                                  subtitle_clip_features, subtitle_clip_indices)
from utils.feature_stores import VideoFeatureStore, write_video_store


def write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_didemo_segments_are_inclusive_five_second_chunks():
    assert didemo_segment_to_seconds([3, 3]) == [15.0, 20.0]
    assert didemo_segment_to_seconds([1, 4]) == [5.0, 25.0]


def test_most_agreed_segment_counts_annotators_and_breaks_ties_by_listing_order():
    assert most_agreed_segment([[2, 2], [1, 2], [3, 3], [2, 2]]) == [2, 2]
    assert most_agreed_segment([[4, 4], [4, 4], [0, 0], [4, 4], [0, 0], [0, 0], [0, 0]]) == [0, 0]
    assert most_agreed_segment([[1, 2], [3, 3], [3, 3], [1, 2]]) == [1, 2]  # 2 vs 2: listed first wins


def test_convert_didemo(tmp_path):
    rows = [{"annotation_id": 7, "description": "a dog runs", "video": "v1.mp4", "num_segments": 6,
             "times": [[1, 2], [3, 3], [3, 3], [0, 5]]},
            {"annotation_id": 8, "description": "short", "video": "v2.avi", "times": [[0, 0], [1, 1], [1, 1]]}]
    records = convert_didemo(write_json(tmp_path / "val_data.json", rows))
    # The video extension is dropped: features are named by the file stem, as the extractor writes them.
    assert records[0] == dict(desc_id=7, desc="a dog runs", vid_name="v1", duration=None, moment=[15.0, 20.0],
                              annotator_moments=[[15.0, 20.0], [5.0, 15.0], [15.0, 20.0], [0.0, 30.0]])
    assert records[1]["moment"] == [5.0, 10.0] and records[1]["annotator_moments"] is None  # 3 < 4 annotators


def test_convert_anet_numbers_one_query_per_sentence(tmp_path):
    data = {"v_a": {"duration": 80.5, "timestamps": [[0, 10.2], [30, 81]], "sentences": [" A man.", "He sits."]},
            "v_b": {"duration": 20.0, "timestamps": [[1, 2]], "sentences": ["x"]}}
    records = convert_anet(write_json(tmp_path / "train.json", data))
    assert [(r["vid_name"], r["desc"], r["duration"], r["moment"]) for r in records] == [
        ("v_a", "A man.", 80.5, [0.0, 10.2]), ("v_a", "He sits.", 80.5, [30.0, 81.0]), ("v_b", "x", 20.0, [1.0, 2.0])]
    data["v_b"]["timestamps"] = []
    with pytest.raises(CorpusInputError, match="v_b: 0 timestamps for 1 sentences"):
        convert_anet(write_json(tmp_path / "bad.json", data))


def test_convert_qvhighlights_labels_the_first_window_and_evaluates_every_window(tmp_path):
    rows = [{"qid": 5, "query": "a cat", "vid": "yt_60.0_210.0", "duration": 150,
             "relevant_windows": [[10, 20], [40, 44]], "relevant_clip_ids": [5, 6]},
            {"qid": 6, "query": "a dog", "vid": "yt_60.0_210.0", "duration": 150, "relevant_windows": [[0, 8]]}]
    records = convert_qvhighlights(write_jsonl(tmp_path / "val.jsonl", rows))
    assert records == [dict(desc_id=5, desc="a cat", vid_name="yt_60.0_210.0", duration=150.0, moment=[10.0, 20.0],
                            annotator_moments=[[10.0, 20.0], [40.0, 44.0]], ts_min_overlaps=1),
                       dict(desc_id=6, desc="a dog", vid_name="yt_60.0_210.0", duration=150.0, moment=[0.0, 8.0],
                            annotator_moments=None)]
    rows[0]["relevant_windows"][1] = [44, 40]
    with pytest.raises(CorpusInputError, match=r"qid 5: relevant_windows\[1\]: moment \[44, 40\] starts after"):
        convert_qvhighlights(write_jsonl(tmp_path / "bad.jsonl", rows))
    test = convert_qvhighlights(write_jsonl(tmp_path / "test.jsonl", [{k: v for k, v in rows[0].items()
                                                                       if k != "relevant_windows"}]), has_gt=False)
    assert test[0]["moment"] is None


def test_convert_tvr_keeps_type_and_annotator_lists(tmp_path):
    rows = [{"desc_id": 1, "desc": "q", "vid_name": "v", "duration": 9.0, "ts": [1, 2], "type": "v"},
            {"desc_id": 2, "desc": "q", "vid_name": "v", "duration": 9.0, "ts": [[1, 2], [2, 3], [1, 3], [0, 1]]}]
    records = convert_tvr(write_jsonl(tmp_path / "a.jsonl", rows))
    assert records[0]["type"] == "v" and records[0]["moment"] == [1.0, 2.0]
    assert records[1]["moment"] == [1.0, 2.0] and len(records[1]["annotator_moments"]) == 4
    rows[0]["ts"] = [3, 2]
    with pytest.raises(CorpusInputError, match="desc_id 1: ts: moment \\[3, 2\\] starts after it ends"):
        convert_tvr(write_jsonl(tmp_path / "b.jsonl", rows))


def test_convert_tvr_keeps_a_moment_list_with_its_own_rule(tmp_path):
    """A val row a QVHighlights build wrote reads back with every window and its rule (without the rule, two
    windows were cut to the first, and four or more were taken for DiDeMo annotators)."""
    rows = [{"desc_id": 1, "desc": "q", "vid_name": "v", "duration": 90.0, "ts": [[1, 2], [5, 9]],
             "ts_min_overlaps": 1},
            {"desc_id": 2, "desc": "q", "vid_name": "v", "duration": 90.0,
             "ts": [[1, 2], [5, 9], [20, 22], [30, 40]], "ts_min_overlaps": 1}]
    records = convert_tvr(write_jsonl(tmp_path / "a.jsonl", rows))
    assert [r["moment"] for r in records] == [[1.0, 2.0], [1.0, 2.0]]
    assert [r["annotator_moments"] for r in records] == [[[1.0, 2.0], [5.0, 9.0]],
                                                         [[1.0, 2.0], [5.0, 9.0], [20.0, 22.0], [30.0, 40.0]]]
    assert [r["ts_min_overlaps"] for r in records] == [1, 1]
    rows[0]["ts_min_overlaps"] = 3
    with pytest.raises(CorpusInputError, match="desc_id 1: ts_min_overlaps must be an integer from 1 to the 2"):
        convert_tvr(write_jsonl(tmp_path / "b.jsonl", rows))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_l2_normalisation_is_the_video_stores_bit_for_bit(tmp_path, dtype):
    """The builder's (and extractor's) normalisation is the formula the video store reads with (the original's)."""
    features = (np.random.default_rng(0).normal(size=(6, 5)) * 3).astype(dtype)
    features[2] = 0
    write_video_store(tmp_path / "v", {"a": features})
    normalised = l2_normalize_rows(features)
    assert normalised.dtype == dtype and not normalised[2].any()
    np.testing.assert_array_equal(normalised.astype(np.float32), VideoFeatureStore(tmp_path / "v").get("a"))


def test_feature_containers_return_the_stored_arrays(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {name: rng.normal(size=(3, 4)).astype(np.float32) for name in ("a.mp4", "b", "c")}
    folder = tmp_path / "feats"
    folder.mkdir()
    np.save(folder / "a.mp4.npy", arrays["a.mp4"])
    np.savez(folder / "b.npz", features=arrays["b"])
    torch.save({"features": torch.from_numpy(arrays["c"])}, folder / "c.pt")
    with h5py.File(tmp_path / "feats.h5", "w") as f:
        for name, array in arrays.items():
            f.create_dataset(name, data=array)
    for path in (folder, tmp_path / "feats.h5"):
        source = open_features(str(path))
        assert sorted(source.keys()) == sorted(arrays)
        for name, array in arrays.items():
            assert np.array_equal(source.get(name), array)
        source.close()


def test_unreadable_feature_file_names_file_and_key(tmp_path):
    folder = tmp_path / "feats"
    folder.mkdir()
    np.save(folder / "v.npy", np.ones((50, 8), dtype=np.float32))
    data = (folder / "v.npy").read_bytes()
    (folder / "v.npy").write_bytes(data[:len(data) // 2])
    with pytest.raises(CorpusInputError, match="v.npy: cannot read features of key 'v'"):
        open_features(str(folder)).get("v")


def test_check_feature_array_rejects_bad_values():
    with pytest.raises(CorpusInputError, match="here: NaN or infinite value in row 1"):
        check_feature_array(np.array([[0.0, 1.0], [np.inf, 0.0]]), "here")
    with pytest.raises(CorpusInputError, match="expected feature dim 3 .* found 2"):
        check_feature_array(np.zeros((2, 2)), "here", dim=3)


def test_resample_rows_averages_the_overlapped_rows():
    rows = np.arange(6, dtype=np.float32)[:, None]  # 6 rows of 1 s
    out = resample_rows(rows, 1.0, 1.5)  # clips [0,1.5) [1.5,3) [3,4.5) [4.5,6)
    expected = np.array([(0 + 0.5 * 1) / 1.5, (0.5 * 1 + 2) / 1.5, (3 + 0.5 * 4) / 1.5, (0.5 * 4 + 5) / 1.5])
    assert np.allclose(out[:, 0], expected)
    assert np.array_equal(resample_rows(rows, 1.0, 1.0), rows)


def test_subtitle_clip_assignment_against_a_hand_computed_case():
    # clip length 1.5, 5 clips: [0,1.5) [1.5,3) [3,4.5) [4.5,6) [6,7.5)
    sentences = [dict(start=0.2, end=1.4), dict(start=1.0, end=3.2), dict(start=9.0, end=10.0)]
    assert list(subtitle_clip_indices(0.2, 1.4, 1.5, 5)) == [0]
    assert list(subtitle_clip_indices(1.0, 3.2, 1.5, 5)) == [0, 1, 2]
    assert list(subtitle_clip_indices(9.0, 10.0, 1.5, 5)) == []  # after the video
    tokens = [np.array([[1.0, -5.0], [0.0, 2.0]]), np.array([[3.0, -1.0]]), np.array([[9.0, 9.0]])]
    clips = subtitle_clip_features(sentences, [t.astype(np.float32) for t in tokens], 5, 1.5)
    assert np.array_equal(clips, np.array([[3, 2], [3, -1], [3, -1], [0, 0], [0, 0]], dtype=np.float32))


def test_subtitles_from_srt_and_jsonl(tmp_path):
    (tmp_path / "subs").mkdir()
    (tmp_path / "subs" / "show_1.srt").write_text(
        "1\n00:00:01,500 --> 00:00:03,000\nHello there.\n\n2\n00:01:02,250 --> 00:01:04,000\nHow are\nyou?\n")
    assert parse_srt(str(tmp_path / "subs" / "show_1.srt")) == [
        dict(text="Hello there.", start=1.5, end=3.0), dict(text="How are you?", start=62.25, end=64.0)]
    assert list(load_subtitles(str(tmp_path / "subs"))) == ["show_1"]
    path = write_jsonl(tmp_path / "subs.jsonl", [{"vid_name": "v", "sub": [{"text": "a", "start": 0, "end": 1}]}])
    assert load_subtitles(path) == {"v": [{"text": "a", "start": 0, "end": 1}]}


def test_video_names_lose_a_video_extension_and_features_match_with_or_without_it(tmp_path):
    from utils.corpus_formats import video_name
    assert [video_name(n) for n in ("123.mp4", "a.b.MOV", "clip.npy", "v_x", ".mp4", 17)] == [
        "123", "a.b", "clip.npy", "v_x", ".mp4", "17"]
    rows = [dict(desc_id=1, desc="q", vid_name="v1.mkv", duration="12.5", ts=[0, 2])]
    assert convert_tvr(write_jsonl(tmp_path / "a.jsonl", rows))[0]["vid_name"] == "v1"
    folder = tmp_path / "feats"
    folder.mkdir()
    np.save(folder / "v1.mp4.npy", np.ones((2, 3), np.float32))  # features named after the file
    features = open_features(str(folder))
    assert "v1" in features and features.get("v1").shape == (2, 3) and "v2" not in features
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["v1.mp4"] = np.ones((4, 3), np.float32)
        f["v1"] = np.zeros((1, 3), np.float32)
        f["v2.avi"] = np.ones((5, 3), np.float32)
    h5 = open_features(str(tmp_path / "f.h5"))
    assert h5.get("v1").shape == (1, 3) and h5.get("v2").shape == (5, 3)  # a key as it is wins over an alias
    h5.close()
    subtitles = tmp_path / "subs.jsonl"
    write_jsonl(subtitles, [dict(vid_name="v1.mp4", sub=[dict(text="hi", start=0, end=1)])])
    assert list(load_subtitles(str(subtitles))) == ["v1"]


@pytest.mark.parametrize("duration", ["long", None, [3], -1, float("nan"), True])
def test_a_non_numeric_duration_is_a_one_line_error(tmp_path, duration):
    rows = [dict(desc_id=1, desc="q", vid_name="v1", duration=duration, ts=[0, 2])]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    if duration is None:  # no duration: the builder takes it from the features
        assert convert_tvr(path)[0]["duration"] is None
        return
    with pytest.raises(CorpusInputError, match=r"a.jsonl: desc_id 1: duration must be a positive number of seconds"):
        convert_tvr(path)
    anet = write_json(tmp_path / "anet.json",
                      {"v_a": {"duration": duration, "timestamps": [[0, 1]], "sentences": ["x"]}})
    with pytest.raises(CorpusInputError, match=r"anet.json: video v_a: duration must be a positive number"):
        convert_anet(anet)


def test_non_numeric_durations_are_one_line_errors(tmp_path):
    import json

    from utils.corpus_formats import CorpusInputError, convert_qvhighlights
    from utils.build_corpus import load_durations
    path = tmp_path / "qv.jsonl"
    path.write_text(json.dumps(dict(qid=1, query="q", vid="v", duration="long", relevant_windows=[[0, 2]])) + "\n")
    with pytest.raises(CorpusInputError, match=r"qv.jsonl: qid 1: duration must be a positive number .* 'long'"):
        convert_qvhighlights(str(path))
    durations = tmp_path / "durations.json"
    durations.write_text(json.dumps({"v": "n/a"}))
    with pytest.raises(CorpusInputError, match=r"durations.json: video 'v': duration must be a positive number"):
        load_durations(str(durations))
