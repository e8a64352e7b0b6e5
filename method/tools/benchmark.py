"""Benchmark: each fast path of the pipeline against its plain formulation, measured in one run on this machine.

    python -m method.tools.benchmark                        # every section at full size
    python -m method.tools.benchmark --quick                # every section at tiny sizes: a smoke run
    python -m method.tools.benchmark --device cuda --sections train eval --out benchmark_results/gpu.json

Sections (`--sections`, default all):

* train: one optimizer step (`method.optimization.training_step`, the step train.py takes) at the paper
  config (H 768, Dv 4352, L 100, Lq 30, bsz 16 x (1 + 3 negatives) = 64 videos) on a batch from the training
  dataset of a generated corpus; memory-light (decomposed QAL, method/memory_light.py) vs plain (materialised
  QAL concat, plain ops: the original's formulation), each in a fresh process: median step time, peak memory
  (peak RSS on the CPU, torch.cuda.max_memory_allocated on CUDA), the losses, and the FLOPs of the step.
  Plus the AMP modes of the device on the memory-light model.
* eval: queries/s of `method.evaluation.compute_predictions` on a generated corpus whose video reuse matches
  TVR val (~55 candidate slots per video), video cache on vs off (identical predictions), and the AMP modes
  with the cache on (their metrics next to fp32's, with the binomial standard error as the noise).
* every module method/tools/benchmark_<name>.py is section <name> ("Section modules" below): post
  (post-processing, production vs the original's formulations), corpus (the corpus builder), extract (video
  feature extraction), and those added later.

The machine's matmul peak (fp32 and each AMP dtype) is measured in the same run; FLOPs are counted with torch's
FlopCounterMode during a warm-up pass, giving the achieved fraction of the peak. An AMP mode whose matmuls are
slower than fp32 (bf16 on a CPU without AVX512-BF16 or AMX) is not run at full sizes (--force_amp runs it).
Output: a table on stdout and JSON at --out (written atomically). The run checks its own results (every
ratio, rate, time and size finite and positive) and exits with status 1 when one is not.

A section module that sets SMOKE_BY_DEFAULT = False (long_videos: it trains eight runs) is left out of a --quick run
unless named in --sections.

Section modules expose `run(args) -> dict` (JSON-serialisable; may hold "targets": {name: bool} and "ratios")
and `table_rows(results) -> list[str]`; optionally `add_arguments(parser)` for flags named --<name>_...,
and REQUIRES = {python module: setup.py extra}, checked before any section runs. They import only core
dependencies at module level. `args` carries the flags plus `args.device` (torch.device) and `args.work_dir`
(a temporary folder of this run).
"""
import argparse
import datetime
import importlib
import importlib.util
import json
import logging
import math
import os
import pkgutil
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from easydict import EasyDict
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from method.amp import AMP_DTYPES, autocast_context, check_amp, make_grad_scaler
from method.checkpoint import build_model
from method.dataset import StartEndDataset, prepare_batch_inputs, start_end_collate
from method.optimization import build_optimizer, training_step
from utils.data_config import load_data_config
from utils.errors import ConquerError, run_cli
from utils.io_utils import load_json, save_json
from utils.run_dir import REPO_ROOT
from utils.synthetic_tvr import generate_corpus
from utils.tvr_format import MAX_PREDICTIONS_PER_QUERY, TASKS

logger = logging.getLogger(__name__)

DEFAULT_REAL_ANNOTATIONS = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "tvr")
CORE_SECTIONS = ("train", "eval")
SECTION_ORDER = ("train", "eval", "post")  # then the other section modules, by name
WORKER_RESULT_PREFIX = "BENCHMARK_WORKER_RESULT "
TVR_VAL_VIDEOS = 2179
CANDIDATES = 10  # first-stage videos re-ranked per query (--max_vcmr_video)

