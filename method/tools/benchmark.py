"""Benchmark: training step, evaluation throughput and post-processing, each against its plain formulation.

    python -m method.tools.benchmark                        # full run, paper config (~8 min on a 2-core CPU)
    python -m method.tools.benchmark --quick                # tiny sizes: a smoke run (~20 s)
    python -m method.tools.benchmark --device cuda --sections train eval --out benchmark_results/gpu.json

Every number is measured in this run, on this machine, and given as a ratio to its plain formulation:

* train: one optimizer step (forward + backward + BertAdamW) at the paper config (H 768, 12 heads, Dv 4352,
  L 100, Lq 30, bsz 16 x (1 + 3 negatives) = 64 videos). Memory-light (decomposed QAL + the memory_light
  building blocks) vs plain (materialised QAL concat, plain ops: the original's formulation). Each
  configuration runs in a fresh subprocess: median step time, peak memory (peak RSS on the CPU, since RSS
  peaks cannot be reset in-process; torch.cuda.max_memory_allocated on CUDA) and the losses, which must agree.
  Plus the AMP modes of the device on the memory-light model.
* eval: queries/s of the evaluation forward pass + ranking (method.evaluation.compute_predictions) on a
  generated corpus whose video reuse matches TVR val (~55 candidate slots per video), paper config, video
  cache on vs off in fp32 (predictions must be identical), and the AMP modes with the cache on (their
  metrics next to fp32's, with the binomial standard error of a recall over that many queries as the noise).
* post: scores -> top-N -> temporal NMS -> metrics on the real-scale val split (--real_annotations: 10,895
  queries, 2,179 videos; random logits), fast vs plain formulations (valid-pair scores with partial top-N
  selection vs full scores with a full sort, rows built once for all queries vs per batch, NMS vectorised over
  all queries vs list NMS per query; the metrics code is shared).

FLOPs per training step and per query are counted with torch's FlopCounterMode on the meta device (no
compute), and the machine's matmul peak (fp32 and each AMP dtype) is measured in the same run to give the
achieved fraction of it. An AMP mode whose matmuls are slower than fp32 (bf16 on a CPU without AVX512-BF16
or AMX: ~100x slower) is not run at the paper sizes, only projected from its matmul peak (--force_amp runs it).
Output: a table on stdout and JSON at --out.
"""
import argparse
import datetime
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from easydict import EasyDict
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from method.amp import AMP_DTYPES, autocast_context, check_amp, make_grad_scaler
from method.conquer import CONQUER
from method.optimization import build_optimizer
from utils.io_utils import load_json, load_jsonl, save_json
from utils.run_dir import REPO_ROOT

logger = logging.getLogger(__name__)

DEFAULT_REAL_ANNOTATIONS = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "tvr")
SECTIONS = ("train", "eval", "post")
WORKER_RESULT_PREFIX = "BENCHMARK_WORKER_RESULT "
TVR_VAL_QUERIES, TVR_VAL_VIDEOS = 10895, 2179
TVR_CANDIDATE_SLOTS_PER_VIDEO = TVR_VAL_QUERIES * 11 / TVR_VAL_VIDEOS  # ~55: GT + 10 candidates per query
QUERY_TYPES = {"v": 0.74, "t": 0.09, "vt": 0.17}
TARGETS = {  # (section, ratio name) -> (comparison, bound), from the performance issue
    ("train", "peak_memory"): ("<=", 0.5),
    ("train", "step_time"): ("<=", 1.0),
    ("eval", "queries_per_s"): (">=", 1.5),
    ("post", "total_time_speedup"): (">=", 5.0),
}

# Sizes. "paper" is the configuration of the paper / scripts; "quick" keeps every code path at tiny sizes.
SIZES = {
    "paper": dict(model_config="model_config.json", visual_dim=4352, text_dim=768, query_dim=768, video_len=100,
                  query_len=30, bsz=16, neg_video_num=3, train_warmup=1, train_steps=3,
                  eval_videos=12, eval_queries=60, eval_query_bsz=5, post_queries=None, matmul_n=2048),
    "quick": dict(model_config="model_config_tiny.json", visual_dim=24, text_dim=16, query_dim=16, video_len=20,
                  query_len=10, bsz=2, neg_video_num=3, train_warmup=1, train_steps=2,
                  eval_videos=10, eval_queries=20, eval_query_bsz=5, post_queries=60, matmul_n=256),
}


class BenchmarkError(RuntimeError):
    """A benchmark step failed; the message names the section and what went wrong."""


# ----------------------------------------------------------------------------------------------------
# helpers

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values):
    return float(np.median(values)) if values else float("nan")


def load_model_config(name):
    return load_json(os.path.join(REPO_ROOT, "config", name))


def build_model(sizes, device, **kwargs):
    config = load_model_config(sizes["model_config"])
    return CONQUER(config, visual_dim=sizes["visual_dim"], text_dim=sizes["text_dim"], query_dim=sizes["query_dim"],
                   hidden_dim=config["bert_config"]["hidden_size"], video_len=sizes["video_len"],
                   **kwargs).to(device)


