"""Turn a corpus in the formats the field uses into the release layout this project trains on, or a folder of
video features into a search-only corpus.

    python -m utils.build_corpus --out_dir DIR --annotation_format {tvr,didemo,anet,qvhighlights} \\
        --annotations train=PATH val=PATH [test_public=PATH] \\
        --video_features PATH [PATH ...] [--clip_length 1.5] \\
        [--sub_features PATH | --subtitles PATH] [--query_features PATH] [--text_encoder NAME_OR_PATH] \\
        [--video_dir VIDEOS]
    python -m utils.build_corpus --out_dir DIR --video_features PATH [PATH ...] --text_encoder NAME_OR_PATH \\
        [--subtitles PATH | --sub_features PATH] [--video_dir VIDEOS] [--durations JSON]   # search-only

Writes under DIR: the annotation jsonl of every split, `<name>_video2dur_idx.json`, the video, subtitle and
query LMDB stores in the release encodings, DIR/data_config.json (root_path = DIR) and DIR/options.json (the
train.py options of the corpus, for `--config`); then prints the first-stage commands that come next and the
same options as flags. When videos are longer than the
model's max_ctx_len clips, it says how many and the longest, and the flags include `--window_stride N` (this
command's --window_stride, default half a window), so that training and evaluation read them as overlapping
windows rather than their first clips.

A search-only corpus (no --annotations, no --annotation_format) holds every video of the first --video_features
set (each other set must have them all), in split test_public, with no queries: an empty query store, empty
annotation files, no ranklists, and `"search_split": "test_public"` in its data config. It is built to be searched
with trained runs: its last printed line is the `python -m method.search build` command that indexes it.
--text_encoder is required (the search encodes text queries with it). A video's duration comes from --durations,
else from its file in --video_dir, else from its features (clips x clip_length).

Provenance (utils/provenance.py): the data config records each feature set's recipe (the recipe.json that
utils.extract_video_features writes in its folder; None for an .h5 file or a folder without one) and the text
encoder's settings, so that a model trained on one corpus can be checked against another. With a recipe for every
set, --clip_length defaults to the first set's; each set's clip length defaults to its recipe's, and a
--video_feature_clip_lengths value that its recipe contradicts is an error (a --clip_length other than a set's
resamples the set: see Video features below). --video_dir (either kind of corpus) records the folder of the
video files (`<video_dir>/<video name>.<ext>`, absolute) for the search page to play; videos without a file
there are counted in a warning.

* Video features: each `--video_features` PATH is one feature set (a folder of per-video .npy / .npz / .pt
  files or one .h5 keyed by video name). Several sets are L2-normalised row-wise (unless
  --no_l2_normalize) and concatenated per clip, as the release's ResNet + SlowFast features were. A set
  extracted at another clip length (--video_feature_clip_lengths) is resampled to --clip_length (each clip
  the overlap-weighted mean of the rows it covers); the first set then fixes a video's clip count and the
  others are zero-padded or cut to it when they differ by at most --max_clip_count_diff rows (an error
  beyond that).
* Queries: --query_features (per-query files named by desc_id, or an .h5 keyed by str(desc_id)), or the
  query text encoded with --text_encoder (token level).
* Subtitles: --sub_features (clip-level, same containers) or --subtitles (jsonl {vid_name, sub: [{text,
  start, end}]} or a folder of <vid_name>.srt) encoded with --text_encoder: a clip's feature is the
  max-pool of the token features of every sentence overlapping it, zeros where none does. Without either,
  the corpus is visual-only (ctx_mode visual).
* Moments outside their video are clipped to it (counted in a warning). DiDeMo gives no durations: they
  come from --durations (JSON {video: seconds}) or from the features (clips x clip_length).
* First-stage ranklists are not written. The first stage comes next: scripts/train_first_stage.sh on this
  corpus, then scripts/rank_first_stage.sh, which writes the lists with their own data config (this one with
  the ranklist paths replaced) and names it on its last line; CONQUER trains on that config. The ranklist keys
  here (required by the loader) name data/<split>_first_stage_ranklist, where lists from another retriever
  may be put to train on this config directly.

Everything is built in a temporary folder beside DIR (DIR.partial-<pid>-<hex>) and renamed to DIR at the end,
so a failed build leaves no corpus and concurrent builds never remove each other's work; an existing DIR is an
error (also when another build creates it first). Features are streamed one video at a time.
"""
import argparse
import contextlib
import logging
import os
import time

import numpy as np
from tqdm import tqdm

import config as config_package
from utils.corpus_formats import (ANNOTATION_FORMATS, CorpusInputError, check_feature_array, duration_seconds,
                                  l2_normalize_rows, load_annotations, load_subtitles, open_features, resample_rows,
                                  subtitle_clip_features, video_name)
