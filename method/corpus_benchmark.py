"""Benchmark of the corpus builder: build a corpus from synthetic per-video .npy files, report time and peak memory.

    python -m method.corpus_benchmark --work_dir /tmp/corpus_bench [--n_videos 20000 --dim 4352]

Writes n_videos feature files (min_clips..max_clips clips of `dim` float32 values each), TVR-format
annotations (one query per video, 90% train / 10% val) and an .h5 of query features, then runs
`python -m utils.build_corpus` on them in a child process and reports its wall time and peak resident
memory (the child's ru_maxrss). The work folder is removed at the end unless --keep.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
from tqdm import tqdm


def write_inputs(work_dir, n_videos, dim, min_clips, max_clips, query_dim, seed=0):
    """Synthetic inputs in work_dir -> (annotation paths {split: path}, features folder, query .h5, input bytes)."""
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", required=True, help="scratch folder (created; must not exist)")
    parser.add_argument("--n_videos", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=4352)
    parser.add_argument("--min_clips", type=int, default=8)
    parser.add_argument("--max_clips", type=int, default=24)
    parser.add_argument("--query_dim", type=int, default=768)
    parser.add_argument("--keep", action="store_true", help="keep the inputs and the built corpus")
    args = parser.parse_args(argv)

    os.makedirs(args.work_dir)
    try:
        start = time.time()
        paths, feats, queries, n_bytes = write_inputs(args.work_dir, args.n_videos, args.dim, args.min_clips,
                                                      args.max_clips, args.query_dim)
        input_seconds = time.time() - start
        command = [sys.executable, "-m", "utils.build_corpus", "--out_dir", os.path.join(args.work_dir, "corpus"),
                   "--annotation_format", "tvr", "--annotations", f"train={paths['train']}", f"val={paths['val']}",
                   "--video_features", feats, "--clip_length", "1.5", "--query_features", queries]
        start = time.time()
        subprocess.run(command, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        build_seconds = time.time() - start
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(json.dumps(dict(n_videos=args.n_videos, dim=args.dim, clips=[args.min_clips, args.max_clips],
                              video_feature_gib=round(n_bytes / 2 ** 30, 2),
                              input_generation_s=round(input_seconds, 1), build_s=round(build_seconds, 1),
                              videos_per_s=round(args.n_videos / build_seconds, 1),
                              build_peak_rss_mib=round(peak_mib, 1)), indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(args.work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