def _encoder_inputs(valid, length, dim, token_type, generator):
    """valid (..., ) real rows per sequence -> encoder input dict of (..., length, ·), zero-padded."""
    mask = (torch.arange(length) < valid[..., None]).long()
    feat = torch.randn(*mask.shape, dim, generator=generator) * mask[..., None]
    return {"feat": feat, "feat_mask": mask, "feat_pos_id": torch.arange(length).expand(mask.shape).clone(),
            "feat_token_id": torch.full(mask.shape, token_type, dtype=torch.long)}


def make_training_batch(sizes, n_queries, n_videos, seed=0):
    """A padded batch as the training loader gives it: query (B, Lq, ·), visual/sub (B, N, L, ·), st_ed_indices."""
    g = torch.Generator().manual_seed(seed)
    length, query_len = sizes["video_len"], sizes["query_len"]
    video_valid = torch.randint(length // 5, length + 1, (n_queries, n_videos), generator=g)
    query_valid = torch.randint(max(1, query_len // 4), query_len + 1, (n_queries,), generator=g)
    batch = {"query": _encoder_inputs(query_valid, query_len, sizes["query_dim"], 1, g),
             "visual": _encoder_inputs(video_valid, length, sizes["visual_dim"], 0, g),
             "sub": _encoder_inputs(video_valid, length, sizes["text_dim"], 1, g)}
    st = (torch.rand(n_queries, generator=g) * (video_valid[:, 0] - 1)).long()
    ed = torch.minimum(st + torch.randint(0, 8, (n_queries,), generator=g), video_valid[:, 0] - 1)
    batch["st_ed_indices"] = torch.stack([st, ed], dim=1)
    return batch


def to_device(batch, device):
    return {key: to_device(value, device) if isinstance(value, dict) else value.to(device)
            for key, value in batch.items()}


def machine_info(device):
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    info = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), host=platform.node(),
                cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                python=platform.python_version(), torch=torch.__version__, device=str(device),
                load_average_start=list(os.getloadavg()))
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ----------------------------------------------------------------------------------------------------
# machine peak and FLOP counts

def matmul_seconds(a, b, device):
    synchronize(device)
    start = time.perf_counter()
    a @ b
    synchronize(device)
    return time.perf_counter() - start


def matmul_peak_flops(device, dtype, n, max_matmul_s=1.0, budget_s=5.0, repeats=5):
    """Best FLOP/s of an n x n x n matmul (2 n^3 FLOPs) in `dtype` on `device` over up to `repeats` runs.
    A 512-size probe first estimates the speed, and n is halved until one matmul takes at most
    `max_matmul_s` (a dtype without native instructions can be 10-100x slower). Returns (FLOP/s, n used)."""
    g = torch.Generator().manual_seed(0)

    def operands(size):
        return [torch.randn(size, size, generator=g).to(device=device, dtype=dtype) for _ in range(2)]

    probe = operands(min(n, 512))
    matmul_seconds(*probe, device)  # warm-up: kernel selection, thread pool
    rate = 2 * probe[0].shape[0] ** 3 / max(matmul_seconds(*probe, device), 1e-9)
    while n > 512 and 2 * n ** 3 / rate > max_matmul_s:
        n //= 2
    a, b = operands(n)
    matmul_seconds(a, b, device)
    times = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        times.append(matmul_seconds(a, b, device))
    return 2 * n ** 3 / min(times), n


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn):
    """FLOPs (matmuls, convolutions, attention) that `fn` runs, counted by FlopCounterMode. FlopCounterMode has
    no formula for the CPU's fused attention kernel, so its two matmuls are counted as for the other kernels."""
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops})
    with counter:
        fn()
    return counter.get_total_flops()


def meta_model(sizes, **kwargs):
    with torch.device("meta"):
        return build_model(sizes, torch.device("meta"), **kwargs)


def training_step_flops(sizes):
    """FLOPs of the forward and backward pass of one training batch (the optimizer's are negligible)."""
    model = meta_model(sizes).train()
    n_videos = 1 + sizes["neg_video_num"]
    batch = to_device(make_training_batch(sizes, sizes["bsz"], n_videos), torch.device("meta"))

    def step():
        _, begin, end = model.get_pred_from_raw_query(batch)
        b = begin.shape[0]
        loss = (F.cross_entropy(begin.reshape(b, -1), batch["st_ed_indices"][:, 0])
                + F.cross_entropy(end.reshape(b, -1), batch["st_ed_indices"][:, 1]))
        loss.backward()
    return count_flops(step)


def query_flops(sizes, n_videos_per_query, videos_per_query):
    """Forward FLOPs per query: (uncached: 1 query x N videos, cached: the query-dependent part plus the
    video encodings amortised over the queries, `videos_per_query` = distinct videos / queries)."""
    model = meta_model(sizes).eval()
    batch = to_device(make_training_batch(sizes, 1, n_videos_per_query), torch.device("meta"))
    with torch.no_grad():
        full = count_flops(lambda: model.get_pred_from_raw_query(batch))
        one_video = {m: {k: v[0, :1] for k, v in batch[m].items()} for m in ("visual", "sub")}
        per_video = count_flops(lambda: model.encode_videos(one_video))
    return full, full - n_videos_per_query * per_video + videos_per_query * per_video


