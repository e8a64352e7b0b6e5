"""Benchmark section `long_videos`: videos longer than the model's window, read as windows (--window_stride S)
against the original's truncation (--window_stride 0), end to end on the CPU.

    python -m method.tools.benchmark --sections long_videos [--quick] [--long_videos_window_stride S] [...]

Every step is the command a user runs, in a child process; the results are read from the run directories.

* Corpora (utils/synthetic_tvr.py, planted signal): LONG, videos of 5-15 minutes (2-6 windows of L = 100 clips of
  1.5 s), moments anywhere in them; SHORT, TVR-length videos (every video fits in one window), same counts and
  dims. --quick: L = 20 and every duration scaled by 1/5.
* Pipeline, per corpus and per mode (windows: --window_stride S, default L / 2; truncation: 0): the first stage
  (scripts/train_first_stage.sh), ranking every split (python -m method.rank_first_stage), CONQUER
  (scripts/train_sharednorm_general.sh, the paper's recipe, with config/model_config_tiny.json), evaluation
  (inference.py --nms_thd 0.7, the flags of scripts/inference.sh).
* Quality (LONG): VCMR R@1/5/10/100 at IoU 0.5 and 0.7 of the NMS submission, for the val queries whose moment
  starts inside the first window (before L x clip_length seconds) and for those starting after it
  (utils/standalone_eval.py on each subset), windows vs truncation.
* Cost (windows runs, LONG vs SHORT): seconds per query and peak resident memory of ranking (every split) and of
  evaluation; building the search index (python -m method.search build) and one search query (python -m
  method.search query: a whole command, its start-up and model loading included).
* Identity (SHORT): no video is longer than a window, so the submission files of the windows runs and the
  truncation runs must be byte-equal.

A step that fails does not stop the section: its error (the command and the end of its output) is reported, the
steps that depend on it are left out, and the section's targets say what did not run. The corpora, run
directories and the output of every command are kept in --long_videos_out_dir when it is given.
"""
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from utils.data_config import load_data_config
from utils.errors import ConquerError
from utils.io_utils import load_json, load_jsonl
from utils.run_dir import REPO_ROOT
from utils.standalone_eval import eval_retrieval
from utils.synthetic_tvr import generate_corpus
from utils.tvr_format import IOU_THRESHOLDS, RECALL_TOPK

NMS_THD = 0.7
SMOKE_BY_DEFAULT = False  # eight training runs: benchmark.py --quick runs it only when named in --sections
MEASURED_COMMANDS = {"rank": "method.rank_first_stage", "evaluate": "inference.py", "search": "method.search"}
MODES = ("windows", "truncation")
CORPORA = ("long", "short")
# Sizes: L, the corpus durations (seconds: 5-15 minutes and TVR's 60-150 s at L 100), split sizes, epochs. The
# first stage's epochs are cheap (no Transformer), and after 5 epochs (155 steps) it ranked poorly (LONG val R@10
# 19, windows, 2026-12-02); CONQUER's epochs are not cheap.
FULL = dict(max_ctx_len=100, clip_length=1.5, long_durations=(300.0, 900.0), short_durations=(60.0, 150.0),
            corpus=dict(n_train_videos=200, n_train_queries=1000, n_val_videos=60, n_val_queries=300,
                        n_test_videos=10, n_test_queries=5, visual_dim=48, text_dim=32, query_dim=32, seed=0),
            first_stage_epochs=20, conquer_epochs=5, search_queries=3)
QUICK = dict(max_ctx_len=20, clip_length=1.5, long_durations=(60.0, 180.0), short_durations=(12.0, 30.0),
             corpus=dict(n_train_videos=20, n_train_queries=40, n_val_videos=10, n_val_queries=20, n_test_videos=10,
                         n_test_queries=2, visual_dim=8, text_dim=8, query_dim=8, seed=0),
             first_stage_epochs=1, conquer_epochs=1, search_queries=1)
