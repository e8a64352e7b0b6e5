"""Evaluation: model predictions -> submission files and metrics.

`eval_epoch` runs the model over an evaluation `StartEndDataset` (is_eval=True), ranks SVMR / VR / VCMR
predictions with method/scoring.py (`rank_batch` per batch, `prediction_results` once at the end), writes
the top-100 submission (and its metrics on val, by utils/standalone_eval.py), then optionally the temporal-NMS
submission (utils/temporal_nms.py) and its metrics.

Video-encoding cache (`opt.video_cache`, default on): the video encoder does not see the query, and every
query re-ranks its own k candidates plus its GT video, so the same video is encoded many times per
evaluation (about 55k encodings for 2.2k distinct val videos). With the cache, every distinct video is
encoded once up front and each query batch only runs the query encoder and the query-dependent layers on
gathered rows. The cache lives on the model's device when it fits, else in (pinned) host memory. Its videos
and the query items come from the same `dataset.eval_candidates`, read once.

Windows (`--window_stride`, utils/windows.py). When a candidate video is longer than one window, every query
re-ranks all windows of its k candidate videos (`--max_vcmr_video` counts videos) and, for SVMR, of its GT
video: the windows of a group of queries are encoded once (the encodings of one group at a time, at most
WINDOW_CACHE_BYTES), each query batch scores its window slots padded to the batch's largest count, and
`rank_windowed_batch` merges the windows back into moments of whole videos. The cost of a query grows with the
windows of its videos; the log reports the window slots per query. Without a long candidate video the path
above runs unchanged.

Model methods used: `encode_query`, `encode_videos`, `score_encoded` (cache on) or `get_pred_from_raw_query`
(cache off).
"""
import logging
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from tqdm import tqdm

from method.amp import autocast_context
from method.dataset import prepare_batch_inputs, start_end_collate
from method.scoring import prediction_results, rank_batch, rank_windowed_batch
from utils import distributed
from utils.errors import OptionError
from utils.io_utils import gc_paused, save_json
from utils.standalone_eval import GroundTruthError, eval_retrieval
from utils.temporal_nms import apply_nms
from utils.tvr_format import IOU_THRESHOLDS, MAX_PREDICTIONS_PER_QUERY, TASKS
from utils.windows import Window

logger = logging.getLogger(__name__)

# Share of the free accelerator memory the video cache may take; the rest is left to the query batches.
CACHE_DEVICE_MEMORY_FRACTION = 0.5
# Encodings of windows held at once when videos are read as windows (float32 estimate; queries are grouped).
WINDOW_CACHE_BYTES = 2 << 30


def _evaluate_nms_submission(submission_nms, ground_truth, opt):
    """Metrics of the NMS submission. The original asks for query types here whatever the corpus (a DiDeMo
    GT has none); `nms_metrics_by_dset` asks for them only on tvr, as for the submission without NMS."""
    by_dset = opt.get("nms_metrics_by_dset", False)
    try:
        return eval_retrieval(submission_nms, ground_truth, iou_thds=IOU_THRESHOLDS, match_number=not opt.debug,
                              verbose=opt.debug, use_desc_type=opt.dset_name == "tvr" if by_dset else True)
    except GroundTruthError as e:
        if by_dset:
            raise
        raise GroundTruthError(f"{e} (the NMS metrics use query types, as the original; pass "
                               f"--nms_metrics_by_dset to use them only for --dset_name tvr)") from None


def resolve_tasks(tasks, split, has_gt):
    """The tasks to run on `split` (a tuple): SVMR needs the GT video, which test_public lacks."""
    tasks = tuple(tasks)
    if not tasks or set(tasks) - set(TASKS):
        raise OptionError(f"evaluation tasks {list(tasks)}: expected a non-empty subset of {list(TASKS)}")
    if "SVMR" in tasks and not has_gt:
        logger.info("Skipping SVMR: split %r has no ground-truth videos", split)
        tasks = tuple(t for t in tasks if t != "SVMR")
    return tasks


def _model_device(model, opt):
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device(opt.device)


