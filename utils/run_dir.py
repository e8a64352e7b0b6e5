"""The run directory: what a training run writes there, and where inference finds it.

`<results_root>/<dset>-<exp_id>-<YYYY_MM_DD_HH_MM_SS>[_n]/` holds opt.json (every option), code.zip (a snapshot
of the code), model.ckpt (the best evaluation), last.ckpt (what --resume continues from), train.log.txt and
eval.log.txt (the original's per-epoch formats), run.log (the full log) and tensorboard_log/. A resumed run
cuts the logs back to their sizes recorded in last.ckpt, so the unfinished epoch's lines are written once.
"""
import logging
import os
import sys
import tempfile
import time

from tqdm import tqdm

from utils import distributed
from utils.errors import OptionError
from utils.io_utils import atomic_write, make_code_zip, save_json

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPT_FILENAME = "opt.json"
CKPT_FILENAME = "model.ckpt"
LAST_CKPT_FILENAME = "last.ckpt"
TENSORBOARD_DIRNAME = "tensorboard_log"
TRAIN_LOG_FILENAME = "train.log.txt"
EVAL_LOG_FILENAME = "eval.log.txt"
RUN_LOG_FILENAME = "run.log"
# Logs that last.ckpt records the size of, so a resumed run cuts off what the unfinished epoch appended.
RESUMABLE_LOGS = (TRAIN_LOG_FILENAME, EVAL_LOG_FILENAME)
TIME_FORMAT = "%Y_%m_%d_%H_%M_%S"


def make_unique_dir(stem):
    """Create `stem`, or `stem_1`, `stem_2`, ... if taken, so two runs started in the same second never share a
    run directory (creation is atomic, so this also holds across processes)."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    candidate, suffix = stem, 0
    while True:
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            suffix += 1
            candidate = f"{stem}_{suffix}"


def create_run_dir(opt):
    """A new run directory for `opt` (dset_name, exp_id, results_root) with code.zip and opt.json; its path."""
    stem = os.path.join(opt.results_root, "-".join([opt.dset_name, opt.exp_id, time.strftime(TIME_FORMAT)]))
    run_dir = make_unique_dir(stem)
    make_code_zip(REPO_ROOT, os.path.join(run_dir, "code.zip"), enclosing_dir="code",
                  exclude_dirs=("condor", "data", "results", "debug_results", "__pycache__"),
                  exclude_dirs_substring="results", exclude_extensions=(".pyc", ".ipynb", ".swap"))
    save_json(dict(opt, results_dir=run_dir), os.path.join(run_dir, OPT_FILENAME), save_pretty=True)
    return run_dir


def add_run_paths(opt):
    """Set opt.ckpt_filepath, last_ckpt_filepath, train_log_filepath, eval_log_filepath and tensorboard_log_dir
    below opt.results_dir."""
    opt.ckpt_filepath = os.path.join(opt.results_dir, CKPT_FILENAME)
    opt.last_ckpt_filepath = os.path.join(opt.results_dir, LAST_CKPT_FILENAME)
    opt.train_log_filepath = os.path.join(opt.results_dir, TRAIN_LOG_FILENAME)
    opt.eval_log_filepath = os.path.join(opt.results_dir, EVAL_LOG_FILENAME)
    opt.tensorboard_log_dir = os.path.join(opt.results_dir, TENSORBOARD_DIRNAME)


def locate_model_dir(model_dir):
    """`--model_dir` is a path to a run directory, or (as in the original) a name under results/."""
    candidates = [model_dir, os.path.join("results", model_dir)]
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, OPT_FILENAME)):
            return candidate
    raise OptionError(f"--model_dir {model_dir}: no {OPT_FILENAME} in " + " or ".join(map(repr, candidates)))


def recorded_path(path):
    """A path an opt.json records as it was given (relative ones to the folder the run was started from: the
    repository root for the scripts) -> that path when it exists from here, else the same path below the repository
    root when that exists, else the path unchanged."""
    if path is None or os.path.isabs(path) or os.path.exists(path):
        return path
    below_root = os.path.join(REPO_ROOT, path)
    return below_root if os.path.exists(below_root) else path


def choose_checkpoint_dir(saved_results_dir, model_dir, force_model_dir=False):
    """Where inference reads model.ckpt (and, by default, writes its outputs).

    The original always used the results_dir saved in opt.json, so a downloaded or moved run directory only
    worked from one exact place. We use it when it holds the checkpoint, else the run directory itself.
    """
    if not force_model_dir and saved_results_dir and os.path.isfile(os.path.join(saved_results_dir, CKPT_FILENAME)):
        return saved_results_dir
    if os.path.isfile(os.path.join(model_dir, CKPT_FILENAME)):
        return model_dir
    raise OptionError(f"--model_dir {model_dir}: no {CKPT_FILENAME} found in {model_dir!r}"
                      + ("" if force_model_dir or not saved_results_dir else
                         f" nor in the results_dir saved in opt.json ({saved_results_dir!r})"))


def check_writable(output_dir):
    """Create `output_dir` if needed and write a probe file there (permission bits tell nothing for root or on
    a read-only file system), so a read-only run directory fails before any output is written."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        if os.access(output_dir, os.W_OK):
            with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write_probe."):
                return
        reason = "no write permission"
    except OSError as e:
        reason = e.strerror
    raise OptionError(f"output directory {output_dir!r} is not writable ({reason}; a read-only run directory?); "
                      "pass --output_dir DIR to write the predictions elsewhere")


