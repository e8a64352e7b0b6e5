"""The search index of a corpus split: everything about its videos that does not depend on the query.

For a pair of trained run directories (a first stage and CONQUER) and one split of a corpus, the index holds one
row per window (utils/windows.py: a video longer than CONQUER's max_ctx_len L clips is read as windows of L clips
every --window_stride clips, the run's; a video that fits, or any video without windows, is one window at clip 0):
CONQUER's encodings V̂, Ŝ (W, L, H) and visual masks (W, L) of each window, and for a learned first stage its
embeddings of each window ("clips" (W, M, L', D), "clip_mask" (W, L')). Arrays are stored in chunks of the windows
of at most `chunk_videos` videos, one `.npy` file per array and chunk, opened memory-mapped, so the index may be
larger than RAM: a query reads only the rows it re-ranks (and, for a learned first stage, streams the embeddings).

Layout of INDEX/:

    CURRENT                 name of the live version folder (written atomically, last)
    v000001/manifest.json   run dirs and checkpoint sha256, their windows (window_stride, max_ctx_len), corpus
                            data config, split and provenance (utils/provenance.py), array shapes, rows per
                            chunk, package versions
    v000001/windows.json    [video name, start clip] of every row, in row order: the windows of a video together,
                            in start order
    v000001/<array>.<chunk>.npy
    v000001/thumbnails.json {video name: layout of its sprite} (utils/thumbnails.py), when the corpus's data
                            config has a "video_dir"; the sprites are v000001/thumbnails/<video name>.jpg

A build writes a new version folder under a temporary name, renames it, then points CURRENT at it and removes
the old version; an interrupted build leaves the previous index untouched. An update (`--update`) hard-links
the previous version's chunks, rewrites a chunk with only its kept rows when some of its videos left the split,
and encodes only the windows of the videos the corpus gained. Folders get the umask's permissions, so that a
server running as another user can read the index.

Format version 2 (rows are windows) replaced version 1 (rows were videos, videos.json); a version-1 index is
refused with a line asking to rebuild it: its manifest does not record the windows its runs read, and a rebuild
costs only the encoding of the split.
"""
import datetime
import functools
import hashlib
import logging
import os
import platform
import shutil
from typing import NamedTuple

import numpy as np
import torch
from easydict import EasyDict
from torch.utils.data import default_collate
from tqdm import tqdm

from config.options import TestOptions
from method.checkpoint import load_trained_model
from method.dataset import build_eval_dataset, prepare_batch_inputs
from method.first_stage import MODALITIES
from method.rank_first_stage import load_first_stage
from utils import run_dir as run_dirs
from utils.data_config import load_data_config
from utils.errors import ConquerError
from utils.feature_stores import FeatureStoreError, expect_dims
from utils.io_utils import atomic_folder, atomic_write, load_json, save_json
from utils.provenance import provenance, provenance_difference
from utils.thumbnails import ThumbnailError, write_sprite
from utils.tvr_format import SPLITS
from utils.video_decoding import video_file
from utils.windows import Window

logger = logging.getLogger(__name__)

INDEX_FORMAT = "conquer-search-index"
FORMAT_VERSION = 2
CURRENT_FILENAME = "CURRENT"
MANIFEST_FILENAME = "manifest.json"
WINDOWS_FILENAME = "windows.json"
THUMBNAILS_FILENAME, THUMBNAILS_DIRNAME = "thumbnails.json", "thumbnails"
VERSION_PREFIX = "v"
# `--first_stage ranklist`: no learned first stage; candidates come from the corpus's stored ranklists.
RANKLIST_FIRST_STAGE = "ranklist"
# Manifest entries that opening an index and loading a Searcher read: section -> its keys (() = a plain value).
MANIFEST_KEYS = {"created": (), "chunks": (), "arrays": (), "conquer": ("run_dir", "checkpoint", "sha256"),
                 "corpus": ("data_config", "split"), "first_stage": ("kind",)}
MODEL_FIRST_STAGE_KEYS = ("run_dir", "checkpoint", "sha256")


class SearchIndexError(ConquerError):
    """A search index is missing, partial, corrupt or was built from other run dirs; the message names it."""


def sha256_file(path, block_size=2 ** 22):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()


def conquer_options(run_dir, dataset_config, split, device=-1, max_vcmr_video=None):
    """The options inference would use for CONQUER run `run_dir` on `split` of `dataset_config`."""
    argv = ["--model_dir", os.fspath(run_dir), "--dataset_config", os.fspath(dataset_config),
            "--eval_split_name", split, "--device", str(device), "--num_workers", "0"]
    if max_vcmr_video is not None:
        argv += ["--max_vcmr_video", str(max_vcmr_video)]
    return TestOptions().parse(argv)


