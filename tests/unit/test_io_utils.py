"""utils.io_utils: `atomic_folder` (a folder appears whole or not at all, with normal permissions, and concurrent
builds of one destination never remove each other's work), and a caller of `atomic_write`."""
import os
import stat
import threading

import pytest

from utils.io_utils import atomic_folder
from utils.run_dir import drop_tensorboard_scalars


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_folder_appears_only_at_the_end_with_umask_permissions(tmp_path):
    target = tmp_path / "sub" / "corpus"
    old_umask = os.umask(0o022)
    try:
        with atomic_folder(target) as temp:
            assert os.path.dirname(temp) == str(tmp_path / "sub") and not target.exists()
            (open(os.path.join(temp, "a.txt"), "w")).write("a")
    finally:
        os.umask(old_umask)
    assert (target / "a.txt").read_text() == "a"
    assert _mode(target) == 0o755  # tempfile.mkdtemp would give 0o700
    assert os.listdir(tmp_path / "sub") == ["corpus"]


def test_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "corpus") as temp:
            open(os.path.join(temp, "a.txt"), "w").close()
            raise RuntimeError("build failed")
    assert os.listdir(tmp_path) == []


def test_existing_target_is_refused_before_any_work_unless_replaced(tmp_path):
    target = tmp_path / "store"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError):
        with atomic_folder(target):
            pytest.fail("the body must not run")
    with atomic_folder(target, replace=True) as temp:
        open(os.path.join(temp, "new.txt"), "w").close()
    assert os.listdir(target) == ["new.txt"] and os.listdir(tmp_path) == ["store"]


def test_replace_failure_keeps_the_previous_folder(tmp_path):
    target = tmp_path / "store"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(target, replace=True):
            raise RuntimeError("write failed")
    assert os.listdir(target) == ["old.txt"] and os.listdir(tmp_path) == ["store"]


def test_two_concurrent_builds_keep_each_others_work(tmp_path):
    """Both start before either finishes (a fixed `.partial` name made the second delete the first's folder):
    the first to finish publishes its folder, the second gets FileExistsError and removes only its own."""
    target = tmp_path / "corpus"
    both_started = threading.Barrier(2)
    first_done = threading.Event()
    outcome = {}

    def build(name, wait_for_first):
        try:
            with atomic_folder(target) as temp:
                open(os.path.join(temp, name), "w").close()
                both_started.wait(timeout=10)
                if wait_for_first:
                    first_done.wait(timeout=10)
                    assert os.listdir(temp) == [name]  # the first build's exit did not touch this folder
            outcome[name] = "published"
        except FileExistsError:
            outcome[name] = "refused"
        finally:
            first_done.set()

    threads = [threading.Thread(target=build, args=(name, name == "second")) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcome == {"first": "published", "second": "refused"}
    assert os.listdir(target) == ["first"] and os.listdir(tmp_path) == ["corpus"]


def test_an_empty_folder_created_meanwhile_is_not_silently_replaced(tmp_path):
    target = tmp_path / "corpus"
    with pytest.raises(FileExistsError):
        with atomic_folder(target):
            target.mkdir()  # os.rename alone would replace an empty folder without a word
    assert os.listdir(tmp_path) == ["corpus"] and os.listdir(target) == []


def test_rewritten_tensorboard_event_files_keep_normal_permissions(tmp_path):
    """run_dir rewrote event files through its own mkstemp + rename, which left them 0600; atomic_write does not."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for step in range(4):
        writer.add_scalar("loss", float(step), step)
    writer.close()
    old_umask = os.umask(0o022)
    try:
        drop_tensorboard_scalars(str(tmp_path), lambda tag, step: step >= 2)
    finally:
        os.umask(old_umask)
    (name,) = os.listdir(tmp_path)
    steps = [event.step for event in LegacyEventFileLoader(str(tmp_path / name)).Load() if event.HasField("summary")]
    assert steps == [0, 1] and _mode(tmp_path / name) == 0o644