# Settings that differ from train.py's defaults; everything else is config/options.py's default.
SIZES = {
    "paper": dict(model_config="model_config.json", bsz=16, train_warmup=1, train_steps=3, eval_videos=12,
                  eval_queries=60, eval_query_bsz=5, matmul_n=2048),
    "quick": dict(model_config="model_config_tiny.json", visual_dim=24, text_dim=16, query_dim=16, max_ctx_len=20,
                  max_desc_len=10, bsz=2, train_warmup=1, train_steps=2, eval_videos=10, eval_queries=20,
                  eval_query_bsz=5, matmul_n=256),
}
TRAIN_CONFIGS = {"plain": dict(qal_impl="plain", memory_light=False),
                 "memory_light": dict(qal_impl="decomposed", memory_light=True)}


class BenchmarkError(ConquerError):
    """A section cannot run or failed; the message names the section and what went wrong."""


# ----------------------------------------------------------------------------------------------------
# production settings, data and model

def production_options(sizes, device, **overrides):
    """train.py's options: config/options.py's defaults, then `sizes` and `overrides`; the paper's evaluation
    settings (general similarity with the first-stage video scores)."""
    from config.options import BaseOptions
    options = BaseOptions()
    options.initialize()
    opt = EasyDict(vars(options.parser.parse_args([])))
    model_cfg = load_json(os.path.join(REPO_ROOT, "config", sizes["model_config"]))
    opt.update({key: value for key, value in sizes.items() if key in opt}, use_interal_vr_scores=True,
               hidden_dim=model_cfg["bert_config"]["hidden_size"], num_workers=0, device=device, **overrides)
    return opt, model_cfg


def model_corpus(sizes, opt, out_dir):
    """Generated corpus at the model's sizes: bsz training queries, and a val split of eval_queries queries on
    eval_videos videos (each query: its GT video + 10 candidates) -> path of its data config."""
    max_duration = opt.clip_length * opt.max_ctx_len  # TVR: 60-150 s videos, capped at 100 clips
    return generate_corpus(out_dir, n_train_videos=max(10, 2 * opt.bsz), n_train_queries=opt.bsz,
                           n_val_videos=sizes["eval_videos"], n_val_queries=sizes["eval_queries"], n_test_videos=10,
                           n_test_queries=5, visual_dim=opt.visual_dim, text_dim=opt.text_dim,
                           query_dim=opt.query_dim, min_duration=0.4 * max_duration, max_duration=max_duration,
                           max_clips=opt.max_ctx_len, seed=0)


def dataset_for(opt, data_config, is_eval, mode):
    return StartEndDataset(load_data_config(data_config), max_ctx_len=opt.max_ctx_len, max_desc_len=opt.max_desc_len,
                           clip_length=opt.clip_length, ctx_mode=opt.ctx_mode, is_eval=is_eval, mode=mode,
                           neg_video_num=opt.neg_video_num, use_extend_pool=opt.use_extend_pool,
                           inference_top_k=opt.max_vcmr_video)


def first_batch(dataset, n, device):
    """The model inputs of items 0..n-1, collated and moved as the training and evaluation loaders do."""
    return prepare_batch_inputs(start_end_collate([dataset[i] for i in range(n)])[1], device)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(result of fn(), seconds), the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn):
    """(result of fn(), FLOPs of its matmuls, convolutions and attention, counted by FlopCounterMode). The
    counter has no formula for the CPU's fused attention kernel: its two matmuls are counted as for the others."""
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops})
    with counter:
        result = fn()
    return result, counter.get_total_flops()


def matmul_seconds(a, b, device):
    return timed(lambda: a @ b, device)[1]


def matmul_peak_flops(device, dtype, n, max_matmul_s=1.0, budget_s=5.0, repeats=5):
    """(best FLOP/s of an n x n x n matmul in `dtype`, n used). n is halved until one matmul takes at most
    `max_matmul_s` (a dtype without native instructions can be 10-100x slower than fp32)."""
    g = torch.Generator().manual_seed(0)

    def operands(size):
        return [torch.randn(size, size, generator=g).to(device=device, dtype=dtype) for _ in range(2)]

    probe = operands(min(n, 512))
    timed(lambda: probe[0] @ probe[1], device)  # warm-up: kernel selection, thread pool
    rate = 2 * probe[0].shape[0] ** 3 / max(timed(lambda: probe[0] @ probe[1], device)[1], 1e-9)
    while n > 512 and 2 * n ** 3 / rate > max_matmul_s:
        n //= 2
    a, b = operands(n)
    timed(lambda: a @ b, device)
    times = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        times.append(timed(lambda: a @ b, device)[1])
    return 2 * n ** 3 / min(times), n


