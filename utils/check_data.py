"""Check a TVR-format corpus before training on it: every problem is reported with its file and key.

    python -m utils.check_data --dataset_config config/tvr_data_config.json [--splits train val test_public]

Checks: the data config loads; every store opens; every annotation is well formed (fields, type, unique
desc_id, 0 <= start <= end); every train and val moment gives clip labels start <= end on its video, as
training computes them (--max_ctx_len, --clip_length: the training set's, 100 and 1.5 as in the original;
--window_stride: the run's, 0 labels on the first --max_ctx_len clips, a stride on the whole video);
every desc_id has query features and a ranklist; ranklists reference only
videos of their split, hold at least --max_vcmr_video entries on val/test_public and (train) rank the GT in
the top 100 (--no_ranklists skips the ranklists; a corpus whose ranklists are all absent, as one built by
utils/build_corpus.py, is checked without them and the run ends with one line saying that the first stage comes
next); every annotated or ranked video has visual (and subtitle) features; feature values are finite
and dims agree across keys. What the original accepts but may be a mistake (no `duration`, moments ending
after the video, videos with zero feature rows) is reported as warnings with counts. Per split it also
counts the videos longer than --max_ctx_len clips: train.py reads them as overlapping windows with
--window_stride N, and only their first --max_ctx_len clips without. A search-only corpus (a data config with
"search_split", from utils/build_corpus.py without annotations) has no queries: one line says so, with its
number of videos and that `python -m method.search build` indexes it, and the checks are those of its stores
(the query store opens; every video of the search split has visual, and with ctx_mode visual_sub subtitle,
features; dims agree across keys). Exit status 0 when no problem is found (warnings allowed), 2 otherwise (as
every command on bad input).
"""
import argparse
import collections
import os
import sys

from tqdm import tqdm

from utils.data_config import DataConfigError, load_data_config
from utils.errors import CLI_ERROR_EXIT_STATUS, OptionError, run_cli
from utils.feature_stores import (FeatureStoreError, QueryFeatureStore, RanklistStore, SubtitleFeatureStore,
                                  VideoFeatureStore)
from utils.io_utils import DataFileError, load_json, load_jsonl
from utils.tvr_format import (CTX_MODES, FIRST_STAGE_TOP, SPLIT_FILE_KEYS, SPLITS, DatasetError, annotation_problems,
                              annotation_warnings, moment_problem, moments_of, st_ed_label)
from utils.windows import WindowError, check_stride


class _FeatureCheck:
    """Reads every key of one feature store once, remembering problems and which dim each key has."""

    def __init__(self, store):
        self.store = store
        self.keys_by_dim = collections.defaultdict(list)
        self.n_rows = {}  # key -> number of feature rows (keys read without problem)

    def check(self, key, problems):
        if key in self.n_rows:
            return
        try:
            features = self.store.get(key)
        except FeatureStoreError as e:
            self.n_rows[key] = None
            problems.append(str(e))
            return
        self.n_rows[key] = features.shape[0]
        self.keys_by_dim[features.shape[1]].append(key)

    def empty_keys(self):
        return sorted(key for key, n in self.n_rows.items() if n == 0)

    def dim_problems(self):
        if len(self.keys_by_dim) <= 1:
            return []
        majority = max(self.keys_by_dim, key=lambda d: len(self.keys_by_dim[d]))
        return [f"{self.store.kind} store {self.store.path}: key {key!r} has feature dim {dim}, while "
                f"{len(self.keys_by_dim[majority])} keys have dim {majority}"
                for dim, keys in self.keys_by_dim.items() if dim != majority for key in keys]


def _open(store_class, path, problems):
    try:
        store = store_class(path)
        len(store)  # forces the LMDB open
        return store
    except FeatureStoreError as e:
        problems.append(str(e))
        return None