# Both stages train a fixed number of epochs and keep the last checkpoint (--disable_eval): no checkpoint is
# chosen on the val queries the section reports, and a truncation run whose val VCMR stays 0 still gets one.
FIRST_STAGE_FLAGS = ["--hidden_dim", "32", "--bsz", "32", "--num_workers", "0", "--disable_eval"]
CONQUER_FLAGS = ["--model_config", "config/model_config_tiny.json", "--hidden_dim", "32", "--num_workers", "0",
                 "--lr", "1e-3", "--disable_eval"]
# inference.py with the flags of scripts/inference.sh.
INFERENCE_FLAGS = ["--max_vcmr_video", "10", "--eval_query_bsz", "5", "--tasks", "VR", "SVMR", "VCMR",
                   "--device", "-1", "--num_workers", "0", "--nms_thd", str(NMS_THD)]

# Runs a module (`python -m`) or a script as the command line would, then writes the process's peak resident
# memory (VmHWM, KiB) to a file: VmHWM belongs to the process image started by exec, where ru_maxrss of a
# child would also count pages of the benchmark process it was forked from.
PEAK_PROBE = """import runpy, sys
peak_file, target, sys.argv = sys.argv[1], sys.argv[2], sys.argv[2:]
try:
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as status, open(peak_file, "w") as f:
        f.write(next(line for line in status if line.startswith("VmHWM:")).split()[1])
"""


class StepError(ConquerError):
    """A command of the pipeline failed; the message names it and ends with the end of its output."""


# ----------------------------------------------------------------------------------------------------
# commands

def step_env(jobs):
    """The environment of every command: this benchmark's Python for the scripts, and with `jobs` commands at
    a time, the cores shared out among them (more threads than cores would slow every one down)."""
    env = dict(os.environ, PYTHON=sys.executable)
    if jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def run_step(name, command, log_dir, env, shown=None):
    """Run `command` from the repository root, its output to LOG_DIR/<name>.log -> wall seconds. Errors show
    the command as `shown` (default: the command itself)."""
    log_path = os.path.join(log_dir, f"{name}.log")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        status = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - start
    if status != 0:
        with open(log_path) as log:
            tail = log.read().strip().splitlines()[-3:]
        raise StepError(f"{name}: `{' '.join(shown or command)}` exited with status {status} (output in "
                        f"{log_path}): " + " | ".join(tail))
    return seconds


def run_measured(name, target, arguments, log_dir, env):
    """Run `python -m target` (or the script `target`) -> {"s": wall seconds, "peak_rss_bytes"}."""
    peak_file = os.path.join(log_dir, f"{name}.peak_kib")
    shown = ["python"] + ([target] if target.endswith(".py") else ["-m", target]) + list(arguments)
    seconds = run_step(name, [sys.executable, "-c", PEAK_PROBE, peak_file, target, *arguments], log_dir, env, shown)
    with open(peak_file) as f:
        return {"s": seconds, "peak_rss_bytes": int(f.read()) * 1024}


def only_entry(folder):
    """The one entry of a folder a single run wrote into."""
    (entry,) = os.listdir(folder)
    return os.path.join(folder, entry)


def inference_file(folder, suffix):
    """The one file inference.py wrote into a run directory whose name ends with `suffix`."""
    (name,) = [name for name in os.listdir(folder) if name.startswith("inference_") and name.endswith(suffix)]
    return os.path.join(folder, name)


def corpus_flags(sizes):
    corpus = sizes["corpus"]
    return ["--visual_dim", str(corpus["visual_dim"]), "--text_dim", str(corpus["text_dim"]),
            "--query_dim", str(corpus["query_dim"]), "--max_ctx_len", str(sizes["max_ctx_len"]),
            "--clip_length", f"{sizes['clip_length']:g}", "--train_set_honours_options"]


