"""From a folder of video files and two trained runs to a search index, in one command; rerun it to add videos.

    python -m method.index_videos VIDEOS OUT_DIR --first_stage RUN --conquer RUN [--gpu ID|ID,ID,...|cpu]
        [--whisper_model openai/whisper-small] [--language en] [--num_beams 1]   # or: scripts/index_videos.sh

VIDEOS is a folder of video files (utils.extract_video_features lists them); RUN are a first-stage run and a
CONQUER run of train.py, trained on one corpus. The steps, each resumable, each skipping what is already done:

1. **clip features** of every video, for each video feature set of the runs' training corpus, with that set's
   recorded recipe (utils.extract_video_features --recipe): OUT_DIR/features/set<i>/;
2. **subtitles** (when a run reads them, ctx_mode visual_sub) by speech recognition (utils.transcribe):
   OUT_DIR/subtitles.jsonl;
3. **a search-only corpus** of the videos now in VIDEOS (utils.build_corpus without annotations, with the
   training corpus's text encoder): a new OUT_DIR/corpus/cNNNNNN/ each run, and OUT_DIR/data_config.json, the
   live corpus's config (a fixed path: the index records it);
4. **the search index** (method.search build, `--update` when OUT_DIR/index exists: only new videos are
   encoded, removed videos leave it, CURRENT switches atomically): OUT_DIR/index/.

It ends by printing the `python -m method.search serve` command. Steps 1 and 2 run as subprocesses of their
own commands, under torchrun with one process per GPU when --gpu lists several, and are not started when every
video has their outputs. A video that cannot be decoded is left out (named; exit status 1). Any other failure
stops the run with one line and leaves the previous corpus and index as they were, still served; a server
running during a successful run takes the new index version at its next search. OUT_DIR/collection.json records
the videos folder and runs (a rerun with others is refused) and the seconds each step took.
"""
import argparse
import logging
import os
import shutil
import subprocess
import sys
import time

from method.search_index import build_index
from utils import run_dir as run_dirs
from utils.build_corpus import build_corpus
from utils.errors import ConquerError, run_cli
from utils.extract_video_features import list_videos, video_stem
from utils.io_utils import load_json, save_json
from utils.provenance import provenance, provenance_difference
from utils.transcribe import merge_parts
from utils.data_config import load_data_config

logger = logging.getLogger(__name__)

COLLECTION_FILENAME = "collection.json"
COLLECTION_FORMAT = "conquer-video-collection"
DATA_CONFIG_FILENAME = "data_config.json"
SUBTITLES_FILENAME = "subtitles.jsonl"
CORPUS_PREFIX = "c"
DEFAULT_WHISPER_MODEL = "openai/whisper-small"


class CollectionError(ConquerError):
    """The inputs of index_videos cannot make an index; the message names the folder, run or flag."""


class TrainedCorpus:
    """What the two runs were trained on: the training data config of each, and what a new corpus must copy."""

    def __init__(self, first_stage, conquer):
        self.first_stage_dir, self.first_stage_opt = _run(first_stage, "--first_stage", "first_stage")
        self.conquer_dir, self.conquer_opt = _run(conquer, "--conquer", "conquer")
        configs = {flag: _training_config(opt, run_dir, flag) for flag, run_dir, opt in (
            ("--first_stage", self.first_stage_dir, self.first_stage_opt),
            ("--conquer", self.conquer_dir, self.conquer_opt))}
        difference = provenance_difference(provenance(configs["--first_stage"]), provenance(configs["--conquer"]))
        if difference:
            raise CollectionError(f"--first_stage {self.first_stage_dir} and --conquer {self.conquer_dir} were trained "
                                  f"on corpora of different recipes ({difference}); use two runs of one corpus")
        self.config = configs["--conquer"]
        self.recipes = [feature_set.get("recipe") for feature_set in self.config.get("video_feature_sets", [])]
        if not self.recipes or None in self.recipes:
            raise CollectionError(f"--conquer {self.conquer_dir}: its training corpus "
                                  f"{self.conquer_opt['dataset_config']} records no extraction recipe for its video "
                                  "features (extracted before recipes were recorded, or not by "
                                  "utils.extract_video_features), so new videos cannot be extracted the same way; "
                                  "re-extract and rebuild that corpus, then train again")
        self.text_encoder = self.config.get("text_encoder")
        if not self.text_encoder:
            raise CollectionError(f"--conquer {self.conquer_dir}: its training corpus has no text encoder (its "
                                  "queries were given as features), so typed queries cannot be encoded; build the "
                                  "training corpus with --text_encoder")
        self.needs_subtitles = "visual_sub" in (self.first_stage_opt.get("ctx_mode"), self.conquer_opt.get("ctx_mode"))


