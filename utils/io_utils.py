"""File helpers shared by every entry point.

Every write that a user could lose (checkpoints, opt.json, predictions, metrics) goes through
`atomic_write`: the bytes land in a temporary file in the destination folder, are fsync'ed, and
only then replace the destination with `os.replace`. A process killed at any moment leaves either
the previous file or the new one, never half of one.

Every folder built in several steps (a corpus, a store, a set of ranklists, a search index) goes through
`atomic_folder`: it is built under a unique temporary name beside its destination (`<name>.partial-<pid>-<hex>`)
and renamed into place at the end, so a reader never sees half a folder, a failure leaves nothing, and two
processes building the same destination never touch each other's temporary folder. A process killed
mid-build leaves its temporary folder behind, named after the destination and the process.
"""
import contextlib
import errno
import gc
import io
import json
import os
import secrets
import shutil
import tempfile

from utils.errors import ConquerError


class DataFileError(ConquerError):
    """A user-supplied file is missing or malformed; the message names the file and what was expected."""


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file next to `path`; on a clean exit it atomically replaces `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        os.chmod(tmp_path, 0o666 & ~_current_umask())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise
    _fsync_directory(directory)


@contextlib.contextmanager
def atomic_folder(path, replace=False):
    """Yield a new empty folder beside `path` (permissions 0o777 & ~umask, as os.mkdir gives); on a clean exit
    it is renamed onto `path`, on an exception it is removed.

    Without `replace` an existing `path` is a FileExistsError, checked when entering (before any work) and
    again by the rename (another process may have finished first: its folder is kept, ours removed). With
    `replace` an existing `path` is moved aside, the new folder renamed in and the old one removed, so `path`
    is missing only between two renames.
    """
    path = os.path.abspath(os.fspath(path))
    if not replace and os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "already exists", path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temp = _new_folder_beside(path, "partial")
    try:
        yield temp
        (_replace_folder if replace else _rename_folder)(temp, path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _fsync_directory(os.path.dirname(path))


def _new_folder_beside(path, tag):
    """Create `<path>.<tag>-<pid>-<hex>`, a name no other process or call can pick (the pid tells whose it is)."""
    while True:
        candidate = f"{path}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(candidate)  # mode 0o777 & ~umask; tempfile.mkdtemp would make it 0700
            return candidate
        except FileExistsError:
            continue


def _rename_folder(temp, path):
    # os.rename onto an existing empty folder would silently replace it, so check; a non-empty one or a file
    # (created since the check) makes the rename itself fail.
    if os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "already exists", path)
    try:
        os.rename(temp, path)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
        raise FileExistsError(errno.EEXIST, "already exists", path) from e


def _replace_folder(temp, path):
    if not os.path.lexists(path):
        os.rename(temp, path)
        return
    old = _new_folder_beside(path, "old")
    os.rmdir(old)  # the name is ours: a unique name that did not exist a moment ago
    os.rename(path, old)
    try:
        os.rename(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(old, path)
        raise
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.remove(old)


def remove_stale_temp_files(directory):
    """Delete the temporary files (`.<name>.<random>.tmp`) that `atomic_write` leaves in `directory` when its
    process is killed mid-write; only call it when no other process is writing there. Returns their names."""
    stale = [name for name in os.listdir(directory) if name.startswith(".") and name.endswith(".tmp")
             and os.path.isfile(os.path.join(directory, name))]
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, name))
    return stale


def _current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fsync_directory(directory):
    # Makes the rename itself durable; some filesystems do not allow opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_json(data, path, save_pretty=False, sort_keys=False):
    """Write JSON atomically: compact by default, indent 4 with `save_pretty` (as the original)."""
    with atomic_write(path, "w") as f:
        if save_pretty:
            f.write(json.dumps(data, indent=4, sort_keys=sort_keys))
        else:
            json.dump(data, f)


def save_jsonl(rows, path):
    with atomic_write(path, "w") as f:
        f.write("\n".join(json.dumps(row) for row in rows))


def load_json(path):
    if not os.path.isfile(path):
        raise DataFileError(f"{path}: file not found")
    with open(path, "r") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}: invalid JSON ({e})") from None


def load_jsonl(path):
    """Read a JSON-lines file; a malformed line is reported with its 1-based line number."""
    if not os.path.isfile(path):
        raise DataFileError(f"{path}: file not found")
    rows = []
    with open(path, "r") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}: line {line_no} is not valid JSON ({e})") from None
    return rows


def atomic_torch_save(obj, path):
    """`torch.save` through `atomic_write` (the serialised bytes are built in memory first)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_write(path, "wb") as f:
        f.write(buffer.getbuffer())


def make_code_zip(src_dir, zip_path, enclosing_dir="code", exclude_dirs=(), exclude_dirs_substring=None,
                  exclude_extensions=()):
    """Snapshot the code tree into `zip_path` (written atomically), as the original saves `code.zip`."""
    import zipfile

    src_dir = os.path.abspath(src_dir)
    with atomic_write(zip_path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
        for root, dirs, files in os.walk(src_dir):
            dirs[:] = sorted(d for d in dirs if d not in exclude_dirs and not d.startswith(".")
                             and not (exclude_dirs_substring and exclude_dirs_substring in d))
            for name in sorted(files):
                if name.endswith(tuple(exclude_extensions)):
                    continue
                path = os.path.join(root, name)
                zf.write(path, os.path.join(enclosing_dir, os.path.relpath(path, src_dir)))


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector (restoring its previous state) while building large numbers of
    acyclic containers, which only trigger useless collections."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