def check_corpus(dataset_config, splits=SPLITS, max_vcmr_video=10, ctx_mode="visual_sub", ranklists=True,
                 max_ctx_len=100, clip_length=1.5, window_stride=0):
    """-> (counts per split {split: {"queries", "videos", "problems", "long_videos", "longest_clips"}}, list of
    problem messages, {warning: (count, first key)}). long_videos counts the split's videos with more than
    max_ctx_len visual rows; longest_clips is the most rows of a video of the split (0 without a video store)."""
    try:
        check_stride(window_stride, max_ctx_len)
    except WindowError as e:
        raise OptionError(str(e)) from None
    problems = []
    warnings = {}
    try:
        config = load_data_config(dataset_config)
        video_splits = load_json(config.video_duration_idx_path)
    except (DataConfigError, DataFileError) as e:
        return {}, [str(e)], warnings

    query_store = _open(QueryFeatureStore, config.desc_bert_path, problems)
    video_store = _open(VideoFeatureStore, config.vid_feat_path, problems)
    sub_store = _open(SubtitleFeatureStore, config.sub_bert_path, problems) if "sub" in ctx_mode else None
    feature_checks = [_FeatureCheck(store) for store in (video_store, sub_store) if store is not None]
    query_check = _FeatureCheck(query_store) if query_store is not None else None

    counts = {}
    for split in splits:
        n_before = len(problems)
        data_key, ranklist_key = SPLIT_FILE_KEYS[split]
        if split not in video_splits:
            problems.append(f"{config.video_duration_idx_path}: no split {split!r}")
            counts[split] = dict(queries=0, videos=0, problems=len(problems) - n_before, long_videos=0,
                                 longest_clips=0)
            continue
        video2idx = {name: int(dur_idx[1]) for name, dur_idx in video_splits[split].items()}
        idx2video = {idx: name for name, idx in video2idx.items()}
        try:
            rows = load_jsonl(config[data_key])
        except DataFileError as e:
            problems.append(str(e))
            rows = []
        problems.extend(annotation_problems(rows, config[data_key], split, video2idx, config.dset_name,
                                            single_moment=split == "train"))
        warnings.update(annotation_warnings(rows, config[data_key]))
        rows = [row for row in rows if isinstance(row, dict) and "desc_id" in row]

        videos = {row["vid_name"] for row in rows if row.get("vid_name") in video2idx}
        ranklist_store = _open(RanklistStore, config[ranklist_key], problems) if ranklists else None
        for row in tqdm(rows, desc=f"{split}: queries and ranklists", disable=not rows):
            desc_id = row["desc_id"]
            if query_check is not None:
                query_check.check(desc_id, problems)
            if ranklist_store is not None:
                videos.update(_ranklist_problems(ranklist_store, row, split, idx2video, max_vcmr_video, problems))
        for name in tqdm(sorted(videos), desc=f"{split}: video features", disable=not videos):
            for feature_check in feature_checks:
                feature_check.check(name, problems)
        clip_counts = {}  # video -> visual rows, for the videos read without problem
        if video_store is not None:
            clip_counts = {name: feature_checks[0].n_rows[name] for name in videos
                           if feature_checks[0].n_rows.get(name) is not None}
        if split != "test_public" and video_store is not None:
            problems.extend(_label_problems(rows, config[data_key], clip_counts,
                                            max_ctx_len if window_stride == 0 else None, clip_length))
        counts[split] = dict(queries=len(rows), videos=len(videos), problems=len(problems) - n_before,
                             long_videos=sum(n > max_ctx_len for n in clip_counts.values()),
                             longest_clips=max(clip_counts.values(), default=0))

    for check in feature_checks + ([query_check] if query_check else []):
        problems.extend(check.dim_problems())
        empty = check.empty_keys()
        if empty:
            warnings[f"{check.store.kind} store {check.store.path}: keys with zero feature rows (training "
                     f"cannot label a GT video without visual rows)"] = (len(empty), empty[0])
    return counts, problems, warnings


def search_split_of(dataset_config):
    """The "search_split" of a search-only corpus's data config (utils/build_corpus.py without annotations), or
    None (another corpus, or a config that does not load: check_corpus reports it)."""
    try:
        return load_data_config(dataset_config).get("search_split")
    except DataConfigError:
        return None


