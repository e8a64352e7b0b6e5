"""Readers of the formats moment-retrieval corpora come in: annotations, feature containers, subtitles.

Annotation converters turn one split's file into query records
    {"desc_id": int, "desc": str, "vid_name": str, "duration": float or None, "moment": [st, ed] or None,
     "annotator_moments": [[st, ed], ...] or None, "ts_min_overlaps": int (only with a rule of its own),
     "type": "v" | "t" | "vt" (TVR only)}
in seconds. `moment` is the training label; `annotator_moments` are every moment evaluation scores against
(written as the `ts` list of the val / test rows), the label first. None where the file gives no moment (a
test split without ground truth) or no duration (DiDeMo: the builder takes it from the features).

Evaluation rules (utils/standalone_eval.py):
* DiDeMo: every annotator's moment (when there are >= 4): a prediction is correct at IoU θ when it overlaps
  at least two of them by θ; the label is the most agreed moment.
* QVHighlights: every relevant window, with `ts_min_overlaps` 1: a prediction is correct at IoU θ when its
  best-IoU window reaches θ, as the official metric scores it; the label is the first window. A query with one
  window has just that moment.
* TVR-format files: a `ts` list of >= 4 pairs, or any list of pairs with `ts_min_overlaps`, is kept with it.

| format        | file                              | fields used                                                   |
|---------------|-----------------------------------|---------------------------------------------------------------|
| tvr           | jsonl, one query a line           | desc_id, desc, vid_name, duration, ts ([st, ed] or a list of  |
|               |                                   | [st, ed] pairs), type                                         |
| didemo        | {train,val,test}_data.json: a     | annotation_id, description, video, times: [[s_idx, e_idx],    |
|               | JSON list of queries              | ...] one pair per annotator, 5-second segment indices,        |
|               |                                   | inclusive: (1, 4) is 5 s .. 25 s                              |
| anet          | ActivityNet Captions {train,      | {video_id: {duration, timestamps: [[st, ed], ...],            |
|               | val_1,val_2}.json                 | sentences: [...]}}, one query per sentence                    |
| qvhighlights  | Moment-DETR jsonl                 | qid, query, vid, duration, relevant_windows: [[st, ed], ...]  |

Feature containers (`open_features`): a folder of per-item files `<key>.npy`, `<key>.npz` (array `features`,
Moment-DETR style) or `<key>.pt` (a tensor, or a dict with `features`), or one HDF5 file whose datasets are
named by key. Every array read is checked: 2-d, numeric, finite, at least one row.

Subtitles (`load_subtitles`): a jsonl file of {"vid_name", "sub": [{"text", "start", "end"}, ...]} (the
TVR subtitle format) or a folder of `<vid_name>.srt` files.
"""
import collections
import os
import re
import zipfile

import numpy as np

from utils.errors import ConquerError
from utils.feature_stores import VISUAL_L2_EPS
from utils.io_utils import DataFileError, load_json, load_jsonl
from utils.standalone_eval import TS_MIN_OVERLAPS
from utils.tvr_format import MULTI_MOMENT_MIN_COUNT
from utils.video_decoding import VIDEO_EXTENSIONS

ANNOTATION_FORMATS = ("tvr", "didemo", "anet", "qvhighlights")
DIDEMO_SEGMENT_SECONDS = 5.0
FEATURE_FILE_EXTENSIONS = (".npy", ".npz", ".pt")


class CorpusInputError(ConquerError):
    """An input file of the corpus builder is missing, unreadable or malformed; names the file and key."""


# ---------------------------------------------------------------------------------------------------
# Annotations

def _require(row, keys, path, index):
    missing = [key for key in keys if key not in row] if isinstance(row, dict) else list(keys)
    if missing:
        raise CorpusInputError(f"{path}: entry {index}: missing field(s) {missing} (expected {list(keys)})")


def _int_id(value, path, field, index):
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.isdigit():
            return int(value)
        raise CorpusInputError(f"{path}: entry {index}: {field} must be an integer, found {value!r}")
    return value


def video_name(value):
    """An annotation's video as the corpus names it: without a video file extension ("123.mp4" -> "123", as
    DiDeMo's `video` field), the name the extractor gives its features (<file stem>.npy) and the search its
    video files (<name>.<extension>)."""
    name = str(value)
    stem, extension = os.path.splitext(name)
    return stem if stem and extension.lower() in VIDEO_EXTENSIONS else name