def run_identity(run_dir, checkpoint_path):
    """What the manifest records of a run: absolute run dir and checkpoint, and the checkpoint's sha256."""
    if not os.path.isfile(checkpoint_path):
        raise SearchIndexError(f"run dir {run_dir}: checkpoint {checkpoint_path} not found")
    return dict(run_dir=os.path.realpath(run_dir), checkpoint=os.path.realpath(checkpoint_path),
                sha256=sha256_file(checkpoint_path))


def first_stage_checkpoint(run_dir):
    return os.path.join(run_dirs.locate_model_dir(run_dir), run_dirs.CKPT_FILENAME)


def run_windows(opt):
    """How a run reads videos, from its options or opt.json: {"window_stride", "max_ctx_len"}."""
    return dict(window_stride=opt.get("window_stride", 0), max_ctx_len=opt["max_ctx_len"])


def first_stage_windows(run_dir):
    return run_windows(load_json(os.path.join(run_dirs.locate_model_dir(run_dir), run_dirs.OPT_FILENAME)))


def check_windows_agree(conquer_opt, conquer_run_dir, first_stage):
    """A learned first stage must read the videos as CONQUER does: the index has one row per window, embedded by
    both stages. Two runs without windows agree whatever their max_ctx_len (the first stage reads CONQUER's first
    clips, as before windows); with windows, stride and max_ctx_len (the window length) must both match."""
    if first_stage == RANKLIST_FIRST_STAGE:
        return
    first, second = first_stage_windows(first_stage), run_windows(conquer_opt)
    if first["window_stride"] == second["window_stride"] == 0 or first == second:
        return
    raise SearchIndexError(
        f"--first_stage {first_stage} was trained with --window_stride {first['window_stride']} --max_ctx_len "
        f"{first['max_ctx_len']} but --conquer {conquer_run_dir} with --window_stride {second['window_stride']} "
        f"--max_ctx_len {second['max_ctx_len']}: the index holds one set of windows for both stages; use runs "
        "trained with the same --window_stride and --max_ctx_len")


def default_split(data_config, path):
    """The split `build` indexes when none is given: the data config's search_split (a search-only corpus, written
    by utils.build_corpus without annotations), else val."""
    split = data_config.get("search_split", "val")
    if split not in SPLITS:
        raise SearchIndexError(f"data config {path}: search_split {split!r} is not one of {list(SPLITS)}")
    return split


class CorpusReader(NamedTuple):
    """What a run reads of a corpus, from its options: checked against the corpus before any model loads."""
    flag: str  # the command-line flag that named the run
    run_dir: str
    modalities: tuple  # ("visual",) or ("visual", "sub")
    dims: dict  # "query_dim" / "visual_dim" / "text_dim" -> the model's input dim, where recorded
    trained_config: object  # the data config it was trained on (its opt.json's dataset_config), or None


def _corpus_reader(flag, run_dir, options, saved):
    return CorpusReader(flag, os.fspath(run_dir), MODALITIES[options.get("ctx_mode", "visual_sub")],
                        {key: options[key] for key in ("query_dim", "visual_dim", "text_dim")
                         if options.get(key) is not None}, run_dirs.recorded_path(saved.get("dataset_config")))


def corpus_readers(conquer_opt, conquer_run_dir, first_stage):
    """The CorpusReader of CONQUER (its options as inference parses them) and of a learned first stage."""
    saved = load_json(os.path.join(conquer_opt.model_dir, run_dirs.OPT_FILENAME))
    readers = [_corpus_reader("--conquer", conquer_run_dir, conquer_opt, saved)]
    if first_stage != RANKLIST_FIRST_STAGE:
        saved = load_json(os.path.join(run_dirs.locate_model_dir(first_stage), run_dirs.OPT_FILENAME))
        readers.append(_corpus_reader("--first_stage", first_stage, saved, saved))
    return readers