def run_pipeline(sizes, data_config, stride, root, env):
    """First stage, ranking, CONQUER and evaluation of one corpus and mode in ROOT -> what they wrote and cost.

    Fills the returned dict step by step and raises StepError (with the dict as `partial`) when a step fails."""
    logs = os.path.join(root, "logs")
    os.makedirs(logs)
    shared = corpus_flags(sizes) + ["--window_stride", str(stride)]
    done = {}
    try:
        run_step("train_first_stage", ["bash", "scripts/train_first_stage.sh", "fs", "cpu", "--dataset_config",
                                       data_config, "--results_root", os.path.join(root, "first_stage"),
                                       "--n_epoch", str(sizes["first_stage_epochs"])] + shared + FIRST_STAGE_FLAGS,
                 logs, env)
        done["first_stage_dir"] = only_entry(os.path.join(root, "first_stage"))
        ranklists = os.path.join(root, "ranklists")
        done["rank"] = run_measured("rank", MEASURED_COMMANDS["rank"],
                                    ["--model_dir", done["first_stage_dir"], "--device", "-1", "--out_dir", ranklists],
                                    logs, env)
        done["ranked_config"] = os.path.join(ranklists, "data_config.json")
        ranked = load_json(os.path.join(ranklists, "metrics.json"))
        done["ranked_queries"] = {split: metrics["n_queries"] for split, metrics in ranked.items()}
        done["first_stage_val_vr"] = ranked["val"]["first_stage"]
        run_step("train_conquer", ["bash", "scripts/train_sharednorm_general.sh", "conquer", "cpu",
                                   "--dataset_config", done["ranked_config"], "--results_root",
                                   os.path.join(root, "conquer"), "--n_epoch", str(sizes["conquer_epochs"])]
                 + shared + CONQUER_FLAGS, logs, env)
        done["conquer_dir"] = only_entry(os.path.join(root, "conquer"))
        done["evaluate"] = run_measured("inference", MEASURED_COMMANDS["evaluate"],
                                        ["--model_dir", done["conquer_dir"], "--dataset_config",
                                         done["ranked_config"]] + INFERENCE_FLAGS, logs, env)
        done["submission"] = inference_file(done["conquer_dir"], "_hero.json")
        done["submission_nms"] = inference_file(done["conquer_dir"], f"_nms_thd_{NMS_THD}.json")
    except StepError as e:
        e.partial = done
        raise
    return done


def search_cost(pipeline, desc_ids, n_queries, root, env):
    """Index the val split (python -m method.search build) and run n_queries search commands -> costs."""
    logs = os.path.join(root, "logs")
    index = os.path.join(root, "search_index")
    build = run_measured("search_build", MEASURED_COMMANDS["search"],
                         ["build", "--first_stage", pipeline["first_stage_dir"], "--conquer", pipeline["conquer_dir"],
                          "--dataset_config", pipeline["ranked_config"], "--split", "val", "--out_dir", index], logs,
                         env)
    queries = [run_measured(f"search_query_{desc_id}", MEASURED_COMMANDS["search"],
                            ["query", "--index", index, "--desc_id", str(desc_id), "--json"], logs, env)
               for desc_id in desc_ids[:n_queries]]
    return {"build": build, "query": {"s": float(np.median([q["s"] for q in queries])),
                                      "peak_rss_bytes": max(q["peak_rss_bytes"] for q in queries)}}


def run_chain(sizes, data_config, corpus, mode, out_dir):
    """The pipeline of one corpus and mode, then (windows runs) the search -> (what ran, {failed step: error})."""
    stride = sizes["window_stride"] if mode == "windows" else 0
    root, env = os.path.join(out_dir, f"{corpus}_{mode}"), step_env(sizes["jobs"])
    try:
        done = run_pipeline(sizes, data_config, stride, root, env)
    except StepError as e:
        return e.partial, {f"{corpus} {mode}": str(e)}
    if mode != "windows":
        return done, {}
    desc_ids = [row["desc_id"] for row in load_jsonl(load_data_config(data_config).eval_data_path)]
    try:
        done["search"] = search_cost(done, desc_ids, sizes["search_queries"], root, env)
    except StepError as e:
        return done, {f"{corpus} search": str(e)}
    return done, {}


# ----------------------------------------------------------------------------------------------------
# results