def check_search_corpus(dataset_config, ctx_mode=None):
    """A search-only corpus: -> (number of videos of its search split, list of problem messages, {warning: (count,
    first key)}). It has no queries to check; what the search reads is: the video table's search split, visual
    (and with ctx_mode visual_sub, subtitle) features of every video of it with one dim per store, and the query
    store (empty). ctx_mode None: the data config's."""
    problems, warnings = [], {}
    try:
        config = load_data_config(dataset_config)
        video_splits = load_json(config.video_duration_idx_path)
    except (DataConfigError, DataFileError) as e:
        return 0, [str(e)], warnings
    split = config.search_split
    if split not in video_splits:
        return 0, [f"{config.video_duration_idx_path}: no split {split!r} (the data config's search_split)"], warnings
    ctx_mode = ctx_mode or config.get("ctx_mode") or "visual"
    _open(QueryFeatureStore, config.desc_bert_path, problems)
    stores = [_open(VideoFeatureStore, config.vid_feat_path, problems)]
    if "sub" in ctx_mode:
        stores.append(_open(SubtitleFeatureStore, config.sub_bert_path, problems))
    feature_checks = [_FeatureCheck(store) for store in stores if store is not None]
    names = sorted(video_splits[split])
    for name in tqdm(names, desc=f"{split}: video features", disable=not names):
        for feature_check in feature_checks:
            feature_check.check(name, problems)
    for check in feature_checks:
        problems.extend(check.dim_problems())
        empty = check.empty_keys()
        if empty:
            warnings[f"{check.store.kind} store {check.store.path}: keys with zero feature rows (the search has "
                     f"no clip of these videos)"] = (len(empty), empty[0])
    if not config.get("text_encoder"):
        warnings[f"data config {dataset_config}: no text_encoder (the search then takes token-feature queries "
                 f"only)"] = (1, "text_encoder")
    return len(names), problems, warnings


def _label_problems(rows, path, n_visual_rows, max_ctx_len, clip_length):
    """Moments whose training labels are not 0 <= st <= ed on their GT video (e.g. a zero-length moment on
    a clip boundary): training (and its eval-loss pass on val) stops on them. The label is that of the
    first moment, as training takes it: on the first max_ctx_len clips (truncation), or on the whole video
    (max_ctx_len None: windows, which take the label's window afterwards)."""
    problems = []
    for i, row in enumerate(rows):
        n_rows = n_visual_rows.get(row.get("vid_name"))
        if n_rows is None or "ts" not in row:
            continue
        label = moments_of(row["ts"])[0]
        if moment_problem(label) is not None:
            continue  # reported by annotation_problems
        try:
            st_ed_label(label, n_rows if max_ctx_len is None else min(n_rows, max_ctx_len), clip_length)
        except DatasetError as e:
            problems.append(f"{path}: row {i} (desc_id {row['desc_id']}): training cannot label it: {e}")
    return problems


def _ranklist_problems(store, row, split, idx2video, max_vcmr_video, problems):
    """Append the problems of one query's ranklist -> names of the split's videos it references."""
    desc_id = row["desc_id"]
    where = f"ranklist store {store.path}: key {str(desc_id)!r}"
    try:
        ranklist = store.get(desc_id)
    except FeatureStoreError as e:
        problems.append(str(e))
        return []
    foreign = [idx for idx, _ in ranklist if idx not in idx2video]
    if foreign:
        problems.append(f"{where}: {len(foreign)} video indices are not videos of split {split!r} "
                        f"(first: {foreign[:5]})")
    if split != "train" and len(ranklist) < max_vcmr_video:
        problems.append(f"{where}: {len(ranklist)} entries, expected at least max_vcmr_video={max_vcmr_video}")
    names = [idx2video[idx] for idx, _ in ranklist if idx in idx2video]
    if split == "train" and row.get("vid_name") not in names[:FIRST_STAGE_TOP]:
        problems.append(f"{where}: GT video {row.get('vid_name')!r} is not in the first {FIRST_STAGE_TOP} "
                        f"entries (training queries must be)")
    return names


