"""LMDB feature stores of the TVR release: readers, writers and the exact value encodings.

| store     | key (UTF-8)     | value                                                        |
|-----------|-----------------|--------------------------------------------------------------|
| query     | str(desc_id)    | bytes of `np.savez(f, features=(n_tokens, Dq))`              |
| subtitle  | vid_name        | bytes of `np.savez(f, features=(n_clips, Dt))`               |
| video     | vid_name        | `msgpack_numpy` map {"features": (n_clips, Dv)}              |
| ranklist  | str(desc_id)    | `msgpack` list of [video_global_idx, score], best first      |

Opening: LMDB forbids opening one environment twice in a process (py-lmdb 3 raises), and an environment
must not be used across fork(). So readers open nothing when constructed; the first `get` opens the
store read-only (lock=False: the release is never written while read) through a module-level cache keyed
by (pid, realpath). Every reader of a path in a process shares one environment; a forked DataLoader
worker finds the parent's entries under another pid, closes its inherited copies (that only unmaps them
in the child) and opens its own. Readers pickle as plain paths, so spawned workers work as well.
"""
import contextlib
import io
import os
import threading

import lmdb
import msgpack
import msgpack_numpy
import numpy as np

from utils.errors import ConquerError
from utils.io_utils import atomic_folder

VISUAL_L2_EPS = 1e-5
_MAX_READERS = 4096 * 8


class FeatureStoreError(ConquerError):
    """A store is missing or holds a bad value; the message names store path, key, expected vs found."""


# ---------------------------------------------------------------------------------------------------
# Encodings (release format)

def encode_npz_features(features):
    """Query / subtitle value: the bytes of an `np.savez` archive holding array `features`."""
    buffer = io.BytesIO()
    np.savez(buffer, features=np.asarray(features))
    return buffer.getvalue()


def decode_npz_features(value):
    # The release arrays are plain numeric arrays, which never need pickle; refusing it keeps a
    # tampered store from running code.
    with np.load(io.BytesIO(value), allow_pickle=False) as archive:
        return archive["features"]


def encode_video_features(features):
    """Visual value: a msgpack_numpy map {"features": array}."""
    return msgpack_numpy.packb({"features": np.asarray(features)})


def decode_video_features(value):
    # A read-only array over the bytes msgpack copied out of the store (so it outlives the transaction);
    # VideoFeatureStore.get returns a fresh array anyway, the L2 normalisation writes one.
    return msgpack_numpy.unpackb(value, raw=False)["features"]


def encode_ranklist(pairs):
    """Ranklist value: a msgpack list of [video_global_idx (int), score (float)], best first."""
    return msgpack.packb([[int(video_idx), float(score)] for video_idx, score in pairs])


def decode_ranklist(value):
    return [(int(video_idx), float(score)) for video_idx, score in msgpack.unpackb(value)]


# ---------------------------------------------------------------------------------------------------
# Per-process environment cache

_envs = {}  # (pid, realpath) -> lmdb.Environment
_envs_lock = threading.Lock()


def _open_env(realpath):
    key = (os.getpid(), realpath)
    env = _envs.get(key)
    if env is not None:
        return env
    with _envs_lock:
        if key in _envs:
            return _envs[key]
        for inherited in [k for k in _envs if k[0] != key[0]]:
            _envs.pop(inherited).close()
        try:
            env = lmdb.open(realpath, readonly=True, create=False, lock=False, readahead=False,
                            max_readers=_MAX_READERS)
        except lmdb.Error as e:
            raise FeatureStoreError(f"store {realpath}: cannot open as LMDB ({e})") from None
        _envs[key] = env
        return env


def close_store(path):
    """Close this process's shared environment of `path` (if open); the next `get` reopens it."""
    key = (os.getpid(), os.path.realpath(path))
    with _envs_lock:
        env = _envs.pop(key, None)
    if env is not None:
        env.close()


# ---------------------------------------------------------------------------------------------------
# Readers

