"""StartEndDataset: one item per query = the query, its GT video and candidate videos.

Training items (`is_eval=False`) hold the GT video followed by `neg_video_num` negatives drawn from the
first-stage ranklist (shared normalization) and the GT (start, end) clip indices. Evaluation items
(`is_eval=True`) hold the GT video (a dummy on test_public) followed by the first `inference_top_k`
ranklist videos and their first-stage scores; those candidates are read once per evaluation
(`eval_candidates`) and serve both the items and the video-encoding cache of method/evaluation.py.

Windows (`window_stride` > 0, utils/windows.py): a video longer than `max_ctx_len` clips is read as windows, each
a slice of the stored video. A training item then holds the GT window, a window of the GT video apart from the
moment (when there is one) and a window of each sampled negative video; evaluation reads windows through
`window_starts` and `get_video_inputs(name, start)`.

Annotations are validated when the dataset is built (cheap checks only); features and ranklists are read
lazily per item, through stores that each process opens for itself (see utils/feature_stores.py), so
DataLoader workers need no special setup.
"""
import copy
import functools
import logging
import math
import os
import random

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate
from tqdm import tqdm

from utils.data_config import load_data_config
from utils.feature_stores import (FeatureStoreError, QueryFeatureStore, RanklistStore, SubtitleFeatureStore,
                                  VideoFeatureStore, expect_dims)
from utils.io_utils import load_jsonl
from utils.tvr_format import (DUMMY_TEST_PUBLIC_VIDEO, FIRST_STAGE_TOP, SPLIT_FILE_KEYS, SPLITS, DatasetError,
                              annotation_problems, is_number, moments_of, split_video_indices, st_ed_label)
from utils.windows import (Window, WindowError, check_stride, choose_one, gt_window, overlaps_moment,
                           window_starts)

logger = logging.getLogger(__name__)

VISUAL_TOKEN_ID = 0
TEXT_TOKEN_ID = 1
_MAX_REPORTED_PROBLEMS = 5