def duration_seconds(value, path, where):
    """A duration in seconds as float (numbers or numeric strings); CorpusInputError naming where otherwise."""
    try:
        seconds = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        seconds = None
    if seconds is None or not np.isfinite(seconds) or seconds <= 0:
        raise CorpusInputError(f"{path}: {where}: duration must be a positive number of seconds, found {value!r}")
    return seconds


def _moment(pair, path, where):
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2
            and all(isinstance(t, (int, float)) and not isinstance(t, bool) and np.isfinite(t) for t in pair)):
        raise CorpusInputError(f"{path}: {where}: expected a moment [start, end] in seconds, found {pair!r}")
    start, end = float(pair[0]), float(pair[1])
    if start > end:
        raise CorpusInputError(f"{path}: {where}: moment {list(pair)} starts after it ends")
    return [start, end]


def convert_tvr(path, has_gt=True):
    """This project's jsonl: rows are kept as they are (ts: one [st, ed], a list of >= 4 pairs, or a list of pairs
    with `ts_min_overlaps`)."""
    records = []
    for i, row in enumerate(load_jsonl(path)):
        _require(row, ("desc_id", "desc"), path, i)
        desc_id = _int_id(row["desc_id"], path, "desc_id", i)
        record = dict(desc_id=desc_id, desc=str(row["desc"]),
                      vid_name=None if row.get("vid_name") is None else video_name(row["vid_name"]),
                      duration=None if row.get("duration") is None else duration_seconds(row["duration"], path,
                                                                                   f"desc_id {desc_id}"),
                      moment=None, annotator_moments=None)
        if "type" in row:
            record["type"] = row["type"]
        if has_gt or "ts" in row:
            _require(row, ("vid_name", "duration", "ts"), path, i)
            ts = row["ts"]
            multi = isinstance(ts, list) and len(ts) > 0 and all(isinstance(p, (list, tuple)) for p in ts)
            moments = [_moment(p, path, f"desc_id {record['desc_id']}: ts") for p in (ts if multi else [ts])]
            record["moment"] = moments[0]
            min_overlaps = row.get(TS_MIN_OVERLAPS)
            if min_overlaps is not None:
                record[TS_MIN_OVERLAPS] = _min_overlaps(min_overlaps, len(moments), path, desc_id)
            record["annotator_moments"] = (moments if len(moments) >= MULTI_MOMENT_MIN_COUNT or min_overlaps is not None
                                           else None)
        records.append(record)
    return records


def _min_overlaps(value, n_moments, path, desc_id):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= n_moments:
        raise CorpusInputError(f"{path}: desc_id {desc_id}: {TS_MIN_OVERLAPS} must be an integer from 1 to the "
                               f"{n_moments} moments of ts, found {value!r}")
    return value


def most_agreed_segment(times):
    """The (s_idx, e_idx) pair chosen by most annotators; a tie goes to the pair listed first."""
    counts = collections.Counter(tuple(pair) for pair in times)  # insertion-ordered: ties keep list order
    return list(max(counts, key=counts.get))


def didemo_segment_to_seconds(pair):
    """Inclusive 5-second segment indices -> [start, end] seconds: (1, 4) -> [5.0, 25.0]."""
    return [pair[0] * DIDEMO_SEGMENT_SECONDS, (pair[1] + 1) * DIDEMO_SEGMENT_SECONDS]


def convert_didemo(path, has_gt=True):
    """DiDeMo {train,val,test}_data.json: the moment is the most agreed segment, the annotator moments every
    annotator's segment, the most agreed first (when there are enough for the evaluator's multi-moment rule);
    durations are left to the features."""
    rows = load_json(path)
    if not isinstance(rows, list):
        raise CorpusInputError(f"{path}: expected a JSON list of DiDeMo queries, found {type(rows).__name__}")
    records = []
    for i, row in enumerate(rows):
        _require(row, ("annotation_id", "description", "video") + (("times",) if has_gt else ()), path, i)
        desc_id = _int_id(row["annotation_id"], path, "annotation_id", i)
        record = dict(desc_id=desc_id, desc=str(row["description"]), vid_name=video_name(row["video"]), duration=None,
                      moment=None, annotator_moments=None)
        if "times" in row:
            times = row["times"]
            if not (isinstance(times, list) and times and all(
                    isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(s, int) and s >= 0 for s in p)
                    and p[0] <= p[1] for p in times)):
                raise CorpusInputError(f"{path}: annotation_id {desc_id}: times must be a non-empty list of "
                                       f"[start_segment, end_segment] index pairs, found {times!r}")
            best = most_agreed_segment(times)
            record["moment"] = didemo_segment_to_seconds(best)
            if len(times) >= MULTI_MOMENT_MIN_COUNT:
                # The most agreed moment first (the label of a loss on this split), the others in file order.
                others = [list(p) for p in times]
                others.remove(best)
                record["annotator_moments"] = [didemo_segment_to_seconds(p) for p in [best] + others]
        records.append(record)
    return records