def check_corpus(readers, data_config, path):
    """Refuse a corpus a run cannot read (its ctx_mode lacks a modality the run reads) or was not trained for (its
    provenance, utils/provenance.py, differs from that of the data config the run was trained on). ctx_mode itself
    is not compared: a visual run reads a visual_sub corpus's visual features as well as a visual corpus's.
    A run whose training data config is gone is indexed with a warning."""
    corpus_modalities = MODALITIES.get(data_config.get("ctx_mode"))
    corpus = dict(provenance(data_config), ctx_mode=None)
    for reader in readers:
        run = f"{reader.flag} {reader.run_dir}"
        missing = [m for m in reader.modalities if corpus_modalities is not None and m not in corpus_modalities]
        if missing:
            raise SearchIndexError(
                f"{run} reads {'_'.join(reader.modalities)} features but the corpus {path} has ctx_mode "
                f"{data_config['ctx_mode']!r} (no {missing[0]!r} features); index it with runs trained with "
                f"--ctx_mode {data_config['ctx_mode']}")
        trained = _trained_provenance(reader)
        difference = trained and provenance_difference(dict(trained, ctx_mode=None), corpus)
        if difference:
            raise SearchIndexError(
                f"{run} was trained on the corpus of {reader.trained_config}, whose features differ from those of "
                f"--dataset_config {path} ({difference}); index a corpus made as the training corpus was, or train "
                "on this one")


def _trained_provenance(reader):
    """The provenance of the data config `reader` was trained on, or None (with a warning) when it is unknown."""
    if reader.trained_config is None or not os.path.isfile(reader.trained_config):
        found = ("records no training data config" if reader.trained_config is None
                 else f"its training data config {reader.trained_config} no longer exists")
        logger.warning("%s %s: %s, so the corpus's features cannot be checked to be those it was trained on",
                       reader.flag, reader.run_dir, found)
        return None
    trained = load_json(reader.trained_config)
    if not isinstance(trained, dict):
        raise SearchIndexError(f"{reader.flag} {reader.run_dir}: its training data config {reader.trained_config} "
                               "is not a JSON object")
    return provenance(trained)


def check_feature_dims(readers, dataset, video_name):
    """Each run's input dims against the corpus's stores (`expect_dims`), reading the split's first query (none in
    a search-only corpus) and `video_name`, before any model loads."""
    desc_id = dataset.query_data[0]["desc_id"] if dataset.query_data else None
    video_stores = {"visual": (dataset.video_store, "visual_dim"), "sub": (dataset.sub_store, "text_dim")}
    for reader in readers:
        checks = [(dataset.query_store, desc_id, "query_dim")] + [(video_stores[m][0], video_name, video_stores[m][1])
                                                                  for m in reader.modalities]
        try:
            expect_dims([(store, key, reader.dims[option], f"--{option}") for store, key, option in checks
                         if option in reader.dims])
        except FeatureStoreError as e:
            raise SearchIndexError(f"{reader.flag} {reader.run_dir}: {e}") from None


def load_first_stage_model(run_dir, device):
    """The trained first-stage retriever of run dir `run_dir` (opt.json with model "first_stage", model.ckpt
    with model_cfg), in eval mode on `device`. Its interface: encode_queries(query_feat (Q, Lq, Dq),
    query_mask (Q, Lq)) -> {"query" (Q, M, D), "modality_weights" (Q, M)}; encode_videos(video inputs of the
    dataset) -> {"clips" (V, M, L, D), "clip_mask" (V, L)}; score(query embeddings, video embeddings) -> (Q, V).
    """
    return load_first_stage(run_dir, device, flag="--first_stage")[0]


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class ChunkedArray:
    """One index array stored as memory-mapped `.npy` chunks of consecutive rows."""

    def __init__(self, name, chunks):
        self.name = name
        self.chunks = chunks
        self.offsets = np.cumsum([0] + [len(chunk) for chunk in chunks])

    def __len__(self):
        return int(self.offsets[-1])

    def gather(self, rows):
        """rows (n,) int -> (n, *row shape) numpy array, in the order of `rows`."""
        rows = np.asarray(rows, dtype=np.int64)
        first = self.chunks[0]
        out = np.empty((len(rows),) + first.shape[1:], dtype=first.dtype)
        chunk_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for chunk_id in np.unique(chunk_of):
            where = np.flatnonzero(chunk_of == chunk_id)
            out[where] = self.chunks[chunk_id][rows[where] - self.offsets[chunk_id]]
        return out


def chunk_filename(array_name, chunk_id):
    return f"{array_name}.{chunk_id:05d}.npy"