def moment_subsets(rows, first_window_seconds):
    """{"first window": desc_ids of the val queries whose moment starts before first_window_seconds,
    "after": the others}."""
    early = [row["desc_id"] for row in rows if row["ts"][0] < first_window_seconds]
    late = [row["desc_id"] for row in rows if row["ts"][0] >= first_window_seconds]
    return {"first window": early, "after": late}


def subset_submission(submission, desc_ids, task="VCMR"):
    """The submission's `task` entries of the queries desc_ids (with its video2idx)."""
    keep = set(desc_ids)
    return {"video2idx": submission["video2idx"], task: [e for e in submission[task] if e["desc_id"] in keep]}


def vcmr_by_subset(submission_path, rows, subsets):
    """{subset: VCMR metrics of the submission on that subset's queries} (subsets without a query are left out)."""
    submission = load_json(submission_path)
    by_id = {row["desc_id"]: row for row in rows}
    return {name: eval_retrieval(subset_submission(submission, ids), [by_id[i] for i in ids],
                                 use_desc_type=False)["VCMR"]
            for name, ids in subsets.items() if ids}


def same_bytes(path_a, path_b):
    with open(path_a, "rb") as a, open(path_b, "rb") as b:
        return a.read() == b.read()


def per_query(cost, n_queries):
    """A whole command's cost per query: its wall time (start-up and loading included) / n_queries."""
    return {"per_query_s": cost["s"] / n_queries, "command_s": cost["s"], "n_queries": n_queries,
            "peak_rss_bytes": cost["peak_rss_bytes"]}


def startup_costs(out_dir, env):
    """Wall time and memory of the measured commands' start-up alone (their --help: Python, torch and the
    project's imports), which their per-query times include."""
    logs = os.path.join(out_dir, "startup_logs")
    os.makedirs(logs)
    return {step: run_measured(step, target, ["--help"], logs, env) for step, target in MEASURED_COMMANDS.items()}


def cost_summary(pipelines):
    """Seconds per query and peak memory of the windows runs on LONG and SHORT, and their LONG / SHORT ratios."""
    costs, ratios = {}, {}
    for corpus in CORPORA:
        run = pipelines[(corpus, "windows")]
        entry = {}
        if "rank" in run:
            entry["rank"] = per_query(run["rank"], sum(run["ranked_queries"].values()))
        if "evaluate" in run:
            entry["evaluate"] = per_query(run["evaluate"], run["ranked_queries"]["val"])
        if "search" in run:
            entry["search"] = run["search"]
        costs[corpus] = entry
    for step in ("rank", "evaluate"):
        if step in costs["long"] and step in costs["short"]:
            ratios[f"{step}_time_long_vs_short"] = costs["long"][step]["per_query_s"] / costs["short"][step]["per_query_s"]
            ratios[f"{step}_memory_long_vs_short"] = (costs["long"][step]["peak_rss_bytes"]
                                                      / costs["short"][step]["peak_rss_bytes"])
    return costs, ratios


# ----------------------------------------------------------------------------------------------------
# section interface

def add_arguments(parser):
    group = parser.add_argument_group("section long_videos")
    group.add_argument("--long_videos_window_stride", type=int, default=None,
                       help="--window_stride of the windows runs (default: half of L, the window length)")
    for stage in ("first_stage", "conquer"):
        group.add_argument(f"--long_videos_{stage}_epochs", type=int, default=None,
                           help=f"epochs of every {stage} training run (default {FULL[f'{stage}_epochs']}, --quick "
                                f"{QUICK[f'{stage}_epochs']})")
    group.add_argument("--long_videos_val_queries", type=int, default=None,
                       help=f"val queries of each corpus (default {FULL['corpus']['n_val_queries']}, --quick "
                            f"{QUICK['corpus']['n_val_queries']})")
    group.add_argument("--long_videos_jobs", type=int, default=None,
                       help="pipelines run at a time, sharing the cores (default 1: clean timings; --quick 2)")
    group.add_argument("--long_videos_out_dir", default=None,
                       help="keep the corpora, run directories and command outputs in this new folder")


