"""Search a corpus: the moments (video, start, end) that best match a query, by two-stage retrieval.

    python -m method.search build --first_stage RUN_DIR --conquer RUN_DIR --dataset_config CFG [--split SPLIT] \
        --out_dir INDEX [--update | --overwrite]
    python -m method.search query --index INDEX [--desc_id N | --text "a query"] [--top_k 10] [--nms_thd 0.7] [--json]
    python -m method.search serve --index INDEX [--host 127.0.0.1 --port 8000] [--max_queue 4 --request_timeout 30]

    searcher = Searcher("INDEX")                      # loads the index and both models once
    searcher.search("a man opens a door", top_k=10)   # or a desc_id (int), or token features (Lq, Dq)

A query is raw text (encoded with the corpus's text encoder, recorded in its data config by
utils/build_corpus.py), token features (n_tokens, Dq), or the desc_id of a query of the indexed split.
The first stage picks the `max_vcmr_video` best videos of the whole index; CONQUER's query-dependent layers
re-rank them on their cached encodings (method/search_index.py), all in one batch; then the moments are
ranked and (optionally) suppressed by temporal NMS by the same functions as inference. So for a desc_id, with
the same candidates and scores, the moments are the VCMR predictions inference.py writes for that query.

Corpora: `build` indexes every video of one split, by default the data config's `search_split`, else val. A
search-only corpus (utils/build_corpus.py without --annotations) has every video in its search_split test_public
and no queries or ranklists: it is searched by text or token features, with a learned first stage. Before any
model loads, `build` (and `build --update`) refuses in one line a corpus that a run cannot read or was not trained
for: a modality the run reads that the corpus's ctx_mode lacks, store feature dims other than the run's
--visual_dim / --text_dim / --query_dim, or a provenance (utils/provenance.py: feature recipes, clip length, text
encoder) other than that of the data config the run was trained on (the dataset_config of its opt.json; a warning
when that file is gone). The index records the corpus's provenance, and an update must agree with it. Each stage
reads its own modalities: a visual CONQUER may index with a visual_sub first stage. Loading a Searcher refuses a
text encoder whose dim is not CONQUER's --query_dim.

Long videos: the index rows are windows (the runs' --window_stride, utils/windows.py). A learned first stage
scores every window and a video scores its best window; the max_vcmr_video best videos are taken (it counts
videos, as in evaluation) and CONQUER re-ranks every window of each of them (one padded batch), ranked by
`rank_windowed_batch` as inference ranks windows: moments found in overlapping windows merged, start and end in
seconds of the whole video. An index in which every video is one window runs exactly the code (and gives the
results) of the search without windows.

First stages: a learned dual encoder (a run dir; its video embeddings are in the index and every query is
scored against all of them), or `--first_stage ranklist`: the corpus's stored ranklists, the candidates
inference reads (desc_id queries only; for tests and for looking at a trained CONQUER without a first stage).

Long queries: the model takes at most max_desc_len tokens. Stored queries (desc_id) are cut to it, as the
dataset does in training and inference. A text or feature query that is longer is refused (its end would be
silently dropped) unless `truncate=True` / `--truncate` asks for the dataset's cut.
"""
import argparse
import json
import logging
import os
import threading
import time
import warnings
from typing import NamedTuple

import numpy as np
import torch
from easydict import EasyDict

from method.checkpoint import load_trained_model
from method.dataset import build_eval_dataset, query_inputs
from method.evaluation import nms_submission, ranked_rows_needed, top_n_submission
from method.first_stage import top_videos, video_max
from method.scoring import prediction_results, rank_batch, rank_windowed_batch
from method import search_index
from method.search_index import (RANKLIST_FIRST_STAGE, SearchIndex, SearchIndexError, build_index,
                                 conquer_options, describe, first_stage_checkpoint, sha256_file)
from utils.data_config import load_data_config
from utils.errors import ConquerError, run_cli
from utils.feature_stores import FeatureStoreError
from utils.tvr_format import MAX_PREDICTIONS_PER_QUERY, SPLITS, DatasetError