# ----------------------------------------------------------------------------------------------------
# train section: one fresh process per configuration

def train_worker(spec):
    """In a fresh process: the model, optimizer and one training batch as train.py builds them, then warm-up
    and timed `training_step`s (FLOPs counted in the first). Returns times, losses and memory."""
    device = torch.device(spec["device"])
    opt, model_cfg = production_options(spec["sizes"], device, amp=spec["amp"],
                                        qal_impl=TRAIN_CONFIGS[spec["config"]]["qal_impl"])
    random.seed(spec["seed"])  # the same negatives in every configuration
    batch = first_batch(dataset_for(opt, spec["data_config"], is_eval=False, mode="train"), opt.bsz, device)
    torch.manual_seed(spec["seed"])
    model = build_model(model_cfg, opt).to(device).train()
    model.set_memory_light(TRAIN_CONFIGS[spec["config"]]["memory_light"])
    optimizer, scaler = build_optimizer(model, opt), make_grad_scaler(opt.amp, device)
    torch.manual_seed(spec["seed"] + 1)  # the same dropout masks in every configuration
    synchronize(device)
    memory_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss_bytes()

    def step():
        return training_step(model, batch, optimizer, scaler, opt.amp, opt.grad_clip)["loss_overall"]
    (loss, seconds), flops = count_flops(lambda: timed(step, device))
    times, losses = [seconds], [loss]
    for _ in range(spec["sizes"]["train_warmup"] + spec["sizes"]["train_steps"] - 1):
        loss, seconds = timed(step, device)
        times.append(seconds)
        losses.append(loss)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    timed_steps = times[spec["sizes"]["train_warmup"]:]
    return dict(config=spec["config"], amp=spec["amp"], step_times_s=timed_steps,
                warmup_times_s=times[:spec["sizes"]["train_warmup"]], median_step_s=float(np.median(timed_steps)),
                flops_per_step=flops, peak_memory_bytes=peak, memory_before_first_step_bytes=memory_before,
                losses=losses, memory_kind="cuda_max_memory_allocated" if device.type == "cuda" else "peak_rss")