# ----------------------------------------------------------------------------------------------------
# train section (one subprocess per configuration)

TRAIN_CONFIGS = {
    "plain": dict(qal_impl="plain", memory_light=False),
    "memory_light": dict(qal_impl="decomposed", memory_light=True),
}


def current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def train_worker(spec):
    """Run in a fresh process: build the model, optimizer and batch, take warmup + timed steps.
    Returns step times, losses and memory (peak RSS, or CUDA max_memory_allocated)."""
    device = torch.device(spec["device"])
    sizes = spec["sizes"]
    torch.manual_seed(spec["seed"])
    model = build_model(sizes, device, **TRAIN_CONFIGS[spec["config"]]).train()
    optimizer = build_optimizer(model, EasyDict(lr=1e-4, wd=0.01, lr_mul=1.0, optimizer="bert_adamw"))
    scaler = make_grad_scaler(spec["amp"], device)
    batch = to_device(make_training_batch(sizes, sizes["bsz"], 1 + sizes["neg_video_num"], seed=spec["seed"]),
                      device)
    torch.manual_seed(spec["seed"] + 1)  # same dropout masks in every configuration
    synchronize(device)
    memory_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss_bytes()
    times, losses = [], []
    for _ in range(sizes["train_warmup"] + sizes["train_steps"]):
        synchronize(device)
        start = time.perf_counter()
        with autocast_context(spec["amp"], device):
            loss, loss_dict = model(batch)
        optimizer.zero_grad(set_to_none=False)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(loss_dict["loss_overall"])
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    timed = times[sizes["train_warmup"]:]
    return dict(config=spec["config"], amp=spec["amp"], step_times_s=timed,
                warmup_times_s=times[:sizes["train_warmup"]], median_step_s=median(timed), peak_memory_bytes=peak,
                memory_before_first_step_bytes=memory_before, losses=losses,
                memory_kind="cuda_max_memory_allocated" if device.type == "cuda" else "peak_rss")