logger = logging.getLogger(__name__)

MAX_TOP_K = MAX_PREDICTIONS_PER_QUERY  # inference keeps this many moments per query
# `serve`: request threads, requests that may wait for the running search, seconds one may wait (search_server).
SERVE_THREADS, SERVE_MAX_QUEUE, SERVE_REQUEST_TIMEOUT = 8, 4, 30.0


class QueryError(ConquerError):
    """A query cannot be answered (empty, wrong shape, too long, unknown desc_id, bad top_k); names what."""


class Moment(NamedTuple):
    video_name: str
    start: float
    end: float
    score: float
    first_stage_rank: int  # 1 = the first stage's best video


class PreparedQuery(NamedTuple):
    desc_id: object  # int for a stored query, else None
    desc: str
    features: np.ndarray  # (n_tokens, Dq) float32, n_tokens <= max_desc_len


class RanklistFirstStage:
    """The corpus's stored first-stage ranklists: the first k videos and scores of a desc_id's ranklist, read
    as inference reads them."""

    def __init__(self, dataset, index):
        self.dataset = dataset
        self.index = index
        self.row_of_desc_id = {row["desc_id"]: row for row in dataset.query_data}

    def candidates(self, queries, query_batch):
        """-> video positions in the index (B, k) int64 numpy, first-stage scores (B, k) float32 tensor."""
        positions, scores = [], []
        for query in queries:
            if query.desc_id is None:
                raise QueryError(f"the {RANKLIST_FIRST_STAGE} first stage answers desc_id queries only (it reads "
                                 "the corpus's stored ranklists); build the index with a learned --first_stage")
            try:
                names, query_scores = self.dataset._read_candidates(self.row_of_desc_id[query.desc_id])
            except (FeatureStoreError, DatasetError) as e:
                raise SearchIndexError(f"desc_id {query.desc_id}: {e}") from None
            missing = [name for name in names[1:] if name not in self.index.position_of]
            if missing:
                raise SearchIndexError(f"search index {self.index.path}: ranked video {missing[0]!r} of desc_id "
                                       f"{query.desc_id} is not indexed; update the index (build --update)")
            positions.append([self.index.position_of[name] for name in names[1:]])
            scores.append(query_scores)
        return np.array(positions, dtype=np.int64), torch.stack(scores)


class EmbeddingFirstStage:
    """A learned dual encoder: every query embedding is scored against every indexed window embedding (exact),
    streaming the index chunk by chunk; a video scores its best window; the k best videos, ties by position."""

    def __init__(self, model, index, k, device):
        self.model = model
        self.index = index
        self.k = k
        self.device = device

    def candidates(self, queries, query_batch):
        """-> video positions in the index (B, k) int64 numpy, their scores (B, k) float32 tensor."""
        query = query_batch["query"]
        query_embedding = self.model.encode_queries(query["feat"], query["feat_mask"])
        clips, masks = self.index.arrays["first_stage.clips"], self.index.arrays["first_stage.clip_mask"]
        scores = torch.cat([self.model.score(query_embedding, {"clips": _tensor(c, self.device),
                                                               "clip_mask": _tensor(m, self.device)})
                            for c, m in zip(clips.chunks, masks.chunks)], dim=1)
        video_scores = video_max(scores.float().cpu(), torch.from_numpy(self.index.row_video),
                                 len(self.index.video_names))
        values, positions = top_videos(video_scores, self.k)
        return positions.numpy(), values


def _tensor(array, device):
    """A read-only (memory-mapped) numpy array as a tensor without a copy on the CPU; it is never written."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the array is not writable
        return torch.from_numpy(array).to(device)


class WindowSlots(NamedTuple):
    """The index rows CONQUER re-ranks for a batch of queries: every window of each query's k candidate videos,
    in candidate then start order, padded to the batch's largest count N."""
    rows: np.ndarray  # (B, N) int64 index rows; a padding slot repeats the query's first row (computed, ignored)
    video: np.ndarray  # (B, N) int64: c in 1..k = the query's candidate c (first-stage order), -1 = padding
    start: np.ndarray  # (B, N) int64: the window's first clip in its video