def _run(run_dir, flag, kind):
    """(absolute run dir, its opt.json) of a run of the given kind ("first_stage" or "conquer")."""
    try:
        located = os.path.abspath(run_dirs.locate_model_dir(run_dir))
    except ConquerError as e:
        raise CollectionError(f"{flag} {run_dir}: {e}") from None
    opt_path = os.path.join(located, run_dirs.OPT_FILENAME)
    if not os.path.isfile(opt_path) or not os.path.isfile(os.path.join(located, run_dirs.CKPT_FILENAME)):
        raise CollectionError(f"{flag} {run_dir}: not a run directory of train.py (needs {run_dirs.OPT_FILENAME} "
                              f"and {run_dirs.CKPT_FILENAME})")
    opt = load_json(opt_path)
    found = opt.get("model", "conquer")
    if found != kind:
        raise CollectionError(f"{flag} {run_dir}: a {found} run, expected a {kind} run (train.py --model {kind})")
    return located, opt


def _training_config(opt, run_dir, flag):
    path = run_dirs.recorded_path(opt.get("dataset_config"))
    if not path or not os.path.isfile(path):
        raise CollectionError(f"{flag} {run_dir}: its training data config {path!r} is not there; the new corpus "
                              "copies its feature recipe and text encoder from it")
    return load_json(path)


class Collection:
    """OUT_DIR: what a previous run of index_videos made there, and the paths of this one."""

    def __init__(self, out_dir):
        self.out_dir = os.path.abspath(out_dir)
        self.record_path = os.path.join(self.out_dir, COLLECTION_FILENAME)
        self.data_config = os.path.join(self.out_dir, DATA_CONFIG_FILENAME)
        self.subtitles = os.path.join(self.out_dir, SUBTITLES_FILENAME)
        self.index = os.path.join(self.out_dir, "index")
        self.corpora = os.path.join(self.out_dir, "corpus")

    def feature_dir(self, set_index):
        return os.path.join(self.out_dir, "features", f"set{set_index}")

    def check_owner(self, identity):
        """Refuse an OUT_DIR holding something else: another collection (other videos or runs) or other files."""
        if not os.path.exists(self.out_dir):
            return
        if not os.path.isdir(self.out_dir):
            raise CollectionError(f"OUT_DIR {self.out_dir}: exists and is not a folder")
        if not os.path.isfile(self.record_path):
            if os.listdir(self.out_dir):
                raise CollectionError(f"OUT_DIR {self.out_dir}: exists and was not made by index_videos (no "
                                      f"{COLLECTION_FILENAME}); choose a new or empty folder")
            return
        recorded = load_json(self.record_path)
        for key, value in identity.items():
            if recorded.get(key) != value:
                raise CollectionError(f"OUT_DIR {self.out_dir}: holds the index of another collection ({key}: "
                                      f"{recorded.get(key)!r}, here {value!r}); choose another OUT_DIR")

    def next_corpus(self):
        existing = [int(name[len(CORPUS_PREFIX):]) for name in _listdir(self.corpora)
                    if name.startswith(CORPUS_PREFIX) and name[len(CORPUS_PREFIX):].isdigit()]
        return os.path.join(self.corpora, f"{CORPUS_PREFIX}{max(existing, default=0) + 1:06d}")

    def live_corpus(self):
        """The corpus folder OUT_DIR/data_config.json points at, or None."""
        if not os.path.isfile(self.data_config):
            return None
        return load_json(self.data_config)["root_path"]

    def remove_other_corpora(self, keep):
        for name in _listdir(self.corpora):
            path = os.path.join(self.corpora, name)
            if os.path.abspath(path) != os.path.abspath(keep):
                shutil.rmtree(path, ignore_errors=True)


