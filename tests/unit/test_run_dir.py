"""utils.run_dir: paths recorded in a run's opt.json, found again from another working directory."""
import os

from utils.run_dir import REPO_ROOT, recorded_path


def test_recorded_paths_are_found_from_here_or_below_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here.json").write_text("{}")
    assert recorded_path("here.json") == "here.json"  # exists from the working directory: as recorded
    assert recorded_path("config/tvr_data_config.json") == os.path.join(REPO_ROOT, "config", "tvr_data_config.json")
    assert recorded_path("nowhere/data_config.json") == "nowhere/data_config.json"  # the caller names it missing
    assert recorded_path(str(tmp_path / "gone.json")) == str(tmp_path / "gone.json")
    assert recorded_path(None) is None