def window_slots(video_rows, row_start, positions):
    """video_rows (V + 1,) (video v's rows are video_rows[v]:video_rows[v + 1]), row_start (W,), candidate video
    positions (B, k) -> WindowSlots. With one row per video, rows are the videos' rows and N = k."""
    counts = video_rows[positions + 1] - video_rows[positions]  # (B, k) windows per candidate
    n_slots = int(counts.sum(axis=1).max())
    rows = np.empty((len(positions), n_slots), dtype=np.int64)
    video = np.full((len(positions), n_slots), -1, dtype=np.int64)
    for i, (query_positions, query_counts) in enumerate(zip(positions, counts)):
        query_rows = np.concatenate([np.arange(video_rows[p], video_rows[p + 1]) for p in query_positions])
        n = len(query_rows)
        rows[i, :n], rows[i, n:] = query_rows, query_rows[0]
        video[i, :n] = np.repeat(np.arange(1, len(query_positions) + 1), query_counts)
    return WindowSlots(rows, video, row_start[rows])


def _check_run(recorded, given, flag, checkpoint_of):
    """The run dir given on the command line (if any) must be the one the index was built from."""
    if given is None:
        return
    recorded_kind = recorded.get("kind", "model")
    if recorded_kind != ("ranklist" if given == RANKLIST_FIRST_STAGE else "model"):
        raise SearchIndexError(f"{flag} {given}: the index was built with {flag} "
                               f"{recorded.get('run_dir', RANKLIST_FIRST_STAGE)}")
    if given == RANKLIST_FIRST_STAGE:
        return
    if os.path.realpath(given) != recorded["run_dir"] or sha256_file(checkpoint_of(given)) != recorded["sha256"]:
        raise SearchIndexError(f"{flag} {given}: the index was built from {recorded['run_dir']} (checkpoint "
                               f"sha256 {recorded['sha256'][:12]}), not from this run; rebuild the index for it")


def _check_checkpoint_unchanged(recorded, flag):
    if not os.path.isfile(recorded["checkpoint"]) or sha256_file(recorded["checkpoint"]) != recorded["sha256"]:
        raise SearchIndexError(f"{flag} checkpoint {recorded['checkpoint']} is missing or changed since the index "
                               "was built (sha256 differs); rebuild the index (build --overwrite)")


