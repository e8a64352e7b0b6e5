"""Rank every query of a corpus with a trained first stage and write the ranklists CONQUER re-ranks.

    python -m method.rank_first_stage --model_dir RUN_DIR [--splits train val test_public] [--out_dir DIR]
        [--dataset_config CONFIG] [--device -1] [--faiss] [--window_lists]
                                                                 # or scripts/rank_first_stage.sh RUN_DIR GPU

RUN_DIR is a first-stage run of train.py (--model first_stage); its model.ckpt is read, and its opt.json gives
max_ctx_len and window_stride: videos are read as the run was trained (windows of max_ctx_len clips every
window_stride clips; 0: the first max_ctx_len clips). The splits ranked are --splits, by default those of the
data config that have queries (a corpus built without test_public ranks train and val). Per split, every window
of every video is encoded once, every query is scored against every video (its best window; exact, chunked
matrix products keeping the top k of each query chunk, so memory does not grow with the queries; `--faiss`: an
approximate index of per-window summaries instead, see `VideoSummaryIndex`, with exact scoring of a sample of
--faiss_check_queries queries only to report its recall), and the ranklist is written in the release layout
(LMDB keyed by str(desc_id), msgpack [[global_video_idx, score], ...] best first; one entry per video, whatever
its windows: CONQUER re-ranks all windows of each listed video): train keeps the top --train_top (2000, at least
100: select100 needs the top 100) videos, val and test_public the top --eval_top (100).

The score written is the model's own s (cosine-like, in [-1, 1]), which CONQUER's general measure multiplies
(s * p_begin * p_end with --use_interal_vr_scores). A positive transform, exp((s - 1) / T) with T the model's
temperature (its softmax probability up to a constant), was measured against it end to end (method/tools/
benchmark_first_stage_scores.py) and did not do better: on a synthetic corpus, CONQUER (tiny, general measure)
evaluated with the same checkpoint and lists, val VCMR 0.5-r1 9.33 with s, 7.67 with the transform (300 queries,
one query = 0.33). The top lists of a trained first stage hold positive s (0.37-0.64 there), where the sign
problem does not arise, while exp(s / T) spreads them ~270-fold and lets the first stage's order override the
moment probabilities.

OUT_DIR (default RUN_DIR/first_stage_ranklists) receives

    train_top2000/, val_top100/, test_public_top100/   the ranklist stores of the splits ranked
    train_select100.jsonl    the training queries whose GT video is in the top 100 (what CONQUER trains on)
    data_config.json         the input data config with only the ranklist and training-annotation paths changed:
                             the config to train and evaluate CONQUER on (the last line printed names it)
    metrics.json             VR metrics (R@1, 5, 10, 100; share of queries with the GT in the top
                             --max_vcmr_video; list_length, when shorter than 100 R@100 is R@list_length) of
                             every written list, beside those of the input config's lists; with --faiss the
                             recall of the approximate lists against exact search on the sampled queries
    <list>_windows.jsonl     only with --window_lists, per ranked split (e.g. val_top100_windows.jsonl): one row
                             per query, {"desc_id", "windows": [[global_video_idx, start_clip, score], ...]}, the
                             best window of each video of its ranklist, in the ranklist's order (the score is the
                             ranklist's). The release readers never look at it.

Everything is written into a temporary folder renamed to OUT_DIR at the end; an existing OUT_DIR is an error.
"""
import argparse
import logging
import os
import time

import numpy as np
import torch
from easydict import EasyDict
from tqdm import tqdm

from method.checkpoint import load_model_checkpoint
from method.first_stage import (FirstStageError, FirstStageRetriever, QueryItems, VideoItems, best_windows,
                                encode_query_bank, encode_video_bank, rank_videos, split_queries, split_videos,
                                top_videos, video_max, vr_metrics)
from utils.data_config import load_data_config
from utils.errors import OptionError, run_cli
from utils.feature_stores import FeatureStoreError, RanklistStore, write_ranklist_store
from utils.io_utils import atomic_folder, load_json, save_json, save_jsonl
from utils.run_dir import CKPT_FILENAME, OPT_FILENAME, locate_model_dir
from utils.tvr_format import FIRST_STAGE_TOP, SPLIT_FILE_KEYS, SPLITS