def current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_train_worker(spec):
    command = [sys.executable, "-m", "method.tools.benchmark", "--worker", json.dumps(spec)]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(WORKER_RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        raise BenchmarkError(f"train section: the worker for {spec['config']} (amp {spec['amp']}) failed with exit "
                             f"code {completed.returncode}:\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1][len(WORKER_RESULT_PREFIX):])


def run_train(args, sizes, data_config):
    runs = {}
    for name, amp in [("plain", "off"), ("memory_light", "off")] + [("memory_light", a) for a in args.amp_measured]:
        key = name if amp == "off" else f"{name}_{amp}"
        logger.info("train: %s", key)
        runs[key] = run_train_worker(dict(config=name, amp=amp, device=str(args.device), sizes=sizes, seed=0,
                                          data_config=data_config))
    plain, light = runs["plain"], runs["memory_light"]
    loss_rel_diff = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(plain["losses"], light["losses"])]
    ratios = dict(step_time=light["median_step_s"] / plain["median_step_s"],
                  peak_memory=light["peak_memory_bytes"] / plain["peak_memory_bytes"])
    for amp in args.amp_measured:
        run = runs[f"memory_light_{amp}"]
        ratios[f"step_time_{amp}_vs_fp32"] = run["median_step_s"] / light["median_step_s"]
        ratios[f"peak_memory_{amp}_vs_fp32"] = run["peak_memory_bytes"] / light["peak_memory_bytes"]
    for run in runs.values():
        run["achieved_flops_per_s"] = run["flops_per_step"] / run["median_step_s"]
    return dict(runs=runs, flops_per_step=light["flops_per_step"], loss_rel_diff_per_step=loss_rel_diff,
                losses_match_first_step=loss_rel_diff[0] <= 1e-5, ratios=ratios,
                targets={"peak memory <= 0.5x plain": ratios["peak_memory"] <= 0.5,
                         "step time <= 1.0x plain": ratios["step_time"] <= 1.0,
                         "same loss as plain (first step)": loss_rel_diff[0] <= 1e-5})


# ----------------------------------------------------------------------------------------------------
# eval section

def recall_noise(metrics_a, metrics_b, n_queries):
    """Per recall key: |a - b| and the binomial standard error (percentage points) of a recall over n queries."""
    out = {}
    for task in TASKS:
        for key, a in metrics_a.get(task, {}).items():
            p = min(max((a + metrics_b[task][key]) / 200.0, 0.0), 1.0)
            out[f"{task} {key}"] = dict(abs_diff=abs(a - metrics_b[task][key]),
                                        standard_error=100.0 * math.sqrt(p * (1 - p) / n_queries))
    return out


def run_eval(args, sizes, data_config):
    from method.evaluation import VideoEncodingCache, compute_predictions, top_n_submission
    from utils.standalone_eval import eval_retrieval

    device = args.device
    opt, model_cfg = production_options(sizes, device)
    dataset = dataset_for(opt, data_config, is_eval=True, mode="val")
    n_queries, n_videos = len(dataset), 1 + opt.max_vcmr_video
    distinct_videos = len({name for names, _ in dataset.eval_candidates for name in names})
    torch.manual_seed(0)
    model = build_model(model_cfg, opt).to(device).eval()
    for index in range(n_queries):  # warm-up: every feature read once (page cache)
        dataset[index]
    one_query = first_batch(dataset, 1, device)
    with torch.no_grad():  # warm-up of the kernels of every precision; FLOPs of one query, of one video
        for amp in ["off"] + args.amp_measured:
            with autocast_context(amp, device):
                model.get_pred_from_raw_query(one_query)
        flops_uncached = count_flops(lambda: model.get_pred_from_raw_query(one_query))[1]
        per_video = count_flops(lambda: model.encode_videos(
            {m: {k: v[0, :1] for k, v in one_query[m].items()} for m in ("visual", "sub")}))[1]
    flops_cached = flops_uncached - (n_videos - distinct_videos / n_queries) * per_video
    runs, predictions = {}, {}
    for key, video_cache, amp in [("cache_off", False, "off"), ("cache_on", True, "off")] + [
            (f"cache_on_{amp}", True, amp) for amp in args.amp_measured]:
        logger.info("eval: %s", key)
        run_opt = EasyDict(opt, video_cache=video_cache, amp=amp)
        predictions[key], seconds = timed(lambda: compute_predictions(model, dataset, run_opt, TASKS), device)
        flops = flops_cached if video_cache else flops_uncached
        runs[key] = dict(seconds=seconds, queries_per_s=n_queries / seconds, video_cache=video_cache, amp=amp,
                         flops_per_query=flops, achieved_flops_per_s=flops * n_queries / seconds)
    with torch.no_grad():
        cache = VideoEncodingCache.build(model, dataset, opt, device, batch_size=opt.eval_query_bsz * n_videos)
    metrics = {key: eval_retrieval(top_n_submission(value, MAX_PREDICTIONS_PER_QUERY), dataset.query_data,
                                   use_desc_type=False) for key, value in predictions.items()}
    identical = predictions["cache_on"] == predictions["cache_off"]
    ratios = dict(queries_per_s=runs["cache_on"]["queries_per_s"] / runs["cache_off"]["queries_per_s"])
    result = dict(runs=runs, n_queries=n_queries, distinct_videos=distinct_videos,
                  candidate_slots_per_video=n_queries * n_videos / distinct_videos, identical_predictions=identical,
                  cache_bytes=cache.nbytes, cache_bytes_tvr_val=cache.nbytes / len(cache.video_names) * TVR_VAL_VIDEOS,
                  metrics_fp32=metrics["cache_on"], ratios=ratios,
                  targets={"queries/s >= 1.5x uncached": ratios["queries_per_s"] >= 1.5,
                           "identical predictions cache on/off": identical})
    for amp in args.amp_measured:
        ratios[f"queries_per_s_{amp}_vs_fp32"] = runs[f"cache_on_{amp}"]["queries_per_s"] / runs["cache_on"][
            "queries_per_s"]
        noise = recall_noise(metrics["cache_on"], metrics[f"cache_on_{amp}"], n_queries)
        result[f"metrics_{amp}_vs_fp32"] = noise
        result[f"metrics_{amp}_within_noise"] = all(v["abs_diff"] <= 2 * v["standard_error"] + 1e-9
                                                    for v in noise.values())
    return result


# ----------------------------------------------------------------------------------------------------
# the core sections' table rows

ROW = "{:<44}{:>16}{:>16}{:>10}"


def _gib(n_bytes):
    return f"{n_bytes / 2 ** 30:.2f} GiB"


def train_rows(t):
    plain, light = t["runs"]["plain"], t["runs"]["memory_light"]
    lines = [f"train step ({light['flops_per_step'] / 1e12:.3f} TFLOP/step)",
             ROW.format("", "plain", "memory-light", "ratio"),
             ROW.format("median step time", f"{plain['median_step_s']:.2f} s", f"{light['median_step_s']:.2f} s",
                        f"{t['ratios']['step_time']:.2f}"),
             ROW.format(f"peak memory ({light['memory_kind']})", _gib(plain["peak_memory_bytes"]),
                        _gib(light["peak_memory_bytes"]), f"{t['ratios']['peak_memory']:.2f}"),
             ROW.format("achieved fraction of the matmul peak", f"{plain['achieved_fraction_of_matmul_peak']:.2f}",
                        f"{light['achieved_fraction_of_matmul_peak']:.2f}", ""),
             ROW.format("loss, first step", f"{plain['losses'][0]:.6f}", f"{light['losses'][0]:.6f}",
                        "match" if t["losses_match_first_step"] else "DIFFER")]
    for run in t["runs"].values():
        if run["amp"] != "off":
            ratio = t["ratios"][f"step_time_{run['amp']}_vs_fp32"]
            lines.append(ROW.format(f"{run['amp']} memory-light: step time / peak memory",
                                    f"{run['median_step_s']:.2f} s", _gib(run["peak_memory_bytes"]), f"{ratio:.2f}"))
    return lines


def eval_rows(e):
    off, on = e["runs"]["cache_off"], e["runs"]["cache_on"]
    lines = [f"evaluation ({e['n_queries']} queries, {e['distinct_videos']} videos, {e['candidate_slots_per_video']:.0f}"
             f" candidate slots per video; GFLOP/query uncached {off['flops_per_query'] / 1e9:.1f}, cached "
             f"{on['flops_per_query'] / 1e9:.1f})",
             ROW.format("", "cache off", "cache on", "ratio"),
             ROW.format("queries/s (fp32)", f"{off['queries_per_s']:.3f}", f"{on['queries_per_s']:.3f}",
                        f"{e['ratios']['queries_per_s']:.2f}"),
             ROW.format("achieved fraction of the fp32 matmul peak", f"{off['achieved_fraction_of_matmul_peak']:.2f}",
                        f"{on['achieved_fraction_of_matmul_peak']:.2f}", ""),
             ROW.format("identical predictions", "", "", "yes" if e["identical_predictions"] else "NO"),
             f"video cache: {e['cache_bytes'] / 2 ** 20:.1f} MiB here, {_gib(e['cache_bytes_tvr_val'])} for the "
             f"{TVR_VAL_VIDEOS} TVR val videos"]
    for run in e["runs"].values():
        if run["amp"] != "off":
            amp = run["amp"]
            worst = max(e[f"metrics_{amp}_vs_fp32"].values(), key=lambda v: v["abs_diff"] - 2 * v["standard_error"])
            lines += [ROW.format(f"{amp} cached queries/s (vs fp32 cached)", f"{run['queries_per_s']:.3f}", "",
                                 f"{e['ratios'][f'queries_per_s_{amp}_vs_fp32']:.2f}"),
                      f"  {amp} metrics within noise of fp32: {e[f'metrics_{amp}_within_noise']} (largest |diff| "
                      f"{worst['abs_diff']:.2f} pts, standard error {worst['standard_error']:.2f})"]
    return lines


CORE_TABLE_ROWS = {"train": train_rows, "eval": eval_rows}


# ----------------------------------------------------------------------------------------------------
# sections, machine, checks

def section_modules():
    """{section name: imported module} of every method/tools/benchmark_<name>.py."""
    modules = {}
    for info in pkgutil.iter_modules([os.path.dirname(os.path.abspath(__file__))]):
        if info.name.startswith("benchmark_"):
            try:
                modules[info.name[len("benchmark_"):]] = importlib.import_module(f"method.tools.{info.name}")
            except ImportError as e:
                raise BenchmarkError(f"section module method/tools/{info.name}.py cannot be imported: {e}") from None
    return modules


def check_requirements(sections, modules):
    for section in sections:
        for module, extra in getattr(modules.get(section), "REQUIRES", {}).items():
            if importlib.util.find_spec(module) is None:
                raise BenchmarkError(f"--sections {section}: needs the Python module {module!r}, which is not "
                                     f"installed; pip install -e '.[{extra}]'")


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


def measure_peaks(args, sizes, results):
    """Matmul peak per dtype; which AMP modes are measured (those not slower than fp32, unless forced)."""
    n = sizes["matmul_n"] * (4 if args.device.type == "cuda" else 1)
    dtypes = {"fp32": torch.float32, **{amp: AMP_DTYPES[amp] for amp in args.amp}}
    peaks = {name: matmul_peak_flops(args.device, dtype, n) for name, dtype in dtypes.items()}
    results["peak"] = {name: flops for name, (flops, _) in peaks.items()}
    results["meta"]["matmul_n"] = {name: used for name, (_, used) in peaks.items()}
    args.amp_measured, skipped = [], {}
    for amp in args.amp:
        speed = results["peak"][amp] / results["peak"]["fp32"]
        if speed < 1 and not (args.quick or args.force_amp):
            skipped[amp] = (f"{amp} matmuls run at {speed:.3f}x the fp32 speed on this {args.device.type} (no "
                            f"native {amp} instructions), so autocast only slows the model down; --force_amp runs it")
        else:
            args.amp_measured.append(amp)
    results["meta"].update(amp_measured=args.amp_measured, amp_skipped=skipped)


def sanity_problems(results, sections):
    """What makes a run's results implausible: a section missing, or a ratio, rate (*_per_s), time (*_s) or
    size (*_bytes) that is not a finite positive number."""
    problems = [f"{section}: no results" for section in sections if not isinstance(results.get(section), dict)]

    def walk(value, path, checked):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}", checked or key == "ratios" or key.endswith(("_per_s", "_s", "_bytes")))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]", checked)
        elif checked and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{path} = {value}: expected a finite positive number")

    for section in sections:
        walk(results.get(section, {}), section, False)
    return problems