class Searcher:
    """Two-stage moment search over an index; load once, then `search` / `search_many` (thread-safe: searches
    run one at a time, each already using every core)."""

    def __init__(self, index, conquer=None, first_stage=None, device=-1, max_vcmr_video=None):
        """index: an index folder; conquer / first_stage: run dirs to check the index against (optional);
        device: CUDA id or -1 (CPU); max_vcmr_video: videos re-ranked per query (default: the run's)."""
        self.index = SearchIndex.open(index)
        manifest = self.index.manifest
        _check_run(manifest["conquer"], conquer, "--conquer", lambda run: conquer_options(
            run, manifest["corpus"]["data_config"], manifest["corpus"]["split"]).ckpt_filepath)
        _check_run(manifest["first_stage"], first_stage, "--first_stage", first_stage_checkpoint)
        _check_checkpoint_unchanged(manifest["conquer"], "--conquer")
        corpus = manifest["corpus"]
        self.opt = conquer_options(manifest["conquer"]["run_dir"], corpus["data_config"], corpus["split"], device,
                                   max_vcmr_video)
        self.device = torch.device(self.opt.device)
        self.model = load_trained_model(self.opt).eval()
        self.first_stage_model = None
        if manifest["first_stage"]["kind"] != RANKLIST_FIRST_STAGE:
            _check_checkpoint_unchanged(manifest["first_stage"], "--first_stage")
            self.first_stage_model = search_index.load_first_stage_model(manifest["first_stage"]["run_dir"],
                                                                         self.device)
        self._use_index(self.index)
        self.text_encoder = self._load_text_encoder()
        self._lock = threading.Lock()

    def _use_index(self, index):
        """Serve `index` (a version of the index the models were loaded for): its videos, the corpus's video table
        and queries, the first stage over its rows."""
        self.index = index
        self.k = min(self.opt.max_vcmr_video, len(index.video_names))
        self.dataset = build_eval_dataset(self.opt, read_ranklists=self.first_stage_model is None)
        self.desc_of = {row["desc_id"]: row["desc"] for row in self.dataset.query_data}
        self.first_stage = (RanklistFirstStage(self.dataset, index) if self.first_stage_model is None
                            else EmbeddingFirstStage(self.first_stage_model, index, self.k, self.device))
        self.data_config = load_data_config(self.opt.dataset_config)

    def refresh(self):
        """Take the index's live version when a build (`--update`) has switched it since it was loaded, keeping the
        loaded models -> True when it switched. A version built from other runs or another corpus split is not
        taken (a warning: serve it with a new Searcher)."""
        with self._lock:
            if search_index.live_version(self.index.path) == os.path.basename(self.index.version_dir):
                return False
            index = SearchIndex.open(self.index.path)
            for section in ("conquer", "first_stage", "corpus"):
                old, new = self.index.manifest[section], index.manifest[section]
                if any(old.get(key) != new.get(key) for key in ("sha256", "kind", "data_config", "split")):
                    logger.warning("search index %s: version %s was built from another %s; still serving %s",
                                   self.index.path, os.path.basename(index.version_dir), section,
                                   os.path.basename(self.index.version_dir))
                    return False
            self._use_index(index)
            logger.info("search index %s: now serving version %s (%d videos)", index.path,
                        os.path.basename(index.version_dir), len(index.video_names))
            return True

    def _load_text_encoder(self):
        settings = self.data_config.get("text_encoder")
        if not settings:
            return None
        from utils.text_encoder import TextEncoder
        encoder = TextEncoder(settings["name_or_path"], device=self.device, dtype=settings.get("dtype", "float32"),
                              max_length=settings.get("max_length"))
        if encoder.dim != self.query_dim:
            raise SearchIndexError(f"text encoder {settings['name_or_path']} of {self.opt.dataset_config} gives "
                                   f"{encoder.dim}-dim token features but the CONQUER run {self.opt.model_dir} takes "
                                   f"--query_dim {self.query_dim}; the corpus's text encoder must be the one the run "
                                   "was trained with")
        return encoder

    @property
    def max_query_tokens(self):
        return self.opt.max_desc_len

    @property
    def query_dim(self):
        return self.opt.query_dim

    def search(self, query, top_k=10, nms_thd=None, truncate=False):
        """One query (text, desc_id or (n_tokens, Dq) features) -> list of up to top_k `Moment`, best first."""
        return self.search_many([query], top_k, nms_thd, truncate)[0]

    def search_many(self, queries, top_k=10, nms_thd=None, truncate=False, batch_size=16):
        """Many queries, scored `batch_size` at a time -> one list of `Moment` per query."""
        results = []
        for start in range(0, len(queries), batch_size):
            results += self.search_batch(queries[start:start + batch_size], top_k, nms_thd, truncate)[0]
        return results

    def search_batch(self, queries, top_k=10, nms_thd=None, truncate=False):
        """As `search_many` for one batch -> (lists of `Moment`, seconds per stage {"query", "first_stage",
        "conquer", "post"})."""
        _check_top_k(top_k)
        if nms_thd is not None and not (isinstance(nms_thd, (int, float)) and 0 <= nms_thd <= 1):
            raise QueryError(f"nms_thd must be a number in [0, 1] or None, got {nms_thd!r}")
        if not queries:
            return [], {}
        with self._lock, torch.inference_mode():
            timing = {}
            started = time.perf_counter()
            prepared = self._prepare(queries, truncate)
            batch = {"query": {key: value.to(self.device) for key, value in torch.utils.data.default_collate(
                [query_inputs(q.features, self.opt.max_desc_len) for q in prepared]).items()}}
            timing["query"] = _lap(started, timing)
            positions, first_stage_scores = self.first_stage.candidates(prepared, batch)
            timing["first_stage"] = _lap(started, timing)
            slots = window_slots(self.index.video_rows, self.index.row_start, positions)
            outputs, slot_length = self._rerank(batch["query"], slots.rows)
            timing["conquer"] = _lap(started, timing)
            moments = self._moments(prepared, positions, slots, slot_length, first_stage_scores, outputs, top_k,
                                    nms_thd)
            timing["post"] = _lap(started, timing)
        return moments, timing

    def _prepare(self, queries, truncate):
        texts = [i for i, q in enumerate(queries) if isinstance(q, str)]
        if texts and self.text_encoder is None:
            raise QueryError(f"text query: the corpus {self.opt.dataset_config} has no text encoder (no "
                             "'text_encoder' in its data config); query by desc_id or by token features")
        for i in texts:
            if not queries[i].strip():
                raise QueryError("empty query text")
        encoded = dict(zip(texts, self.text_encoder.encode_tokens([queries[i] for i in texts]) if texts else []))
        prepared = []
        for i, query in enumerate(queries):
            if i in encoded:
                prepared.append(self._cut(PreparedQuery(None, query, encoded[i]), truncate, "text query"))
            elif isinstance(query, (int, np.integer)) and not isinstance(query, bool):
                prepared.append(self._stored_query(int(query)))
            else:
                prepared.append(self._cut(PreparedQuery(None, "", self._features(query)), truncate,
                                          "feature query"))
        return prepared

    def _stored_query(self, desc_id):
        if not self.desc_of:
            raise QueryError(f"desc_id {desc_id}: split {self.opt.eval_split_name!r} of {self.opt.dataset_config} "
                             "has no stored queries (a search-only corpus); query by text or token features")
        if desc_id not in self.desc_of:
            raise QueryError(f"desc_id {desc_id} is not a query of split {self.opt.eval_split_name!r} of "
                             f"{self.opt.dataset_config}")
        # Cut to max_desc_len, as in inference. A FeatureStoreError here is the corpus's fault, not the query's:
        # it is not turned into a QueryError (the HTTP server answers it 500, not 400).
        features = self.dataset.query_store.get(desc_id)
        return PreparedQuery(desc_id, self.desc_of[desc_id], features)

    def _features(self, query):
        try:
            features = np.asarray(query, dtype=np.float32)
        except (TypeError, ValueError):
            raise QueryError(f"a query is text (str), a desc_id (int) or token features (n_tokens, "
                             f"{self.query_dim}); got {type(query).__name__}") from None
        if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] != self.query_dim:
            raise QueryError(f"token features must have shape (n_tokens >= 1, {self.query_dim}), got "
                             f"{features.shape}")
        if not np.isfinite(features).all():
            raise QueryError("token features contain NaN or inf")
        return features

    def _cut(self, query, truncate, what):
        n, limit = len(query.features), self.max_query_tokens
        if n <= limit:
            return query
        if not truncate:
            raise QueryError(f"{what} has {n} tokens but the model takes at most {limit} (max_desc_len of the "
                             "CONQUER run); shorten it, or truncate as the dataset does (truncate=True / --truncate)")
        return query._replace(features=query.features[:limit])

    def _rerank(self, query, rows):
        """CONQUER's query-dependent layers on the cached encodings of the index rows (B, N) of each query, one
        call; only these rows are read -> (outputs of `score_encoded` over the (B, N) slots, real clips (B, N)
        int64 numpy of each row)."""
        flat = rows.reshape(-1)
        encoded = {modality: _tensor(self.index.arrays[f"conquer.{modality}"].gather(flat), self.device)
                   for modality in self.model.video_modality}
        video_mask = _tensor(self.index.arrays["conquer.video_mask"].gather(flat), self.device)
        outputs = self.model.score_encoded(self.model.encode_query(query), query["feat_mask"], encoded, video_mask,
                                           rows.shape[1])
        return outputs, video_mask.sum(dim=1).reshape(rows.shape).long().cpu().numpy()

    def _moments(self, prepared, positions, slots, slot_length, first_stage_scores, outputs, top_k, nms_thd):
        """Rank as inference: rank_batch (rank_windowed_batch when a video has several windows), prediction rows,
        the 100-row submission, optional NMS; then top_k."""
        opt = EasyDict(self.opt, nms_thd=-1 if nms_thd is None else nms_thd)
        ranking = dict(tasks=("VCMR",), max_before_nms=ranked_rows_needed(opt, MAX_PREDICTIONS_PER_QUERY),
                       min_pred_l=opt.min_pred_l, max_pred_l=opt.max_pred_l,
                       first_stage_scores=first_stage_scores.to(outputs[1].device),
                       use_internal_vr_scores=opt.use_interal_vr_scores)
        if self.index.reads_windows:
            video_scores, begin_logits, end_logits = outputs
            ranked = rank_windowed_batch(opt.similarity_measure, begin_logits, end_logits, slots.video, slots.start,
                                         slot_length, video_scores=video_scores, **ranking)
        else:
            video_scores, begin_logits, end_logits = (None if x is None else _with_placeholder_video(x)
                                                      for x in outputs)
            ranked = rank_batch(opt.similarity_measure, begin_logits, end_logits, video_scores=video_scores,
                                **ranking)
        names = self.index.video_names
        metas = [dict(desc_id=q.desc_id, desc=q.desc, sample_vid_name_list=[names[p] for p in query_positions])
                 for q, query_positions in zip(prepared, positions.tolist())]
        submission = top_n_submission(prediction_results([ranked], metas, self.index.position_of, opt.clip_length),
                                      MAX_PREDICTIONS_PER_QUERY)
        if nms_thd is not None:
            submission = nms_submission(submission, submission, nms_thd, opt.max_before_nms,
                                        MAX_PREDICTIONS_PER_QUERY)
        moments = []
        for query, query_positions in zip(submission["VCMR"], positions.tolist()):
            rank_of = {position: rank for rank, position in enumerate(query_positions, start=1)}
            moments.append([Moment(names[position], float(st), float(ed), float(score), rank_of[position])
                            for position, st, ed, score in query["predictions"][:top_k]])
        return moments