def _listdir(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def step_command(module, args, gpu):
    """The command line running `python -m module args` on `gpu` ('cpu', an id, or a comma-separated list of ids:
    one process per GPU under torchrun) -> (argv, extra environment)."""
    if gpu == "cpu":
        return [sys.executable, "-m", module, *args, "--device", "cpu"], {}
    ids = gpu_ids(gpu)
    environment = dict(CUDA_VISIBLE_DEVICES=gpu)
    if len(ids) == 1:
        return [sys.executable, "-m", module, *args, "--device", "cuda"], environment
    return ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(len(ids)),
             "-m", module, *args, "--device", "cuda"], environment)


def gpu_ids(gpu):
    """--gpu -> the CUDA device ids it lists ([] for cpu)."""
    if gpu == "cpu":
        return []
    ids = gpu.split(",")
    if not all(i.isdigit() for i in ids):
        raise CollectionError(f"--gpu {gpu}: expected cpu, a CUDA device id or a comma-separated list of ids")
    return [int(i) for i in ids]


def run_step(name, argv, environment):
    """Run one step's command; its output streams through. Exit status 0 or 1 (some videos left out) goes on;
    anything else stops index_videos with the step's name."""
    logger.info("%s: %s", name, " ".join(argv))
    done = subprocess.run(argv, env=dict(os.environ, **environment))
    if done.returncode not in (0, 1):
        raise CollectionError(f"{name} failed (exit status {done.returncode}; its error is printed above); the "
                              "previous corpus and index are unchanged")
    return done.returncode