class SearchIndex:
    """An opened index (read-only). Rows are windows: `windows` [Window(video_name, start)] in row order, the
    windows of a video together and in start order; `video_names` the videos in row order, `position_of`
    {name: video position}; `video_rows` (V + 1,) int64: video v's rows are video_rows[v]:video_rows[v + 1];
    `row_start` (W,) int64 each row's start clip; `row_video` (W,) int64 each row's video position; `row_of`
    {name: the row of its first window} (its only row when it fits); `arrays` {name: ChunkedArray of W rows}."""

    def __init__(self, path, version_dir, manifest, windows, arrays):
        self.path = path
        self.version_dir = version_dir
        self.manifest = manifest
        self.windows = windows
        self.video_names, self.video_rows = video_layout(windows)
        self.position_of = {name: position for position, name in enumerate(self.video_names)}
        self.row_start = np.array([window.start for window in windows], dtype=np.int64)
        self.row_video = np.repeat(np.arange(len(self.video_names)), np.diff(self.video_rows))
        self.row_of = {name: int(self.video_rows[position]) for position, name in enumerate(self.video_names)}
        self.arrays = arrays

    @property
    def reads_windows(self):
        """Whether a video has more than one window (else every row is a whole video, as without windows)."""
        return len(self.windows) > len(self.video_names)

    @property
    def nbytes(self):
        return sum(chunk.nbytes for array in self.arrays.values() for chunk in array.chunks)

    @functools.cached_property
    def thumbnails(self):
        """{video name: (its sprite's absolute path, its layout: utils.thumbnails.SpriteLayout as a dict)} of the
        videos that have thumbnails; read once."""
        path = os.path.join(self.version_dir, THUMBNAILS_FILENAME)
        layouts = _load_json(path, dict) if os.path.exists(path) else {}
        return {name: (os.path.join(os.path.abspath(self.version_dir), THUMBNAILS_DIRNAME, name + ".jpg"), layout)
                for name, layout in layouts.items()}

    @classmethod
    def open(cls, path):
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise SearchIndexError(f"search index {path}: no such folder")
        current = os.path.join(path, CURRENT_FILENAME)
        if not os.path.isfile(current):
            raise SearchIndexError(f"search index {path}: no {CURRENT_FILENAME} file: not an index, or its first "
                                   "build did not finish; build it with `python -m method.search build`")
        version = live_version(path)
        version_dir = os.path.join(path, version)
        manifest_path = os.path.join(version_dir, MANIFEST_FILENAME)
        if not version or os.sep in version or not os.path.isfile(manifest_path):
            raise SearchIndexError(f"search index {path}: {CURRENT_FILENAME} names version {version!r}, which has no "
                                   f"{MANIFEST_FILENAME}: the index is partial or corrupt; rebuild it")
        manifest = _load_json(manifest_path, dict)
        if manifest.get("format") != INDEX_FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise SearchIndexError(f"search index {manifest_path}: format {manifest.get('format')!r} version "
                                   f"{manifest.get('format_version')!r}, expected {INDEX_FORMAT!r} version "
                                   f"{FORMAT_VERSION} (rows are windows); rebuild it (build --overwrite)")
        missing = missing_manifest_key(manifest)
        if missing:
            raise SearchIndexError(f"search index file {manifest_path}: no key {missing!r}: corrupt index; rebuild it")
        windows_path = os.path.join(version_dir, WINDOWS_FILENAME)
        windows = _read_windows(windows_path)
        chunk_sizes = manifest["chunks"]
        if len(windows) != sum(chunk_sizes):
            raise SearchIndexError(f"search index {windows_path}: {len(windows)} windows but the chunks hold "
                                   f"{sum(chunk_sizes)} rows: corrupt index; rebuild it")
        arrays = {name: ChunkedArray(name, [_open_chunk(version_dir, name, chunk_id, n, spec)
                                            for chunk_id, n in enumerate(chunk_sizes)])
                  for name, spec in manifest["arrays"].items()}
        return cls(path, version_dir, manifest, windows, arrays)


def live_version(path):
    """The version folder name the index's CURRENT file names (read as is, checked by `SearchIndex.open`)."""
    with open(os.path.join(path, CURRENT_FILENAME)) as f:
        return f.read().strip()


def missing_manifest_key(manifest):
    """The first entry (dotted key) of MANIFEST_KEYS, a model first stage's keys or an array's shape and dtype that
    `manifest` lacks, or None."""
    for section, keys in MANIFEST_KEYS.items():
        if section not in manifest:
            return section
        for key in keys:
            if not isinstance(manifest[section], dict) or key not in manifest[section]:
                return f"{section}.{key}"
    if manifest["first_stage"]["kind"] != RANKLIST_FIRST_STAGE:
        missing = [key for key in MODEL_FIRST_STAGE_KEYS if key not in manifest["first_stage"]]
        if missing:
            return f"first_stage.{missing[0]}"
    if not isinstance(manifest["arrays"], dict):
        return "arrays"
    for name, spec in manifest["arrays"].items():
        for key in ("shape", "dtype"):
            if not isinstance(spec, dict) or key not in spec:
                return f"arrays.{name}.{key}"
    return None


