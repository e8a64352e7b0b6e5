"""Benchmark section `first_stage`: ranking quality on a synthetic corpus, exact ranking speed, FAISS at scale.

    python -m method.tools.benchmark --sections first_stage [--first_stage_real_scale_config CONFIG] [...]

Parts:
- quality: on a synthetic corpus with planted signal (utils/synthetic_tvr.py), val VR recall of the trained
  first stage (train.py --model first_stage), of the same model untrained, of the generator's release-style
  ranklists, and of a plain floor (query tokens attention-pooled, clips through a 2-layer MLP, max-over-clips
  cosine, in-batch InfoNCE, as many epochs);
- exact ranking: seconds to rank a split's queries against its videos (`--real_scale_config`: a corpus built
  by `python -m utils.synthetic_tvr --real_annotations ...` with the paper's dims; skipped without it);
- faiss: the approximate search of `rank_first_stage --faiss` on a synthetic corpus of --first_stage_faiss_videos
  videos (--first_stage_faiss_clips clip vectors each; see `synthetic_clip_corpus`): build time, memory,
  per-query latency (one query at a time, one thread) and recall@100 of the approximate list against exact.
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from method.first_stage import (FirstStageRecipe, QueryItems, VideoBank, VideoItems, split_queries,
                                split_videos, top_videos, vr_metrics)
from method.oracle import score_all_reference
from utils.data_config import load_data_config
from utils.synthetic_tvr import generate_corpus

CORPUS = dict(n_train_videos=1000, n_train_queries=5000, n_val_videos=150, n_val_queries=200, visual_dim=48,
              text_dim=32, query_dim=32, seed=0)
QUICK_CORPUS = dict(CORPUS, n_train_videos=60, n_train_queries=240, n_val_videos=30, n_val_queries=60)
TRAIN_FLAGS = ["--bsz", "32", "--lr", "1e-3", "--num_workers", "0", "--max_es_cnt", "2"]
QUALITY_EPOCHS = 10  # the first stage (early stopping may end it sooner) and the floor alike


# ----------------------------------------------------------------------------------------------------
# quality

def load_split(config, split, ctx_mode="visual_sub"):
    """All queries and videos of a split as tensors: (query inputs, video inputs, GT positions, video_idx)."""
    rows, video2idx = split_queries(config, split), split_videos(config, split)
    names = sorted(video2idx, key=video2idx.get)
    queries = QueryItems(config, rows, 30)
    query_inputs = torch.utils.data.default_collate([queries[i] for i in range(len(queries))])
    video_inputs = VideoItems(config, names, 100, ctx_mode).get_many(names)
    gt = torch.tensor([names.index(row["vid_name"]) for row in rows])
    return query_inputs, video_inputs, gt, torch.tensor([video2idx[name] for name in names])


class Floor(nn.Module):
    """The plain floor: attention-pooled query tokens, clips through a 2-layer MLP, max-over-clips cosine."""

    def __init__(self, query_dim, clip_dims, hidden_dim=128):
        super().__init__()
        self.modalities = list(clip_dims)
        self.attention = nn.Linear(query_dim, len(clip_dims))
        self.query_output = nn.ModuleList(nn.Linear(query_dim, hidden_dim) for _ in clip_dims)
        self.mlp = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim))
                                  for m, d in clip_dims.items()})

    def embed(self, query_inputs, video_inputs):
        mask = query_inputs["feat_mask"].bool()
        attention = self.attention(query_inputs["feat"]).masked_fill(~mask[..., None], float("-inf")).softmax(1)
        pooled = torch.einsum("qlm,qld->qmd", attention, query_inputs["feat"])
        query = torch.stack([F.normalize(layer(pooled[:, i]), dim=-1) for i, layer in enumerate(self.query_output)], 1)
        clips = torch.stack([F.normalize(self.mlp[m](video_inputs[m]["feat"]), dim=-1) for m in self.modalities], 1)
        return ({"query": query, "modality_weights": torch.full(query.shape[:2], 1.0 / len(self.modalities))},
                {"clips": clips, "clip_mask": video_inputs["visual"]["feat_mask"].bool()})


def train_floor(train_split, n_epochs=5, batch_size=32, temperature=0.05, seed=0):
    """The floor trained with in-batch InfoNCE (both directions) -> (model, seconds)."""
    torch.manual_seed(seed)
    query_inputs, video_inputs, gt, _ = train_split
    model = Floor(query_inputs["feat"].shape[-1], {m: t["feat"].shape[-1] for m, t in video_inputs.items()})
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    start = time.time()
    for _ in range(n_epochs):
        order = torch.randperm(len(gt))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            batch = order[i:i + batch_size]
            videos = gt[batch]
            query_emb, video_emb = model.embed({k: v[batch] for k, v in query_inputs.items()},
                                               {m: {k: v[videos] for k, v in t.items()} for m, t in video_inputs.items()})
            logits = model_score(query_emb, video_emb) / temperature
            same = (videos[:, None] == videos[None, :]) & ~torch.eye(batch_size, dtype=torch.bool)
            logits = logits.masked_fill(same, float("-inf"))
            target = torch.arange(batch_size)
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model, time.time() - start


def model_score(query_emb, video_emb):
    from method.first_stage import FirstStageRetriever
    return FirstStageRetriever.score(query_emb, video_emb)


@torch.no_grad()
def embedding_metrics(query_emb, video_emb, val_split, max_vcmr_video=10):
    _, _, gt, video_idx = val_split
    bank = VideoBank(list(range(len(video_idx))), video_idx, video_emb)
    _, positions = top_videos(score_all_reference(query_emb, bank, progress=False), 100)
    return vr_metrics(video_idx[positions], video_idx[gt], max_vcmr_video)


def trained_first_stage(data_config, corpus_kwargs, results_root, device, n_epoch, hidden_dim):
    """Train through train.py; -> (run dir, epoch -1 metrics (untrained), best metrics, seconds)."""
    import json

    import train
    from utils.run_dir import REPO_ROOT
    flags = ["--model", "first_stage", "--model_config", os.path.join(REPO_ROOT, "config", "first_stage_config.json"),
             "--dataset_config", data_config, "--visual_dim", str(corpus_kwargs["visual_dim"]),
             "--text_dim", str(corpus_kwargs["text_dim"]), "--query_dim", str(corpus_kwargs["query_dim"]),
             "--stop_task", "VR", "--eval_tasks_at_training", "VR", "--device", "-1" if device.type == "cpu" else "0",
             "--exp_id", "bench",
             "--results_root", results_root, "--n_epoch", str(n_epoch), "--hidden_dim", str(hidden_dim)] + TRAIN_FLAGS
    start = time.time()
    run_dir = train.main(flags)
    seconds = time.time() - start
    with open(os.path.join(run_dir, "eval.log.txt")) as f:
        logged = [json.loads(line.split(" [Metrics] ")[1])["VR"] for line in f]
    stop_metrics = FirstStageRecipe.stop_metric_names["VR"]
    best = max(logged[1:], key=lambda m: sum(m[name] for name in stop_metrics))  # the checkpoint train.py keeps
    return run_dir, logged[0], best, seconds


def release_style_metrics(config, rows, max_vcmr_video=10):
    from method.rank_first_stage import input_ranklist_metrics
    return input_ranklist_metrics(config, "val", rows, max_vcmr_video)


def quality_section(args, work_dir):
    corpus_kwargs = QUICK_CORPUS if args.quick else CORPUS
    data_config = generate_corpus(os.path.join(work_dir, "corpus"), **corpus_kwargs)
    config = load_data_config(data_config)
    train_split, val_split = load_split(config, "train"), load_split(config, "val")
    n_epoch = 1 if args.quick else QUALITY_EPOCHS
    floor, floor_seconds = train_floor(train_split, n_epochs=n_epoch)
    with torch.no_grad():
        floor_metrics = embedding_metrics(*floor.embed(val_split[0], val_split[1]), val_split)
    run_dir, untrained, trained, seconds = trained_first_stage(data_config, corpus_kwargs,
                                                               os.path.join(work_dir, "runs"), args.device,
                                                               n_epoch=n_epoch,
                                                               hidden_dim=32 if args.quick else 128)
    return {"corpus": {k: v for k, v in corpus_kwargs.items()},
            "val_vr": {"trained first stage": trained, "untrained first stage": untrained,
                       "release-style synthetic lists": release_style_metrics(config, split_queries(config, "val")),
                       "floor (MLP clips, attention-pooled query)": floor_metrics},
            "train_seconds": {"first stage (train.py)": round(seconds, 1), "floor": round(floor_seconds, 1)},
            "run_dir": run_dir}


# ----------------------------------------------------------------------------------------------------
# exact ranking speed

def ranking_section(args, run_dir):
    """Seconds to rank the val split of `args.real_scale_config` with an untrained model of the paper dims."""
    from method.checkpoint import build_model
    from method.first_stage import encode_query_bank, encode_video_bank
    config = load_data_config(args.real_scale_config)
    rows, video2idx = split_queries(config, "val"), split_videos(config, "val")
    opt = dict(model="first_stage", query_dim=768, visual_dim=4352, text_dim=768, hidden_dim=256, max_ctx_len=100,
               ctx_mode="visual_sub", max_desc_len=30)
    from utils.io_utils import load_json
    from utils.run_dir import REPO_ROOT
    model = build_model(load_json(os.path.join(REPO_ROOT, "config", "first_stage_config.json")), opt).eval()
    videos = VideoItems(config, sorted(video2idx, key=video2idx.get), 100, "visual_sub")
    videos.video2idx = video2idx
    timings = {}
    start = time.time()
    bank = encode_video_bank(model, videos, torch.device("cpu"), batch_size=64, num_workers=args.num_workers)
    timings["encode videos"] = time.time() - start
    start = time.time()
    query_emb = encode_query_bank(model, QueryItems(config, rows, 30), torch.device("cpu"),
                                  num_workers=args.num_workers)
    timings["encode queries"] = time.time() - start
    start = time.time()
    top_videos(score_all_reference(query_emb, bank), 100)
    timings["score and sort"] = time.time() - start
    timings["total"] = sum(timings.values())
    return {"n_queries": len(rows), "n_videos": len(video2idx), "threads": torch.get_num_threads(),
            "num_workers": args.num_workers,
            "seconds": {k: round(v, 1) for k, v in timings.items()}}


# ----------------------------------------------------------------------------------------------------
# FAISS at scale

def synthetic_clip_corpus(args, rng):
    """-> (clips (V, 1, L, D) unit vectors, queries (Q, 1, D) unit vectors, source video of each query (Q,)).

    Videos follow a hierarchy, topic -> subtopic -> video -> clip (--first_stage_faiss_topics topics of
    --first_stage_faiss_subtopics subtopics), so a query's near videos come at graded distances rather than as
    one plateau of equally near ones. Every Gaussian draw has per-dimension variance ~ 1 / (d + 1) **
    --first_stage_faiss_spectrum_power: learned embeddings concentrate on a few directions (power 0 =
    isotropic, the harder case where a query's 100th-best video is set by noise spread over all dimensions). A
    query is a clip of a random video plus noise (--first_stage_faiss_query_noise), set so that the source
    video is the exact top 1 for about half of the queries, as for a trained model.
    """
    n_videos, n_clips, dim = args.faiss_videos, args.faiss_clips, args.faiss_dim
    scale = (np.arange(dim) + 1.0) ** (-args.faiss_spectrum_power / 2)
    scale = (scale * np.sqrt(dim / np.sum(scale ** 2))).astype(np.float32)

    def gaussian(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * scale

    topics = gaussian(args.faiss_topics, dim)
    n_subtopics = len(topics) * args.faiss_subtopics
    subtopics = np.repeat(topics, args.faiss_subtopics, axis=0) + 0.8 * gaussian(n_subtopics, dim)
    clips = torch.empty(n_videos, 1, n_clips, dim)
    for start in range(0, n_videos, 100_000):
        n = min(100_000, n_videos - start)
        centres = subtopics[rng.integers(0, len(subtopics), n)] + 0.6 * gaussian(n, dim)
        clips[start:start + n, 0] = F.normalize(torch.from_numpy(centres[:, None] + 0.6 * gaussian(n, n_clips, dim)),
                                                dim=-1)
    source = rng.integers(0, n_videos, args.faiss_queries)
    picked = clips[torch.from_numpy(source), 0, torch.from_numpy(rng.integers(0, n_clips, len(source)))]
    noise = args.faiss_query_noise * torch.from_numpy(gaussian(len(source), dim)) / np.sqrt(dim)
    return clips, F.normalize(picked + noise, dim=-1)[:, None], torch.from_numpy(source)


def faiss_section(args):
    """VideoSummaryIndex (method/rank_first_stage.py) on a synthetic corpus of --first_stage_faiss_videos videos:
    build time, memory, latency of one query at a time on one thread, recall@100 of its list against exact."""
    import faiss
    from method.rank_first_stage import VideoSummaryIndex, recall_against
    clips, queries, source = synthetic_clip_corpus(args, np.random.default_rng(0))
    n_videos = len(clips)
    bank = VideoBank([str(i) for i in range(n_videos)], torch.arange(n_videos),
                     {"clips": clips, "clip_mask": torch.ones(n_videos, clips.shape[2], dtype=torch.bool)})
    query_emb = {"query": queries, "modality_weights": torch.ones(len(queries), 1)}
    exact = [top_videos(score_all_reference({key: value[start:start + 20] for key, value in query_emb.items()}, bank,
                                  video_bucket=4096, progress=False), 1000)
             for start in tqdm(range(0, len(queries), 20), desc="Exact search", leave=False)]
    exact_values, exact_positions = torch.cat([values for values, _ in exact]), torch.cat([pos for _, pos in exact])

    start = time.time()
    index = VideoSummaryIndex(bank, n_probe=args.faiss_n_probe, n_candidates=args.faiss_candidates)
    build_seconds = time.time() - start
    ivf = index.indexes[0]
    index_bytes = ivf.ntotal * (args.faiss_dim * 4 + 8) + ivf.nlist * args.faiss_dim * 4

    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    latencies, found = [], []
    for i in range(len(queries)):
        one = {key: value[i:i + 1] for key, value in query_emb.items()}
        start = time.perf_counter()
        found.append(index.top_videos(one, 100, progress=False)[1][0])
        latencies.append(time.perf_counter() - start)
    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)
    recalls = [recall_against(exact_positions[i:i + 1, :100], found[i][None]) for i in range(len(queries))]
    source_rank = (exact_positions == source[:, None]).float().argmax(dim=1)
    source_found = (exact_positions == source[:, None]).any(dim=1)
    return {"index": f"IndexIVFFlat over per-video mean clip vectors, {ivf.nlist} lists, nprobe {ivf.nprobe}, "
                     f"{args.faiss_candidates} candidates scored exactly (max over clips)",
            "n_videos": n_videos, "clips_per_video": args.faiss_clips, "dim": args.faiss_dim,
            "spectrum_power": args.faiss_spectrum_power, "query_noise": args.faiss_query_noise,
            "build_seconds": round(build_seconds, 1), "index_gib": round(index_bytes / 2 ** 30, 3),
            "clip_vectors_gib": round(clips.numel() * 4 / 2 ** 30, 2),
            "ms_per_query": round(1000 * float(np.median(latencies)), 2),
            "ms_per_query_p95": round(1000 * float(np.percentile(latencies, 95)), 2),
            "recall_at_100_vs_exact": round(float(np.mean(recalls)), 4),
            "recall_at_100_vs_exact_min": round(float(np.min(recalls)), 2),
            "exact_source_video_r1_r100": [round(float(((source_rank < n) & source_found).float().mean()), 3)
                                           for n in (1, 100)],
            "exact_score_at_rank_1_100_1000": [round(float(exact_values[:, r].median()), 3) for r in (0, 99, 999)],
            "n_queries": len(queries)}


# ----------------------------------------------------------------------------------------------------

REQUIRES = {"faiss": "faiss"}


def add_arguments(parser):
    parser.add_argument("--first_stage_real_scale_config", default=None,
                        help="data config of a real-scale synthetic corpus (exact ranking speed; skipped without)")
    parser.add_argument("--first_stage_num_workers", type=int, default=1,
                        help="DataLoader workers reading the features while the model encodes (ranking part)")
    parser.add_argument("--first_stage_faiss_videos", type=int, default=1_000_000)
    parser.add_argument("--first_stage_faiss_clips", type=int, default=8)
    parser.add_argument("--first_stage_faiss_dim", type=int, default=64)
    parser.add_argument("--first_stage_faiss_queries", type=int, default=200)
    parser.add_argument("--first_stage_faiss_topics", type=int, default=1000)
    parser.add_argument("--first_stage_faiss_subtopics", type=int, default=100, help="subtopics per topic")
    parser.add_argument("--first_stage_faiss_spectrum_power", type=float, default=1.0)
    parser.add_argument("--first_stage_faiss_query_noise", type=float, default=1.0)
    parser.add_argument("--first_stage_faiss_n_probe", type=int, default=512)
    parser.add_argument("--first_stage_faiss_candidates", type=int, default=2000)


def run(args):
    """-> {"quality", "ranking" (when a real-scale config is given), "faiss"}."""
    prefix = "first_stage_"
    args = argparse.Namespace(quick=args.quick, device=args.device,
                              **{k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)})
    if args.quick:
        args.faiss_videos = min(args.faiss_videos, 2000)
        args.faiss_queries = min(args.faiss_queries, 20)
    results = {}
    with tempfile.TemporaryDirectory() as work_dir:
        results["quality"] = quality_section(args, work_dir)
        results["quality"].pop("run_dir")
    if args.real_scale_config:
        results["ranking"] = ranking_section(args, None)
    results["faiss"] = faiss_section(args)
    return results


def table_rows(results):
    rows = ["First stage, synthetic val split (VR, %):", f"  {'ranklist':44s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s} {'R@100':>6s}"]
    for name, m in results["quality"]["val_vr"].items():
        rows.append(f"  {name:44s} {m['r1']:6.2f} {m['r5']:6.2f} {m['r10']:6.2f} {m['r100']:6.2f}")
    rows.append("  training seconds: " + ", ".join(f"{k} {v}" for k, v in results["quality"]["train_seconds"].items()))
    if "ranking" in results:
        r = results["ranking"]
        rows.append(f"Exact ranking, {r['n_queries']} queries x {r['n_videos']} videos, {r['threads']} threads, "
                    f"{r['num_workers']} reading workers: "
                    + ", ".join(f"{k} {v} s" for k, v in r["seconds"].items()))
    f = results["faiss"]
    rows.append(f"FAISS, {f['n_videos']:,d} videos x {f['clips_per_video']} clips (dim {f['dim']}): {f['index']}; "
                f"build {f['build_seconds']} s, index {f['index_gib']} GiB (+ clip vectors {f['clip_vectors_gib']} GiB), "
                f"{f['ms_per_query']} ms/query p50 (p95 {f['ms_per_query_p95']}, one thread), "
                f"recall@100 vs exact {f['recall_at_100_vs_exact']}")
    return rows