logger = logging.getLogger(__name__)

TRAIN_TOP, EVAL_TOP = 2000, 100


def ranklist_name(split, top):
    return f"{split}_top{top}"


# ----------------------------------------------------------------------------------------------------
# approximate search

class VideoSummaryIndex:
    """Approximate first-stage search: a FAISS inverted-file index over one summary vector per window (per
    video without windows) and modality, then exact scoring of the videos it returns.

    A window's summary in modality m is the L2-normalised mean of its valid clip vectors. A query searches each
    modality's index for the `n_candidates` windows whose summary is nearest its own vector q_m; their videos
    (the union over modalities) are scored exactly over all their windows (FirstStageRetriever.score: weighted
    max over clips, then the max over windows) and cut to the top k. The summary is a proxy for the max over
    clips, so the exact top k is found when its videos have a window within the first n_candidates by summary in
    some modality, in the n_probe inverted lists probed; the recall against exact search is measured, not
    assumed (metrics.json, the benchmark). Summaries are per window, not per video: the mean over a long video's
    every clip drowns a moment of a few clips, the mean over a window keeps it (as the max over clips that it
    stands for is local too); the index then holds one vector per window, still L times fewer than an index of
    every clip. A video's overlapping windows may take several of the n_candidates places.
    """

    def __init__(self, bank, n_probe=512, n_candidates=2000, n_lists=None):
        import faiss  # optional dependency (extra `faiss`)
        self.bank, self.n_candidates = bank, n_candidates
        self.window_video = bank.window_video.cpu().numpy()
        summaries = video_summaries(bank.embeddings["clips"].cpu(), bank.embeddings["clip_mask"].cpu())
        self.indexes = [build_ivf_index(faiss, np.ascontiguousarray(summaries[:, m].numpy()), n_lists)
                        for m in range(summaries.shape[1])]
        for index in self.indexes:
            index.nprobe = min(n_probe, index.nlist)

    def candidates(self, query_emb):
        """-> per query, the sorted bank video positions of the union over modalities of the windows found."""
        queries = query_emb["query"].cpu()
        hits = np.concatenate([index.search(np.ascontiguousarray(queries[:, m].numpy()), self.n_candidates)[1]
                               for m, index in enumerate(self.indexes)], axis=1)
        return [torch.from_numpy(np.unique(self.window_video[row[row >= 0]])) for row in hits]

    @torch.no_grad()
    def top_videos(self, query_emb, top_k, query_chunk=256, progress=True):
        """As `top_videos(score_all_reference(...))`: (values (Q, k), bank positions (Q, k)), over the candidates only."""
        k = min(top_k, len(self.bank))
        all_values, all_positions = [], []
        n_queries = len(query_emb["query"])
        for start in tqdm(range(0, n_queries, query_chunk), desc="FAISS search", disable=not progress, leave=False):
            chunk = {key: value[start:start + query_chunk] for key, value in query_emb.items()}
            for i, candidates in enumerate(self.candidates(chunk)):
                candidates = fill_candidates(candidates, k, len(self.bank))
                rows, owner = self.bank.rows_of(candidates)
                windows = {key: value.index_select(0, rows.to(value.device))
                           for key, value in self.bank.embeddings.items()}
                query = {key: value[i:i + 1].to(windows["clips"].device) for key, value in chunk.items()}
                scores = video_max(FirstStageRetriever.score(query, windows), owner, len(candidates))
                values, order = top_videos(scores.cpu(), k)
                all_values.append(values[0])
                all_positions.append(candidates[order[0]])
        return torch.stack(all_values), torch.stack(all_positions)


def video_summaries(clips, clip_mask):
    """clips (W, M, L, D), clip_mask (W, L) of windows (videos) -> (W, M, D) float32: per modality, the
    L2-normalised mean of the valid clips."""
    return torch.nn.functional.normalize(torch.einsum("vmld,vl->vmd", clips.float(), clip_mask.float()), dim=-1)