class StartEndDataset(Dataset):
    """The items of one split (`mode`): {"meta": {desc_id, desc, vid_name, ts, sample_vid_name_list},
    "model_inputs": {"query": {feat (Lq, Dq), feat_mask, feat_pos_id, feat_token_id}, "visual" and (visual_sub)
    "sub": {feat (N, L, D), feat_mask, feat_pos_id, feat_token_id}, then "st_ed_indices" (2,) in training or
    "inference_vr_scores" (k,) at evaluation}}, N = 1 + neg_video_num (training) or 1 + inference_top_k."""

    def __init__(self, config, max_ctx_len=100, max_desc_len=30, clip_length=1.5, ctx_mode="visual_sub",
                 is_eval=False, mode="train", neg_video_num=3, data_ratio=1, use_extend_pool=500,
                 inference_top_k=10, read_ranklists=True, window_stride=0):
        if mode not in SPLITS:
            raise DatasetError(f"mode must be one of {SPLITS}, found {mode!r}")
        if mode == "test_public" and not is_eval:
            raise DatasetError("mode 'test_public' has no ground truth: it can only be built with is_eval=True")
        for name, value in (("max_ctx_len", max_ctx_len), ("max_desc_len", max_desc_len),
                            ("inference_top_k", inference_top_k)):
            if not (isinstance(value, int) and value >= 1):
                raise DatasetError(f"{name} must be a positive int, found {value!r}")
        if not (isinstance(neg_video_num, int) and neg_video_num >= 0):
            raise DatasetError(f"neg_video_num must be an int >= 0, found {neg_video_num!r}")
        if not (is_number(clip_length) and clip_length > 0):
            raise DatasetError(f"clip_length must be a positive number, found {clip_length!r}")
        try:
            check_stride(window_stride, max_ctx_len)
        except WindowError as e:
            raise DatasetError(str(e)) from None

        self.dset_name = config.dset_name
        self.mode = mode
        self.is_eval = is_eval
        self.has_gt = mode != "test_public"
        self.ctx_mode = ctx_mode
        self.use_sub = "sub" in ctx_mode
        self.max_ctx_len = max_ctx_len
        self.max_desc_len = max_desc_len
        self.clip_length = clip_length
        self.neg_video_num = neg_video_num
        self.data_ratio = data_ratio
        self.use_extend_pool = use_extend_pool
        self.inference_top_k = inference_top_k
        self.window_stride = window_stride
        self._clip_counts = {}  # video name -> visual clip count (windows only)

        self.data_path, ranklist_path = (config[key] for key in SPLIT_FILE_KEYS[mode])
        self.query_data = load_jsonl(self.data_path)
        if data_ratio != 1:
            n_examples = int(len(self.query_data) * data_ratio)
            self.query_data = self.query_data[:n_examples]
            logger.info("Using %.1f%% of the data: %d examples", data_ratio * 100, n_examples)

        self.video_duration_idx_path = config.video_duration_idx_path
        self.video2idx = split_video_indices(config.video_duration_idx_path, mode)
        self.idx2video = {idx: name for name, idx in self.video2idx.items()}

        # A multi-moment (DiDeMo-style) val split also feeds the eval-loss pass: its label is the first moment.
        problems = annotation_problems(self.query_data, self.data_path, mode, self.video2idx, self.dset_name,
                                       single_moment=mode == "train")
        if problems:
            more = len(problems) - _MAX_REPORTED_PROBLEMS
            raise DatasetError("invalid annotations:\n  " + "\n  ".join(problems[:_MAX_REPORTED_PROBLEMS])
                               + (f"\n  ... and {more} more" if more > 0 else ""))

        self.query_store = QueryFeatureStore(config.desc_bert_path, max_len=max_desc_len)
        self.video_store = VideoFeatureStore(config.vid_feat_path, max_len=max_ctx_len)
        self.sub_store = SubtitleFeatureStore(config.sub_bert_path, max_len=max_ctx_len) if self.use_sub else None
        # A corpus searched with a learned first stage may have no ranklists yet.
        self.ranklist_store = RanklistStore(ranklist_path) if read_ranklists else None
        self._dummy_stored = {}  # store kind -> whether it holds the test_public dummy (checked lazily)
        if self.window_stride and not is_eval:
            self._warn_long_moments()

    def check_feature_dims(self, query_dim, visual_dim, text_dim):
        """Compare the feature dims of the first query and its first video with the model's input dims, so a
        mismatch stops the run at start-up with the store and the option to fix; afterwards every read of
        these stores checks its dim too."""
        if not self.query_data:
            return
        row = self.query_data[0]
        video_name = self._gt_name(row) if self.has_gt else self.eval_candidates[0][0][1]
        checks = [(self.query_store, row["desc_id"], query_dim, "--query_dim"),
                  (self.video_store, video_name, visual_dim, "--visual_dim")]
        if self.use_sub:
            checks.append((self.sub_store, video_name, text_dim, "--text_dim"))
        try:
            expect_dims(checks)
        except FeatureStoreError as e:
            raise DatasetError(str(e)) from None

    def __len__(self):
        return len(self.query_data)

    def __getitem__(self, index):
        try:
            return self._build_item(index)
        except (FeatureStoreError, DatasetError) as e:
            raise DatasetError(f"{self._item_context(index)}: {e}") from None

    def _item_context(self, index):
        return f"{self.mode} item {index} (desc_id {self.query_data[index]['desc_id']})"

    def _gt_name(self, row):
        return row["vid_name"] if self.has_gt else DUMMY_TEST_PUBLIC_VIDEO

    def _build_item(self, index):
        row = self.query_data[index]
        desc_id = row["desc_id"]
        gt_name = self._gt_name(row)
        meta = dict(desc_id=desc_id, desc=row["desc"], vid_name=gt_name, ts=row.get("ts"))
        model_inputs = dict(query=self._query_inputs(desc_id))

        if self.is_eval:
            video_names, model_inputs["inference_vr_scores"] = self.eval_candidates[index]
        else:
            ranked_names = self._names(self.ranklist_store.get(desc_id), desc_id)
            video_names = [gt_name] + self._sample_negatives(ranked_names, gt_name, desc_id)
        meta["sample_vid_name_list"] = video_names[1:]
        if self.window_stride and not self.is_eval:
            return self._windowed_training_item(row, meta, model_inputs)

        placeholder_gt = not self.has_gt
        model_inputs["visual"], n_gt_clips = self._video_inputs(video_names, self.video_store, VISUAL_TOKEN_ID,
                                                               placeholder_gt)
        if self.use_sub:
            model_inputs["sub"], _ = self._video_inputs(video_names, self.sub_store, TEXT_TOKEN_ID, placeholder_gt)
        if not self.is_eval:
            st, ed = st_ed_label(_first_moment(row), n_gt_clips, self.clip_length)
            model_inputs["st_ed_indices"] = torch.tensor([st, ed], dtype=torch.int64)
        return dict(meta=meta, model_inputs=model_inputs)

    # Windows (utils/windows.py): a video longer than max_ctx_len clips is read as windows.

    def clip_count(self, name):
        """The visual clip count of video `name` (read once per process)."""
        if name not in self._clip_counts:
            self._clip_counts[name] = self.video_store.clip_count(name)
        return self._clip_counts[name]

    def window_starts(self, name):
        """Start clips of the windows of video `name` ([0] without windows)."""
        if not self.window_stride or (not self.has_gt and name == DUMMY_TEST_PUBLIC_VIDEO):
            return [0]
        return window_starts(self.clip_count(name), self.max_ctx_len, self.window_stride)

    def _windowed_training_item(self, row, meta, model_inputs):
        """A training item over windows: the GT window (one that holds the whole moment, see `gt_window`), then
        one window of the GT video that shares no clip with the moment when there is one (a hard negative: a
        long video's other windows are what its moments compete with at evaluation), then a random window of
        each sampled negative video, N = 1 + neg_video_num in all."""
        gt_name = meta["vid_name"]
        n_clips = self.clip_count(gt_name)
        starts = self.window_starts(gt_name)
        video_st, video_ed = st_ed_label(_first_moment(row), n_clips, self.clip_length)
        gt_start, (st, ed), _ = gt_window(starts, self.max_ctx_len, video_st, video_ed, random.choice)
        negative_names = meta["sample_vid_name_list"]
        windows = [Window(gt_name, gt_start)]
        apart = [start for start in starts if not overlaps_moment(start, self.max_ctx_len, video_st, video_ed)]
        if apart and negative_names:
            negative_names = negative_names[:-1]
            windows.append(Window(gt_name, choose_one(apart)))
        windows += [Window(name, choose_one(self.window_starts(name))) for name in negative_names]
        meta["sample_vid_name_list"] = [window.video_name for window in windows[1:]]
        meta["windows"] = windows
        model_inputs["visual"], _ = self._video_inputs(windows, self.video_store, VISUAL_TOKEN_ID, False)
        if self.use_sub:
            model_inputs["sub"], _ = self._video_inputs(windows, self.sub_store, TEXT_TOKEN_ID, False)
        model_inputs["st_ed_indices"] = torch.tensor([st, ed], dtype=torch.int64)
        return dict(meta=meta, model_inputs=model_inputs)

    def _warn_long_moments(self):
        """Count the moments no window can hold (cut to the window covering most of them in training)."""
        longer = 0
        for row in self.query_data:
            t0, t1 = _first_moment(row)
            longer += math.ceil(float(t1) / self.clip_length) - math.floor(float(t0) / self.clip_length) > \
                self.max_ctx_len
        if longer:
            logger.warning("%d of %d %s moments are longer than a window of %d clips: each is cut to the window "
                           "covering most of it", longer, len(self.query_data), self.mode, self.max_ctx_len)

    def subset(self, start, stop):
        """This dataset restricted to its queries [start, stop) (a rank's share, --debug's first queries); the
        stores and every other attribute are shared."""
        view = copy.copy(self)
        view.query_data = self.query_data[start:stop]
        view.__dict__.pop("eval_candidates", None)
        return view

    @functools.cached_property
    def eval_candidates(self):
        """Per query of an evaluation dataset: (names of its 1 + inference_top_k videos, GT first; their
        first-stage scores, float32 (inference_top_k,)). Read from the ranklist once, on first use."""
        candidates = []
        for index, row in enumerate(tqdm(self.query_data, desc="Reading ranklists", leave=False)):
            try:
                candidates.append(self._read_candidates(row))
            except (FeatureStoreError, DatasetError) as e:
                raise DatasetError(f"{self._item_context(index)}: {e}") from None
        return candidates

    def _read_candidates(self, row):
        desc_id = row["desc_id"]
        ranklist = self.ranklist_store.get(desc_id)
        if len(ranklist) < self.inference_top_k:
            raise DatasetError(f"ranklist {self.ranklist_store.path}: key {str(desc_id)!r} holds {len(ranklist)} "
                               f"videos, expected at least inference_top_k={self.inference_top_k}")
        top = ranklist[:self.inference_top_k]
        scores = torch.tensor([score for _, score in top], dtype=torch.float32)
        return [self._gt_name(row)] + self._names(top, desc_id), scores

    def _names(self, ranklist, desc_id):
        try:
            return [self.idx2video[video_idx] for video_idx, _ in ranklist]
        except KeyError as e:
            raise DatasetError(f"ranklist {self.ranklist_store.path}: key {str(desc_id)!r} references video "
                               f"index {e.args[0]}, which is not a video of split {self.mode!r} in "
                               f"{self.video_duration_idx_path}") from None

    def _sample_negatives(self, ranked_names, gt_name, desc_id):
        """neg_video_num names drawn without replacement from the ranklist head, GT excluded."""
        location = next((i for i, name in enumerate(ranked_names) if name == gt_name), FIRST_STAGE_TOP)
        if self.mode == "train" and not location < FIRST_STAGE_TOP:
            raise DatasetError(f"ranklist {self.ranklist_store.path}: GT video {gt_name!r} of desc_id {desc_id} "
                               f"is not in the first {FIRST_STAGE_TOP} entries (the training file must hold "
                               f"only such queries)")
        pool = [name for name in ranked_names if name != gt_name][:location + self.use_extend_pool]
        if len(pool) < self.neg_video_num:
            raise DatasetError(f"ranklist {self.ranklist_store.path}: key {str(desc_id)!r} leaves a negative pool "
                               f"of {len(pool)} videos, expected at least neg_video_num={self.neg_video_num}")
        return random.sample(pool, k=self.neg_video_num)

    def _query_inputs(self, desc_id):
        return query_inputs(self.query_store.get(desc_id), self.max_desc_len)

    def _video_inputs(self, videos, store, token_id, placeholder_gt):
        """Padded (N, L, D) features of `videos` (names, or `Window`s: a window is read as rows [start, start + L)
        of its video) from `store` -> (inputs dict, GT row count).

        With `placeholder_gt` (test_public) slot 0 is the dummy video, read if the store holds it; otherwise
        it is one all-zero row. Slot 0 never affects test_public outputs: every video is encoded and scored
        on its own at inference and SVMR (the only use of slot 0) needs a GT that test_public lacks.
        """
        windows = [video if isinstance(video, Window) else Window(video, 0) for video in videos]
        video_names = [window.video_name for window in windows]
        rows_by_window = {}
        rows = []
        for i, window in enumerate(windows):
            if i == 0 and placeholder_gt and not self._stores_dummy(store):
                rows.append(None)
                continue
            if window not in rows_by_window:
                rows_by_window[window] = store.get(*window)
            rows.append(rows_by_window[window])
        reference = next((r for r in rows if r is not None), None)
        dim = reference.shape[1] if reference is not None else self._first_video_dim(store)
        for name, r in zip(video_names, rows):
            if r is not None and r.shape[1] != dim:
                raise DatasetError(f"{store.kind} store {store.path}: video {name!r} has feature dim "
                                   f"{r.shape[1]}, expected {dim} (dim of {video_names[0]!r})")
        if rows[0] is None:
            rows[0] = np.zeros((1, dim), dtype=np.float32)

        n_videos, max_len = len(video_names), self.max_ctx_len
        feat = np.zeros((n_videos, max_len, dim), dtype=np.float32)
        mask = np.zeros((n_videos, max_len), dtype=np.int64)
        for i, r in enumerate(rows):
            feat[i, :len(r)] = r
            mask[i, :len(r)] = 1
        inputs = dict(feat=torch.from_numpy(feat), feat_mask=torch.from_numpy(mask),
                      feat_pos_id=torch.arange(max_len, dtype=torch.int64).repeat(n_videos, 1),
                      feat_token_id=torch.full((n_videos, max_len), token_id, dtype=torch.int64))
        return inputs, len(rows[0])

    def _stores_dummy(self, store):
        if store.kind not in self._dummy_stored:
            self._dummy_stored[store.kind] = DUMMY_TEST_PUBLIC_VIDEO in store
        return self._dummy_stored[store.kind]

    def _first_video_dim(self, store):
        # The placeholder alone (cache encoding of the dummy) has no other video to take its dim from.
        return store.get(next(iter(self.video2idx))).shape[1]

    # Evaluation with a video-encoding cache (method/evaluation.py) reads queries and videos separately.

    def get_query_item(self, index):
        """Evaluation item `index` without video features:
        {"meta", "model_inputs": {"query", "inference_vr_scores"}}."""
        if not self.is_eval:
            raise DatasetError("get_query_item is for evaluation datasets (is_eval=True)")
        row = self.query_data[index]
        video_names, scores = self.eval_candidates[index]
        try:
            query = self._query_inputs(row["desc_id"])
        except (FeatureStoreError, DatasetError) as e:
            raise DatasetError(f"{self._item_context(index)}: {e}") from None
        meta = dict(desc_id=row["desc_id"], desc=row["desc"], vid_name=video_names[0], ts=row.get("ts"),
                    sample_vid_name_list=video_names[1:])
        return dict(meta=meta, model_inputs=dict(query=query, inference_vr_scores=scores))

    def get_video_inputs(self, vid_name, start=0):
        """One video's (or, from clip `start`, one window's) slice of an evaluation item: {"visual": {feat (L, Dv),
        feat_mask, feat_pos_id, feat_token_id (L,)}, "sub": {... (L, Dt)} if ctx_mode has sub}; the test_public
        dummy as in items."""
        placeholder = not self.has_gt and vid_name == DUMMY_TEST_PUBLIC_VIDEO
        window = Window(vid_name, start)
        try:
            inputs = {"visual": self._video_inputs([window], self.video_store, VISUAL_TOKEN_ID, placeholder)[0]}
            if self.use_sub:
                inputs["sub"] = self._video_inputs([window], self.sub_store, TEXT_TOKEN_ID, placeholder)[0]
        except (FeatureStoreError, DatasetError) as e:
            raise DatasetError(f"{self.mode} video {vid_name!r}: {e}") from None
        return {modality: {key: value[0] for key, value in tensors.items()} for modality, tensors in inputs.items()}