def video_layout(windows):
    """Windows in row order -> (video names in row order, video_rows (V + 1,) int64: video v's rows are
    video_rows[v]:video_rows[v + 1]); ValueError unless each video's windows are together, distinct and in start
    order."""
    names, firsts = [], []
    for row, (name, start) in enumerate(windows):
        if names and name == names[-1]:
            if start <= windows[row - 1].start:
                raise ValueError(f"row {row}: window ({name!r}, {start}) after start {windows[row - 1].start}")
            continue
        names.append(name)
        firsts.append(row)
    if len(set(names)) != len(names):
        raise ValueError("the windows of a video are not together")
    return names, np.array(firsts + [len(windows)], dtype=np.int64)


def _read_windows(path):
    rows = _load_json(path, list)
    if not all(isinstance(row, list) and len(row) == 2 and isinstance(row[0], str) and isinstance(row[1], int)
               and not isinstance(row[1], bool) and row[1] >= 0 for row in rows):
        raise SearchIndexError(f"search index file {path}: expected a list of [video name, start clip]; rebuild "
                               "the index")
    windows = [Window(name, start) for name, start in rows]
    try:
        video_layout(windows)
    except ValueError as e:
        raise SearchIndexError(f"search index file {path}: {e}: corrupt index; rebuild it") from None
    return windows


def _load_json(path, expected_type):
    if not os.path.isfile(path):
        raise SearchIndexError(f"search index file {path} is missing: the index is partial; rebuild it")
    try:
        value = load_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise SearchIndexError(f"search index file {path}: invalid JSON ({e}); rebuild the index") from None
    if not isinstance(value, expected_type):
        raise SearchIndexError(f"search index file {path}: expected a JSON {expected_type.__name__}")
    return value


def _open_chunk(version_dir, name, chunk_id, n_rows, spec):
    path = os.path.join(version_dir, chunk_filename(name, chunk_id))
    expected = (n_rows,) + tuple(spec["shape"])
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise SearchIndexError(f"search index array {path} is missing: the index is partial; rebuild it") from None
    except (ValueError, OSError, EOFError) as e:
        raise SearchIndexError(f"search index array {path}: unreadable ({e}); rebuild the index") from None
    if array.shape != expected or array.dtype != np.dtype(spec["dtype"]):
        raise SearchIndexError(f"search index array {path}: {array.dtype} {array.shape}, expected {spec['dtype']} "
                               f"{expected}; rebuild the index")
    return array


def _environment():
    return dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__)


def encode_video_batch(model, first_stage_model, video_inputs):
    """Index rows of one batch of dataset window inputs {"visual": {...} (n, L, ·), "sub": ...}
    -> {array name: (n, ...) numpy}."""
    encoded = model.encode_videos(video_inputs)
    arrays = {f"conquer.{modality}": encoded[modality] for modality in model.video_modality}
    arrays["conquer.video_mask"] = video_inputs["visual"]["feat_mask"]
    if first_stage_model is not None:
        embedded = first_stage_model.encode_videos(video_inputs)
        arrays["first_stage.clips"] = embedded["clips"]
        arrays["first_stage.clip_mask"] = embedded["clip_mask"]
    return {name: value.detach().cpu().numpy() for name, value in arrays.items()}


def index_identity(conquer_opt, conquer_run_dir, first_stage, split, corpus_provenance):
    """The manifest entries an update must agree with: runs, corpus (with its provenance) and the settings of the
    encodings (the windows the rows are: CONQUER's window_stride and max_ctx_len, and the first stage's)."""
    if first_stage == RANKLIST_FIRST_STAGE:
        first = dict(kind=RANKLIST_FIRST_STAGE)
    else:
        first = dict(kind="model", **run_identity(first_stage, first_stage_checkpoint(first_stage)),
                     **first_stage_windows(first_stage))
    return dict(conquer=run_identity(conquer_run_dir, conquer_opt.ckpt_filepath), first_stage=first,
                corpus=dict(data_config=os.path.realpath(conquer_opt.dataset_config), split=split,
                            dset_name=conquer_opt.dset_name, ctx_mode=conquer_opt.ctx_mode,
                            **run_windows(conquer_opt), provenance=corpus_provenance))