def section_sizes(args):
    sizes = dict(QUICK if args.quick else FULL)
    sizes["corpus"] = dict(sizes["corpus"])
    for stage in ("first_stage", "conquer"):
        if getattr(args, f"long_videos_{stage}_epochs") is not None:
            sizes[f"{stage}_epochs"] = getattr(args, f"long_videos_{stage}_epochs")
    if args.long_videos_val_queries is not None:
        sizes["corpus"]["n_val_queries"] = args.long_videos_val_queries
    sizes["window_stride"] = (sizes["max_ctx_len"] // 2 if args.long_videos_window_stride is None
                              else args.long_videos_window_stride)
    # The quick run is a smoke run, whose times mean little: its four pipelines share the cores two at a time.
    sizes["jobs"] = (2 if args.quick else 1) if args.long_videos_jobs is None else args.long_videos_jobs
    check_sizes(sizes)
    return sizes


def check_sizes(sizes):
    """Raise ConquerError naming the --long_videos_ flag whose value cannot run."""
    if not 1 <= sizes["window_stride"] <= sizes["max_ctx_len"]:
        raise ConquerError(f"--long_videos_window_stride {sizes['window_stride']}: expected a clip count in [1, "
                           f"{sizes['max_ctx_len']}] (the window length L of this size)")
    for flag, value in (("first_stage_epochs", sizes["first_stage_epochs"]),
                        ("conquer_epochs", sizes["conquer_epochs"]), ("jobs", sizes["jobs"]),
                        ("val_queries", sizes["corpus"]["n_val_queries"])):
        if value < 1:
            raise ConquerError(f"--long_videos_{flag} {value}: expected a positive number")


def make_corpora(sizes, out_dir):
    """{"long": data config, "short": data config}: the same counts, dims and seed, different durations."""
    return {corpus: generate_corpus(os.path.join(out_dir, f"corpus_{corpus}"), **sizes["corpus"],
                                    clip_length=sizes["clip_length"],
                                    min_duration=sizes[f"{corpus}_durations"][0],
                                    max_duration=sizes[f"{corpus}_durations"][1],
                                    max_clips=int(np.ceil(sizes[f"{corpus}_durations"][1] / sizes["clip_length"])))
            for corpus in CORPORA}


def run(args):
    """-> {"sizes", "moments", "startup", "first_stage_val_vr", "quality", "cost", "identical_on_short", "failed",
    "ratios", "targets"}."""
    sizes = section_sizes(args)
    out_dir = args.long_videos_out_dir or os.path.join(args.work_dir, "long_videos")
    if os.path.exists(out_dir):
        raise ConquerError(f"--long_videos_out_dir {out_dir}: exists already; give a new folder")
    os.makedirs(out_dir)
    corpora = make_corpora(sizes, out_dir)
    startup = startup_costs(out_dir, step_env(1))
    chains = [(corpus, mode) for corpus in CORPORA for mode in MODES]
    with ThreadPoolExecutor(sizes["jobs"]) as pool:
        outcomes = list(pool.map(lambda chain: run_chain(sizes, corpora[chain[0]], *chain, out_dir), chains))
    pipelines = {chain: done for chain, (done, _) in zip(chains, outcomes)}
    failed = {name: error for _, chain_failed in outcomes for name, error in chain_failed.items()}

    val_rows = load_jsonl(load_data_config(corpora["long"]).eval_data_path)
    subsets = moment_subsets(val_rows, sizes["max_ctx_len"] * sizes["clip_length"])
    quality = {mode: vcmr_by_subset(pipelines[("long", mode)]["submission_nms"], val_rows, subsets)
               for mode in MODES if "submission_nms" in pipelines[("long", mode)]}
    costs, ratios = cost_summary(pipelines)
    short = [pipelines[("short", mode)] for mode in MODES]
    identical = None
    if all("submission_nms" in done for done in short):
        identical = all(same_bytes(short[0][key], short[1][key]) for key in ("submission", "submission_nms"))
    return {"sizes": sizes, "moments": {name: len(ids) for name, ids in subsets.items()}, "startup": startup,
            "first_stage_val_vr": {f"{c} {m}": p["first_stage_val_vr"] for (c, m), p in pipelines.items()
                                   if "first_stage_val_vr" in p},
            "quality": quality, "cost": costs, "identical_on_short": identical, "failed": failed, "ratios": ratios,
            "targets": {"every pipeline and search step ran": not failed,
                        "TVR-length videos: submissions with and without --window_stride byte-equal": bool(identical)}}