def convert_anet(path, has_gt=True):
    """ActivityNet Captions: one query per sentence; desc_ids are numbered later, in file order."""
    videos = load_json(path)
    if not isinstance(videos, dict):
        raise CorpusInputError(f"{path}: expected a JSON object {{video_id: {{duration, timestamps, sentences}}}}")
    records = []
    for vid_name, video in videos.items():
        _require(video, ("duration", "sentences") + (("timestamps",) if has_gt else ()), path, vid_name)
        sentences = video["sentences"]
        timestamps = video.get("timestamps")
        duration = duration_seconds(video["duration"], path, f"video {vid_name}")
        if timestamps is not None and len(timestamps) != len(sentences):
            raise CorpusInputError(f"{path}: video {vid_name}: {len(timestamps)} timestamps for "
                                   f"{len(sentences)} sentences (expected one each)")
        for j, sentence in enumerate(sentences):
            moment = None if timestamps is None else _moment(timestamps[j], path, f"video {vid_name}: timestamps[{j}]")
            records.append(dict(desc_id=None, desc=str(sentence).strip(), vid_name=video_name(vid_name),
                                duration=duration, moment=moment, annotator_moments=None))
    return records


def convert_qvhighlights(path, has_gt=True):
    """QVHighlights / Moment-DETR jsonl: the first relevant window is the training label; evaluation scores every
    window, a prediction being correct when its best-IoU window reaches θ (`ts_min_overlaps` 1), as the
    official metric."""
    records = []
    for i, row in enumerate(load_jsonl(path)):
        _require(row, ("qid", "query", "vid", "duration") + (("relevant_windows",) if has_gt else ()), path, i)
        desc_id = _int_id(row["qid"], path, "qid", i)
        record = dict(desc_id=desc_id, desc=str(row["query"]), vid_name=str(row["vid"]),
                      duration=duration_seconds(row["duration"], path, f"qid {row['qid']}"), moment=None,
                      annotator_moments=None)
        if "relevant_windows" in row:
            windows = row["relevant_windows"]
            if not (isinstance(windows, list) and windows):
                raise CorpusInputError(f"{path}: qid {desc_id}: relevant_windows must be a non-empty list, "
                                       f"found {windows!r}")
            moments = [_moment(w, path, f"qid {desc_id}: relevant_windows[{j}]") for j, w in enumerate(windows)]
            record["moment"] = moments[0]
            if len(moments) > 1:
                record.update(annotator_moments=moments, **{TS_MIN_OVERLAPS: 1})
        records.append(record)
    return records


CONVERTERS = dict(tvr=convert_tvr, didemo=convert_didemo, anet=convert_anet, qvhighlights=convert_qvhighlights)


def load_annotations(annotation_format, path, has_gt=True):
    """Query records of one split file (see the module docstring)."""
    if annotation_format not in CONVERTERS:
        raise CorpusInputError(f"annotation format {annotation_format!r}: expected one of {ANNOTATION_FORMATS}")
    try:
        return CONVERTERS[annotation_format](path, has_gt)
    except DataFileError as e:
        raise CorpusInputError(str(e)) from None


# ---------------------------------------------------------------------------------------------------
# Feature containers

def check_feature_array(array, where, dim=None):
    """`array` as a float32 (n, D) numpy array; CorpusInputError naming `where` unless it is a 2-d numeric
    finite array with at least one row (and D == dim when given)."""
    array = np.asarray(array)
    if array.ndim != 2 or array.dtype.kind not in "fiu" or array.shape[0] == 0:
        raise CorpusInputError(f"{where}: expected a numeric (n_rows >= 1, dim) array, found dtype {array.dtype} "
                               f"shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise CorpusInputError(f"{where}: expected feature dim {dim} (the dim of the other items), found "
                               f"{array.shape[1]}")
    finite = np.isfinite(array)
    if not finite.all():
        row = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise CorpusInputError(f"{where}: NaN or infinite value in row {row}")
    return array.astype(np.float32, copy=False)


