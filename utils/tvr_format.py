"""The TVR release format, in one place: splits and their files, the evaluation vocabulary, annotation checks
and the clip labels of a moment.

The release (and every corpus this project writes) holds, per split, an annotation jsonl whose rows are
{"desc_id": int, "desc": str, "vid_name": str, "duration": seconds, "ts": [start, end] seconds,
"type": "v" | "t" | "vt"} (test_public rows have no ground truth: only desc_id and desc), a video table
`{split: {vid_name: [duration, global_idx]}}`, LMDB feature stores and first-stage ranklists (see
utils/feature_stores.py), located by a data config (utils/data_config.py).
"""
import math
import numbers

from utils.errors import ConquerError
from utils.io_utils import load_json

SPLITS = ("train", "val", "test_public")
# Data-config keys of each split's annotation file and first-stage ranklist.
SPLIT_FILE_KEYS = {
    "train": ("train_data_path", "train_first_VR_ranklist_path"),
    "val": ("eval_data_path", "eval_first_VR_ranklist_path_hero"),
    "test_public": ("test_data_path", "test_public_first_VR_ranklist_path_hero"),
}
# Paths of the feature release below its root folder, in the order config/tvr_data_config.json lists them.
RELEASE_PATHS = {
    "desc_bert_path": "sub_query_feature/tvr_query_pretrained_w_sub_query",
    "sub_bert_path": "sub_query_feature/tvr_sub_pretrained_w_sub_query_max_cl-1.5",
    "vid_feat_path": "video_feature/resnet_slowfast_1.5",
    "train_data_path": "data/tvr_train_select100_release.jsonl",
    "eval_data_path": "data/tvr_val_release.jsonl",
    "test_data_path": "data/tvr_test_public_release.jsonl",
    "train_first_VR_ranklist_path": "data/train_select100_top2000",
    "eval_first_VR_ranklist_path_hero": "data/tvr_val_top100_hero",
    "test_public_first_VR_ranklist_path_hero": "data/tvr_test_public_top100_hero",
    "video_duration_idx_path": "data/tvr_video2dur_idx.json",
}


def release_data_config(root_path):
    """The data config of a corpus in the release layout below `root_path` (what config/tvr_data_config.json
    holds for the downloaded release). Its `ctx_mode` is informational: the --ctx_mode option decides."""
    config = {"dset_name": "tvr", "root_path": root_path}
    for key, path in RELEASE_PATHS.items():
        config[key] = path
        if key == "vid_feat_path":
            config["ctx_mode"] = "visual_sub"
    return config


TASKS = ("VCMR", "SVMR", "VR")
IOU_THRESHOLDS = (0.5, 0.7)
RECALL_TOPK = (1, 5, 10, 100)
QUERY_TYPES = ("v", "t", "vt")
CTX_MODES = ("visual_sub", "visual")
# A "ts" with at least this many [start, end] pairs lists several annotators' moments (DiDeMo); a prediction
# is then correct at IoU θ when it overlaps at least MULTI_MOMENT_MIN_OVERLAPS of them by θ.
MULTI_MOMENT_MIN_COUNT = 4
MULTI_MOMENT_MIN_OVERLAPS = 2
# A submission keeps this many predictions per query, and the evaluator reads no more.
MAX_PREDICTIONS_PER_QUERY = 100
# The training file keeps only queries whose GT video is in the first-stage top 100 ("select100").
FIRST_STAGE_TOP = 100
# test_public has no ground truth; the original puts this test_challenge video in slot 0 of every item.
DUMMY_TEST_PUBLIC_VIDEO = "castle_s01e01_seg02_clip_20"


class DatasetError(ConquerError):
    """Bad annotations, ranklists or dataset arguments; the message names the file, key and desc_id."""


def split_video_indices(video_table_path, split):
    """{vid_name: global_idx} of `split` in the video table `{split: {vid_name: [duration, global_idx]}}`."""
    table = load_json(video_table_path)
    if not isinstance(table, dict) or split not in table:
        raise DatasetError(f"{video_table_path}: no split {split!r} "
                           f"(expected {{split: {{vid_name: [duration, global_idx]}}}})")
    return {name: int(dur_idx[1]) for name, dur_idx in table[split].items()}