def run_train_worker(spec):
    """Run `train_worker(spec)` in a fresh Python process and return its result."""
    command = [sys.executable, "-m", "method.tools.benchmark", "--worker", json.dumps(spec)]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(WORKER_RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        raise BenchmarkError(f"train section: the worker for {spec['config']} (amp {spec['amp']}) failed with exit "
                             f"code {completed.returncode}:\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1][len(WORKER_RESULT_PREFIX):])


def run_train_section(sizes, device, amp_modes, seed=0):
    runs = {}
    for name, amp in [("plain", "off"), ("memory_light", "off")] + [("memory_light", a) for a in amp_modes]:
        key = name if amp == "off" else f"{name}_{amp}"
        logger.info("train: %s", key)
        runs[key] = run_train_worker(dict(config=name, amp=amp, device=str(device), sizes=sizes, seed=seed))
    plain, light = runs["plain"], runs["memory_light"]
    loss_rel_diff = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(plain["losses"], light["losses"])]
    flops = training_step_flops(sizes)
    result = dict(
        runs=runs, flops_per_step=flops,
        losses_match_first_step=loss_rel_diff[0] <= 1e-5, loss_rel_diff_per_step=loss_rel_diff,
        ratios=dict(step_time=light["median_step_s"] / plain["median_step_s"],
                    peak_memory=light["peak_memory_bytes"] / plain["peak_memory_bytes"]))
    for amp in amp_modes:
        run = runs[f"memory_light_{amp}"]
        result["ratios"][f"step_time_{amp}_vs_fp32"] = run["median_step_s"] / light["median_step_s"]
        result["ratios"][f"peak_memory_{amp}_vs_fp32"] = run["peak_memory_bytes"] / light["peak_memory_bytes"]
    for run in runs.values():
        run["achieved_flops_per_s"] = flops / run["median_step_s"]
    return result


# ----------------------------------------------------------------------------------------------------
# eval section

def eval_corpus(sizes, out_dir):
    """Synthetic corpus whose val split has eval_queries queries over eval_videos videos (every query: its GT
    video + 10 candidates), i.e. ~eval_queries * 11 / eval_videos candidate slots per video."""
    from utils.synthetic_tvr import generate_corpus
    max_duration = 1.5 * sizes["video_len"]  # TVR: 60-150 s videos, capped at 100 clips
    return generate_corpus(out_dir, n_train_videos=10, n_val_videos=sizes["eval_videos"], n_test_videos=10,
                           n_train_queries=10, n_val_queries=sizes["eval_queries"], n_test_queries=5,
                           visual_dim=sizes["visual_dim"], text_dim=sizes["text_dim"], query_dim=sizes["query_dim"],
                           min_duration=0.4 * max_duration, max_duration=max_duration, max_clips=sizes["video_len"],
                           seed=0)


def eval_options(sizes, device, video_cache, amp):
    return EasyDict(similarity_measure="general", use_interal_vr_scores=True, eval_query_bsz=sizes["eval_query_bsz"],
                    num_workers=0, min_pred_l=0, max_pred_l=24, max_before_nms=200, clip_length=1.5,
                    video_cache=video_cache, amp=amp, device=device)


def recall_noise(metrics_a, metrics_b, n_queries):
    """Per recall key: |a - b| and the binomial standard error (percentage points) of a recall over n queries."""
    out = {}
    for task in ("VCMR", "SVMR", "VR"):
        for key, a in metrics_a.get(task, {}).items():
            b = metrics_b[task][key]
            p = min(max((a + b) / 200.0, 0.0), 1.0)
            out[f"{task} {key}"] = dict(fp32=a, other=b, abs_diff=abs(a - b),
                                        standard_error=100.0 * math.sqrt(p * (1 - p) / n_queries))
    return out


def run_eval_section(sizes, device, amp_modes):
    from method.dataset import StartEndDataset
    from method.evaluation import VideoEncodingCache, compute_predictions, top_n_submission
    from utils.data_config import load_data_config
    from utils.standalone_eval import eval_retrieval

    tasks = ("VCMR", "SVMR", "VR")
    with tempfile.TemporaryDirectory(prefix="conquer_benchmark_") as tmp:
        data_config = load_data_config(eval_corpus(sizes, tmp))
        dataset = StartEndDataset(data_config, max_ctx_len=sizes["video_len"], max_desc_len=sizes["query_len"],
                                  is_eval=True, mode="val", inference_top_k=10)
        n_queries = len(dataset)
        distinct_videos = len({name for names, _ in dataset.eval_candidates for name in names})
        torch.manual_seed(0)
        model = build_model(sizes, device).eval()

        def predict(video_cache, amp):
            opt = eval_options(sizes, device, video_cache, amp)
            synchronize(device)
            start = time.perf_counter()
            results = compute_predictions(model, dataset, opt, tasks)  # autocast from opt.amp
            synchronize(device)
            return results, time.perf_counter() - start

        for index in range(n_queries):  # warm-up: every feature read once (page cache), then the kernels
            dataset[index]
        warm_up_batch = to_device(make_training_batch(sizes, 1, 11), device)
        for amp in ["off"] + list(amp_modes):  # kernels of every precision chosen/compiled before timing
            with torch.no_grad(), autocast_context(amp, device):
                model.get_pred_from_raw_query(warm_up_batch)
        runs, results = {}, {}
        for key, video_cache, amp in [("cache_off", False, "off"), ("cache_on", True, "off")] + [
                (f"cache_on_{amp}", True, amp) for amp in amp_modes]:
            logger.info("eval: %s", key)
            results[key], seconds = predict(video_cache, amp)
            runs[key] = dict(seconds=seconds, queries_per_s=n_queries / seconds, video_cache=video_cache, amp=amp)
        with torch.no_grad():
            cache = VideoEncodingCache.build(model, dataset, eval_options(sizes, device, True, "off"), device,
                                             batch_size=sizes["eval_query_bsz"] * 11)
        metrics = {key: eval_retrieval(top_n_submission(value, 100), dataset.query_data, use_desc_type=False)
                   for key, value in results.items()}

    flops_uncached, flops_cached = query_flops(sizes, 11, distinct_videos / n_queries)
    runs["cache_off"]["flops_per_query"] = flops_uncached
    for key, run in runs.items():
        run.setdefault("flops_per_query", flops_cached)
        run["achieved_flops_per_s"] = run["flops_per_query"] * run["queries_per_s"]
    cache_bytes_per_video = cache.nbytes / len(cache.video_names)
    result = dict(
        runs=runs, n_queries=n_queries, distinct_videos=distinct_videos,
        candidate_slots_per_video=n_queries * 11 / distinct_videos,
        identical_predictions=results["cache_on"] == results["cache_off"],
        flop_ratio_uncached_over_cached=flops_uncached / flops_cached,
        cache_bytes=cache.nbytes, cache_bytes_per_video=cache_bytes_per_video,
        cache_bytes_tvr_val=cache_bytes_per_video * TVR_VAL_VIDEOS,
        metrics_fp32=metrics["cache_on"],
        ratios=dict(queries_per_s=runs["cache_on"]["queries_per_s"] / runs["cache_off"]["queries_per_s"]))
    for amp in amp_modes:
        result["ratios"][f"queries_per_s_{amp}_vs_fp32"] = (runs[f"cache_on_{amp}"]["queries_per_s"]
                                                            / runs["cache_on"]["queries_per_s"])
        noise = recall_noise(metrics["cache_on"], metrics[f"cache_on_{amp}"], n_queries)
        result[f"metrics_{amp}_vs_fp32"] = noise
        result[f"metrics_{amp}_within_noise"] = all(v["abs_diff"] <= 2 * v["standard_error"] + 1e-9
                                                    for v in noise.values())
    return result


# ----------------------------------------------------------------------------------------------------
# post section

def val_split(real_annotations, n_queries, seed=0):
    """(annotation rows, video2idx, {name: duration}) of the val split: the real files when available, else a
    synthetic split of the same size (TVR_VAL_QUERIES queries on TVR_VAL_VIDEOS videos); first n_queries rows."""
    if real_annotations:
        rows = load_jsonl(os.path.join(real_annotations, "tvr_val_release.jsonl"))
        video_dur_idx = load_json(os.path.join(real_annotations, "tvr_video2dur_idx.json"))["val"]
        durations = {name: float(dur_idx[0]) for name, dur_idx in video_dur_idx.items()}
        video2idx = {name: int(dur_idx[1]) for name, dur_idx in video_dur_idx.items()}
    else:
        rng = np.random.default_rng(seed)
        durations = {f"synthetic_val_{i:05d}": round(float(d), 2)
                     for i, d in enumerate(rng.uniform(30.0, 150.0, TVR_VAL_VIDEOS))}
        video2idx = {name: i for i, name in enumerate(durations)}
        names = list(durations)
        rows = []
        for desc_id in range(TVR_VAL_QUERIES):
            name = names[int(rng.integers(len(names)))]
            st = float(rng.uniform(0, durations[name] - 3))
            ed = min(durations[name], st + float(rng.uniform(2, 30)))
            rows.append(dict(desc_id=desc_id, desc=f"synthetic query {desc_id}", vid_name=name,
                             duration=durations[name], ts=[round(st, 2), round(ed, 2)],
                             type=str(rng.choice(list(QUERY_TYPES), p=list(QUERY_TYPES.values())))))
    return (rows if n_queries is None else rows[:n_queries]), video2idx, durations


def random_logit_batches(rows, video2idx, durations, batch_size, device, length=100, k=10, clip_length=1.5, seed=0):
    """Per batch of queries: metas as the evaluation dataset gives them (desc_id, desc, vid_name,
    sample_vid_name_list), begin/end logits (B, 1+k, L) with -1e4 on padded clips as the model gives them, and
    first-stage scores (B, k) descending."""
    rng = np.random.default_rng(seed)
    names = list(video2idx)
    n_clips = {name: min(length, max(1, math.ceil(durations[name] / clip_length))) for name in names}
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        metas = []
        for row in chunk:
            candidates = [names[i] for i in rng.choice(len(names), k + 1, replace=False) if names[i] != row["vid_name"]]
            candidates = candidates[:k]
            if rng.random() < 0.5:  # the first stage finds the GT video for about half the queries
                candidates[int(rng.integers(k))] = row["vid_name"]
            metas.append(dict(desc_id=row["desc_id"], desc=row["desc"], vid_name=row["vid_name"],
                              sample_vid_name_list=candidates))
        valid = np.array([[n_clips[name] for name in [m["vid_name"]] + m["sample_vid_name_list"]] for m in metas])
        padded = np.arange(length)[None, None, :] >= valid[:, :, None]
        begin = np.where(padded, -1e4, rng.normal(0, 3, padded.shape)).astype(np.float32)
        end = np.where(padded, -1e4, rng.normal(0, 3, padded.shape)).astype(np.float32)
        first_stage = -np.sort(-rng.uniform(0.05, 1.0, (len(chunk), k)), axis=1).astype(np.float32)
        batches.append(dict(metas=metas, begin=torch.from_numpy(begin).to(device),
                            end=torch.from_numpy(end).to(device), first_stage=torch.from_numpy(first_stage).to(device)))
    return batches


def postprocess(batches, ground_truth, video2idx, fast, nms_thd=0.7, max_before_nms=200, max_after_nms=100,
                clip_length=1.5):
    """Scores -> ranked predictions -> top-100 submission -> NMS -> metrics, timed per stage: score_and_select,
    rows (per-query result dicts), nms (top-100 cut and NMS), metrics.

    fast: what method.evaluation.eval_epoch runs on CPU: valid-pair scores with partial selection of only the
    rows the files read (method.evaluation.ranked_rows_needed), rows built once for all queries, NMS greedy
    steps vectorised over all queries, the evaluator's bulk conversion, the garbage collector paused.
    plain: the original's formulations: full scores with a full sort of max_before_nms rows, rows per batch,
    list NMS query by query, the evaluator converting query by query.
    """
    from method.evaluation import nms_submission, ranked_rows_needed, top_n_submission
    from method.oracle import apply_nms_reference, moment_rows_reference, select_top_n_reference
    from method.scoring import concatenate_ranked, prediction_results, score_batch, score_batch_band, video_rows
    from utils.io_utils import gc_paused
    from utils.standalone_eval import eval_retrieval

    def scored(batch, score, n_ranked, **select):
        return score("general", batch["begin"], batch["end"], tasks=("VCMR", "SVMR", "VR"), max_before_nms=n_ranked,
                     min_pred_l=0, max_pred_l=24, first_stage_scores=batch["first_stage"],
                     use_internal_vr_scores=True, **select)

    times = {}
    clock = time.perf_counter()

    def lap(stage):
        nonlocal clock
        now = time.perf_counter()
        times[stage] = times.get(stage, 0.0) + now - clock
        clock = now

    if fast:
        n_ranked = ranked_rows_needed(EasyDict(nms_thd=nms_thd, max_before_nms=max_before_nms), max_after_nms)
        with gc_paused():
            ranked_batches = [scored(batch, score_batch_band, n_ranked) for batch in batches]
            lap("score_and_select")
            results = prediction_results(ranked_batches, [meta for batch in batches for meta in batch["metas"]],
                                         video2idx, clip_length)
            lap("rows")
            submission = top_n_submission(results, max_after_nms)
            nms = nms_submission(submission, submission, nms_thd, max_before_nms, max_after_nms)
            lap("nms")
            metrics, metrics_nms = (eval_retrieval(s, ground_truth) for s in (submission, nms))
            lap("metrics")
    else:
        results = {"VCMR": [], "SVMR": [], "VR": []}
        for batch in batches:
            ranked = scored(batch, score_batch, max_before_nms, select=select_top_n_reference)
            lap("score_and_select")
            metas = batch["metas"]
            gt_video = np.array([[video2idx[m["vid_name"]]] for m in metas])
            candidate = np.array([[video2idx[name] for name in m["sample_vid_name_list"]] for m in metas])
            svmr, vr, vcmr = ranked["SVMR"], ranked["VR"], ranked["VCMR"]
            rows = {
                "VCMR": moment_rows_reference(np.take_along_axis(candidate, vcmr["candidate"], axis=1), vcmr["st"],
                                              vcmr["ed"], vcmr["score"], clip_length, seconds_dtype=np.float32),
                "SVMR": moment_rows_reference(np.broadcast_to(gt_video, svmr["st"].shape), svmr["st"], svmr["ed"],
                                              svmr["score"], clip_length, seconds_dtype=np.float64),
                "VR": video_rows(np.take_along_axis(candidate, vr["candidate"], axis=1), vr["score"])}
            for task, task_rows in rows.items():
                results[task] += [dict(desc_id=m["desc_id"], desc=m["desc"], predictions=predictions)
                                  for m, predictions in zip(metas, task_rows)]
            lap("rows")
        results["video2idx"] = video2idx
        submission = top_n_submission(results, max_after_nms)
        nms = {"video2idx": video2idx, "VR": submission["VR"]}
        for task in ("SVMR", "VCMR"):
            nms[task] = apply_nms_reference(submission[task], nms_thd, max_before_nms, max_after_nms)
        lap("nms")
        metrics, metrics_nms = (eval_retrieval(s, ground_truth, bulk_conversion=False) for s in (submission, nms))
        lap("metrics")
    times["total"] = sum(times.values())
    return times, (submission, nms, metrics, metrics_nms)


def same_outputs(a, b):
    """Equal submissions, NMS submissions and metrics (metrics through JSON, where NaN equals NaN)."""
    submission_a, nms_a, *metrics_a = a
    submission_b, nms_b, *metrics_b = b
    return submission_a == submission_b and nms_a == nms_b and json.dumps(metrics_a) == json.dumps(metrics_b)


def run_post_section(sizes, real_annotations, device):
    rows, video2idx, durations = val_split(real_annotations, sizes["post_queries"])
    batches = random_logit_batches(rows, video2idx, durations, sizes["eval_query_bsz"], device)
    runs, outputs = {}, {}
    for key, fast in (("plain", False), ("fast", True)):
        logger.info("post: %s", key)
        runs[key], outputs[key] = postprocess(batches, rows, video2idx, fast)
    plain, fast = runs["plain"], runs["fast"]
    return dict(
        runs=runs, n_queries=len(rows), n_videos=len(video2idx),
        annotations=real_annotations or "synthetic (TVR val size)",
        identical_outputs=same_outputs(outputs["plain"], outputs["fast"]),
        ratios=dict(total_time_speedup=plain["total"] / fast["total"],
                    score_and_select_speedup=plain["score_and_select"] / fast["score_and_select"],
                    nms_speedup=plain["nms"] / fast["nms"]))


# ----------------------------------------------------------------------------------------------------
# report

def check_targets(results):
    checks = []
    for (section, name), (comparison, bound) in TARGETS.items():
        if section in results:
            value = results[section]["ratios"][name]
            ok = value <= bound if comparison == "<=" else value >= bound
            checks.append(dict(section=section, ratio=name, value=value, target=f"{comparison} {bound}", ok=ok))
    if "train" in results:
        checks.append(dict(section="train", ratio="losses match (first step)", value=None, target="equal",
                           ok=results["train"]["losses_match_first_step"]))
    if "eval" in results:
        checks.append(dict(section="eval", ratio="identical predictions cache on/off", value=None, target="equal",
                           ok=results["eval"]["identical_predictions"]))
    if "post" in results:
        checks.append(dict(section="post", ratio="identical outputs fast/plain", value=None, target="equal",
                           ok=results["post"]["identical_outputs"]))
    return checks


def _gib(n_bytes):
    return f"{n_bytes / 2 ** 30:.2f} GiB"


def format_table(results):
    lines = []
    meta = results["meta"]
    lines.append(f"CONQUER benchmark {meta['date']} | {meta['cpu']} ({meta['cpu_count']} CPUs, "
                 f"{meta['torch_threads']} torch threads) | device {meta['device']}"
                 + (f" ({meta['gpu']})" if "gpu" in meta else "") + f" | torch {meta['torch']}"
                 + f" | load {meta['load_average_start'][0]:.2f} -> {meta['load_average_end'][0]:.2f}"
                 + (" | QUICK sizes" if meta["quick"] else ""))
    peak = results["peak"]
    lines.append("matmul peak: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s (n={meta['matmul_n'][k]})"
                                             for k, v in peak.items()))
    for amp, skipped in meta["amp_skipped"].items():
        projections = [f"{skipped[key]:.0f} s {label}" for key, label in (
            ("projected_train_step_s", "per training step"), ("projected_eval_s_per_query", "per query"))
            if key in skipped]
        lines.append(f"{amp} not measured: {skipped['reason']}"
                     + (f"; at its matmul peak it would take {', '.join(projections)}" if projections else ""))
    row = "{:<44}{:>16}{:>16}{:>10}"
    if "train" in results:
        t = results["train"]
        plain, light = t["runs"]["plain"], t["runs"]["memory_light"]
        lines += ["", f"train step (bsz {results['sizes']['bsz']} x {1 + results['sizes']['neg_video_num']} videos), "
                      f"{t['flops_per_step'] / 1e12:.3f} TFLOP/step",
                  row.format("", "plain", "memory-light", "ratio"),
                  row.format("median step time", f"{plain['median_step_s']:.2f} s", f"{light['median_step_s']:.2f} s",
                             f"{t['ratios']['step_time']:.2f}"),
                  row.format(f"peak memory ({light['memory_kind']})", _gib(plain["peak_memory_bytes"]),
                             _gib(light["peak_memory_bytes"]), f"{t['ratios']['peak_memory']:.2f}"),
                  row.format("achieved fraction of the fp32 matmul peak",
                             f"{plain['achieved_fraction_of_matmul_peak']:.2f}",
                             f"{light['achieved_fraction_of_matmul_peak']:.2f}", ""),
                  row.format("loss, first step", f"{plain['losses'][0]:.6f}", f"{light['losses'][0]:.6f}",
                             "match" if t["losses_match_first_step"] else "DIFFER")]
        for key, run in t["runs"].items():
            if key.startswith("memory_light_"):
                amp = run["amp"]
                lines.append(row.format(f"{amp} memory-light: step time / peak memory", f"{run['median_step_s']:.2f} s",
                                        _gib(run["peak_memory_bytes"]),
                                        f"{t['ratios'][f'step_time_{amp}_vs_fp32']:.2f}"))
    if "eval" in results:
        e = results["eval"]
        off, on = e["runs"]["cache_off"], e["runs"]["cache_on"]
        lines += ["", f"evaluation ({e['n_queries']} queries, {e['distinct_videos']} videos, "
                      f"{e['candidate_slots_per_video']:.0f} candidate slots per video; GFLOP/query: "
                      f"uncached {off['flops_per_query'] / 1e9:.1f}, cached {on['flops_per_query'] / 1e9:.1f})",
                  row.format("", "cache off", "cache on", "ratio"),
                  row.format("queries/s (fp32)", f"{off['queries_per_s']:.3f}", f"{on['queries_per_s']:.3f}",
                             f"{e['ratios']['queries_per_s']:.2f}"),
                  row.format("achieved fraction of the fp32 matmul peak",
                             f"{off['achieved_fraction_of_matmul_peak']:.2f}",
                             f"{on['achieved_fraction_of_matmul_peak']:.2f}", ""),
                  row.format("identical predictions", "", "", "yes" if e["identical_predictions"] else "NO"),
                  f"video cache: {e['cache_bytes'] / 2 ** 20:.1f} MiB here, {_gib(e['cache_bytes_tvr_val'])} for the "
                  f"{TVR_VAL_VIDEOS} TVR val videos"]
        for key, run in e["runs"].items():
            if key.startswith("cache_on_"):
                amp = run["amp"]
                worst = max(e[f"metrics_{amp}_vs_fp32"].values(), key=lambda v: v["abs_diff"] - 2 * v["standard_error"])
                lines.append(row.format(f"{amp} cached queries/s (vs fp32 cached)", f"{run['queries_per_s']:.3f}",
                                        "", f"{e['ratios'][f'queries_per_s_{amp}_vs_fp32']:.2f}"))
                lines.append(f"  {amp} metrics within noise of fp32: {e[f'metrics_{amp}_within_noise']} (largest "
                             f"|diff| {worst['abs_diff']:.2f} pts, standard error {worst['standard_error']:.2f})")
    if "post" in results:
        p = results["post"]
        lines += ["", f"post-processing ({p['n_queries']} queries, {p['n_videos']} videos, {p['annotations']})",
                  row.format("", "plain", "fast", "speedup")]
        for stage in ("score_and_select", "rows", "nms", "metrics", "total"):
            plain_s, fast_s = p["runs"]["plain"][stage], p["runs"]["fast"][stage]
            lines.append(row.format(stage, f"{plain_s:.2f} s", f"{fast_s:.2f} s", f"{plain_s / fast_s:.2f}"))
        lines.append(row.format("identical outputs", "", "", "yes" if p["identical_outputs"] else "NO"))
    lines += ["", "targets:"]
    for check in results["targets"]:
        value = "" if check["value"] is None else f"{check['value']:.3f} "
        lines.append(f"  [{'ok' if check['ok'] else 'MISSED'}] {check['section']} {check['ratio']}: {value}"
                     f"(target {check['target']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# CLI

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every code path")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="benchmark_results/benchmark.json", help="JSON results file")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--amp", nargs="*", default=None, choices=["bf16", "fp16"],
                        help="AMP modes measured besides fp32 (default: bf16 on the CPU, bf16 and fp16 on CUDA)")
    parser.add_argument("--force_amp", action="store_true",
                        help="measure the AMP modes even where their matmuls are slower than fp32 (skipped otherwise)")
    parser.add_argument("--real_annotations", default=DEFAULT_REAL_ANNOTATIONS if os.path.isdir(
        DEFAULT_REAL_ANNOTATIONS) else None, help="folder with tvr_val_release.jsonl and tvr_video2dur_idx.json for "
                        "the post section (default: ../shared/data/tvr if present, else a synthetic split)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to torch")
    if args.amp is None:
        args.amp = ["bf16", "fp16"] if args.device == "cuda" else ["bf16"]
    for amp in args.amp:
        try:
            check_amp(amp, args.device)
        except ValueError as e:
            parser.error(f"--amp: {e}")
    if args.real_annotations and not os.path.isfile(os.path.join(args.real_annotations, "tvr_val_release.jsonl")):
        parser.error(f"--real_annotations {args.real_annotations}: no tvr_val_release.jsonl there")
    return args