def build_eval_dataset(opt, read_ranklists=True):
    """The evaluation dataset inference runs on: split opt.eval_split_name of the data config opt.dataset_config,
    with the run's options (max_ctx_len, max_desc_len, clip_length, ctx_mode, data_ratio, max_vcmr_video,
    window_stride)."""
    return StartEndDataset(
        load_data_config(opt.dataset_config), max_ctx_len=opt.max_ctx_len, max_desc_len=opt.max_desc_len,
        clip_length=opt.clip_length, ctx_mode=opt.ctx_mode, is_eval=True, mode=opt.eval_split_name,
        neg_video_num=0, data_ratio=opt.data_ratio, inference_top_k=opt.max_vcmr_video,
        read_ranklists=read_ranklists, window_stride=opt.get("window_stride", 0))


def _first_moment(row):
    """The training label of an annotation row: its moment, or the first of a multi-moment (DiDeMo) row."""
    return moments_of(row["ts"])[0]


def query_inputs(features, max_desc_len):
    """Token features (n, Dq) with n <= max_desc_len -> model query inputs {feat (Lq, Dq), feat_mask, feat_pos_id,
    feat_token_id (Lq,)} padded to Lq = max_desc_len."""
    feat = np.zeros((max_desc_len, features.shape[1]), dtype=np.float32)
    feat[:len(features)] = features
    mask = np.zeros(max_desc_len, dtype=np.int64)
    mask[:len(features)] = 1
    return dict(feat=torch.from_numpy(feat), feat_mask=torch.from_numpy(mask),
                feat_pos_id=torch.arange(max_desc_len, dtype=torch.int64),
                feat_token_id=torch.full((max_desc_len,), TEXT_TOKEN_ID, dtype=torch.int64))