def _loader(dataset, opt, device, batch_size, collate_fn):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=opt.num_workers,
                      collate_fn=collate_fn, pin_memory=device.type == "cuda")


class _QueryItems(Dataset):
    """The query side of an evaluation dataset's items (`get_query_item`)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset.get_query_item(index)


class _VideoItems(Dataset):
    """One evaluation video's (or window's) inputs per item (`get_video_inputs`)."""

    def __init__(self, dataset, windows):
        self.dataset = dataset
        self.windows = windows

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, index):
        return self.dataset.get_video_inputs(*self.windows[index])


class VideoEncodingCache:
    """Encoder outputs of every distinct video of an evaluation, each computed once.

    Attributes:
        video_names: list of V distinct names (order of first appearance over the queries).
        query_video_rows: (n_queries, 1 + k) int64, cache row of each video of each evaluation item.
        encoded: {modality: (V, L, H)} on `storage_device`; video_mask: (V, L) visual mask, same device.
    """

    def __init__(self, video_names, query_video_rows, encoded, video_mask):
        self.video_names = video_names
        self.query_video_rows = query_video_rows
        self.encoded = encoded
        self.video_mask = video_mask

    @property
    def storage_device(self):
        return self.video_mask.device

    @property
    def nbytes(self):
        tensors = list(self.encoded.values()) + [self.video_mask]
        return sum(t.numel() * t.element_size() for t in tensors)

    @classmethod
    def build(cls, model, dataset, opt, device, batch_size):
        """Encode every video of `dataset.eval_candidates` (model already in eval mode, no grad)."""
        query_names = [names for names, _ in dataset.eval_candidates]
        row_of = {}
        for names in query_names:
            for name in names:
                row_of.setdefault(name, len(row_of))
        query_video_rows = torch.tensor([[row_of[name] for name in names] for names in query_names],
                                        dtype=torch.long)
        cache = cls.encode(model, dataset, [Window(name, 0) for name in row_of], query_video_rows, opt, device,
                           batch_size)
        logger.info("Video-encoding cache: %d distinct videos for %d queries (%d video slots), %.1f MiB on %s",
                    len(row_of), len(query_names), query_video_rows.numel(), cache.nbytes / 2 ** 20,
                    cache.storage_device)
        return cache

    @classmethod
    def encode(cls, model, dataset, windows, query_video_rows, opt, device, batch_size):
        """Encode `windows` (each a `Window`: a video from one of its clips) into cache rows, in their order."""
        video_names = [window.video_name for window in windows]
        encoded = video_mask = None
        offset = 0
        loader = _loader(_VideoItems(dataset, windows), opt, device, batch_size, default_collate)
        for video_inputs in tqdm(loader, desc="Encoding videos", total=len(loader),
                                 disable=not distributed.is_main_process()):
            video_inputs = prepare_batch_inputs(video_inputs, device, non_blocking=True)
            n = video_inputs["visual"]["feat_mask"].shape[0]
            # Every chunk has the row count of a full uncached batch: GPU kernels (hence the last bits of
            # the results) can depend on it, and the cache should not change the predictions.
            batch_encoded = {key: value[:n] for key, value in
                             model.encode_videos(_pad_rows(video_inputs, batch_size)).items()}
            if encoded is None:
                storage = _cache_storage_device(batch_encoded, len(video_names), device)
                encoded = {key: _empty_like_rows(value, len(video_names), storage)
                           for key, value in batch_encoded.items()}
                video_mask = _empty_like_rows(video_inputs["visual"]["feat_mask"], len(video_names), storage)
            for key, value in batch_encoded.items():
                encoded[key][offset:offset + n].copy_(value)
            video_mask[offset:offset + n].copy_(video_inputs["visual"]["feat_mask"])
            offset += n
        return cls(video_names, query_video_rows, encoded, video_mask)

    def gather(self, rows, device):
        """Cache rows (M,) -> ({modality: (M, L, H)}, video_mask (M, L)) on `device`."""
        rows = rows.to(self.storage_device)
        encoded = {key: value.index_select(0, rows).to(device, non_blocking=True)
                   for key, value in self.encoded.items()}
        return encoded, self.video_mask.index_select(0, rows).to(device, non_blocking=True)


def _pad_rows(inputs, n_rows):
    """Nested dict of (m, ...) tensors -> (n_rows, ...) by repeating row 0 (m <= n_rows)."""
    if isinstance(inputs, dict):
        return {key: _pad_rows(value, n_rows) for key, value in inputs.items()}
    missing = n_rows - inputs.shape[0]
    return torch.cat([inputs, inputs[:1].expand(missing, *inputs.shape[1:])]) if missing > 0 else inputs


def _empty_like_rows(tensor, n_rows, device):
    pin = device.type == "cpu" and tensor.device.type == "cuda"
    return torch.empty((n_rows,) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=device, pin_memory=pin)


def _cache_storage_device(first_batch_encoded, n_videos, device):
    """The model's device if the whole cache takes at most a fraction of its free memory, else the host."""
    if device.type != "cuda":
        return device
    bytes_per_video = sum(v[0].numel() * v.element_size() for v in first_batch_encoded.values())
    free_bytes, _ = torch.cuda.mem_get_info(device)
    needed = bytes_per_video * n_videos
    if needed <= CACHE_DEVICE_MEMORY_FRACTION * free_bytes:
        return device
    logger.info("Video-encoding cache needs %.1f MiB, more than %.0f%% of the %.1f MiB free on %s: keeping it "
                "in host memory", needed / 2 ** 20, 100 * CACHE_DEVICE_MEMORY_FRACTION, free_bytes / 2 ** 20, device)
    return torch.device("cpu")


