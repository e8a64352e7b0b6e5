"""The oldest torch this project runs on, and a clear error on an older one.

torch 2.6 is the first release with everything used here: checkpoints are read with
`torch.serialization.safe_globals` given (class, "module.name") pairs and
`get_unsafe_globals_in_checkpoint` (2.6), mixed precision uses `torch.amp.GradScaler(device)` (2.3) and
`torch.is_autocast_enabled(device_type)` (2.4), scoring uses `torch.nonzero_static`.
"""
import re

import torch

from utils.errors import ConquerError

MIN_TORCH_VERSION = (2, 6)
# One API per reason above that an older torch lacks; checked as well as the version string.
REQUIRED_APIS = ("serialization.safe_globals", "serialization.get_unsafe_globals_in_checkpoint", "amp.GradScaler",
                 "nonzero_static")


class TorchVersionError(ConquerError):
    """The installed torch is older than MIN_TORCH_VERSION."""


def _version_tuple(version):
    match = re.match(r"(\d+)\.(\d+)", str(version))
    return (int(match.group(1)), int(match.group(2))) if match else None


def _has_api(dotted):
    obj = torch
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return True


def require_torch():
    """Raise TorchVersionError naming the requirement unless torch >= MIN_TORCH_VERSION."""
    found = _version_tuple(torch.__version__)
    missing = [api for api in REQUIRED_APIS if not _has_api(api)]
    if (found is not None and found < MIN_TORCH_VERSION) or missing:
        minimum = ".".join(map(str, MIN_TORCH_VERSION))
        lacking = f" (it lacks torch.{missing[0]})" if missing else ""
        raise TorchVersionError(f"this project needs torch>={minimum}; found torch {torch.__version__}{lacking}: "
                                f"pip install 'torch>={minimum}'")
