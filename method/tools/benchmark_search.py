"""Benchmark of the corpus search (method/search.py): latency per query, batched throughput, index build.

    python -m method.tools.benchmark --sections search [--quick] [--device cpu|cuda] [--search_threads N]

Paper config (model_config.json, H 768, exclusive measure, max_vcmr_video 10) with random weights over a
real-scale index: a synthetic corpus whose val split has the real TVR videos and queries (2,179 videos,
utils/synthetic_tvr.py --real_annotations; input dims visual 512, text 256, query 768: the input dims only
change the cached video encoder and the query's input projection). Measured in one run:

* index build time and size;
* single-query latency p50 / p95 (desc_id queries, one at a time), split into query preparation, first stage,
  CONQUER (query encoder + query-dependent layers on the top videos, one batch) and post-processing (ranking
  and submission rows, as inference);
* batched throughput (queries/s, 16 queries per batch);
* FLOPs of the query encoder and the query-dependent layers for one query and its top videos (what must run
  per query; the video encodings are cached) and the machine's fp32 matmul peak on the same threads and at the
  model's largest matmul shape (the feed-forward (k·L, H) x (H, 4H)), measured between the timed queries (best
  of 3 after each query, median over the queries) so that a machine shared with other jobs loads both alike;
  the CONQUER time is compared with its compute bound FLOPs / peak.

With 2 threads on 2 cores shared with other busy processes, every parallel op waits for both threads to be
scheduled, which costs milliseconds per op and can double the CONQUER time while one large matmul (the peak)
hardly suffers; `--search_threads 1` then measures the code without that wait.

The first stage is the corpus's stored ranklists (a lookup); a learned first stage adds its own time.
--quick: tiny corpus and model, a smoke run of a few seconds.
"""
import logging
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from config.options import BaseOptions
from method.checkpoint import save_checkpoint
from method.conquer import CONQUER
from method.search import Searcher
from method.search_index import build_index
from method.tools.benchmark import DEFAULT_REAL_ANNOTATIONS, count_flops, machine_info, matmul_seconds
from utils.io_utils import load_json
from utils.run_dir import REPO_ROOT
from utils.synthetic_tvr import generate_corpus

logger = logging.getLogger(__name__)

FULL = dict(model_config="model_config.json", hidden_dim=768, max_ctx_len=100, corpus=dict(
    n_train_videos=12, n_train_queries=16, visual_dim=512, text_dim=256, query_dim=768, eval_ranklist_len=100),
    n_latency=40, n_batched=160)
QUICK = dict(model_config="model_config_tiny.json", hidden_dim=32, max_ctx_len=30, corpus=dict(
    n_train_videos=12, n_val_videos=40, n_test_videos=12, n_train_queries=16, n_val_queries=48, n_test_queries=4,
    visual_dim=12, text_dim=8, query_dim=8, max_duration=45.0), n_latency=8, n_batched=32)


def random_run_dir(root, data_config, setting, corpus, device):
    """A CONQUER run dir (opt.json + model.ckpt) with random weights at `setting`."""
    model_config = os.path.join(REPO_ROOT, "config", setting["model_config"])
    opt = BaseOptions().parse(["--dataset_config", data_config, "--model_config", model_config, "--exp_id", "bench",
                               "--results_root", root, "--similarity_measure", "exclusive",
                               "--hidden_dim", str(setting["hidden_dim"]), "--max_ctx_len", str(setting["max_ctx_len"]),
                               "--visual_dim", str(corpus["visual_dim"]), "--text_dim", str(corpus["text_dim"]),
                               "--query_dim", str(corpus["query_dim"]), "--device", str(device)])
    model_cfg = load_json(model_config)
    model = CONQUER(model_cfg, visual_dim=opt.visual_dim, text_dim=opt.text_dim, query_dim=opt.query_dim,
                    hidden_dim=opt.hidden_dim, video_len=opt.max_ctx_len, similarity_measure="exclusive")
    save_checkpoint(opt.ckpt_filepath, model.state_dict(), model_cfg, epoch=0)
    return opt.results_dir


def query_dependent_flops(searcher, n_videos):
    """FLOPs of CONQUER's query encoder + query-dependent layers for one query and its n_videos candidates."""
    model, opt = searcher.model, searcher.opt
    query = {"feat": torch.zeros(1, opt.max_desc_len, opt.query_dim), "feat_mask": torch.ones(1, opt.max_desc_len,
             dtype=torch.long), "feat_pos_id": torch.arange(opt.max_desc_len)[None],
             "feat_token_id": torch.ones(1, opt.max_desc_len, dtype=torch.long)}
    rows = np.arange(n_videos)
    encoded = {m: torch.from_numpy(searcher.index.arrays[f"conquer.{m}"].gather(rows)) for m in model.video_modality}
    mask = torch.from_numpy(searcher.index.arrays["conquer.video_mask"].gather(rows))
    with torch.inference_mode():
        return count_flops(lambda: model.score_encoded(model.encode_query(query), query["feat_mask"], encoded, mask,
                                                       n_videos))[1]