def _with_placeholder_video(tensor):
    """(B, k, ...) -> (B, 1 + k, ...): slot 0 is where evaluation puts the GT video, which VCMR never reads."""
    return torch.cat([torch.zeros_like(tensor[:, :1]), tensor], dim=1)


def _lap(started, timing):
    return time.perf_counter() - started - sum(timing.values())


def _check_top_k(top_k):
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= MAX_TOP_K:
        raise QueryError(f"top_k must be an integer in [1, {MAX_TOP_K}], got {top_k!r}")


def format_table(moments):
    """Moments -> a readable fixed-width table."""
    lines = [f"{'rank':>4}  {'video':<40} {'start':>8} {'end':>8} {'score':>11} {'1st stage':>9}"]
    lines += [f"{rank:>4}  {m.video_name:<40} {m.start:>8.2f} {m.end:>8.2f} {m.score:>11.4g} {m.first_stage_rank:>9}"
              for rank, m in enumerate(moments, start=1)]
    return "\n".join(lines)


def _parser():
    parser = argparse.ArgumentParser(prog="python -m method.search", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser(
        "build", help="index a corpus split for a pair of trained runs",
        description="Index every video of a corpus split for a pair of trained runs: by default the data config's "
                    "search_split (a search-only corpus, searched by text or token features), else val. Before any "
                    "model loads, a corpus the runs cannot read or were not trained for is refused: a modality a run "
                    "reads missing from its ctx_mode, store feature dims other than the runs', or a provenance "
                    "(feature recipes, clip length, text encoder) other than that of the data config each run was "
                    "trained on. --update is checked the same way, and against the provenance the index records.")
    build.add_argument("--first_stage", required=True,
                       help=f"first-stage run dir (trained with the --window_stride and --max_ctx_len of --conquer), "
                            f"or '{RANKLIST_FIRST_STAGE}': the corpus's stored ranklists (desc_id queries only)")
    build.add_argument("--conquer", required=True, help="CONQUER run dir (opt.json + model.ckpt)")
    build.add_argument("--dataset_config", required=True, help="data config of the corpus")
    build.add_argument("--split", default=None, choices=SPLITS,
                       help="split to index (default: the data config's search_split, else val)")
    build.add_argument("--out_dir", required=True, help="index folder")
    build.add_argument("--update", action="store_true", help="extend an existing index with the corpus's new videos")
    build.add_argument("--overwrite", action="store_true", help="rebuild an existing index from scratch")
    build.add_argument("--batch_size", type=int, default=32,
                       help="windows encoded per forward pass (videos, for runs without --window_stride)")
    build.add_argument("--device", type=int, default=-1, help="CUDA device id, -1 = CPU")

    query = commands.add_parser("query", help="search an index")
    query.add_argument("--index", required=True)
    what = query.add_mutually_exclusive_group(required=True)
    what.add_argument("--desc_id", type=int, help="a query of the indexed split")
    what.add_argument("--text", help="query text (needs a corpus with a text encoder)")
    what.add_argument("--features", help=".npy file of token features (n_tokens, Dq)")
    query.add_argument("--top_k", type=int, default=10)
    query.add_argument("--nms_thd", type=float, default=None, help="temporal NMS IoU threshold (default: none)")
    query.add_argument("--truncate", action="store_true", help="cut a too-long query to the model's maximum")
    query.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    _add_common(query)

    serve = commands.add_parser("serve", help="HTTP endpoint POST /search and a search page at /")
    serve.add_argument("--index", required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--threads", type=int, default=SERVE_THREADS,
                       help="request threads of the server (at least --max_queue + 2)")
    serve.add_argument("--max_queue", type=int, default=SERVE_MAX_QUEUE,
                       help="requests that may wait for the running search; more are answered 503 + Retry-After")
    serve.add_argument("--request_timeout", type=float, default=SERVE_REQUEST_TIMEOUT,
                       help="seconds a request may wait for the model before it is answered 503 + Retry-After")
    _add_common(serve)
    return parser


def _add_common(parser):
    parser.add_argument("--conquer", default=None, help="check that the index was built from this CONQUER run")
    parser.add_argument("--first_stage", default=None, help="check that the index was built from this first stage")
    parser.add_argument("--device", type=int, default=-1, help="CUDA device id, -1 = CPU")


def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = _parser().parse_args(argv)
    if args.command == "build":
        summary = build_index(args.out_dir, args.conquer, args.first_stage, args.dataset_config, args.split,
                              update=args.update, overwrite=args.overwrite, batch_size=args.batch_size,
                              device=args.device)
        print(f"index {summary['out_dir']}: {summary['n_videos']} videos in {summary['n_windows']} windows "
              f"({summary['n_encoded']} videos encoded now), {summary['nbytes'] / 2 ** 20:.1f} MiB")
        return summary
    if args.command == "serve":  # bad server flags stop before the models load
        from method.search_server import check_server_options
        check_server_options(args.threads, args.max_queue, args.request_timeout)
    searcher = Searcher(args.index, conquer=args.conquer, first_stage=args.first_stage, device=args.device)
    if args.command == "serve":
        from method.search_server import serve
        logger.info("index %s: %s", args.index, json.dumps(describe(searcher.index)))
        return serve(searcher, args.host, args.port, args.threads, args.max_queue, args.request_timeout)
    query = args.text if args.text is not None else args.desc_id
    if args.features is not None:
        query = _load_features(args.features)
    moments = searcher.search(query, top_k=args.top_k, nms_thd=args.nms_thd, truncate=args.truncate)
    print(json.dumps([m._asdict() for m in moments], indent=1) if args.json else format_table(moments))
    return moments


def _load_features(path):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise QueryError(f"--features {path}: cannot read a .npy array ({e})") from None


if __name__ == "__main__":
    run_cli(main)
