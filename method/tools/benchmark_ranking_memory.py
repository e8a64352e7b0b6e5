"""Benchmark section `ranking_memory`: peak memory of exact first-stage ranking as the query count grows.

    python -m method.tools.benchmark --sections ranking_memory [--ranking_memory_queries 2000 20000]

Ranks Q queries against 5,000 videos (tiny dims: one modality, 8 clips of dim 16, so the videos take ~2.5 MB)
into top-100 lists, each run in a fresh process on one thread, two ways:

* chunked: `rank_videos`, what rank_first_stage does: the top k of each chunk of --query_chunk queries;
* full matrix: `top_videos(score_all_reference(...))`, the former path: the whole (Q, V) score matrix, then the selection.

Reported per run: the peak resident memory of the process and its growth during ranking (peak minus the
resident memory once the inputs are built), beside the size of the (Q, k) output. Target: from the smallest to
the largest Q the chunked growth rises by no more than the output does (plus 8 MiB).

The children run with MALLOC_MMAP_THRESHOLD_=65536, so that glibc returns every freed block of a chunk's scores
to the system: with its default, adaptive threshold the first freed blocks raise the threshold and later chunks
reuse (and fragment) the heap, so the growth climbs over the first ~5 chunks before it levels off (2,000
queries: 133 MiB, 5,000: 184, 10,000 to 40,000: 193-209, on a 2-core VM, 2026-12-02), which measures the
allocator rather than the ranking.
"""
import multiprocessing
import os
import resource

import torch

SMOKE_BY_DEFAULT = False  # four fresh processes, one holding a 20k x 5k matrix: ~2 min on a loaded 2-core VM
N_VIDEOS, N_CLIPS, DIM, TOP_K, QUERY_CHUNK = 5000, 8, 16, 100, 1024
SLACK_BYTES = 8 * 2 ** 20
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # see the module docstring
METHODS = ("chunked", "full matrix")


def _rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rank_in_process(n_queries, method, results):
    """Child process: build the inputs, rank, report peak RSS before and after."""
    from method.first_stage import VideoBank, rank_videos, top_videos
    from method.oracle import score_all_reference
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    clips = torch.nn.functional.normalize(torch.randn(N_VIDEOS, 1, N_CLIPS, DIM, generator=generator), dim=-1)
    bank = VideoBank([str(i) for i in range(N_VIDEOS)], torch.arange(N_VIDEOS),
                     {"clips": clips, "clip_mask": torch.ones(N_VIDEOS, N_CLIPS, dtype=torch.bool)})
    query_emb = {"query": torch.nn.functional.normalize(torch.randn(n_queries, 1, DIM, generator=generator), dim=-1),
                 "modality_weights": torch.ones(n_queries, 1)}
    before = _rss_bytes()
    if method == "chunked":
        values, positions = rank_videos(query_emb, bank, TOP_K, query_chunk=QUERY_CHUNK, progress=False)
    else:
        values, positions = top_videos(score_all_reference(query_emb, bank, query_chunk=QUERY_CHUNK, progress=False), TOP_K)
    output_bytes = sum(t.numel() * t.element_size() for t in (values, positions))
    results.put(dict(peak_rss_bytes=_rss_bytes(), ranking_growth=_rss_bytes() - before, output_bytes=output_bytes))


def measure(n_queries, method):
    """One ranking in a fresh process (spawned with ALLOCATOR_ENV) -> its _rank_in_process result."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_rank_in_process, args=(n_queries, method, results))
    saved = {key: os.environ.get(key) for key in ALLOCATOR_ENV}
    os.environ.update(ALLOCATOR_ENV)
    try:
        process.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    result = results.get()
    process.join()
    return result


def add_arguments(parser):
    parser.add_argument("--ranking_memory_queries", type=int, nargs="+", default=[2000, 20000],
                        help="query counts ranked against 5,000 videos (the first and the last are compared)")


def run(args):
    counts = [n // 10 for n in args.ranking_memory_queries] if args.quick else args.ranking_memory_queries
    runs = {method: {str(n): measure(n, method) for n in counts} for method in METHODS}
    small, large = str(counts[0]), str(counts[-1])
    chunked = runs["chunked"]
    growth = chunked[large]["ranking_growth"] - chunked[small]["ranking_growth"]
    output_growth = chunked[large]["output_bytes"] - chunked[small]["output_bytes"]
    return {"n_videos": N_VIDEOS, "top_k": TOP_K, "query_chunk": QUERY_CHUNK, "runs": runs,
            "targets": {f"chunked: growth from {small} to {large} queries within the output's + 8 MiB":
                        growth <= output_growth + SLACK_BYTES}}


def table_rows(results):
    mib = 2 ** 20
    rows = [f"Exact ranking memory, Q queries x {results['n_videos']:,d} videos -> top {results['top_k']} (query chunk "
            f"{results['query_chunk']}, one thread, fresh process each):",
            f"  {'method':12s} {'Q':>7s} {'peak RSS MiB':>13s} {'growth MiB':>11s} {'output MiB':>11s}"]
    for method, by_count in results["runs"].items():
        for n, r in by_count.items():
            rows.append(f"  {method:12s} {int(n):7d} {r['peak_rss_bytes'] / mib:13.1f} "
                        f"{r['ranking_growth'] / mib:11.1f} {r['output_bytes'] / mib:11.1f}")
    return rows