def video_aliases(keys):
    """{video_name(key): key} of the keys named with a video file extension ("123.mp4"), whose annotations name
    the video without it (`video_name`); a key present as it is wins over an alias."""
    keys = set(keys)
    return {video_name(key): key for key in keys if video_name(key) != key and video_name(key) not in keys}


class FolderFeatures:
    """A folder of `<key>.npy` / `<key>.npz` / `<key>.pt` files, indexed once when opened."""

    def __init__(self, path):
        self.path = path
        self._files = {}
        for name in os.listdir(path):
            key, extension = os.path.splitext(name)
            if extension not in FEATURE_FILE_EXTENSIONS:
                continue
            if key in self._files:
                raise CorpusInputError(f"{path}: key {key!r} has two feature files ({os.path.basename(self._files[key])}"
                                       f" and {name})")
            self._files[key] = os.path.join(path, name)
        self._aliases = video_aliases(self._files)

    def __contains__(self, key):
        return str(key) in self._files or str(key) in self._aliases

    def keys(self):
        return list(self._files)

    def get(self, key):
        file_path = self._files.get(self._aliases.get(str(key), str(key)))
        if file_path is None:
            raise CorpusInputError(f"{self.path}: no feature file for key {str(key)!r}")
        try:
            if file_path.endswith(".npy"):
                return np.load(file_path, allow_pickle=False)
            if file_path.endswith(".npz"):
                with np.load(file_path, allow_pickle=False) as archive:
                    if "features" not in archive:
                        raise CorpusInputError(f"{file_path}: no array 'features' (found {list(archive.keys())})")
                    return archive["features"]
            return _torch_features(file_path)
        except CorpusInputError:
            raise
        except (OSError, ValueError, EOFError, RuntimeError, zipfile.BadZipFile, KeyError) as e:
            raise CorpusInputError(f"{file_path}: cannot read features of key {str(key)!r} "
                                   f"({type(e).__name__}: {e})") from None

    def close(self):
        pass


def _torch_features(file_path):
    import torch

    value = torch.load(file_path, map_location="cpu", weights_only=True)
    if isinstance(value, dict):
        if "features" not in value:
            raise CorpusInputError(f"{file_path}: no key 'features' (found {list(value)})")
        value = value["features"]
    if not isinstance(value, torch.Tensor):
        raise CorpusInputError(f"{file_path}: expected a tensor, found {type(value).__name__}")
    return value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()


class H5Features:
    """One HDF5 file whose top-level datasets are named by key."""

    def __init__(self, path):
        import h5py

        self.path = path
        try:
            self._file = h5py.File(path, "r")
        except OSError as e:
            raise CorpusInputError(f"{path}: cannot open as HDF5 ({e})") from None
        self._aliases = video_aliases(self._file.keys())

    def __contains__(self, key):
        return str(key) in self._file or str(key) in self._aliases

    def keys(self):
        return list(self._file.keys())

    def get(self, key):
        if str(key) not in self:
            raise CorpusInputError(f"{self.path}: no dataset for key {str(key)!r}")
        try:
            return self._file[self._aliases.get(str(key), str(key))][()]
        except (OSError, KeyError, TypeError) as e:
            raise CorpusInputError(f"{self.path}: cannot read key {str(key)!r} ({type(e).__name__}: {e})") from None

    def close(self):
        self._file.close()


def open_features(path):
    """A feature container (folder of per-key files, or an .h5 / .hdf5 file) with `in`, `keys()`, `get(key)`."""
    if os.path.isdir(path):
        return FolderFeatures(path)
    if os.path.isfile(path) and path.endswith((".h5", ".hdf5")):
        return H5Features(path)
    raise CorpusInputError(f"{path}: expected a folder of .npy/.npz/.pt files or an .h5 file, found "
                           f"{'a file of another type' if os.path.exists(path) else 'nothing'}")