# ----------------------------------------------------------------------------------------------------
# table

METRIC_KEYS = [f"{thd}-r{k}" for thd in IOU_THRESHOLDS for k in RECALL_TOPK]


def _mib(n_bytes):
    return f"{n_bytes / 2 ** 20:.0f} MiB"


def table_rows(results):
    sizes = results["sizes"]
    window_s = sizes["max_ctx_len"] * sizes["clip_length"]
    rows = [f"long videos: windows of L={sizes['max_ctx_len']} clips ({window_s:g} s) every "
            f"{sizes['window_stride']} clips vs truncation (--window_stride 0); LONG videos "
            f"{sizes['long_durations'][0]:g}-{sizes['long_durations'][1]:g} s, SHORT "
            f"{sizes['short_durations'][0]:g}-{sizes['short_durations'][1]:g} s; "
            f"{sizes['corpus']['n_val_videos']} val videos; epochs: first stage {sizes['first_stage_epochs']}, "
            f"CONQUER {sizes['conquer_epochs']}",
            f"  LONG val VCMR (NMS {NMS_THD}), moments starting in the first window ({results['moments']['first window']}"
            f" queries) / after it ({results['moments']['after']}):",
            "  " + f"{'':28}" + "".join(f"{key:>9}" for key in METRIC_KEYS)]
    for mode, by_subset in results["quality"].items():
        for subset, metrics in by_subset.items():
            rows.append("  " + f"{mode + ', ' + subset:28}" + "".join(f"{metrics[key]:9.2f}" for key in METRIC_KEYS))
    for name, vr in results["first_stage_val_vr"].items():
        rows.append(f"  first stage val VR, {name}: R@1 {vr['r1']:.2f}, R@10 {vr['r10']:.2f}, R@100 {vr['r100']:.2f}")
    long, short = results["cost"]["long"], results["cost"]["short"]
    rows.append(f"  cost of the windows runs, whole commands on the CPU{'':5}{'LONG':>36}{'SHORT':>36}")
    for step, label in (("rank", "ranking, every split"), ("evaluate", "evaluation, val")):
        cells = [f"{c[step]['command_s']:.1f} s = {c[step]['per_query_s'] * 1e3:.1f} ms/query, "
                 f"{_mib(c[step]['peak_rss_bytes'])}" if step in c else "-" for c in (long, short)]
        n_queries = next((c[step]["n_queries"] for c in (long, short) if step in c), "-")
        rows.append(f"    {label + f' ({n_queries} queries)':52}{cells[0]:>36}{cells[1]:>36}")
    for key, label in (("build", "search index build, val"), ("query", "search query command, median")):
        cells = [f"{c['search'][key]['s']:.1f} s, {_mib(c['search'][key]['peak_rss_bytes'])}" if "search" in c else "-"
                 for c in (long, short)]
        rows.append(f"    {label:52}{cells[0]:>36}{cells[1]:>36}")
    rows.append("    start-up alone (--help): " + ", ".join(f"{step} {cost['s']:.1f} s, {_mib(cost['peak_rss_bytes'])}"
                                                        for step, cost in results["startup"].items()))
    rows.append("    LONG / SHORT: " + (", ".join(f"{k} {v:.2f}" for k, v in results["ratios"].items()) or "-"))
    identical = results["identical_on_short"]
    rows.append("  SHORT (no video longer than a window), submissions with --window_stride "
                f"{sizes['window_stride']} and 0: " + {True: "byte-equal", False: "DIFFER", None: "not compared"}[identical])
    rows += [f"  FAILED {name}: {message}" for name, message in results["failed"].items()]
    return rows