def run(args):
    device = torch.device(args.device)
    sizes = dict(SIZES["quick" if args.quick else "paper"])
    results = {"meta": dict(machine_info(device), quick=args.quick, amp_modes=args.amp), "sizes": sizes}
    peak_dtypes = {"fp32": torch.float32, **{amp: AMP_DTYPES[amp] for amp in args.amp}}
    matmul_n = sizes["matmul_n"] * (4 if device.type == "cuda" else 1)
    results["peak"], results["meta"]["matmul_n"] = {}, {}
    for name, dtype in peak_dtypes.items():
        results["peak"][name], results["meta"]["matmul_n"][name] = matmul_peak_flops(device, dtype, matmul_n)
    amp_modes, amp_skipped = [], {}
    for amp in args.amp:
        speed = results["peak"][amp] / results["peak"]["fp32"]
        if speed < 1 and not (args.quick or args.force_amp):
            amp_skipped[amp] = dict(matmul_speed_vs_fp32=speed, reason=(
                f"{amp} matmuls run at {speed:.3f}x the fp32 speed on this {device.type} (no native {amp} "
                f"instructions), so autocast can only slow the model down; --force_amp runs it anyway"))
        else:
            amp_modes.append(amp)
    results["meta"]["amp_measured"], results["meta"]["amp_skipped"] = amp_modes, amp_skipped
    for section in args.sections:
        start = time.perf_counter()
        load = os.getloadavg()[0]
        if section == "train":
            results["train"] = run_train_section(sizes, device, amp_modes)
        elif section == "eval":
            results["eval"] = run_eval_section(sizes, device, amp_modes)
        else:
            results["post"] = run_post_section(sizes, args.real_annotations, device)
        results[section].update(seconds=time.perf_counter() - start, load_average_start=load,
                                load_average_end=os.getloadavg()[0])
    for amp, skipped in amp_skipped.items():  # what the skipped modes would cost at their matmul peak
        if "train" in results:
            skipped["projected_train_step_s"] = results["train"]["flops_per_step"] / results["peak"][amp]
        if "eval" in results:
            skipped["projected_eval_s_per_query"] = (results["eval"]["runs"]["cache_on"]["flops_per_query"]
                                                     / results["peak"][amp])
    for section in ("train", "eval"):
        for run in results.get(section, {}).get("runs", {}).values():
            dtype = "fp32" if run["amp"] == "off" else run["amp"]
            run["achieved_fraction_of_matmul_peak"] = run["achieved_flops_per_s"] / results["peak"][dtype]
    results["meta"]["load_average_end"] = list(os.getloadavg())
    results["targets"] = check_targets(results)
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.worker is not None:
        print(WORKER_RESULT_PREFIX + json.dumps(train_worker(json.loads(args.worker))), flush=True)
        return None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    results = run(args)
    save_json(results, args.out, save_pretty=True)
    print(format_table(results))
    print(f"\nresults written to {args.out}")
    return results


if __name__ == "__main__":
    main()