def first_stage_pending(dataset_config, splits):
    """The line saying that the first stage comes next when none of `splits` has its ranklist yet (a corpus of
    utils/build_corpus.py before ranking), else None; the ranklists are then not checked, not each reported."""
    try:
        config = load_data_config(dataset_config)
    except DataConfigError:
        return None  # check_corpus reports it
    paths = [config[SPLIT_FILE_KEYS[split][1]] for split in splits]
    if any(os.path.exists(path) for path in paths):
        return None
    return ("No first-stage ranklists yet (not checked): the first stage comes next, scripts/train_first_stage.sh "
            "then scripts/rank_first_stage.sh, whose last line names the data config to check and train on")


def long_videos_line(split, count, max_ctx_len, clip_length, window_stride):
    """What the split's videos longer than max_ctx_len clips become in training and evaluation (None: none)."""
    if not count["long_videos"]:
        return None
    head = (f"  {split}: {count['long_videos']} of {count['videos']} videos are longer than --max_ctx_len "
            f"{max_ctx_len} clips (longest {count['longest_clips']} clips = {count['longest_clips'] * clip_length:g} s)")
    if window_stride:
        return head + f": read as overlapping windows of {max_ctx_len} clips with --window_stride {window_stride}"
    return head + (f": read as overlapping windows with train.py --window_stride N, truncated to their first "
                   f"{max_ctx_len} clips without it")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_config", required=True, help="data config JSON (e.g. config/tvr_data_config.json)")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    parser.add_argument("--max_problems", type=int, default=20, help="problems printed (all are counted)")
    parser.add_argument("--max_vcmr_video", type=int, default=10, help="minimum ranklist length on val/test_public")
    parser.add_argument("--ctx_mode", choices=CTX_MODES, default=None,
                        help="visual: the subtitle store is not needed (default: visual_sub; a search-only "
                             "corpus's: its data config's)")
    parser.add_argument("--no_ranklists", action="store_true",
                        help="do not check first-stage ranklists (a corpus the first stage has not ranked yet)")
    parser.add_argument("--max_ctx_len", type=int, default=100,
                        help="clips per video of the training set (the original's training set: 100)")
    parser.add_argument("--clip_length", type=float, default=1.5,
                        help="seconds per clip of the training set (the original's training set: 1.5)")
    parser.add_argument("--window_stride", type=int, default=0,
                        help="train.py's --window_stride: 0 labels moments on the first --max_ctx_len clips (the "
                             "original's truncation), a stride on the whole video (overlapping windows)")
    args = parser.parse_args(argv)
    if search_split_of(args.dataset_config) is not None:
        return _report_search_corpus(args)
    args.ctx_mode = args.ctx_mode or "visual_sub"

    pending = None if args.no_ranklists else first_stage_pending(args.dataset_config, args.splits)
    counts, problems, warnings = check_corpus(args.dataset_config, args.splits, args.max_vcmr_video, args.ctx_mode,
                                              ranklists=not (args.no_ranklists or pending),
                                              max_ctx_len=args.max_ctx_len,
                                              clip_length=args.clip_length, window_stride=args.window_stride)
    for split, count in counts.items():
        print(f"{split}: {count['queries']} queries, {count['videos']} videos, {count['problems']} problems")
        line = long_videos_line(split, count, args.max_ctx_len, args.clip_length, args.window_stride)
        if line:
            print(line)
    if pending:
        print(pending)
    return _report(warnings, problems, args.max_problems)


def _report_search_corpus(args):
    n_videos, problems, warnings = check_search_corpus(args.dataset_config, args.ctx_mode)
    print(f"A search-only corpus: {n_videos} videos and no queries, to be indexed with `python -m method.search "
          f"build` (its splits, ranklists and labels are not checked)")
    return _report(warnings, problems, args.max_problems)


def _report(warnings, problems, max_problems):
    """Print the warnings and the first max_problems problems -> the exit status."""
    if warnings:
        print(f"\n{len(warnings)} warning(s) (accepted, as by the original):")
        for warning, (count, first) in warnings.items():
            print(f"  - {warning}: {count} (first: {first!r})")
    if problems:
        print(f"\n{len(problems)} problem(s); the first {min(len(problems), max_problems)}:")
        for problem in problems[:max_problems]:
            print(f"  - {problem}")
        return CLI_ERROR_EXIT_STATUS
    print("OK: no problems found")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