def _identity_difference(old, new):
    """First manifest entry in which two identities differ, as 'key: old -> new', or None. The corpus provenance
    is compared as a run's is (`provenance_difference`), and not at all when the index predates its record."""
    for section in new:
        for key in sorted(set(old.get(section, {})) | set(new[section])):
            if (section, key) != ("corpus", "provenance") and old.get(section, {}).get(key) != new[section].get(key):
                return f"{section}.{key}: {old.get(section, {}).get(key)!r} -> {new[section].get(key)!r}"
    recorded = old.get("corpus", {}).get("provenance")
    difference = recorded and provenance_difference(recorded, new["corpus"]["provenance"])
    return f"corpus.provenance {difference}" if difference else None


def build_index(out_dir, conquer, first_stage, dataset_config, split=None, update=False, overwrite=False,
                batch_size=32, chunk_videos=1024, device=-1):
    """Build (or with `update`, extend) the index of `split` at `out_dir` -> summary dict {"out_dir", "n_videos",
    "n_windows" (rows), "n_encoded" (videos encoded now), "nbytes"}.

    first_stage: a first-stage run dir (trained with CONQUER's windows), or RANKLIST_FIRST_STAGE. split: by default
    the data config's search_split, else val (`default_split`). Before any model loads, the corpus is refused
    when a run cannot read it or was not trained for it (`check_corpus`, `check_feature_dims`). An existing
    `out_dir` is an error unless `update` (encode only videos the index lacks and drop those no longer in the
    split; the runs and corpus must be the ones it was built from) or `overwrite` (rebuild everything; a missing
    or empty `out_dir` is simply built). batch_size: windows per forward pass;
    chunk_videos: videos per chunk file (with all their windows).
    """
    out_dir = os.fspath(out_dir)
    data_config = load_data_config(dataset_config)
    split = split or default_split(data_config, dataset_config)
    opt = conquer_options(conquer, dataset_config, split, device)
    check_windows_agree(opt, conquer, first_stage)
    readers = corpus_readers(opt, conquer, first_stage)
    check_corpus(readers, data_config, dataset_config)
    identity = index_identity(opt, conquer, first_stage, split, provenance(data_config))
    previous = _previous_index(out_dir, identity, update, overwrite)
    # Videos are read with every modality either run reads: a visual_sub first stage with a visual CONQUER
    # embeds the subtitles that CONQUER ignores.
    read = {modality for reader in readers for modality in reader.modalities}
    dataset = build_eval_dataset(EasyDict(opt, ctx_mode="_".join(m for m in MODALITIES["visual_sub"] if m in read)),
                                 read_ranklists=False)
    if first_stage == RANKLIST_FIRST_STAGE and not dataset.query_data:
        raise SearchIndexError(f"--first_stage {RANKLIST_FIRST_STAGE} answers the stored queries of the split from "
                               f"its ranklists, and split {split!r} of {dataset_config} has no queries (a search-only "
                               "corpus); build the index with a learned --first_stage")
    names = list(dataset.video2idx)
    check_feature_dims(readers, dataset, names[0] if names else None)
    in_split = set(names)
    kept = [name for name in previous.video_names if name in in_split] if previous is not None else []
    n_removed = len(previous.video_names) - len(kept) if previous is not None else 0
    kept_set = set(kept)
    new_names = [name for name in names if name not in kept_set]
    if previous is not None and not new_names and not n_removed:
        logger.info("search index %s is up to date (%d videos)", out_dir, len(kept))
        return dict(out_dir=out_dir, n_videos=len(kept), n_windows=len(previous.windows), n_encoded=0,
                    nbytes=previous.nbytes)
    if n_removed:
        logger.info("%d indexed videos are no longer in split %s: their rows are dropped", n_removed, split)

    # Models are loaded only to encode new videos: an update that only drops videos copies rows.
    model = load_trained_model(opt).eval() if new_names else None
    first_stage_model = (load_first_stage_model(first_stage, opt.device)
                         if new_names and first_stage != RANKLIST_FIRST_STAGE else None)
    # A new version goes inside an existing index (CURRENT switches to it); anything else is renamed into place.
    inside = os.path.isfile(os.path.join(out_dir, CURRENT_FILENAME))
    version = _next_version(out_dir) if inside else f"{VERSION_PREFIX}000001"
    with atomic_folder(os.path.join(out_dir, version) if inside else out_dir,
                       replace=not inside and os.path.isdir(out_dir)) as staging:
        version_dir = staging if inside else os.path.join(staging, version)
        if not inside:
            os.mkdir(version_dir)
        chunk_sizes, windows, arrays = [], [], {}
        if previous is not None:
            chunk_sizes, windows = _carry_rows(previous, kept_set, version_dir)
            arrays = dict(previous.manifest["arrays"])
        new_windows = [[Window(name, start) for name in new_names[first:first + chunk_videos]
                        for start in dataset.window_starts(name)]
                       for first in range(0, len(new_names), chunk_videos)]
        with torch.inference_mode(), tqdm(total=sum(map(len, new_windows)), desc="Indexing windows") as bar:
            for chunk_windows in new_windows:
                specs = _write_chunk(version_dir, len(chunk_sizes), chunk_windows, dataset, model, first_stage_model,
                                     opt.device, batch_size, bar)
                if arrays and specs != arrays:
                    raise SearchIndexError(f"search index {out_dir}: new videos encode to arrays {specs}, the index "
                                           f"holds {arrays}; rebuild it with --overwrite")
                arrays = specs
                chunk_sizes.append(len(chunk_windows))
                windows += chunk_windows
        _write_thumbnails(version_dir, data_config, opt.clip_length, previous, kept + new_names)
        save_json([list(window) for window in windows], os.path.join(version_dir, WINDOWS_FILENAME))
        manifest = dict(format=INDEX_FORMAT, format_version=FORMAT_VERSION, created=_now(), **identity,
                        n_videos=len(kept) + len(new_names), n_windows=len(windows), chunks=chunk_sizes,
                        arrays=arrays, environment=_environment())
        save_json(manifest, os.path.join(version_dir, MANIFEST_FILENAME), save_pretty=True)
        if not inside:
            _write_current(staging, version)
    if inside:
        _switch_version(out_dir, version)
    index = SearchIndex.open(out_dir)
    return dict(out_dir=out_dir, n_videos=len(index.video_names), n_windows=len(index.windows),
                n_encoded=len(new_names), nbytes=index.nbytes)