from utils.errors import run_cli
from utils.feature_stores import StoreWriter, encode_npz_features, encode_video_features
from utils.io_utils import atomic_folder, load_json, save_json, save_jsonl
from utils.provenance import RECIPE_FILENAME, read_recipe
from utils.standalone_eval import TS_MIN_OVERLAPS
from utils.tvr_format import SPLITS
from utils.video_decoding import VideoDecodeError, count_clips, probe_duration, video_file
from utils.windows import WindowError, check_stride

logger = logging.getLogger(__name__)

DATA_CONFIG_NAME = "data_config.json"
OPTIONS_NAME = "options.json"  # the corpus flags as a train.py --config file
QUERY_CHUNK = 2048  # queries whose features are held at once
MODEL_CONFIG_PATH = os.path.join(os.path.dirname(config_package.__file__), "model_config.json")
# A search-only corpus: every video in this split (the split without ground truth), and no queries.
SEARCH_SPLIT = "test_public"
SEARCH_ONLY_DSET_NAME = "videos"
SEARCH_BUILD_COMMAND = ("python -m method.search build --first_stage RUN --conquer RUN --dataset_config {} "
                        "--out_dir INDEX")


def release_layout(name, clip_length):
    """Path keys of the data config (relative to root_path) for corpus `name`. Nothing writes the ranklist paths:
    rank_first_stage writes its own folder and config; they are where lists from another retriever may go."""
    cl = f"{clip_length:g}"
    return dict(
        desc_bert_path=f"sub_query_feature/{name}_query",
        sub_bert_path=f"sub_query_feature/{name}_sub_max_cl-{cl}",
        vid_feat_path=f"video_feature/{name}_visual_cl-{cl}",
        train_data_path=f"data/{name}_train_release.jsonl",
        eval_data_path=f"data/{name}_val_release.jsonl",
        test_data_path=f"data/{name}_test_public_release.jsonl",
        train_first_VR_ranklist_path="data/train_first_stage_ranklist",
        eval_first_VR_ranklist_path_hero="data/val_first_stage_ranklist",
        test_public_first_VR_ranklist_path_hero="data/test_public_first_stage_ranklist",
        video_duration_idx_path=f"data/{name}_video2dur_idx.json",
    )


def model_max_clips():
    """Clips per video the default model config can take (its video position embeddings)."""
    return int(load_json(MODEL_CONFIG_PATH)["bert_config"]["max_position_embeddings"])