class TqdmHandler(logging.Handler):
    """Console logging that does not break the progress bars; records logged with
    `extra={"file_only": True}` (e.g. the model printout) go to run.log only."""

    def filter(self, record):
        return not getattr(record, "file_only", False) and super().filter(record)

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(run_dir):
    """Log INFO to the console and to `<run_dir>/run.log` (appended); returns the handlers to remove.
    Under torchrun only rank 0 does so; the other ranks show warnings and errors on the console."""
    formatter = logging.Formatter("%(asctime)s.%(msecs)03d:%(levelname)s:%(name)s - %(message)s",
                                  datefmt="%Y-%m-%d %H:%M:%S")
    if not distributed.is_main_process():
        handlers = [TqdmHandler(level=logging.WARNING)]
    else:
        handlers = [TqdmHandler(level=logging.INFO),
                    logging.FileHandler(os.path.join(run_dir, RUN_LOG_FILENAME), mode="a")]
    root = logging.getLogger()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handlers


def append_line(path, text):
    with open(path, "a") as f:
        f.write(text)


def log_sizes(run_dir):
    """{log file name: size in bytes} of the logs a resumed run cuts back to."""
    sizes = {}
    for name in RESUMABLE_LOGS:
        path = os.path.join(run_dir, name)
        sizes[name] = os.path.getsize(path) if os.path.exists(path) else 0
    return sizes


def truncate_logs(run_dir, sizes):
    """Cut each log back to its size in `sizes` (from `log_sizes` when last.ckpt was written)."""
    for name, size in sizes.items():
        path = os.path.join(run_dir, name)
        if os.path.exists(path) and os.path.getsize(path) > size:
            with open(path, "r+b") as f:
                f.truncate(size)


def drop_tensorboard_scalars(log_dir, drop):
    """Rewrite every event file under `log_dir` without the scalars for which `drop(tag, step)` is true
    (each file is replaced atomically). What a resumed run calls to forget the unfinished epoch's points."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from tensorboard.summary.writer.record_writer import RecordWriter

    for directory, _, names in os.walk(log_dir):
        for name in sorted(n for n in names if n.startswith("events.out.tfevents.")):
            path = os.path.join(directory, name)
            kept, changed = [], False
            for event in LegacyEventFileLoader(path).Load():
                if event.HasField("summary"):
                    values = [v for v in event.summary.value if not drop(v.tag, event.step)]
                    if len(values) != len(event.summary.value):
                        changed = True
                        if not values:
                            continue
                        del event.summary.value[:]
                        event.summary.value.extend(values)
                kept.append(event)
            if not changed:
                continue
            with atomic_write(path, "wb") as f:
                writer = RecordWriter(f)
                for event in kept:
                    writer.write(event.SerializeToString())


class NullWriter:
    """The TensorBoard writer of the ranks other than 0, which write nothing."""

    def add_scalar(self, *args, **kwargs):
        pass

    def add_scalars(self, *args, **kwargs):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def unfinished_epoch_points(epoch, batches_per_epoch):
    """(tag, step) -> whether that TensorBoard point belongs to `epoch` or later: its training steps
    (Train/*, step epoch * batches_per_epoch + batch), its eval-loss point (Eval_Loss/*, step epoch) and
    its evaluation (Eval/*, step (epoch + 1) * batches_per_epoch)."""
    def belongs(tag, step):
        if tag.startswith("Eval_Loss/"):
            return step >= epoch
        if tag.startswith("Eval/"):
            return step >= (epoch + 1) * batches_per_epoch
        return step >= epoch * batches_per_epoch
    return belongs


def open_tensorboard(log_dir, resumed_epoch, batches_per_epoch):
    """The run's TensorBoard writer (rank 0; the other ranks get a NullWriter). A run resumed at epoch
    `resumed_epoch` (None: a new run) first drops that unfinished epoch's points, which it writes again."""
    if not distributed.is_main_process():
        return NullWriter()
    from torch.utils.tensorboard import SummaryWriter

    if resumed_epoch is not None:
        drop_tensorboard_scalars(log_dir, unfinished_epoch_points(resumed_epoch, batches_per_epoch))
    return SummaryWriter(log_dir)