def index_videos(videos, out_dir, first_stage, conquer, gpu="cpu", whisper_model=DEFAULT_WHISPER_MODEL,
                 language=None, num_beams=None, batch_size=32):
    """Make or update the index of the videos in folder `videos` under `out_dir` -> summary dict (see the module
    docstring): {"index", "data_config", "videos", "left_out", "n_encoded", "seconds": {step: s}, "serve"}."""
    started = time.perf_counter()
    devices = gpu_ids(gpu)  # the corpus and index steps run in this process, on the first one
    if not os.path.isdir(videos):
        raise CollectionError(f"VIDEOS {videos}: not a folder of video files")
    videos = os.path.abspath(videos)
    files = list_videos([videos])
    if not files:
        raise CollectionError(f"VIDEOS {videos}: no video files found")
    trained = TrainedCorpus(first_stage, conquer)
    collection = Collection(out_dir)
    identity = dict(format=COLLECTION_FORMAT, videos=videos, first_stage=trained.first_stage_dir,
                    conquer=trained.conquer_dir)
    collection.check_owner(identity)
    os.makedirs(collection.out_dir, exist_ok=True)
    seconds = {}
    exit_status = 0

    names = [video_stem(path) for path in files]
    # A step whose outputs every video already has is not started: a rerun without new videos costs no model load.
    lap = time.perf_counter()
    for i, recipe in enumerate(trained.recipes):
        if all(os.path.isfile(os.path.join(collection.feature_dir(i), name + ".npy")) for name in names):
            continue
        os.makedirs(collection.feature_dir(i), exist_ok=True)
        recipe_path = os.path.join(collection.out_dir, "features", f"set{i}.recipe.json")
        save_json(recipe, recipe_path, save_pretty=True)
        argv, environment = step_command("utils.extract_video_features", [
            "--videos", videos, "--out_dir", collection.feature_dir(i), "--recipe", recipe_path], gpu)
        exit_status |= run_step(f"clip features (set {i})", argv, environment)
    seconds["features"] = time.perf_counter() - lap

    lap = time.perf_counter()
    if trained.needs_subtitles and not set(names) <= set(merge_parts(collection.subtitles)):
        args = ["--videos", videos, "--out", collection.subtitles, "--model", whisper_model]
        if language:
            args += ["--language", language]
        if num_beams:
            args += ["--num_beams", str(num_beams)]
        exit_status |= run_step("subtitles", *step_command("utils.transcribe", args, gpu))
    seconds["subtitles"] = time.perf_counter() - lap

    present = [name for name in names
               if all(os.path.isfile(os.path.join(collection.feature_dir(i), name + ".npy"))
                      for i in range(len(trained.recipes)))]
    left_out = sorted(set(names) - set(present))
    if not present:
        raise CollectionError(f"VIDEOS {videos}: no video could be decoded; nothing to index")

    lap = time.perf_counter()
    corpus_dir = collection.next_corpus()
    encoder = trained.text_encoder
    summary = build_corpus(
        corpus_dir, annotation_format=None, annotations=None,
        video_features=[collection.feature_dir(i) for i in range(len(trained.recipes))],
        clip_length=None, subtitles=collection.subtitles if trained.needs_subtitles else None,
        text_encoder=encoder["name_or_path"], text_encoder_dtype=encoder.get("dtype", "float32"),
        text_encoder_device=f"cuda:{devices[0]}" if devices else "cpu", video_dir=videos, video_names=present,
        progress=True)
    seconds["corpus"] = time.perf_counter() - lap

    lap = time.perf_counter()
    previous_config = load_json(collection.data_config) if os.path.isfile(collection.data_config) else None
    save_json(load_json(summary["data_config"]), collection.data_config, save_pretty=True)
    try:
        result = build_index(collection.index, trained.conquer_dir, trained.first_stage_dir, collection.data_config,
                             split=load_data_config(collection.data_config).search_split,
                             update=os.path.isdir(collection.index), batch_size=batch_size,
                             device=devices[0] if devices else -1)
    except BaseException:
        if previous_config is not None:
            save_json(previous_config, collection.data_config, save_pretty=True)
        else:
            os.remove(collection.data_config)
        shutil.rmtree(corpus_dir, ignore_errors=True)
        raise
    collection.remove_other_corpora(keep=corpus_dir)
    seconds["index"] = time.perf_counter() - lap
    seconds["total"] = time.perf_counter() - started

    serve = (f"python -m method.search serve --index {collection.index} --conquer {trained.conquer_dir} "
             f"--first_stage {trained.first_stage_dir}")
    record = dict(identity, videos_indexed=len(present), left_out=left_out, n_encoded=result["n_encoded"],
                  seconds={step: round(value, 2) for step, value in seconds.items()})
    save_json(record, collection.record_path, save_pretty=True)
    return dict(record, index=collection.index, data_config=collection.data_config, serve=serve,
                exit_status=1 if (exit_status or left_out) else 0)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("videos", metavar="VIDEOS", help="folder of video files")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder of the features, subtitles, corpus and index")
    parser.add_argument("--first_stage", required=True, help="first-stage run dir (train.py --model first_stage)")
    parser.add_argument("--conquer", required=True, help="CONQUER run dir")
    parser.add_argument("--gpu", default="cpu", help="cpu, a CUDA device id, or a comma-separated list of ids")
    parser.add_argument("--whisper_model", default=DEFAULT_WHISPER_MODEL,
                        help="speech recognition model (hub id or local folder), when the runs read subtitles")
    parser.add_argument("--language", default=None, help="spoken language for speech recognition (default: detect)")
    parser.add_argument("--num_beams", type=int, default=None,
                        help="beam search width of speech recognition (default 5; 1: greedy, faster on a CPU)")
    parser.add_argument("--batch_size", type=int, default=32, help="windows per forward pass when indexing")
    return parser.parse_args(argv)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    summary = index_videos(args.videos, args.out_dir, args.first_stage, args.conquer, args.gpu, args.whisper_model,
                           args.language, args.num_beams, args.batch_size)
    if summary["left_out"]:
        logger.warning("%d videos could not be decoded and are not searchable: %s", len(summary["left_out"]),
                       ", ".join(summary["left_out"]))
    steps = ", ".join(f"{step} {value:.1f} s" for step, value in summary["seconds"].items())
    logger.info("%d videos indexed (%d encoded now); %s", summary["videos_indexed"], summary["n_encoded"], steps)
    print(f"Serve with: {summary['serve']}")
    return summary["exit_status"]


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