def default_window_stride(max_ctx_len):
    """Half a window: then every moment of up to half a window lies wholly inside some window."""
    return max(1, max_ctx_len // 2)


def training_window_stride(window_stride, max_ctx_len, n_long_videos):
    """The --window_stride to train with: 0 (no flag) when every video fits in max_ctx_len clips, where windows
    change nothing; else the one given, or half a window."""
    if not n_long_videos:
        return 0
    return default_window_stride(max_ctx_len) if window_stride is None else window_stride


def check_window_stride(window_stride):
    """Raise CorpusInputError unless --window_stride is None (the default) or valid for the model's limit (the
    max_ctx_len of any corpus with videos longer than it)."""
    if window_stride is None:
        return
    try:
        check_stride(window_stride, model_max_clips())
    except WindowError as e:
        raise CorpusInputError(str(e)) from None


class _Warnings:
    """Counts of repaired input problems, with the first example of each."""

    def __init__(self):
        self.counts, self.examples = {}, {}

    def add(self, kind, example):
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.examples.setdefault(kind, example)

    def lines(self):
        return [f"warning: {n} {kind} (first: {self.examples[kind]})" for kind, n in self.counts.items()]


class VideoFeatureSets:
    """Reads one video's clip features from every set: resampled, checked, aligned, normalised, concatenated."""

    def __init__(self, paths, clip_lengths, clip_length, l2_normalize, max_clip_count_diff, warnings):
        self.sources = [open_features(path) for path in paths]
        self.paths = list(paths)
        self.clip_lengths = list(clip_lengths)
        self.clip_length = clip_length
        self.l2_normalize = l2_normalize
        self.max_clip_count_diff = max_clip_count_diff
        self.dims = [None] * len(paths)
        self.warnings = warnings

    def video_names(self):
        """The videos of the first set, sorted, named as annotations name them (without a video extension)."""
        return sorted(set(video_name(key) for key in self.sources[0].keys()))

    def missing(self, names):
        """[(path, first missing name, number missing)] over the sets."""
        result = []
        for path, source in zip(self.paths, self.sources):
            absent = [name for name in names if name not in source]
            if absent:
                result.append((path, absent[0], len(absent)))
        return result

    def read(self, name):
        """-> (n_clips, sum of dims) float32."""
        parts = []
        for i, (path, source) in enumerate(zip(self.paths, self.sources)):
            rows = check_feature_array(source.get(name), f"{path}: key {name!r}", self.dims[i])
            self.dims[i] = rows.shape[1]
            if self.clip_lengths[i] != self.clip_length:
                rows = resample_rows(rows, self.clip_lengths[i], self.clip_length)
            if parts:
                rows = align_clip_count(rows, len(parts[0]), f"{path}: key {name!r}", self.max_clip_count_diff,
                                        self.warnings)
            parts.append(l2_normalize_rows(rows) if self.l2_normalize else rows)
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def close(self):
        for source in self.sources:
            source.close()


def align_clip_count(rows, n_clips, where, max_diff, warnings):
    """Zero-pad or cut `rows` to n_clips rows when they differ by at most max_diff; an error beyond."""
    if len(rows) == n_clips:
        return rows
    if abs(len(rows) - n_clips) > max_diff:
        raise CorpusInputError(f"{where}: {len(rows)} clips, while the first feature set has {n_clips} for this "
                               f"video (more than --max_clip_count_diff {max_diff} apart: check the clip lengths)")
    warnings.add("videos whose feature sets differ in clip count (zero-padded / cut to the first set)", where)
    aligned = np.zeros((n_clips, rows.shape[1]), dtype=rows.dtype)
    aligned[:min(n_clips, len(rows))] = rows[:n_clips]
    return aligned


def _load_splits(annotation_format, annotations):
    """{split: records}; desc_ids assigned where the format has none; duplicates are an error."""
    records_by_split = {}
    next_id = 0
    seen = {}
    for split in SPLITS:
        if split not in annotations:
            records_by_split[split] = []
            continue
        path = annotations[split]
        records = load_annotations(annotation_format, path, has_gt=split != "test_public")
        for record in records:
            if record["desc_id"] is None:
                record["desc_id"] = next_id
                next_id += 1
            if record["desc_id"] in seen:
                raise CorpusInputError(f"{path}: desc_id {record['desc_id']} appears twice (also in "
                                       f"{seen[record['desc_id']]})")
            seen[record["desc_id"]] = path
        records_by_split[split] = records
    return records_by_split


def _videos_of(records):
    """Video names in order of first appearance, with the duration their annotations give (or None)."""
    durations = {}
    for record in records:
        name = record["vid_name"]
        if name is None:
            continue
        if name not in durations or (durations[name] is None and record["duration"] is not None):
            durations[name] = record["duration"]
        elif record["duration"] is not None and abs(record["duration"] - durations[name]) > 1e-2:
            raise CorpusInputError(f"video {name!r}: annotations give two durations ({durations[name]} and "
                                   f"{record['duration']}, desc_id {record['desc_id']})")
    return durations


def _clip_moment(moment, duration, desc_id, warnings):
    clipped = [min(max(t, 0.0), duration) for t in moment]
    if clipped != moment:
        warnings.add("moments outside their video, clipped to it", f"desc_id {desc_id}: {moment} on {duration} s")
    return [round(t, 4) for t in clipped]


def load_durations(path):
    """--durations: a JSON {video: seconds} -> {video: float}; a value that is not a positive number is an
    error naming the file and the video."""
    return {name: duration_seconds(value, path, f"video {name!r}") for name, value in load_json(path).items()}


def _release_row(record, split, duration, warnings):
    """The annotation row written for one query."""
    row = dict(desc_id=record["desc_id"], desc=record["desc"])
    if record["vid_name"] is not None:
        row.update(vid_name=record["vid_name"], duration=duration)
    if record["moment"] is not None:
        label = _clip_moment(record["moment"], duration, record["desc_id"], warnings)
        if split != "train" and record["annotator_moments"]:
            row["ts"] = [_clip_moment(m, duration, record["desc_id"], warnings) for m in record["annotator_moments"]]
            if TS_MIN_OVERLAPS in record:
                row[TS_MIN_OVERLAPS] = record[TS_MIN_OVERLAPS]
        else:
            row["ts"] = label
    if "type" in record:
        row["type"] = record["type"]
    return row


def _encoder(name_or_path, device, dtype, batch_size):
    from utils.text_encoder import TextEncoder

    return TextEncoder(name_or_path, device=device, dtype=dtype, batch_size=batch_size)


def build_corpus(out_dir, annotation_format, annotations, video_features, clip_length=None,
                 video_feature_clip_lengths=None, sub_features=None, subtitles=None, query_features=None,
                 text_encoder=None, text_encoder_device=None, text_encoder_dtype="float32", text_batch_size=64,
                 durations=None, dset_name=None, l2_normalize=True, max_clip_count_diff=2, window_stride=None,
                 video_dir=None, video_names=None, progress=True):
    """Build the corpus in out_dir (see the module docstring) -> summary dict (dims, counts, flags, warnings).

    annotation_format and annotations None: a search-only corpus of the videos `video_names` (default: every video
    of the first feature set).
    clip_length None: the first feature set's recipe's (every set needs a recipe then).
    window_stride: the --window_stride of the printed training flags when some videos are longer than the model's
    max_ctx_len clips (default: half a window); 0 trains on their first max_ctx_len clips, as the original.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise CorpusInputError(f"--out_dir {out_dir}: already exists (choose a new folder or remove it)")
    check_window_stride(window_stride)
    search_only = annotations is None
    if search_only != (annotation_format is None):
        raise CorpusInputError("--annotations and --annotation_format go together: give both, or neither for a "
                               "search-only corpus")
    if sub_features and subtitles:
        raise CorpusInputError("--sub_features and --subtitles are alternatives: give one")
    if search_only:
        if query_features:
            raise CorpusInputError("--query_features: a search-only corpus (no --annotations) has no queries")
        if not text_encoder:
            raise CorpusInputError("--text_encoder is needed for a search-only corpus (no --annotations): the "
                                   "search encodes its text queries with the corpus's text encoder")
    elif video_names is not None:
        raise CorpusInputError("video_names: a corpus with annotations holds the videos they name")
    elif not set(annotations) <= set(SPLITS) or not {"train", "val"} <= set(annotations):
        raise CorpusInputError(f"--annotations: expected train=PATH val=PATH [test_public=PATH], found "
                               f"{sorted(annotations)}")
    if (subtitles or not query_features) and not text_encoder:
        raise CorpusInputError("--text_encoder is needed to encode the query text (no --query_features) and the "
                               "subtitles (--subtitles)")
    if video_dir is not None and not os.path.isdir(video_dir):
        raise CorpusInputError(f"--video_dir {video_dir}: not a folder")
    recipes = [read_recipe(path) if os.path.isdir(path) else None for path in video_features]
    clip_length, clip_lengths = feature_clip_lengths(video_features, recipes, clip_length,
                                                     video_feature_clip_lengths)
    dset_name = dset_name or annotation_format or SEARCH_ONLY_DSET_NAME
    ctx_mode = "visual_sub" if (sub_features or subtitles) else "visual"
    warnings = _Warnings()
    started = time.time()

    video_sets = VideoFeatureSets(video_features, clip_lengths, clip_length, l2_normalize, max_clip_count_diff,
                                  warnings)
    if search_only:
        records_by_split = {split: [] for split in SPLITS}
        videos_by_split = {split: {} for split in SPLITS}
        if video_names is None:
            videos_by_split[SEARCH_SPLIT] = dict.fromkeys(video_sets.video_names())
            named_by = f"a video of the first --video_features set {video_features[0]}"
        else:
            videos_by_split[SEARCH_SPLIT] = dict.fromkeys(video_names)
            named_by = "one of the videos the corpus is to hold"
        if not videos_by_split[SEARCH_SPLIT]:
            raise CorpusInputError(f"{video_features[0]}: no video features" if video_names is None
                                   else "video_names: empty, no video for the corpus")
    else:
        records_by_split = _load_splits(annotation_format, annotations)
        if dset_name == "tvr":
            untyped = next((r for split in ("train", "val") for r in records_by_split[split] if "type" not in r),
                           None)
            if untyped is not None:
                raise CorpusInputError(f"desc_id {untyped['desc_id']}: no 'type' (v, t or vt), which a corpus named "
                                       f"'tvr' needs for its per-type metrics; pass another --dset_name")
        videos_by_split = {split: _videos_of(records) for split, records in records_by_split.items()}
        named_by = "named in the annotations"
    given_durations = load_durations(durations) if durations else {}

    all_videos = list(dict.fromkeys(name for split in SPLITS for name in videos_by_split[split]))
    for path, name, n_missing in video_sets.missing(all_videos):
        raise CorpusInputError(f"{path}: no features for video {name!r}, {named_by} ({n_missing} videos missing)")
    sub_source = open_features(sub_features) if sub_features else None
    if sub_source is not None:
        absent = [name for name in all_videos if name not in sub_source]
        if absent:
            raise CorpusInputError(f"{sub_features}: no subtitle features for video {absent[0]!r} "
                                   f"({len(absent)} videos missing)")
    query_source = open_features(query_features) if query_features else None
    all_queries = [r for split in SPLITS for r in records_by_split[split]]
    if query_source is not None:
        absent = [r["desc_id"] for r in all_queries if str(r["desc_id"]) not in query_source]
        if absent:
            raise CorpusInputError(f"{query_features}: no query features for desc_id {absent[0]} "
                                   f"({len(absent)} queries missing)")
    video_files = find_video_files(video_dir, all_videos, warnings) if video_dir is not None else {}
    file_durations = probe_video_durations({name: file for name, file in video_files.items()
                                            if name not in given_durations}, warnings, progress) if search_only else {}
    subtitle_sentences = load_subtitles(subtitles) if subtitles else None
    encoder = (_encoder(text_encoder, text_encoder_device, text_encoder_dtype, text_batch_size)
               if text_encoder and (subtitles or not query_features) else None)

    layout = release_layout(dset_name, clip_length)
    with _corpus_folder(out_dir) as partial, _closed_at_exit(video_sets, sub_source, query_source):
        path = {key: os.path.join(partial, relative) for key, relative in layout.items()}
        n_clips_by_video, dims = _write_video_stores(path, all_videos, video_sets, sub_source, subtitle_sentences,
                                                     encoder, clip_length, max_clip_count_diff, warnings, progress)
        dims["query"] = _write_query_store(path["desc_bert_path"], all_queries, query_source, encoder, progress)
        if search_only:
            dims["query"] = encoder.dim
        for name, seconds in file_durations.items():
            if abs(n_clips_by_video[name] - count_clips(seconds, clip_length)) > 1:
                warnings.add("video files whose duration disagrees with their clip count (another video than the "
                             "features'?)", f"{video_files[name]}: {seconds:g} s, {n_clips_by_video[name]} clips of "
                                            f"{clip_length:g} s")
        video2dur, rows_by_split = {}, {}
        next_idx = 0
        for split in SPLITS:
            video2dur[split] = {}
            for name, duration in videos_by_split[split].items():
                if duration is None:
                    duration = float(given_durations.get(name) or file_durations.get(name)
                                     or n_clips_by_video[name] * clip_length)
                video2dur[split][name] = [duration, next_idx]
                next_idx += 1
            rows_by_split[split] = [
                _release_row(r, split, video2dur[split][r["vid_name"]][0] if r["vid_name"] else None, warnings)
                for r in records_by_split[split]]
        for split, key in (("train", "train_data_path"), ("val", "eval_data_path"), ("test_public", "test_data_path")):
            save_jsonl(rows_by_split[split], path[key])
        save_json(video2dur, path["video_duration_idx_path"])

        max_clips = max(n_clips_by_video.values())
        max_ctx_len = min(max_clips, model_max_clips())
        n_long = sum(n > max_ctx_len for n in n_clips_by_video.values())
        longest = max(n_clips_by_video, key=n_clips_by_video.get)
        longest_duration = next(video2dur[split][longest][0] for split in SPLITS if longest in video2dur[split])
        data_config = dict(
            dset_name=dset_name, root_path=out_dir, **layout, ctx_mode=ctx_mode, clip_length=clip_length,
            video_feature_sets=[dict(path=os.path.abspath(p), clip_length=c, dim=d, l2_normalized=l2_normalize,
                                     recipe=r)
                                for p, c, d, r in zip(video_features, clip_lengths, video_sets.dims, recipes)],
            text_encoder=encoder.settings() if encoder is not None else None)
        if search_only:
            data_config["search_split"] = SEARCH_SPLIT
        else:
            data_config["first_stage_ranklists"] = (
                "none in this corpus: scripts/rank_first_stage.sh writes them with the data config to train CONQUER "
                "on (its last line names it)")
        if video_dir is not None:
            data_config["video_dir"] = os.path.abspath(video_dir)
        save_json(data_config, os.path.join(partial, DATA_CONFIG_NAME), save_pretty=True)
        summary = dict(data_config=os.path.join(out_dir, DATA_CONFIG_NAME), dset_name=dset_name, ctx_mode=ctx_mode,
                       search_only=search_only, clip_length=clip_length, max_ctx_len=max_ctx_len,
                       n_long_videos=n_long, longest_video=dict(name=longest, clips=max_clips, seconds=longest_duration),
                       window_stride=training_window_stride(window_stride, max_ctx_len, n_long), dims=dims,
                       queries={split: len(records_by_split[split]) for split in SPLITS},
                       videos={split: len(videos_by_split[split]) for split in SPLITS},
                       video_files=len(video_files) if video_dir is not None else None, warnings=warnings.lines())
        if not search_only:
            summary["options"] = os.path.join(out_dir, OPTIONS_NAME)
            save_json(corpus_options(summary), os.path.join(partial, OPTIONS_NAME), save_pretty=True)

    return dict(summary, seconds=round(time.time() - started, 1))


def feature_clip_lengths(paths, recipes, clip_length, given):
    """(corpus clip length, [source clip length of each feature set]): --clip_length, else the first set's recipe's;
    each set's from --video_feature_clip_lengths, else its recipe, else the corpus's. A given value that another
    record contradicts is a CorpusInputError."""
    recipe_lengths = [None if recipe is None else _recipe_clip_length(path, recipe)
                      for path, recipe in zip(paths, recipes)]
    if clip_length is None:
        if None in recipe_lengths:
            raise CorpusInputError(f"--clip_length is needed: {paths[recipe_lengths.index(None)]} has no "
                                   f"{RECIPE_FILENAME} to take it from")
        clip_length = recipe_lengths[0]
    if not clip_length > 0:
        raise CorpusInputError(f"--clip_length must be positive, found {clip_length}")
    if given is not None and len(given) != len(paths):
        raise CorpusInputError(f"--video_feature_clip_lengths: {len(given)} values for {len(paths)} "
                               f"--video_features sets")
    lengths = []
    for i, (path, recorded) in enumerate(zip(paths, recipe_lengths)):
        if given is not None and recorded is not None and abs(given[i] - recorded) > 1e-9:
            raise CorpusInputError(f"--video_feature_clip_lengths {given[i]:g} for {path}: its {RECIPE_FILENAME} "
                                   f"says the features have clip_length {recorded:g}")
        lengths.append(given[i] if given is not None else recorded if recorded is not None else clip_length)
        if lengths[-1] != clip_length:
            logger.info("%s: clips of %g s resampled to %g s", path, lengths[-1], clip_length)
    return clip_length, lengths


def _recipe_clip_length(path, recipe):
    value = recipe.get("clip_length")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise CorpusInputError(f"{os.path.join(path, RECIPE_FILENAME)}: clip_length {value!r}, expected a positive "
                               f"number of seconds")
    return float(value)


def find_video_files(video_dir, names, warnings):
    """{name: its `video_file` in video_dir} for the names that have one; the others are counted in `warnings`."""
    found = {}
    for name in names:
        path = video_file(video_dir, name)
        if path is None:
            warnings.add(f"videos without a file in --video_dir {video_dir} (the search page cannot play them)",
                         name)
        else:
            found[name] = path
    return found


def probe_video_durations(video_files, warnings, progress):
    """{name: duration in seconds} of the video files that can be read; the others are counted in `warnings`."""
    durations = {}
    try:
        for name, path in tqdm(video_files.items(), desc="video durations", unit="video", disable=not progress):
            try:
                durations[name] = probe_duration(path)
            except VideoDecodeError as e:
                warnings.add("video files whose duration cannot be read (clip count x clip length instead)", str(e))
    except ImportError:  # PyAV, imported by the decoding functions, is an extra
        raise CorpusInputError("--video_dir: the videos' durations are read with PyAV (pip install -e .[extract]); "
                               "install it, or give --durations") from None
    return durations


@contextlib.contextmanager
def _corpus_folder(out_dir):
    """`atomic_folder(out_dir)`, stopping with a CorpusInputError when another build published out_dir first."""
    try:
        with atomic_folder(out_dir) as partial:
            yield partial
    except FileExistsError as e:
        if e.filename != out_dir:
            raise
        raise CorpusInputError(f"--out_dir {out_dir}: another build created it meanwhile; this build is "
                               f"discarded") from None


@contextlib.contextmanager
def _closed_at_exit(*sources):
    """Close the feature sources (None where there is none) however the build ends."""
    try:
        yield
    finally:
        for source in sources:
            if source is not None:
                source.close()


def _write_video_stores(path, names, video_sets, sub_source, subtitle_sentences, encoder, clip_length,
                        max_clip_count_diff, warnings, progress):
    """Visual (and subtitle) store, one video at a time -> ({name: n_clips}, {"visual": Dv, "text": Dt})."""
    n_clips_by_video = {}
    dims = dict(visual=None, text=None)
    with_sub = sub_source is not None or subtitle_sentences is not None
    with StoreWriter(path["vid_feat_path"], encode_video_features) as visual_writer, \
            _optional_writer(path["sub_bert_path"] if with_sub else None) as sub_writer:
        for name in tqdm(names, desc="videos", disable=not progress):
            visual = video_sets.read(name)
            visual_writer.put(name, visual)
            n_clips_by_video[name] = len(visual)
            dims["visual"] = visual.shape[1]
            if sub_source is not None:
                sub = check_feature_array(sub_source.get(name), f"{sub_source.path}: key {name!r}", dims["text"])
                sub = align_clip_count(sub, len(visual), f"{sub_source.path}: key {name!r}", max_clip_count_diff,
                                       warnings)
            elif subtitle_sentences is not None:
                sentences = subtitle_sentences.get(name, [])
                if not sentences:
                    warnings.add("videos without subtitles (zero subtitle features)", name)
                    sub = np.zeros((len(visual), encoder.dim), dtype=np.float32)
                else:
                    tokens = encoder.encode_tokens([str(s["text"]) for s in sentences])
                    sub = subtitle_clip_features(sentences, tokens, len(visual), clip_length)
            else:
                continue
            dims["text"] = sub.shape[1]
            sub_writer.put(name, sub)
    return n_clips_by_video, dims


class _optional_writer:
    """A StoreWriter for the npz encoding, or nothing when path is None."""

    def __init__(self, path):
        self.writer = StoreWriter(path, encode_npz_features) if path else None

    def __enter__(self):
        return self.writer.__enter__() if self.writer else None

    def __exit__(self, *exc):
        return self.writer.__exit__(*exc) if self.writer else False


def _write_query_store(store_path, records, query_source, encoder, progress):
    """Query store, QUERY_CHUNK queries at a time -> query feature dim."""
    dim = None
    with StoreWriter(store_path, encode_npz_features) as writer:
        chunks = [records[i:i + QUERY_CHUNK] for i in range(0, len(records), QUERY_CHUNK)]
        for chunk in tqdm(chunks, desc="queries", unit="chunk", disable=not progress or len(chunks) < 2):
            if query_source is not None:
                features = [check_feature_array(query_source.get(r["desc_id"]),
                                                f"{query_source.path}: key {str(r['desc_id'])!r}", dim)
                            for r in chunk]
            else:
                features = encoder.encode_tokens([r["desc"] for r in chunk], progress=progress and len(chunks) == 1,
                                                 desc="queries")
            for record, tokens in zip(chunk, features):
                dim = tokens.shape[1]
                writer.put(record["desc_id"], tokens)
    return dim


def training_flags(summary):
    """The train.py flags for a built corpus: its data config and `corpus_flags`."""
    return ["--dataset_config", summary["data_config"]] + corpus_flags(summary)


def corpus_options(summary):
    """The train.py options that describe the corpus (its training set must follow the options, unlike the
    original's), for the first stage and for CONQUER alike, as a --config file holds them; CONQUER's
    --dataset_config is the ranking's."""
    options = dict(dset_name=summary["dset_name"], train_set_honours_options=True, ctx_mode=summary["ctx_mode"],
                   clip_length=summary["clip_length"], max_ctx_len=summary["max_ctx_len"])
    if summary["window_stride"]:
        options["window_stride"] = summary["window_stride"]
    options.update(visual_dim=summary["dims"]["visual"], query_dim=summary["dims"]["query"])
    if summary["dims"]["text"] is not None:
        options["text_dim"] = summary["dims"]["text"]
    return options


def corpus_flags(summary):
    """`corpus_options` as command-line flags."""
    flags = []
    for key, value in corpus_options(summary).items():
        flags += [f"--{key}"] if value is True else [f"--{key}", f"{value:g}" if isinstance(value, float) else str(value)]
    return flags


def long_video_note(summary):
    """The line printed about videos longer than max_ctx_len clips, or None when there is none."""
    if not summary["n_long_videos"]:
        return None
    limit, longest = summary["max_ctx_len"], summary["longest_video"]
    head = (f"note: {summary['n_long_videos']} videos have more than {limit} clips, the model's limit (longest: "
            f"{longest['name']!r}, {longest['clips']} clips = {longest['seconds']:g} s); ")
    if summary["search_only"]:
        return head + ("the search reads them as the runs read videos: as overlapping windows when they were "
                       f"trained with a positive --window_stride, else their first {limit} clips only")
    if summary["window_stride"]:
        return head + (f"they are read as overlapping windows of {limit} clips every {summary['window_stride']} "
                       f"clips (--window_stride {summary['window_stride']} below; --window_stride 0 would read "
                       f"their first {limit} clips only)")
    return head + (f"with --window_stride 0 training and evaluation see their first {limit} clips only (a "
                   f"positive --window_stride reads them as overlapping windows)")


def _split_paths(items):
    paths = {}
    for item in items:
        split, sep, path = item.partition("=")
        if not sep or split not in SPLITS or not path:
            raise CorpusInputError(f"--annotations {item!r}: expected SPLIT=PATH with SPLIT one of {SPLITS}")
        paths[split] = path
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out_dir", required=True, help="folder to create (must not exist)")
    parser.add_argument("--annotation_format", default=None, choices=ANNOTATION_FORMATS,
                        help="with --annotations; neither: a search-only corpus of every video of the first "
                             "--video_features set, no queries (needs --text_encoder)")
    parser.add_argument("--annotations", default=None, nargs="+", metavar="SPLIT=PATH",
                        help="train=PATH val=PATH [test_public=PATH]")
    parser.add_argument("--video_features", required=True, nargs="+",
                        help="one folder of per-video .npy/.npz/.pt files or one .h5 per feature set")
    parser.add_argument("--clip_length", type=float, default=None,
                        help="seconds per clip of the built corpus (default: the first feature set's recipe.json "
                             "clip_length; needed when a set has no recipe)")
    parser.add_argument("--video_feature_clip_lengths", type=float, nargs="+", default=None,
                        help="clip length of each --video_features set (default: its recipe's, else --clip_length); "
                             "sets at another clip length than the corpus's are resampled")
    parser.add_argument("--no_l2_normalize", action="store_true",
                        help="concatenate the feature sets without L2-normalising each first")
    parser.add_argument("--max_clip_count_diff", type=int, default=2,
                        help="clip counts of a video's feature sets may differ by this much (padded / cut)")
    parser.add_argument("--sub_features", default=None, help="clip-level subtitle features (folder or .h5)")
    parser.add_argument("--subtitles", default=None, help="subtitle jsonl {vid_name, sub} or a folder of .srt files")
    parser.add_argument("--query_features", default=None,
                        help="token-level query features: folder of <desc_id>.npy/.npz/.pt or .h5 keyed by desc_id")
    parser.add_argument("--text_encoder", default=None, help="Hugging Face model name or local folder")
    parser.add_argument("--text_encoder_device", default=None, help="e.g. cuda:0 or cpu (default: cuda if present)")
    parser.add_argument("--text_encoder_dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--text_batch_size", type=int, default=64)
    parser.add_argument("--durations", default=None,
                        help="JSON {video: seconds} (DiDeMo, search-only corpora; else from the video files of a "
                             "search-only corpus's --video_dir, else from the features)")
    parser.add_argument("--video_dir", default=None,
                        help="folder of the video files, <video name>.mp4/.webm/...: the search page plays them; "
                             "a search-only corpus also reads its videos' durations from them")
    parser.add_argument("--dset_name", default=None,
                        help=f"corpus name in file names and results (default: the annotation format, or "
                             f"'{SEARCH_ONLY_DSET_NAME}' for a search-only corpus); 'tvr' requires query types and "
                             f"adds per-type metrics")
    parser.add_argument("--window_stride", type=int, default=None,
                        help="the train.py --window_stride printed when videos are longer than the model's "
                             "max_ctx_len clips (default: max_ctx_len // 2); 0: train on their first clips only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    summary = build_corpus(
        args.out_dir, args.annotation_format, _split_paths(args.annotations) if args.annotations else None,
        args.video_features, args.clip_length, video_feature_clip_lengths=args.video_feature_clip_lengths,
        sub_features=args.sub_features, subtitles=args.subtitles, query_features=args.query_features,
        text_encoder=args.text_encoder, text_encoder_device=args.text_encoder_device,
        text_encoder_dtype=args.text_encoder_dtype, text_batch_size=args.text_batch_size, durations=args.durations,
        dset_name=args.dset_name, l2_normalize=not args.no_l2_normalize, max_clip_count_diff=args.max_clip_count_diff,
        window_stride=args.window_stride, video_dir=args.video_dir)
    for line in summary["warnings"]:
        print(line)
    if summary["search_only"]:
        print(f"{SEARCH_SPLIT}: {summary['videos'][SEARCH_SPLIT]} videos, no queries (a search-only corpus)")
    else:
        for split in SPLITS:
            print(f"{split}: {summary['queries'][split]} queries, {summary['videos'][split]} videos")
    if summary["video_files"] is not None:
        print(f"{summary['video_files']} of {sum(summary['videos'].values())} videos have a file in --video_dir")
    print(f"Wrote {summary['data_config']} in {summary['seconds']} s ({summary['ctx_mode']} corpus)")
    note = long_video_note(summary)
    if note:
        print(note)
    if summary["search_only"]:
        print("Index it for search with a first-stage run and a CONQUER run trained on a corpus of the same feature "
              "recipe and text encoder:")
        print("  " + SEARCH_BUILD_COMMAND.format(summary["data_config"]))
        return summary
    print("No first-stage ranklists in this corpus; the first stage comes next:")
    print("  bash scripts/train_first_stage.sh fs GPU|cpu " + " ".join(training_flags(summary)))
    print("  bash scripts/rank_first_stage.sh RUN_DIR GPU|cpu   # its last line: the --dataset_config to train "
          "CONQUER on")
    print("Corpus flags (first stage and CONQUER): " + " ".join(corpus_flags(summary)))
    print(f"  (the same in {summary['options']}: pass --config {summary['options']})")
    return summary


if __name__ == "__main__":
    run_cli(main)