def _forward_batches(model, dataset, opt, device):
    """Yield (metas, first-stage scores (B, k), (video_scores, begin_logits, end_logits)) per query batch."""
    loader = _loader(dataset, opt, device, opt.eval_query_bsz, start_end_collate)
    for metas, model_inputs in tqdm(loader, desc="Scoring queries", total=len(loader),
                                    disable=not distributed.is_main_process()):
        model_inputs = prepare_batch_inputs(model_inputs, device, non_blocking=True)
        yield metas, model_inputs["inference_vr_scores"], model.get_pred_from_raw_query(model_inputs)


def _cached_forward_batches(model, dataset, opt, device):
    """As `_forward_batches`, with every video encoded once by a `VideoEncodingCache`."""
    n_videos_per_item = 1 + dataset.inference_top_k
    cache = VideoEncodingCache.build(model, dataset, opt, device, batch_size=opt.eval_query_bsz * n_videos_per_item)
    loader = _loader(_QueryItems(dataset), opt, device, opt.eval_query_bsz, start_end_collate)
    offset = 0
    for metas, model_inputs in tqdm(loader, desc="Scoring queries", total=len(loader),
                                    disable=not distributed.is_main_process()):
        rows = cache.query_video_rows[offset:offset + len(metas)]
        offset += len(metas)
        model_inputs = prepare_batch_inputs(model_inputs, device, non_blocking=True)
        query_inputs = model_inputs["query"]
        encoded, video_mask = cache.gather(rows.reshape(-1), device)
        outputs = model.score_encoded(model.encode_query(query_inputs), query_inputs["feat_mask"], encoded,
                                      video_mask, rows.shape[1])
        yield metas, model_inputs["inference_vr_scores"], outputs


def query_windows(dataset, include_gt):
    """Per query of an evaluation dataset read as windows: its window slots [(video slot, Window)], video slot 0
    = the GT video (only with `include_gt`: SVMR is its only use), 1..k = the candidates in ranklist order."""
    starts = {}
    slots = []
    for names, _ in tqdm(dataset.eval_candidates, desc="Laying out windows", leave=False,
                         disable=not distributed.is_main_process()):
        query = []
        for video, name in enumerate(names):
            if video == 0 and not include_gt:
                continue
            if name not in starts:
                starts[name] = dataset.window_starts(name)
            query += [(video, Window(name, start)) for start in starts[name]]
        slots.append(query)
    return slots