def resample_rows(features, source_clip_length, target_clip_length):
    """Rows at one clip length -> rows at another: each target clip is the mean of the source rows it overlaps,
    weighted by the overlap. (n, D) -> (ceil(n * source / target), D), float32."""
    n_source = features.shape[0]
    n_target = max(1, int(np.ceil(n_source * source_clip_length / target_clip_length - 1e-6)))
    source_edges = np.arange(n_source + 1) * source_clip_length
    target_edges = np.arange(n_target + 1) * target_clip_length
    overlap = np.clip(np.minimum(target_edges[1:, None], source_edges[None, 1:])
                      - np.maximum(target_edges[:-1, None], source_edges[None, :-1]), 0, None)  # (n_target, n_source)
    weights = overlap / np.maximum(overlap.sum(axis=1, keepdims=True), 1e-12)
    return (weights @ features.astype(np.float64)).astype(np.float32)


def l2_normalize_rows(features):
    """Each row divided by its L2 norm plus VISUAL_L2_EPS, in the array's dtype: bit for bit the formula the video
    store's reader applies (the original's), so an all-zero row stays zero and features normalised here are
    changed by the reader only by the factor 1 / (1 + eps)."""
    return features / (np.linalg.norm(features, axis=-1, keepdims=True) + VISUAL_L2_EPS)


# ---------------------------------------------------------------------------------------------------
# Subtitles

_SRT_TIME = re.compile(r"(\d+):(\d+):(\d+)[,.](\d+)\s*-->\s*(\d+):(\d+):(\d+)[,.](\d+)")


def _srt_seconds(h, m, s, ms):
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 10 ** len(ms)


def parse_srt(path):
    """An .srt file -> [{"text", "start", "end"}], in file order."""
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            blocks = re.split(r"\n\s*\n", f.read().replace("\r\n", "\n").strip())
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusInputError(f"{path}: cannot read as an .srt file ({e})") from None
    sentences = []
    for block in blocks:
        lines = block.strip().split("\n")
        time_line = next((i for i, line in enumerate(lines) if _SRT_TIME.search(line)), None)
        if time_line is None:
            continue
        g = _SRT_TIME.search(lines[time_line]).groups()
        text = " ".join(line.strip() for line in lines[time_line + 1:] if line.strip())
        if text:
            sentences.append(dict(text=text, start=_srt_seconds(*g[:4]), end=_srt_seconds(*g[4:])))
    return sentences


def load_subtitles(path):
    """{vid_name: [{"text", "start", "end"}, ...]} from a jsonl file or a folder of `<vid_name>.srt` files."""
    if os.path.isdir(path):
        return {video_name(name[:-len(".srt")]): parse_srt(os.path.join(path, name))
                for name in sorted(os.listdir(path)) if name.endswith(".srt")}
    try:
        rows = load_jsonl(path)
    except DataFileError as e:
        raise CorpusInputError(str(e)) from None
    subtitles = {}
    for i, row in enumerate(rows):
        _require(row, ("vid_name", "sub"), path, i)
        for j, sentence in enumerate(row["sub"]):
            _require(sentence, ("text", "start", "end"), path, f"{i} (vid_name {row['vid_name']}) sub[{j}]")
        name = video_name(row["vid_name"])  # as the annotations' names
        if name in subtitles:
            raise CorpusInputError(f"{path}: vid_name {row['vid_name']!r} appears twice")
        subtitles[name] = row["sub"]
    return subtitles


def subtitle_clip_indices(start, end, clip_length, n_clips):
    """Clips a subtitle sentence [start, end] overlaps: floor(start / cl) .. ceil(end / cl) - 1, within the video."""
    first = max(int(np.floor(start / clip_length)), 0)
    last = min(int(np.ceil(end / clip_length)) - 1, n_clips - 1)
    return range(first, last + 1)


def subtitle_clip_features(sentences, sentence_tokens, n_clips, clip_length):
    """Clip features of one video: each clip is the max over the token features of every subtitle sentence
    overlapping it; zeros where no sentence does.

    sentences: [{"start", "end", ...}]; sentence_tokens: matching list of (n_tokens, D) arrays -> (n_clips, D).
    """
    dim = sentence_tokens[0].shape[1]
    clips = np.zeros((n_clips, dim), dtype=np.float32)
    covered = np.zeros(n_clips, dtype=bool)
    for sentence, tokens in zip(sentences, sentence_tokens):
        pooled = tokens.max(axis=0)
        for clip in subtitle_clip_indices(float(sentence["start"]), float(sentence["end"]), clip_length, n_clips):
            clips[clip] = np.maximum(clips[clip], pooled) if covered[clip] else pooled
            covered[clip] = True
    return clips