class _Store:
    """Lazily opened read-only LMDB store; subclasses define `kind` and `_decode(value)`."""
    kind = "LMDB"
    encoding = "the release encoding"

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(os.path.join(self.path, "data.mdb")):
            found = "a directory without data.mdb" if os.path.isdir(self.path) else "nothing"
            raise FeatureStoreError(
                f"{self.kind} store {self.path}: expected an LMDB directory holding data.mdb, found {found}")
        self._realpath = os.path.realpath(self.path)

    def _read(self, key):
        """Decoded value of `key`; FeatureStoreError if absent or undecodable."""
        key = str(key)
        with _open_env(self._realpath).begin(buffers=True) as txn:
            value = txn.get(key.encode("utf-8"))
            if value is None:
                raise FeatureStoreError(f"{self.kind} store {self.path}: key {key!r} not found")
            try:
                return self._decode(value)
            except Exception as e:  # any decoder failure means the same thing: a corrupt value
                raise FeatureStoreError(
                    f"{self.kind} store {self.path}: key {key!r}: value cannot be decoded as {self.encoding} "
                    f"({type(e).__name__}: {e})") from None

    def __contains__(self, key):
        with _open_env(self._realpath).begin(buffers=True) as txn:
            return txn.get(str(key).encode("utf-8")) is not None

    def __len__(self):
        return _open_env(self._realpath).stat()["entries"]

    def keys(self):
        """All keys as str, in LMDB (byte) order."""
        with _open_env(self._realpath).begin() as txn:
            return [key.decode("utf-8") for key in txn.cursor().iternext(keys=True, values=False)]


class _FeatureStore(_Store):
    """Feature rows per key, returned as float32 (n, D) after truncation to `max_len` rows."""

    def __init__(self, path, max_len=None, dim=None):
        super().__init__(path)
        self.max_len = max_len
        self.dim = dim

    def get(self, key, start=0):
        """Rows [start, start + max_len) of `key` (a window of a long video; all rows without max_len)."""
        features = self._read_array(key)
        where = f"{self.kind} store {self.path}: key {str(key)!r}"
        if self.dim is not None and features.shape[1] != self.dim:
            raise FeatureStoreError(f"{where}: expected feature dim {self.dim}, found {features.shape[1]}")
        features = features[start:None if self.max_len is None else start + self.max_len]
        if not np.isfinite(features).all():
            bad_row = int(np.flatnonzero(~np.isfinite(features).all(axis=1))[0])
            raise FeatureStoreError(f"{where}: expected finite values, found NaN/inf in row {bad_row}")
        return self._postprocess(features).astype(np.float32, copy=False)

    def clip_count(self, key):
        """Rows stored under `key` (a video's clip count), whatever max_len."""
        return self._read_array(key).shape[0]

    def _read_array(self, key):
        features = self._read(key)
        if not (isinstance(features, np.ndarray) and features.ndim == 2 and features.dtype.kind in "fiu"):
            raise FeatureStoreError(f"{self.kind} store {self.path}: key {str(key)!r}: expected a numeric 2-d "
                                    f"`features` array (n, D), found {getattr(features, 'dtype', type(features).__name__)} "
                                    f"shape {getattr(features, 'shape', None)}")
        return features

    def _postprocess(self, features):
        return features


class QueryFeatureStore(_FeatureStore):
    """desc_id -> query token features (n_tokens, Dq); no normalisation."""
    kind = "query"
    encoding = "np.savez bytes with array `features`"
    _decode = staticmethod(decode_npz_features)


class SubtitleFeatureStore(_FeatureStore):
    """vid_name -> subtitle clip features (n_clips, Dt); no normalisation."""
    kind = "subtitle"
    encoding = "np.savez bytes with array `features`"
    _decode = staticmethod(decode_npz_features)


class VideoFeatureStore(_FeatureStore):
    """vid_name -> visual clip features (n_clips, Dv), each row L2-normalised after truncation."""
    kind = "video"
    encoding = "msgpack_numpy map with key `features`"
    _decode = staticmethod(decode_video_features)

    def _postprocess(self, features):
        # In the stored dtype, eps added to the norm (not a clamp), as the original.
        return features / (np.linalg.norm(features, axis=-1, keepdims=True) + VISUAL_L2_EPS)


class RanklistStore(_Store):
    """desc_id -> first-stage ranklist [(video_global_idx, score), ...], best first."""
    kind = "ranklist"
    encoding = "msgpack list of [video_idx, score] pairs"
    _decode = staticmethod(decode_ranklist)

    def get(self, desc_id):
        return self._read(desc_id)


