"""method/amp.py: the autocast context and GradScaler for --amp off/bf16/fp16, and its errors."""
import contextlib

import pytest
import torch

from method.amp import autocast_context, check_amp, make_grad_scaler
from utils.errors import OptionError


def test_off_is_plain_fp32():
    assert isinstance(autocast_context("off", "cpu"), contextlib.nullcontext)
    layer = torch.nn.Linear(4, 3)
    with autocast_context("off", torch.device("cpu")):
        assert layer(torch.randn(2, 4)).dtype == torch.float32
    assert not make_grad_scaler("off", "cpu").is_enabled()


def test_bf16_on_cpu_autocasts_matmuls_and_needs_no_scaler():
    layer = torch.nn.Linear(4, 3)
    with autocast_context("bf16", torch.device("cpu")):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    assert not make_grad_scaler("bf16", "cpu").is_enabled()


@pytest.mark.parametrize("amp,device,message", [
    ("fp16", "cpu", "--amp fp16 needs a CUDA device"),
    ("fp8", "cpu", "--amp 'fp8' is unknown"),
    ("bf16", "meta", "supported on cpu and cuda only"),
])
def test_unsupported_combinations_name_the_flag(amp, device, message):
    with pytest.raises(OptionError, match=message):
        check_amp(amp, device)


def test_bf16_training_step_on_cpu_runs_and_stays_close_to_fp32():
    from model_fixtures import make_batch, make_model

    batch = make_batch(b=2, n=2, video_len=12, query_len=7)
    losses = {}
    for amp in ("off", "bf16"):
        torch.manual_seed(0)
        model = make_model(similarity_measure="exclusive").eval()
        with autocast_context(amp, "cpu"):
            loss, _ = model(batch)
        make_grad_scaler(amp, "cpu").scale(loss).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        losses[amp] = loss.item()
    assert losses["bf16"] == pytest.approx(losses["off"], rel=0.05)