def fill_candidates(candidates, k, n_videos):
    """Sorted positions with at least k entries: too few candidates are topped up with the first other videos
    (scored exactly like the rest)."""
    if len(candidates) >= k:
        return candidates
    rest = torch.from_numpy(np.setdiff1d(np.arange(n_videos), candidates.numpy()))
    return torch.cat([candidates, rest[:k - len(candidates)]]).sort().values


def build_ivf_index(faiss, vectors, n_lists=None):
    """IndexIVFFlat over unit `vectors` (N, D) float32, n_lists ~ 4 sqrt(N) by default.

    The lists are built with plain L2 k-means: on unit vectors the L2 order is the inner-product order."""
    n, dim = vectors.shape
    n_lists = n_lists or max(1, min(int(4 * np.sqrt(n)), n // 39))
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, n_lists)
    sample = vectors[np.random.default_rng(0).permutation(n)[:max(n_lists * 64, 10000)]]
    index.train(sample)
    index.add(vectors)
    return index


def recall_against(exact_positions, approximate_positions):
    """Mean share of each query's exact top-k found in its approximate top-k (same k)."""
    found = [len(set(a.tolist()) & set(e.tolist())) / len(e) for a, e in zip(approximate_positions, exact_positions)]
    return float(np.mean(found))


# ----------------------------------------------------------------------------------------------------
# one split

def rank_split(model, config, split, opt, args, device):
    """-> {"rows", "video_idx" (Q, k) global indices best first, "scores" (Q, k), "faiss_check"
    (see `faiss_check`) or None, "window_starts" (Q, k) the best window of each listed video (with --window_lists)
    or None}."""
    rows = split_queries(config, split)
    video2idx = split_videos(config, split)
    if not video2idx:
        raise FirstStageError(f"{config.video_duration_idx_path}: split {split!r} has no videos")
    videos = VideoItems(config, sorted(video2idx, key=video2idx.get), opt.max_ctx_len, opt.ctx_mode,
                        visual_dim=opt.visual_dim, text_dim=opt.text_dim, window_stride=opt.get("window_stride", 0))
    videos.video2idx = video2idx
    queries = QueryItems(config, rows, opt.max_desc_len, query_dim=opt.query_dim)
    top = args.train_top if split == "train" else args.eval_top
    start = time.time()
    bank = encode_video_bank(model, videos, device, batch_size=args.video_bsz, num_workers=args.num_workers)
    query_emb = encode_query_bank(model, queries, device, num_workers=args.num_workers)
    result = {"rows": rows, "faiss_check": None}
    if args.faiss:
        index = VideoSummaryIndex(bank, n_probe=args.faiss_n_probe, n_candidates=max(args.faiss_candidates, top))
        values, positions = index.top_videos(query_emb, top)
        result["faiss_check"] = faiss_check(query_emb, bank, positions, args.faiss_check_queries, args.query_chunk)
        if result["faiss_check"]:
            logger.info("%s: FAISS recall@%d against exact search on %d sampled queries: %.4f", split,
                        result["faiss_check"]["k"], result["faiss_check"]["queries_checked"],
                        result["faiss_check"]["recall"])
    else:
        values, positions = rank_videos(query_emb, bank, top, query_chunk=args.query_chunk)
    result["video_idx"] = bank.video_idx[positions.cpu()]
    result["scores"] = values.cpu()
    result["window_starts"] = (best_windows(query_emb, bank, positions, query_chunk=args.query_chunk)[0]
                               if args.window_lists else None)
    logger.info("%s: %d queries x %d videos (%d windows) ranked in %.1f s", split, len(rows), len(bank),
                bank.n_windows, time.time() - start)
    return result


def faiss_check(query_emb, bank, positions, n_check, query_chunk):
    """Recall of approximate lists against exact search on a sample of n_check queries (exact scoring of all
    queries is what --faiss avoids) -> {"k", "recall", "queries_checked"}, k = min(100, list length); None for
    n_check 0. The sample is random with a fixed seed, so reruns check the same queries."""
    if n_check == 0:
        return None
    n_queries = positions.shape[0]
    sample = torch.from_numpy(np.sort(np.random.default_rng(0).permutation(n_queries)[:n_check]))
    k = min(FIRST_STAGE_TOP, positions.shape[1])
    exact = rank_videos({key: value[sample.to(value.device)] for key, value in query_emb.items()}, bank, k,
                        query_chunk=query_chunk, progress=False)[1]
    return {"k": k, "recall": round(recall_against(exact, positions[sample][:, :k].cpu()), 4),
            "queries_checked": len(sample)}


def window_list_rows(rows, video_idx, window_starts, scores):
    """The --window_lists rows of a split: {"desc_id", "windows": [[video_idx, start, score], ...]} per query,
    in ranklist order."""
    for row, idx, starts, values in zip(rows, video_idx.tolist(), window_starts.tolist(), scores.tolist()):
        yield {"desc_id": row["desc_id"], "windows": [list(entry) for entry in zip(idx, starts, values)]}


def gt_indices(rows, config, split):
    video2idx = split_videos(config, split)
    return torch.tensor([video2idx[row["vid_name"]] for row in rows])


def input_ranklist_metrics(config, split, rows, max_vcmr_video):
    """VR metrics of the input config's ranklist of `split` (e.g. HERO's), or None when it has none."""
    path = config[SPLIT_FILE_KEYS[split][1]]
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        return None
    store = RanklistStore(path)
    try:
        lists = [[idx for idx, _ in store.get(row["desc_id"])[:max(FIRST_STAGE_TOP, max_vcmr_video)]] for row in rows]
    except FeatureStoreError as e:
        logger.info("input ranklist of %s not compared: %s", split, e)
        return None
    width = max(len(ranked) for ranked in lists)
    padded = torch.full((len(lists), width), -1, dtype=torch.long)
    for i, ranked in enumerate(lists):
        padded[i, :len(ranked)] = torch.tensor(ranked, dtype=torch.long)
    return vr_metrics(padded, gt_indices(rows, config, split), max_vcmr_video)


def select100(rows, ranked_video_idx, gt_video_idx):
    """The rows whose GT video is in the first FIRST_STAGE_TOP entries of their ranklist."""
    hits = (ranked_video_idx[:, :FIRST_STAGE_TOP] == gt_video_idx[:, None]).any(dim=1)
    return [row for row, hit in zip(rows, hits.tolist()) if hit]


# ----------------------------------------------------------------------------------------------------
# the whole output folder

def load_first_stage(model_dir, device, flag="--model_dir"):
    """(model in eval mode on device, the run's options) from a first-stage run directory (a path, or a name
    under results/); `flag` is the option named in errors."""
    model_dir = locate_model_dir(model_dir)
    opt = load_json(os.path.join(model_dir, OPT_FILENAME))
    if opt.get("model", "conquer") != "first_stage":
        raise OptionError(f"{flag} {model_dir}: a CONQUER run, not a first-stage run (--model first_stage)")
    model, _ = load_model_checkpoint(os.path.join(model_dir, CKPT_FILENAME), opt)
    return model.to(device).eval(), opt


def splits_to_rank(config, requested):
    """--splits, or by default the data config's splits that have queries (a built corpus may have no test_public)
    -> (splits, the log line saying which)."""
    if requested:
        return list(requested), f"ranking --splits {' '.join(requested)}"
    splits = [split for split in SPLITS if has_rows(config[SPLIT_FILE_KEYS[split][0]])]
    if not splits:
        raise FirstStageError(f"data config: no split has queries ({', '.join(SPLIT_FILE_KEYS[s][0] for s in SPLITS)} "
                              f"are missing or empty)")
    skipped = [split for split in SPLITS if split not in splits]
    return splits, (f"ranking the splits with queries: {', '.join(splits)}"
                    + (f" ({', '.join(skipped)}: no queries)" if skipped else ""))


def has_rows(path):
    """Whether the jsonl file at `path` exists and holds a non-blank line (read up to the first one only)."""
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return any(line.strip() for line in f)


def check_device(device):
    """--device -> torch.device; a CUDA index the machine does not have is an OptionError."""
    if device < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise OptionError(f"--device {device}: CUDA is not available on this machine; use --device -1 (CPU)")
    if device >= torch.cuda.device_count():
        raise OptionError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(f"cuda:{device}")


def rank_corpus(args):
    """Rank the splits and write OUT_DIR -> (OUT_DIR, the metrics written, also in OUT_DIR/metrics.json)."""
    out_dir = os.path.abspath(args.out_dir or os.path.join(args.model_dir, "first_stage_ranklists"))
    if os.path.exists(out_dir):
        raise OptionError(f"--out_dir {out_dir} exists; remove it or pass another --out_dir")
    device = check_device(args.device)
    model, opt = load_first_stage(args.model_dir, device)
    config_path = args.dataset_config or opt["dataset_config"]
    config = load_data_config(config_path)
    raw_config = load_json(config_path)
    # The built corpus's note that it has no lists yet (utils/build_corpus.py) is not true of this config.
    raw_config.pop("first_stage_ranklists", None)
    splits, line = splits_to_rank(config, args.splits)
    logger.info(line)
    for split in splits:  # bad input stops the run before any ranking
        split_queries(config, split)

    with atomic_folder(out_dir) as partial:
        metrics = {}
        for split in splits:
            top = args.train_top if split == "train" else args.eval_top
            ranked = rank_split(model, config, split, EasyDict(opt), args, device)
            store_name = ranklist_name(split, top)
            write_ranklist_store(os.path.join(partial, store_name),
                                 ((row["desc_id"], list(zip(idx.tolist(), score.tolist())))
                                  for row, idx, score in zip(ranked["rows"], ranked["video_idx"], ranked["scores"])))
            raw_config[SPLIT_FILE_KEYS[split][1]] = os.path.join(out_dir, store_name)
            split_metrics = {"n_queries": len(ranked["rows"]), "ranklist": os.path.join(out_dir, store_name),
                             "list_length": ranked["video_idx"].shape[1]}
            if ranked["window_starts"] is not None:
                window_file = f"{store_name}_windows.jsonl"
                save_jsonl(window_list_rows(ranked["rows"], ranked["video_idx"], ranked["window_starts"],
                                            ranked["scores"]), os.path.join(partial, window_file))
                split_metrics["window_list"] = os.path.join(out_dir, window_file)
            if ranked["faiss_check"] is not None:
                split_metrics["faiss_recall_vs_exact"] = ranked["faiss_check"]
            if split != "test_public":
                gt = gt_indices(ranked["rows"], config, split)
                split_metrics["first_stage"] = vr_metrics(ranked["video_idx"], gt, args.max_vcmr_video)
                split_metrics["input_ranklist"] = input_ranklist_metrics(config, split, ranked["rows"],
                                                                         args.max_vcmr_video)
            if split == "train":
                kept = select100(ranked["rows"], ranked["video_idx"], gt)
                save_jsonl(kept, os.path.join(partial, "train_select100.jsonl"))
                raw_config["train_data_path"] = os.path.join(out_dir, "train_select100.jsonl")
                split_metrics["select100"] = {"kept": len(kept), "dropped": len(ranked["rows"]) - len(kept)}
                logger.info("train_select100: %d of %d queries kept (%d dropped: GT not in the top %d)", len(kept),
                            len(ranked["rows"]), len(ranked["rows"]) - len(kept), FIRST_STAGE_TOP)
            metrics[split] = split_metrics
        save_json(raw_config, os.path.join(partial, "data_config.json"), save_pretty=True)
        save_json(metrics, os.path.join(partial, "metrics.json"), save_pretty=True)
    return out_dir, metrics


def format_metrics(metrics):
    """Lines: split, list, R@1/5/10/100, GT in the top max_vcmr_video; R@100 is labelled by the list length
    when the lists are shorter."""
    lines = [f"{'split':12s} {'ranklist':14s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s} {'R@100':>6s} {'in top k':>8s}"]
    for split, split_metrics in metrics.items():
        for name in ("first_stage", "input_ranklist"):
            m = split_metrics.get(name)
            if m:
                short = name == "first_stage" and split_metrics["list_length"] < FIRST_STAGE_TOP
                lines.append(f"{split:12s} {name:14s} {m['r1']:6.2f} {m['r5']:6.2f} {m['r10']:6.2f} {m['r100']:6.2f} "
                             f"{m['gt_in_top_max_vcmr_video']:8.2f}"
                             + (f"  (lists of {split_metrics['list_length']}: R@100 is "
                                f"R@{split_metrics['list_length']})" if short else ""))
        if "select100" in split_metrics:
            s = split_metrics["select100"]
            lines.append(f"{split:12s} select100: {s['kept']} queries kept, {s['dropped']} dropped")
        check = split_metrics.get("faiss_recall_vs_exact")
        if check:
            lines.append(f"{split:12s} FAISS recall@{check['k']} vs exact ({check['queries_checked']} sampled "
                         f"queries): {check['recall']}")
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="first-stage run directory (opt.json, model.ckpt)")
    parser.add_argument("--dataset_config", default=None, help="data config (default: the run's)")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=None,
                        help="splits to rank (default: those of the data config that have queries)")
    parser.add_argument("--out_dir", default=None, help="output folder (default RUN_DIR/first_stage_ranklists)")
    parser.add_argument("--device", type=int, default=-1, help="CUDA device; -1 = CPU")
    parser.add_argument("--train_top", type=int, default=TRAIN_TOP,
                        help=f"videos per training query (at least {FIRST_STAGE_TOP}: train_select100 needs them)")
    parser.add_argument("--eval_top", type=int, default=EVAL_TOP, help="videos per val / test_public query")
    parser.add_argument("--max_vcmr_video", type=int, default=10,
                        help="CONQUER's candidate count: the metrics report the share of GT videos in this top")
    parser.add_argument("--video_bsz", type=int, default=64,
                        help="windows encoded per batch (videos, for a run without --window_stride)")
    parser.add_argument("--query_chunk", type=int, default=1024,
                        help="queries scored per matrix product (memory: query_chunk x windows scores)")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers reading features")
    parser.add_argument("--faiss", action="store_true",
                        help="approximate search instead of exact scoring: a FAISS index of per-window summaries "
                             "(per video without windows), then exact scoring of their videos")
    parser.add_argument("--faiss_n_probe", type=int, default=512, help="inverted lists probed per query")
    parser.add_argument("--faiss_candidates", type=int, default=2000,
                        help="windows (videos without windows) taken per query and modality from the index, "
                             "their videos scored exactly (at least the list length)")
    parser.add_argument("--faiss_check_queries", type=int, default=256,
                        help="queries per split also ranked exactly to report the recall of --faiss (0: none)")
    parser.add_argument("--window_lists", action="store_true",
                        help="also write <list>_windows.jsonl per split: the start clip of the best window of "
                             "every listed video")
    args = parser.parse_args(argv)
    for name in ("train_top", "eval_top", "max_vcmr_video", "video_bsz", "query_chunk", "faiss_n_probe",
                 "faiss_candidates"):
        if getattr(args, name) <= 0:
            raise OptionError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.faiss_check_queries < 0:
        raise OptionError(f"--faiss_check_queries must be >= 0, got {args.faiss_check_queries}")
    if args.train_top < FIRST_STAGE_TOP:
        raise OptionError(f"--train_top {args.train_top}: at least {FIRST_STAGE_TOP}, the top that "
                          f"train_select100 (CONQUER's training queries) is taken from")
    if args.eval_top < args.max_vcmr_video:
        raise OptionError(f"--eval_top {args.eval_top} must be >= --max_vcmr_video {args.max_vcmr_video}")
    return args


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s - %(message)s")
    args = parse_args(argv)
    out_dir, metrics = rank_corpus(args)
    print("\n".join(format_metrics(metrics)))
    print(f"written: {out_dir}")
    # The one place that names the config CONQUER trains on: the corpus's own config has no ranklists.
    print(f"Train with: --dataset_config {os.path.join(out_dir, 'data_config.json')}")


if __name__ == "__main__":
    run_cli(main)