def _window_groups(slots, max_rows):
    """Consecutive query ranges [(start, stop)] whose distinct windows number at most max_rows (a query with more
    is a group of its own), so the windows' encodings are held for one group at a time."""
    groups, start, distinct = [], 0, set()
    for i, query in enumerate(slots):
        windows = {window for _, window in query}
        if i > start and len(distinct | windows) > max_rows:
            groups.append((start, i))
            start, distinct = i, set()
        distinct |= windows
    if slots:
        groups.append((start, len(slots)))
    return groups


def _windowed_forward_batches(model, dataset, opt, device, include_gt):
    """As `_cached_forward_batches` for videos read as windows: yield (metas, first-stage scores (B, k),
    outputs over (B, N) window slots, (slot_video, slot_start, slot_length) (B, N) numpy).

    Windows of the queries of one group are encoded once, then each query batch scores all its window slots,
    padded to the batch's largest count; the encodings are held for one group at a time
    (WINDOW_CACHE_BYTES), so memory stays bounded whatever the corpus's total length.
    """
    slots = query_windows(dataset, include_gt)
    counts = np.array([len(query) for query in slots])
    logger.info("Windows of --window_stride %d: %.1f window slots per query (max %d), %d distinct windows: the cost "
                "of a query grows with the windows of its videos", dataset.window_stride, counts.mean(),
                counts.max(), len({window for query in slots for _, window in query}))
    modalities = 2 if dataset.use_sub else 1
    max_rows = max(1, WINDOW_CACHE_BYTES // (dataset.max_ctx_len * opt.hidden_dim * 4 * modalities))
    query_items = _QueryItems(dataset)
    video_batch_size = opt.eval_query_bsz * (1 + dataset.inference_top_k)
    for start, stop in _window_groups(slots, max_rows):
        row_of = {}
        for query in slots[start:stop]:
            for _, window in query:
                row_of.setdefault(window, len(row_of))
        cache = VideoEncodingCache.encode(model, dataset, list(row_of), None, opt, device, video_batch_size)
        row_length = cache.video_mask.sum(dim=1).cpu().numpy()
        loader = _loader(Subset(query_items, range(start, stop)), opt, device, opt.eval_query_bsz, start_end_collate)
        offset = start
        for metas, model_inputs in tqdm(loader, desc="Scoring queries", total=len(loader),
                                        disable=not distributed.is_main_process()):
            batch_slots = slots[offset:offset + len(metas)]
            offset += len(metas)
            n_slots = max(len(query) for query in batch_slots)
            slot_video = np.full((len(metas), n_slots), -1, dtype=np.int64)
            slot_start = np.zeros((len(metas), n_slots), dtype=np.int64)
            rows = np.zeros((len(metas), n_slots), dtype=np.int64)  # padding slots read row 0, then are ignored
            for i, query in enumerate(batch_slots):
                for j, (video, window) in enumerate(query):
                    slot_video[i, j], slot_start[i, j], rows[i, j] = video, window.start, row_of[window]
            slot_length = np.where(slot_video >= 0, row_length[rows], 0)
            model_inputs = prepare_batch_inputs(model_inputs, device, non_blocking=True)
            query_inputs = model_inputs["query"]
            encoded, video_mask = cache.gather(torch.from_numpy(rows).reshape(-1), device)
            outputs = model.score_encoded(model.encode_query(query_inputs), query_inputs["feat_mask"], encoded,
                                          video_mask, n_slots)
            yield metas, model_inputs["inference_vr_scores"], outputs, (slot_video, slot_start, slot_length)


def reads_windows(dataset):
    """Whether an evaluation dataset has a candidate video longer than one window. Without one, evaluation runs
    exactly as without windows (same code, same outputs)."""
    if not dataset.window_stride:
        return False
    names = {name for names, _ in dataset.eval_candidates for name in names}
    return any(len(dataset.window_starts(name)) > 1
               for name in tqdm(sorted(names), desc="Counting clips", leave=False,
                                disable=not distributed.is_main_process()))


def ranked_rows_needed(opt, max_after_nms):
    """Rows per query the submission and NMS will read, so ranking needs no more.

    The submission keeps max_after_nms rows; NMS reads the first max_before_nms rows of the truncated
    submission [Q7], or of the full lists with `nms_input_full`.
    """
    if opt.nms_thd != -1 and opt.get("nms_input_full", False):
        return opt.max_before_nms
    return min(opt.max_before_nms, max_after_nms)


def compute_predictions(model, eval_dataset, opt, tasks, n_ranked=None):
    """Ranked predictions of every query: {"VCMR", "SVMR", "VR"} (non-empty tasks), then "video2idx".

    Each task maps to a list, in dataset order, of {"desc_id", "desc", "predictions"} with up to n_ranked
    (default max_before_nms) rows [video_idx, st, ed, score] (VR: the k candidates [video_idx, 0, 0, score]).
    """
    device = _model_device(model, opt)
    n_ranked = opt.max_before_nms if n_ranked is None else n_ranked
    model.eval()
    ranking = dict(tasks=tasks, max_before_nms=n_ranked, min_pred_l=opt.min_pred_l, max_pred_l=opt.max_pred_l,
                   use_internal_vr_scores=opt.use_interal_vr_scores)
    ranked_batches, all_metas = [], []
    # --amp: the forward passes run lazily inside the loop, so autocast wraps it; scoring casts to fp32.
    with torch.no_grad(), autocast_context(opt.get("amp", "off"), device):
        if reads_windows(eval_dataset):  # the video cache is how windows are read, whatever --no_video_cache
            for metas, first_stage_scores, (video_scores, begin_logits, end_logits), slots in \
                    _windowed_forward_batches(model, eval_dataset, opt, device, include_gt="SVMR" in tasks):
                ranked_batches.append(rank_windowed_batch(
                    opt.similarity_measure, begin_logits, end_logits, *slots, video_scores=video_scores,
                    first_stage_scores=first_stage_scores, **ranking))
                all_metas += metas
            return prediction_results(ranked_batches, all_metas, eval_dataset.video2idx, opt.clip_length)
        batches = (_cached_forward_batches if opt.get("video_cache", True) else _forward_batches)
        for metas, first_stage_scores, (video_scores, begin_logits, end_logits) in batches(
                model, eval_dataset, opt, device):
            ranked_batches.append(rank_batch(opt.similarity_measure, begin_logits, end_logits,
                                             video_scores=video_scores, first_stage_scores=first_stage_scores,
                                             **ranking))
            all_metas += metas
    return prediction_results(ranked_batches, all_metas, eval_dataset.video2idx, opt.clip_length)


def top_n_submission(results, top_n):
    """{"video2idx", then each task} with every query's predictions cut to the first `top_n` (new dicts; a list
    that is short enough is shared, not copied)."""
    submission = {"video2idx": results["video2idx"]}
    for task, queries in results.items():
        if task != "video2idx":
            submission[task] = [dict(query, predictions=query["predictions"] if len(query["predictions"]) <= top_n
                                     else query["predictions"][:top_n]) for query in queries]
    return submission


def nms_submission(submission, nms_source, nms_thd, max_before_nms, max_after_nms):
    """{"video2idx", "VR" of `submission` if present, then "SVMR" and "VCMR" after temporal NMS of the
    first max_before_nms rows of each query of `nms_source`}."""
    submission_nms = {"video2idx": submission["video2idx"]}
    if "VR" in submission:
        submission_nms["VR"] = submission["VR"]
    for task in ("SVMR", "VCMR"):
        if task in submission:
            submission_nms[task] = apply_nms(nms_source[task], nms_thd, max_before_nms, max_after_nms)
    return submission_nms


def _derived_path(submission_path, suffix):
    """`x.json` -> `x<suffix>` (suffix includes its own extension)."""
    stem = submission_path[:-len(".json")] if submission_path.endswith(".json") else submission_path
    return stem + suffix


def eval_epoch(model, eval_dataset, opt, save_submission_filename, tasks=TASKS,
               max_after_nms=MAX_PREDICTIONS_PER_QUERY):
    """Predict, save and (on val) evaluate.

    Files in opt.results_dir: the submission `save_submission_filename` (top `max_after_nms` per query,
    compact JSON) and on val `<name>_metrics.json`; with opt.nms_thd != -1 also `<name>_nms_thd_<thd>.json`
    and on val `<name>_nms_thd_<thd>_metrics.json`.

    NMS reads each query's first max_before_nms predictions of the *truncated* submission, i.e. at most
    `max_after_nms` rows, as the original [Q7]; `opt.nms_input_full` makes it read the untruncated list.
    Ranking stops at the rows these files read (`ranked_rows_needed`), which gives the same files as ranking
    max_before_nms rows and truncating.

    Returns:
        (metrics without NMS or None, metrics with NMS or None, list of the paths written); under torchrun
        (utils/distributed.py) only rank 0 writes and returns them, the other ranks get (None, None, []).
    """
    start_time = time.time()
    tasks = resolve_tasks(tasks, opt.eval_split_name, eval_dataset.has_gt)
    if len(eval_dataset) == 0:
        raise OptionError(f"the {opt.eval_split_name} evaluation dataset has no queries")
    logger.info("Computing %s predictions of %d queries", "/".join(tasks), len(eval_dataset))
    # Under torchrun each rank scores a contiguous share of the queries (whole query batches) and rank 0,
    # which alone writes files, gathers them in dataset order; the other ranks return here.
    shard = (eval_dataset.subset(*distributed.shard_bounds(len(eval_dataset), opt.eval_query_bsz))
             if distributed.is_distributed() else eval_dataset)
    n_ranked = ranked_rows_needed(opt, max_after_nms)
    results = distributed.gather_predictions(compute_predictions(model, shard, opt, tasks, n_ranked)
                                             if len(shard) else {})
    if results is None:
        return None, None, []
    with gc_paused():  # the submissions are millions of acyclic lists: collections would find nothing to free
        metrics, metrics_nms, written = _save_and_evaluate(results, eval_dataset, opt, save_submission_filename,
                                                           max_after_nms)
    logger.info("Evaluation finished in %d seconds", int(time.time() - start_time))
    return metrics, metrics_nms, written


def _save_and_evaluate(results, eval_dataset, opt, save_submission_filename, max_after_nms):
    """The submission files of `eval_epoch` and their metrics on val: (metrics, metrics_nms, written paths)."""
    has_metrics = opt.eval_split_name == "val"  # the other splits have no GT
    submission_path = os.path.join(opt.results_dir, save_submission_filename)
    submission = top_n_submission(results, max_after_nms)
    save_json(submission, submission_path)
    written = [submission_path]
    metrics = metrics_nms = None
    if has_metrics:
        metrics = eval_retrieval(submission, eval_dataset.query_data, iou_thds=IOU_THRESHOLDS, match_number=not opt.debug,
                                 verbose=opt.debug, use_desc_type=opt.dset_name == "tvr")
        metrics_path = _derived_path(submission_path, "_metrics.json")
        save_json(metrics, metrics_path, save_pretty=True)
        written.append(metrics_path)

    if opt.nms_thd != -1:
        logger.info("Temporal NMS with threshold %s", opt.nms_thd)
        submission_nms = nms_submission(submission, results if opt.get("nms_input_full", False) else submission,
                                        opt.nms_thd, opt.max_before_nms, max_after_nms)
        nms_path = _derived_path(submission_path, f"_nms_thd_{opt.nms_thd}.json")
        save_json(submission_nms, nms_path)
        written.append(nms_path)
        if has_metrics:
            metrics_nms = _evaluate_nms_submission(submission_nms, eval_dataset.query_data, opt)
            metrics_nms_path = _derived_path(nms_path, "_metrics.json")
            save_json(metrics_nms, metrics_nms_path, save_pretty=True)
            written.append(metrics_nms_path)
    return metrics, metrics_nms, written