def _previous_index(out_dir, identity, update, overwrite):
    """The index an update extends (None for a fresh build); refuses what the flags do not allow."""
    if update and overwrite:
        raise SearchIndexError("--update and --overwrite exclude each other")
    if not os.path.exists(out_dir):
        return None
    if not os.path.isfile(os.path.join(out_dir, CURRENT_FILENAME)):
        if os.path.isdir(out_dir) and not os.listdir(out_dir):
            return None
        raise SearchIndexError(f"--out_dir {out_dir} exists and is not a search index (no {CURRENT_FILENAME}); "
                               "choose another folder")
    if not (update or overwrite):
        raise SearchIndexError(f"--out_dir {out_dir} already holds a search index; pass --update to add the "
                               "corpus's new videos, or --overwrite to rebuild it")
    if overwrite:
        return None
    previous = SearchIndex.open(out_dir)
    difference = _identity_difference(previous.manifest, identity)
    if difference:
        raise SearchIndexError(f"--update {out_dir}: the index was built from other inputs ({difference}); "
                               "pass --overwrite to rebuild it, or another --out_dir")
    return previous


def _carry_rows(previous, keep, staging):
    """Write the previous version's rows of the videos in `keep` into `staging` as chunks 0, 1, ...: a chunk that
    keeps all its rows is hard-linked, one that keeps some is rewritten with them, one that keeps none is dropped
    -> (rows per chunk, windows in row order)."""
    chunk_sizes, windows = [], []
    offsets = np.cumsum([0] + list(previous.manifest["chunks"]))
    for old_id, (first, last) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        rows = [row for row in range(first, last) if previous.windows[row].video_name in keep]
        if not rows:
            continue
        new_id = len(chunk_sizes)
        for name, array in previous.arrays.items():
            target = os.path.join(staging, chunk_filename(name, new_id))
            if len(rows) == last - first:
                _link_or_copy(os.path.join(previous.version_dir, chunk_filename(name, old_id)), target)
            else:
                np.save(target, array.chunks[old_id][np.asarray(rows) - first])
        chunk_sizes.append(len(rows))
        windows += [previous.windows[row] for row in rows]
    return chunk_sizes, windows


