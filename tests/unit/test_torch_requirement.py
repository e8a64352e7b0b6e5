"""utils/torch_requirement.py: an older torch stops every entry point with one line naming the requirement."""
import re

import pytest
import torch

import train
from method.checkpoint import load_checkpoint
from utils.errors import run_cli
from utils.torch_requirement import TorchVersionError, require_torch


def test_this_torch_is_new_enough():
    require_torch()


@pytest.mark.parametrize("version", ["2.5.1", "2.1.0+cu121", "1.13.1"])
def test_older_version_is_refused(monkeypatch, version):
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(TorchVersionError, match=rf"needs torch>=2\.6; found torch {re.escape(version)}: pip install"):
        require_torch()


def test_missing_api_is_refused_whatever_the_version_says(monkeypatch):
    monkeypatch.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint")
    with pytest.raises(TorchVersionError, match="lacks torch.serialization.get_unsafe_globals_in_checkpoint"):
        require_torch()


def test_entry_points_and_checkpoint_loading_say_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, ["--exp_id", "x", "--device", "-1", "--results_root", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: this project needs torch>=2.6; found torch 2.5.1: pip install 'torch>=2.6'"]
    with pytest.raises(TorchVersionError):
        load_checkpoint(tmp_path / "model.ckpt")