# The original builds its training set with the dataset's own defaults, whatever the options say.
ORIGINAL_TRAIN_SET_OPTIONS = dict(max_ctx_len=100, max_desc_len=30, clip_length=1.5, ctx_mode="visual_sub")


def train_set_options(opt, data_config):
    """max_ctx_len, max_desc_len, clip_length and ctx_mode of the training set.

    As the original: the dataset defaults (100, 30, 1.5, visual_sub), whatever the options say, so that
    non-default options train exactly as it did; with --train_set_honours_options, the options. The options
    are also used, with a log line, where the original crashes: ctx_mode visual_sub with max_ctx_len other
    than 100 (the model splits its two-modality sequence at max_ctx_len clips), a corpus without subtitle
    features (the original's training set reads them), and with --window_stride (windows must be the model's).
    """
    honoured = {name: opt[name] for name in ORIGINAL_TRAIN_SET_OPTIONS}
    if opt.train_set_honours_options or honoured == ORIGINAL_TRAIN_SET_OPTIONS:
        return honoured
    if opt.get("window_stride", 0):  # windows are this implementation's: they are read as the model reads them
        logger.info("training set built with the options %s (--window_stride)", honoured)
        return honoured
    crash = None
    if opt.ctx_mode == "visual_sub" and opt.max_ctx_len != ORIGINAL_TRAIN_SET_OPTIONS["max_ctx_len"]:
        crash = f"--ctx_mode visual_sub and --max_ctx_len {opt.max_ctx_len}"
    elif not os.path.isdir(data_config.sub_bert_path):
        crash = f"no subtitle store at {data_config.sub_bert_path}"
    if crash:
        logger.info("training set built with the options %s (the original's fixed %s crash with %s)",
                    honoured, ORIGINAL_TRAIN_SET_OPTIONS, crash)
        return honoured
    logger.info("training set built with %s, as the original, not with the options %s; pass "
                "--train_set_honours_options to use the options", ORIGINAL_TRAIN_SET_OPTIONS, honoured)
    return dict(ORIGINAL_TRAIN_SET_OPTIONS)


