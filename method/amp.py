"""Automatic mixed precision (`--amp off|bf16|fp16`) for training and inference.

* bf16: torch.autocast with bfloat16, on CUDA and on the CPU (where bf16 matmuls can run several times
  faster than fp32 on CPUs with AMX/AVX512-BF16). bf16 has fp32's exponent range, so no loss scaling.
* fp16: torch.autocast with float16 plus a GradScaler (dynamic loss scaling); CUDA only.
* off: plain fp32; the returned context does nothing and the scaler is disabled (a pass-through).

Autocast only changes the dtype of the ops it covers (matmuls, convolutions, ...); parameters, optimizer
state and the losses' softmax/cross-entropy stay in fp32.
"""
import contextlib

import torch

from utils.errors import OptionError

AMP_MODES = ("off", "bf16", "fp16")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _device_type(device):
    return torch.device(device).type


def check_amp(amp, device):
    """Raise OptionError unless precision `amp` can run on `device` (torch.device or str)."""
    if amp not in AMP_MODES:
        raise OptionError(f"--amp {amp!r} is unknown; expected one of {list(AMP_MODES)}")
    device_type = _device_type(device)
    if amp == "fp16" and device_type != "cuda":
        raise OptionError(f"--amp fp16 needs a CUDA device but the device is {device_type!r}; "
                       "use --amp bf16 on the CPU (or --amp off)")
    if amp != "off" and device_type not in ("cpu", "cuda"):
        raise OptionError(f"--amp {amp} is supported on cpu and cuda only, not on {device_type!r}; use --amp off")


def autocast_context(amp, device):
    """Context manager for the forward pass: torch.autocast for bf16/fp16, a no-op for off (`check_amp` has
    accepted `amp` on `device`)."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device_type(device), dtype=AMP_DTYPES[amp])


def make_grad_scaler(amp, device):
    """GradScaler for the backward pass: enabled for fp16 only (bf16 and off need no loss scaling, and a
    disabled scaler passes scale/step/update straight through)."""
    return torch.amp.GradScaler(_device_type(device), enabled=amp == "fp16")
