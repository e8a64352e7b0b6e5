"""Benchmark section `corpus`: the corpus builder on synthetic per-video .npy files, its wall time and peak memory.

    python -m method.tools.benchmark --sections corpus [--corpus_videos 20000 --corpus_dim 4352]

Writes corpus_videos feature files (corpus_clips MIN..MAX clips of corpus_dim float32 values each), TVR-format
annotations (one query per video, 90% train / 10% val) and an .h5 of query features, then runs
`python -m utils.build_corpus` on them in a child process and reports its wall time and peak resident
memory (the child's own high-water mark, VmHWM). The inputs and the corpus live in the benchmark's temporary
folder, or in --corpus_work_dir (kept; it must not exist yet).
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
from tqdm import tqdm

from utils.errors import ConquerError
from utils.run_dir import REPO_ROOT

REQUIRES = {"h5py": "corpus"}
FULL = dict(videos=20000, dim=4352, query_dim=768)
QUICK = dict(videos=200, dim=32, query_dim=16)


def add_arguments(parser):
    group = parser.add_argument_group("section corpus")
    group.add_argument("--corpus_videos", type=int, default=None,
                       help=f"videos in the corpus (default {FULL['videos']}, --quick {QUICK['videos']})")
    group.add_argument("--corpus_dim", type=int, default=None,
                       help=f"video feature dimension (default {FULL['dim']}, --quick {QUICK['dim']})")
    group.add_argument("--corpus_clips", type=int, nargs=2, default=[8, 24], metavar=("MIN", "MAX"),
                       help="clips per video, drawn uniformly")
    group.add_argument("--corpus_query_dim", type=int, default=None,
                       help=f"query feature dimension (default {FULL['query_dim']}, --quick {QUICK['query_dim']})")
    group.add_argument("--corpus_work_dir", default=None, help="keep the inputs and the corpus in this new folder")


def write_inputs(work_dir, n_videos, dim, min_clips, max_clips, query_dim, seed=0):
    """Synthetic inputs in work_dir -> (annotation paths {split: path}, features folder, query .h5, input bytes)."""
    import h5py

    rng = np.random.default_rng(seed)
    feats = os.path.join(work_dir, "video_features")
    os.makedirs(feats)
    rows = {"train": [], "val": []}
    n_bytes = 0
    with h5py.File(os.path.join(work_dir, "queries.h5"), "w") as queries:
        for i in tqdm(range(n_videos), desc="synthetic inputs"):
            n_clips = int(rng.integers(min_clips, max_clips + 1))
            features = rng.standard_normal((n_clips, dim), dtype=np.float32)
            np.save(os.path.join(feats, f"video_{i:06d}.npy"), features)
            n_bytes += features.nbytes
            duration = round(n_clips * 1.5, 2)
            split = "val" if i % 10 == 0 else "train"
            rows[split].append(dict(desc_id=i, desc=f"query {i}", vid_name=f"video_{i:06d}", duration=duration,
                                    ts=[0.0, min(3.0, duration)], type="v"))
            queries.create_dataset(str(i), data=rng.standard_normal((12, query_dim), dtype=np.float32))
    paths = {}
    for split, split_rows in rows.items():
        paths[split] = os.path.join(work_dir, f"{split}.jsonl")
        with open(paths[split], "w") as f:
            f.write("\n".join(json.dumps(r) for r in split_rows))
    return paths, feats, os.path.join(work_dir, "queries.h5"), n_bytes


# Runs a module as `python -m` would, then writes the process's peak resident memory (VmHWM, KiB) to a file.
# VmHWM belongs to the process image started by exec; ru_maxrss would also count the benchmark process's
# memory, which a forked child inherits.
PEAK_PROBE = """import runpy, sys
peak_file, sys.argv = sys.argv[1], sys.argv[2:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as status, open(peak_file, "w") as f:
        f.write(next(line for line in status if line.startswith("VmHWM:")).split()[1])
"""


def run_with_peak_memory(module, module_args, peak_file):
    """Run `python -m module *module_args` in a child process -> (seconds, its peak resident memory in bytes)."""
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", PEAK_PROBE, peak_file, module, *module_args], cwd=REPO_ROOT)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise ConquerError(f"section corpus: python -m {module} failed with exit status {completed.returncode}")
    with open(peak_file) as f:
        return seconds, int(f.read()) * 1024


def run(args):
    sizes = QUICK if args.quick else FULL
    n_videos = args.corpus_videos or sizes["videos"]
    dim, query_dim = args.corpus_dim or sizes["dim"], args.corpus_query_dim or sizes["query_dim"]
    work_dir = args.corpus_work_dir or os.path.join(args.work_dir, "corpus_benchmark")
    if os.path.exists(work_dir):
        raise ConquerError(f"--corpus_work_dir {work_dir}: exists already; give a new folder")
    os.makedirs(work_dir)
    start = time.perf_counter()
    paths, feats, queries, n_bytes = write_inputs(work_dir, n_videos, dim, *args.corpus_clips, query_dim)
    input_seconds = time.perf_counter() - start
    build_args = ["--out_dir", os.path.join(work_dir, "corpus"), "--annotation_format", "tvr", "--annotations",
                  f"train={paths['train']}", f"val={paths['val']}", "--video_features", feats, "--clip_length", "1.5",
                  "--query_features", queries]
    build_seconds, peak_bytes = run_with_peak_memory("utils.build_corpus", build_args,
                                                     os.path.join(work_dir, "build_peak_kib"))
    return dict(n_videos=n_videos, dim=dim, clips=list(args.corpus_clips), video_feature_bytes=n_bytes,
                input_generation_s=input_seconds, build_s=build_seconds, videos_per_s=n_videos / build_seconds,
                build_peak_rss_bytes=peak_bytes)


def table_rows(results):
    return [f"corpus build ({results['n_videos']} videos of {results['clips'][0]}-{results['clips'][1]} clips x "
            f"{results['dim']}-d, {results['video_feature_bytes'] / 2 ** 30:.2f} GiB of features)",
            f"  build {results['build_s']:.1f} s ({results['videos_per_s']:.0f} videos/s), peak resident memory "
            f"{results['build_peak_rss_bytes'] / 2 ** 20:.0f} MiB; writing the inputs took "
            f"{results['input_generation_s']:.1f} s"]