def build_training_datasets(opt):
    """CONQUER's (train, eval-loss, evaluation) datasets for train.py; the last two are None with --disable_eval. The training set's
    lengths, clip length and ctx_mode follow `train_set_options`; the other two use the options."""
    data_config = load_data_config(opt.dataset_config)
    common = dict(max_ctx_len=opt.max_ctx_len, max_desc_len=opt.max_desc_len, clip_length=opt.clip_length,
                  ctx_mode=opt.ctx_mode, data_ratio=opt.data_ratio, window_stride=opt.get("window_stride", 0))
    train_dataset = StartEndDataset(data_config, mode="train", is_eval=False, neg_video_num=opt.neg_video_num,
                                    use_extend_pool=opt.use_extend_pool, data_ratio=opt.data_ratio,
                                    window_stride=opt.get("window_stride", 0), **train_set_options(opt, data_config))
    if opt.disable_eval:
        return train_dataset, None, None
    eval_loss_dataset = StartEndDataset(data_config, mode="val", is_eval=False, neg_video_num=opt.neg_video_num,
                                        use_extend_pool=opt.use_extend_pool, **common)
    eval_dataset = StartEndDataset(data_config, mode=opt.eval_split_name, is_eval=True,
                                   inference_top_k=opt.max_vcmr_video, **common)
    return train_dataset, eval_loss_dataset, eval_dataset


def start_end_collate(batch):
    """List of items -> (meta list, model_inputs with a leading batch dim on every tensor)."""
    return [item["meta"] for item in batch], default_collate([item["model_inputs"] for item in batch])


def prepare_batch_inputs(model_inputs, device, non_blocking=False):
    """Copy of the (nested dict of tensors) batch with every tensor moved to `device`."""
    return {key: (prepare_batch_inputs(value, device, non_blocking) if isinstance(value, dict)
                  else value.to(device, non_blocking=non_blocking))
            for key, value in model_inputs.items()}