def _link_or_copy(source, target):
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _write_thumbnails(version_dir, data_config, clip_length, previous, names):
    """The thumbnail sprites of `names` (utils/thumbnails.py, a tile per clip of `clip_length`) and their layouts
    in `version_dir`, when `data_config` has a "video_dir": a sprite of the `previous` version is hard-linked, the
    other videos are decoded. A video without a file or that cannot be decoded gets none (one warning counts them):
    thumbnails never fail a build."""
    if not data_config.get("video_dir"):
        return
    folder = os.path.join(data_config.root_path, data_config.video_dir)
    carried = previous.thumbnails if previous is not None else {}
    os.mkdir(os.path.join(version_dir, THUMBNAILS_DIRNAME))
    layouts, no_file, failed = {}, 0, []
    for name in tqdm(names, desc="Thumbnails"):
        sprite = os.path.join(version_dir, THUMBNAILS_DIRNAME, name + ".jpg")
        if name in carried and os.path.isfile(carried[name][0]):
            _link_or_copy(carried[name][0], sprite)
            layouts[name] = carried[name][1]
            continue
        path = video_file(folder, name)
        if path is None:
            no_file += 1
            continue
        try:
            layouts[name] = write_sprite(path, sprite, clip_length)._asdict()
        except (ThumbnailError, ImportError) as e:  # ImportError: PyAV is not installed (the `extract` extras)
            failed.append(str(e))
    if no_file or failed:
        logger.warning("%d of %d videos have no thumbnails: %d without a file in %s, %d that cannot be decoded%s",
                       no_file + len(failed), len(names), no_file, folder, len(failed),
                       f" (first: {failed[0]})" if failed else "")
    save_json(layouts, os.path.join(version_dir, THUMBNAILS_FILENAME))


def _write_chunk(staging, chunk_id, windows, dataset, model, first_stage_model, device, batch_size, bar):
    """Encode `windows` (Window rows) into the chunk files `chunk_id` in `staging` -> {array name: {"shape",
    "dtype"}}."""
    files = None
    for start in range(0, len(windows), batch_size):
        batch = default_collate([dataset.get_video_inputs(*window) for window in windows[start:start + batch_size]])
        rows = encode_video_batch(model, first_stage_model, prepare_batch_inputs(batch, device))
        if files is None:
            files = {name: np.lib.format.open_memmap(os.path.join(staging, chunk_filename(name, chunk_id)), mode="w+",
                                                     dtype=value.dtype, shape=(len(windows),) + value.shape[1:])
                     for name, value in rows.items()}
        for name, value in rows.items():
            files[name][start:start + len(value)] = value
        bar.update(len(value))
    for array in files.values():
        array.flush()
    return {name: dict(shape=list(array.shape[1:]), dtype=str(array.dtype)) for name, array in files.items()}


def _next_version(index_dir):
    """The name of the version after the highest one in an index folder."""
    existing = [int(name[len(VERSION_PREFIX):]) for name in os.listdir(index_dir)
                if name.startswith(VERSION_PREFIX) and name[len(VERSION_PREFIX):].isdigit()]
    return f"{VERSION_PREFIX}{max(existing, default=0) + 1:06d}"


def _switch_version(index_dir, version):
    """Point CURRENT at `version` (atomically), then remove the version it named."""
    with open(os.path.join(index_dir, CURRENT_FILENAME)) as f:
        old_version = f.read().strip()
    _write_current(index_dir, version)
    if old_version and old_version != version:
        shutil.rmtree(os.path.join(index_dir, old_version), ignore_errors=True)


def _write_current(index_dir, version):
    with atomic_write(os.path.join(index_dir, CURRENT_FILENAME), mode="w") as f:
        f.write(version + "\n")


def describe(index):
    """A short JSON-able summary of an opened index: names and ids, no paths (it is shown to HTTP clients)."""
    manifest = index.manifest
    return dict(index=os.path.basename(os.path.normpath(index.path)), version=os.path.basename(index.version_dir),
                n_videos=len(index.video_names), n_windows=len(index.windows), nbytes=index.nbytes,
                conquer=_run_summary(manifest["conquer"]), first_stage=_run_summary(manifest["first_stage"]),
                corpus={key: value for key, value in manifest["corpus"].items()
                        if key not in ("data_config", "provenance")},
                created=manifest["created"])


def _run_summary(recorded):
    """A manifest's run entry -> {"kind"?, "run": run dir name, "sha256"} (or {"kind": "ranklist"})."""
    if recorded.get("kind") == RANKLIST_FIRST_STAGE:
        return dict(kind=RANKLIST_FIRST_STAGE)
    return dict(run=os.path.basename(os.path.normpath(recorded["run_dir"])), sha256=recorded["sha256"])