def format_table(results, modules):
    meta = results["meta"]
    lines = [f"CONQUER benchmark {meta['date']} | {meta['cpu']} ({meta['cpu_count']} CPUs, {meta['torch_threads']} "
             f"torch threads) | device {meta['device']}" + (f" ({meta['gpu']})" if "gpu" in meta else "")
             + f" | torch {meta['torch']} | load {meta['load_average_start'][0]:.2f} -> "
             f"{meta['load_average_end'][0]:.2f}" + (" | QUICK sizes" if meta["quick"] else "")]
    if "peak" in results:
        lines.append("matmul peak: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s (n={meta['matmul_n'][k]})"
                                                 for k, v in results["peak"].items()))
        lines += [f"{amp} not measured: {reason}" for amp, reason in meta["amp_skipped"].items()]
    for section in meta["sections"]:
        rows = CORE_TABLE_ROWS.get(section) or modules[section].table_rows
        lines += [""] + rows(results[section])
    lines += ["", "targets:"] + [f"  [{'ok' if ok else 'MISSED'}] {name}" for name, ok in results["targets"].items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# CLI

def parse_args(argv, modules):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sections = sorted(list(CORE_SECTIONS) + list(modules),
                      key=lambda name: (SECTION_ORDER + (name,)).index(name))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every code path")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="benchmark_results/benchmark.json", help="JSON results file")
    parser.add_argument("--sections", nargs="+", default=None, choices=sections, metavar="SECTION",
                        help=f"sections to run, of {', '.join(sections)} (default: all; with --quick, those "
                             "whose module does not set SMOKE_BY_DEFAULT = False)")
    parser.add_argument("--amp", nargs="*", default=None, choices=["bf16", "fp16"],
                        help="AMP modes measured besides fp32 (default: bf16 on the CPU, bf16 and fp16 on CUDA)")
    parser.add_argument("--force_amp", action="store_true",
                        help="measure the AMP modes even where their matmuls are slower than fp32 (skipped otherwise)")
    parser.add_argument("--real_annotations", default=DEFAULT_REAL_ANNOTATIONS if os.path.isdir(
        DEFAULT_REAL_ANNOTATIONS) else None, help="folder with the real TVR annotations (tvr_val_release.jsonl, "
                        "tvr_test_public_release.jsonl, tvr_video2dur_idx.json) for the post section (default: "
                        "../shared/data/tvr if present, else a synthetic split of the same size)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    for module in modules.values():
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.sections is None:
        args.sections = [name for name in sections
                         if not (args.quick and not getattr(modules.get(name), "SMOKE_BY_DEFAULT", True))]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to torch")
    args.amp = (["bf16", "fp16"] if args.device == "cuda" else ["bf16"]) if args.amp is None else args.amp
    for amp in args.amp:
        try:
            check_amp(amp, args.device)
        except ConquerError as e:
            parser.error(str(e))
    if args.real_annotations and not os.path.isfile(os.path.join(args.real_annotations, "tvr_val_release.jsonl")):
        parser.error(f"--real_annotations {args.real_annotations}: no tvr_val_release.jsonl there")
    args.device = torch.device(args.device)
    return args


def run(args, modules):
    sizes = dict(SIZES["quick" if args.quick else "paper"])
    results = {"meta": dict(machine_info(args.device), quick=args.quick, sections=args.sections), "sizes": sizes}
    if {"train", "eval"} & set(args.sections):
        measure_peaks(args, sizes, results)
    with tempfile.TemporaryDirectory(prefix="conquer_benchmark_") as args.work_dir:
        if {"train", "eval"} & set(args.sections):
            opt, _ = production_options(sizes, args.device)
            data_config = model_corpus(sizes, opt, os.path.join(args.work_dir, "model_corpus"))
        for section in args.sections:
            logger.info("section %s", section)
            start, load = time.perf_counter(), os.getloadavg()[0]
            if section == "train":
                results[section] = run_train(args, sizes, data_config)
            elif section == "eval":
                results[section] = run_eval(args, sizes, data_config)
            else:
                results[section] = modules[section].run(args)
            results[section].update(seconds=time.perf_counter() - start, load_average_start=load,
                                    load_average_end=os.getloadavg()[0])
    for section in ("train", "eval"):
        for run_result in results.get(section, {}).get("runs", {}).values():
            peak = results["peak"]["fp32" if run_result["amp"] == "off" else run_result["amp"]]
            run_result["achieved_fraction_of_matmul_peak"] = run_result["achieved_flops_per_s"] / peak
    results["meta"]["load_average_end"] = list(os.getloadavg())
    results["targets"] = {f"{section}: {name}": ok for section in args.sections
                          for name, ok in results[section].get("targets", {}).items()}
    return results


def main(argv=None):
    """Run the benchmark; returns the exit status: 0, or 1 when the results fail their own checks."""
    modules = section_modules()
    args = parse_args(argv, modules)
    if args.worker is not None:
        print(WORKER_RESULT_PREFIX + json.dumps(train_worker(json.loads(args.worker))), flush=True)
        return 0
    check_requirements(args.sections, modules)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    results = run(args, modules)
    results["sanity_problems"] = sanity_problems(results, args.sections)
    save_json(results, args.out, save_pretty=True)
    print(format_table(results, modules))
    print(f"\nresults written to {args.out}")
    for problem in results["sanity_problems"]:
        print(f"implausible result: {problem}", file=sys.stderr)
    return 1 if results["sanity_problems"] else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