def model_matmul(searcher):
    """fp32 operands of the model's largest matmul shape for one query: the feed-forward (k·L, H) x (H, 4H)."""
    bert = searcher.model.config.bert_config
    rows = searcher.k * searcher.opt.max_ctx_len
    return (torch.randn(rows, bert.hidden_size, device=searcher.device),
            torch.randn(bert.hidden_size, bert.intermediate_size, device=searcher.device))


def matmul_peak(a, b, device, repeats=3):
    """Best fp32 matmul rate (FLOP/s) of a @ b over `repeats` runs on the current threads."""
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / min(matmul_seconds(a, b, device) for _ in range(repeats))


def add_arguments(parser):
    parser.add_argument("--search_threads", type=int, default=None,
                        help="torch threads of the search section (default: torch's, one per core)")


def run(args):
    """Build the corpus, run dir and index in a temporary folder, then measure -> results dict."""
    setting = QUICK if args.quick else FULL
    device = torch.device(args.device)
    threads = args.search_threads
    if threads is not None:
        torch.set_num_threads(threads)
    load_start = os.getloadavg()
    device_id = -1 if device.type == "cpu" else (device.index or 0)
    work = tempfile.mkdtemp(prefix="benchmark_search_")
    try:
        corpus_kwargs = dict(setting["corpus"])
        if not args.quick:
            corpus_kwargs["real_annotations"] = DEFAULT_REAL_ANNOTATIONS
        data_config = generate_corpus(os.path.join(work, "corpus"), **corpus_kwargs)
        run_dir = random_run_dir(os.path.join(work, "runs"), data_config, setting, corpus_kwargs, device_id)
        start = time.perf_counter()
        summary = build_index(os.path.join(work, "index"), run_dir, "ranklist", data_config, "val",
                              device=device_id)
        build_seconds = time.perf_counter() - start
        searcher = Searcher(summary["out_dir"], device=device_id)
        desc_ids = [row["desc_id"] for row in searcher.dataset.query_data]
        searcher.search(desc_ids[0])  # warm-up
        operands = model_matmul(searcher)
        matmul_peak(*operands, device)  # warm-up
        timings, peaks = [], []
        for desc_id in desc_ids[:setting["n_latency"]]:
            timings.append(searcher.search_batch([desc_id])[1])
            peaks.append(matmul_peak(*operands, device))
        stages = {stage: [t[stage] for t in timings] for stage in timings[0]}
        totals = [sum(t.values()) for t in timings]
        batched = desc_ids[:setting["n_batched"]]
        start = time.perf_counter()
        searcher.search_many(batched, batch_size=16)
        throughput = len(batched) / (time.perf_counter() - start)
        flops = query_dependent_flops(searcher, searcher.k)
        peak = float(np.median(peaks))
        conquer_p50 = float(np.percentile(stages["conquer"], 50))
        return dict(
            machine=f"{machine_info(device)['cpu']}, {torch.get_num_threads()} threads, {device}",
            date=time.strftime("%Y-%m-%d"), load_average=[load_start[0], os.getloadavg()[0]], quick=bool(args.quick),
            n_videos=summary["n_videos"], n_windows=summary["n_windows"],
            n_queries_timed=len(totals), videos_reranked=searcher.k, build_seconds=build_seconds,
            index_mib=summary["nbytes"] / 2 ** 20,
            latency_ms={"total": _percentiles(totals), **{stage: _percentiles(v) for stage, v in stages.items()}},
            batched_queries_per_s=throughput, query_gflop=flops / 1e9, matmul_peak_gflops=peak / 1e9,
            matmul_shape=[operands[0].shape[0], operands[0].shape[1], operands[1].shape[1]],
            bound_ms=1e3 * flops / peak, conquer_p50_over_bound=conquer_p50 * peak / flops,
            total_p50_over_bound=float(np.percentile(totals, 50)) * peak / flops)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _percentiles(seconds):
    return {"p50": 1e3 * float(np.percentile(seconds, 50)), "p95": 1e3 * float(np.percentile(seconds, 95))}


def table_rows(results):
    """The results as table lines."""
    latency = results["latency_ms"]
    rows = [f"search over {results['n_videos']} videos ({results['n_windows']} windows), top "
            f"{results['videos_reranked']} videos re-ranked "
            f"({results['machine']}, {results['date']}, load average {results['load_average'][0]:.1f} at the "
            f"start, {results['load_average'][1]:.1f} at the end)",
            f"  index build {results['build_seconds']:.1f} s, {results['index_mib']:.0f} MiB"]
    rows += [f"  latency {stage:<12} p50 {v['p50']:8.1f} ms   p95 {v['p95']:8.1f} ms" for stage, v in latency.items()]
    rows += [f"  batched throughput {results['batched_queries_per_s']:.2f} queries/s (16 per batch)",
             f"  query-dependent FLOPs {results['query_gflop']:.1f} GFLOP per query; fp32 matmul peak "
             f"{results['matmul_peak_gflops']:.0f} GFLOP/s ({' x '.join(map(str, results['matmul_shape']))}, "
             f"median between the queries) -> bound {results['bound_ms']:.0f} ms",
             f"  CONQUER p50 / bound {results['conquer_p50_over_bound']:.2f}x, total p50 / bound "
             f"{results['total_p50_over_bound']:.2f}x"]
    return rows