def expect_dims(checks):
    """[(store, key, expected dim, option flag)] -> the features of each key are compared with the model's input dim,
    so a mismatch stops a run at start-up naming the store and the option to fix (key None: nothing to read yet);
    afterwards every read of each store checks its dim too."""
    for store, key, expected, flag in checks:
        if key is not None:
            found = store.get(key).shape[1]
            if found != expected:
                raise FeatureStoreError(f"{store.kind} store {store.path}: features have dim {found} (key "
                                        f"{str(key)!r}) but the model expects {flag} {expected}; pass {flag} {found}, "
                                        "or point the data config at the features the model was built for")
        store.dim = expected


# ---------------------------------------------------------------------------------------------------
# Writers

class StoreWriter:
    """Write one store from scratch: `with StoreWriter(path, encode) as w: w.put(key, value)`.

    Values are encoded with `encode` and committed in chunks; before each chunk the map is sized from the
    pages in use and what the chunk can take (`_reserve`). The store is built in a temporary folder beside
    `path` (`io_utils.atomic_folder`) and moved into place on a clean exit, replacing any previous store there,
    so an interrupted write never leaves a half store under `path`.
    """
    _CHUNK_BYTES = 64 << 20

    def __init__(self, path, encode):
        self.path = os.fspath(path)
        self.encode = encode
        self._pending = []
        self._pending_bytes = 0
        self._map_size = 1 << 20
        self._env = None
        self._cleanup = None

    def __enter__(self):
        with contextlib.ExitStack() as stack:
            partial = stack.enter_context(atomic_folder(self.path.rstrip(os.sep), replace=True))
            self._env = lmdb.open(partial, map_size=self._map_size, subdir=True, readahead=False)
            stack.callback(self._env.close)  # runs first: the environment is closed before its folder moves
            self._cleanup = stack.pop_all()
        return self

    def put(self, key, value):
        encoded = self.encode(value)
        self._pending.append((str(key).encode("utf-8"), encoded))
        self._pending_bytes += len(encoded)
        if self._pending_bytes >= self._CHUNK_BYTES:
            self._flush()

    def _reserve(self, margin):
        """Grow the map to the pages in use plus `margin` times what the pending chunk can take: an entry of
        more than half a page gets whole overflow pages, smaller ones share leaf pages (16 bytes of header
        each, pages half full after splits); the margin covers the B-tree's branch and copy-on-write pages."""
        page = self._env.stat()["psize"]
        used = (self._env.info()["last_pgno"] + 1) * page
        chunk = 0
        for key, value in self._pending:
            size = len(key) + len(value) + 16
            chunk += -(-size // page) * page if size > page // 2 else 2 * size
        needed = used + margin * chunk + (1 << 20)
        if needed > self._map_size:
            self._map_size = -(-needed // (1 << 20)) << 20
            self._env.set_mapsize(self._map_size)

    def _flush(self):
        margin = 2
        while True:
            self._reserve(margin)
            try:
                with self._env.begin(write=True) as txn:
                    for key, value in self._pending:
                        txn.put(key, value)
                break
            except lmdb.MapFullError:  # more B-tree overhead than the margin allowed (many tiny entries)
                margin *= 2
        self._pending, self._pending_bytes = [], 0

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            return self._cleanup.__exit__(exc_type, exc, tb)  # closes the environment, removes the folder
        with self._cleanup:  # on leaving: closes the environment, renames the folder onto `path`
            self._flush()
            close_store(self.path)  # a reader of the old store in this process must reopen the new one
        return False


def _items(data):
    return data.items() if hasattr(data, "items") else data


def _write(path, data, encode):
    with StoreWriter(path, encode) as writer:
        for key, value in _items(data):
            writer.put(key, value)


def write_query_store(path, features_by_desc_id):
    """{desc_id: (n_tokens, Dq) array} (or an iterable of pairs) -> query store at `path`."""
    _write(path, features_by_desc_id, encode_npz_features)


def write_subtitle_store(path, features_by_vid_name):
    """{vid_name: (n_clips, Dt) array} (or an iterable of pairs) -> subtitle store at `path`."""
    _write(path, features_by_vid_name, encode_npz_features)


def write_video_store(path, features_by_vid_name):
    """{vid_name: (n_clips, Dv) array} (or an iterable of pairs) -> visual store at `path`."""
    _write(path, features_by_vid_name, encode_video_features)


def write_ranklist_store(path, ranklist_by_desc_id):
    """{desc_id: [(video_global_idx, score), ...]} (or an iterable of pairs) -> ranklist store at `path`."""
    _write(path, ranklist_by_desc_id, encode_ranklist)