def is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def moment_problem(ts):
    """Why `ts` is not a usable [start, end] moment, or None. A moment may end after its video: its clip
    labels are clipped to the video (`st_ed_label`), as the original does."""
    if not (isinstance(ts, (list, tuple)) and len(ts) == 2 and all(is_number(t) for t in ts)):
        return f"expected [start, end] seconds, found {ts!r}"
    if not 0 <= ts[0] <= ts[1]:
        return f"expected 0 <= start <= end, found {ts!r}"
    return None


def moments_of(ts):
    """The [start, end] moments of a `ts` field: a list of pairs (DiDeMo style) or one pair."""
    if isinstance(ts, list) and ts and all(isinstance(pair, (list, tuple)) for pair in ts):
        return list(ts)
    return [ts]


def annotation_problems(rows, path, split, video2idx, dset_name="tvr", single_moment=True):
    """Cheap validity checks of annotation rows -> list of messages (empty when clean).

    Every message names `path`, the row and desc_id. `single_moment` requires `ts` to be one
    [start, end] pair (training labels); otherwise a list of pairs (DiDeMo style) is also accepted.
    `duration` is optional and never checked against `ts`, as in the original (see `annotation_warnings`).
    """
    has_gt = split != "test_public"
    required = ("desc", "desc_id") + (("vid_name", "ts") if has_gt else ())
    if has_gt and dset_name == "tvr":
        required += ("type",)
    problems = []
    seen = {}
    for i, row in enumerate(rows):
        where = f"{path}: row {i} (desc_id {row.get('desc_id') if isinstance(row, dict) else None})"
        if not isinstance(row, dict):
            problems.append(f"{where}: expected a JSON object, found {type(row).__name__}")
            continue
        missing = [key for key in required if key not in row]
        if missing:
            problems.append(f"{where}: missing field(s) {missing} (a {split} annotation needs {list(required)})")
            continue
        desc_id = row["desc_id"]
        if not isinstance(desc_id, int) or isinstance(desc_id, bool):
            problems.append(f"{where}: desc_id must be an int, found {desc_id!r}")
        elif desc_id in seen:
            problems.append(f"{where}: duplicated desc_id {desc_id} (first at row {seen[desc_id]})")
        else:
            seen[desc_id] = i
        if "type" in row and row["type"] not in QUERY_TYPES:
            problems.append(f"{where}: unknown type {row['type']!r}, expected one of {QUERY_TYPES}")
        if not has_gt:
            continue
        if row["vid_name"] not in video2idx:
            problems.append(f"{where}: vid_name {row['vid_name']!r} is not a video of split {split!r}")
        for pair in ([row["ts"]] if single_moment else moments_of(row["ts"])):
            problem = moment_problem(pair)
            if problem:
                problems.append(f"{where}: ts {problem}")
    return problems


def annotation_warnings(rows, path):
    """What the original accepts but may be a data mistake -> {warning: (count, first desc_id)}: rows
    without a usable `duration`, moments ending after their video's `duration` (their labels are clipped)."""
    warnings = {}

    def warn(kind, row):
        count, first = warnings.get(kind, (0, row.get("desc_id")))
        warnings[kind] = (count + 1, first)

    for row in rows:
        if not isinstance(row, dict) or "ts" not in row:
            continue
        duration = row.get("duration")
        if not (is_number(duration) and duration > 0):
            warn(f"{path}: rows without a positive 'duration'", row)
            continue
        if any(moment_problem(pair) is None and pair[1] > duration for pair in moments_of(row["ts"])):
            warn(f"{path}: moments ending after the video's duration (clip labels are clipped to the video)", row)
    return warnings


def st_ed_label(ts, n_clips, clip_length):
    """GT [t0, t1] seconds -> inclusive clip indices (st, ed) on a video of n_clips.

    st = min(floor(t0/cl), n-1), ed = min(ceil(t1/cl) - 1, n-1), in double precision.
    E.g. ts = [3.2, 7.6], cl = 1.5 -> (2, 5). Raises DatasetError unless 0 <= st <= ed <= n-1.
    """
    max_idx = n_clips - 1
    st = min(math.floor(float(ts[0]) / clip_length), max_idx)
    ed = min(math.ceil(float(ts[1]) / clip_length) - 1, max_idx)
    if not 0 <= st <= ed <= max_idx:
        raise DatasetError(f"ts {list(ts)} with clip_length {clip_length} on {n_clips} clips gives "
                              f"(st, ed) = ({st}, {ed}); expected 0 <= st <= ed <= {max_idx}")
    return st, ed
