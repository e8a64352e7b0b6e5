"""Checkpoints: writing, safe loading, strict weight loading, model construction.

A checkpoint is `torch.save` of {"model": state_dict, "model_cfg": EasyDict, "epoch": int} plus optional
extra keys (e.g. optimizer state for resuming). `model_cfg` is pickled as a nested `easydict.EasyDict`,
so the original code (torch.load with weights_only=False) reads our checkpoints.

Loading never runs pickled code: it uses torch's weights-only unpickler, which accepts tensors and plain
containers, plus exactly one extra global, `easydict.EasyDict`. That unpickler only lets plain dicts
receive items, so the EasyDict is read as an OrderedDict and turned back into an EasyDict afterwards.
"""
import collections
import logging
import os
import pickle
import re

import torch

from method.conquer import CONQUER, to_easydict
from method.first_stage import build_first_stage
from method.layers import ModelConfigError
from utils.errors import ConquerError
from utils.io_utils import atomic_torch_save
from utils.torch_requirement import require_torch

logger = logging.getLogger(__name__)

_ALLOWED_GLOBALS = [(collections.OrderedDict, "easydict.EasyDict")]
_ALLOWED_LEAF_TYPES = (torch.Tensor, bool, int, float, complex, str, bytes, type(None), torch.device, torch.dtype)


class CheckpointError(ConquerError):
    """A checkpoint cannot be read or does not fit the model; the message names the file when there is one."""


def _check_weights_only_loadable(value, where):
    """Refuse to write anything the weights-only loader would later refuse (e.g. numpy arrays, custom objects)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_weights_only_loadable(key, f"{where} key")
            _check_weights_only_loadable(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_weights_only_loadable(item, f"{where}[{i}]")
    elif not isinstance(value, _ALLOWED_LEAF_TYPES):
        raise CheckpointError(
            f"{where}: a {type(value).__module__}.{type(value).__qualname__} cannot be stored in a checkpoint; "
            "use tensors, numbers, strings and plain lists/tuples/dicts")


def save_checkpoint(path, model_state, model_cfg, epoch, **extra):
    """Atomically write {"model": model_state, "model_cfg": EasyDict(model_cfg), "epoch": int(epoch), **extra}."""
    _check_weights_only_loadable(extra, "checkpoint extra")
    checkpoint = {"model": model_state, "model_cfg": to_easydict(model_cfg), "epoch": int(epoch), **extra}
    atomic_torch_save(checkpoint, path)


def _refused_globals(path, message):
    """Names of the globals the weights-only unpickler refused, read from the file without executing it."""
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        return sorted(set(names) - {name for _, name in _ALLOWED_GLOBALS})
    except Exception:  # legacy (non-zip) format: fall back to the unpickler's message
        return sorted(set(re.findall(r"GLOBAL ([\w.]+)", message)))


def load_checkpoint(path, map_location="cpu", required_keys=("model", "model_cfg")):
    """Read a checkpoint safely -> dict ("model_cfg", when present, as a nested EasyDict).

    Raises CheckpointError naming the file when it is missing, truncated or corrupt, lacks
    `required_keys`, or references a Python global outside the allow-list (which is then not executed).
    """
    require_torch()  # an older torch would report every checkpoint as corrupt
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        refused = _refused_globals(path, str(e)) if isinstance(e, pickle.UnpicklingError) else []
        if refused:
            raise CheckpointError(
                f"{path}: refused to load: the checkpoint references the Python global(s) {', '.join(refused)}, "
                "which are not on the allow-list (tensors, plain containers, easydict.EasyDict); nothing was "
                "executed. Load it with torch.load(weights_only=False) only if you trust its source.") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt): {_describe(e)}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path}: expected a dict with keys {list(required_keys)}, found a {type(checkpoint).__name__}")
    missing = [key for key in required_keys if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {missing}; found keys {sorted(map(str, checkpoint))}")
    if "model_cfg" in checkpoint:
        checkpoint["model_cfg"] = to_easydict(checkpoint["model_cfg"])
    return checkpoint


def _describe(exception):
    """Exception type plus the telling line of its message (torch's unpickling messages run over many lines)."""
    message = str(exception)
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", message)
    lines = [detail.group(1)] if detail else message.strip().splitlines()
    return f"{type(exception).__name__}: {lines[0]}" if lines else type(exception).__name__


def _variant_hints(missing, unexpected, mismatched):
    def any_has(keys, fragment):
        return any(fragment in key for key in keys)

    hints = []
    if any_has(unexpected, "video_scoring_head."):
        hints.append("the weights have a video-scoring head: they were trained with --similarity_measure exclusive")
    if any_has(missing, "video_scoring_head."):
        hints.append("the model has a video-scoring head (--similarity_measure exclusive) but the weights do not: "
                     "they were trained with general or disjoint")
    if any_has(unexpected, "query_weight."):
        hints.append("the weights have the MoE gate (query_weight): build the model with ctx_mode visual_sub and "
                     "without --no_output_moe_weight")
    if any_has(missing, "query_weight."):
        hints.append("the weights have no MoE gate (query_weight): they were trained with --no_output_moe_weight "
                     "or ctx_mode visual")
    if any_has(unexpected, "videoEncoder.linear.") or any_has(missing, "videoEncoder.img_linear."):
        hints.append("the weights come from ctx_mode visual")
    if any_has(unexpected, "videoEncoder.img_linear.") or any_has(missing, "videoEncoder.linear."):
        hints.append("the weights come from ctx_mode visual_sub")
    if mismatched:
        hints.append("shape mismatches: check --visual_dim/--text_dim/--query_dim/--hidden_dim/--max_ctx_len "
                     "and the model config (model_cfg)")
    return hints


def _format_keys(keys, limit=30):
    shown = [f"    {key}" for key in keys[:limit]]
    if len(keys) > limit:
        shown.append(f"    ... and {len(keys) - limit} more")
    return "\n".join(shown)


def load_model_weights(model, state_dict, source=None):
    """Strictly copy `state_dict` into `model`; on any mismatch raise CheckpointError listing missing keys,
    unexpected keys and shape mismatches, with a hint at the variant options that may be wrong."""
    model_state = model.state_dict()
    missing = [key for key in model_state if key not in state_dict]
    unexpected = [key for key in state_dict if key not in model_state]
    mismatched = []
    for key, target in model_state.items():
        if key in state_dict:
            value = state_dict[key]
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            if found != tuple(target.shape):
                mismatched.append(f"{key}: weights {found} vs model {tuple(target.shape)}")
    if missing or unexpected or mismatched:
        parts = [f"{source + ': ' if source else ''}weights do not match the model "
                 f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} shape mismatches)"]
        if missing:
            parts.append("  missing from the weights:\n" + _format_keys(missing))
        if unexpected:
            parts.append("  unexpected in the weights:\n" + _format_keys(unexpected))
        if mismatched:
            parts.append("  shape mismatches:\n" + _format_keys(mismatched))
        parts.extend(f"  hint: {hint}" for hint in _variant_hints(missing, unexpected, mismatched))
        raise CheckpointError("\n".join(parts))
    model.load_state_dict(state_dict, strict=True)


# CONQUER constructor argument <- the option that sets it. Options missing from `opt` keep the constructor's
# default, so every default is declared once (with the options, and the same values on the constructor).
MODEL_OPTIONS = {
    "visual_dim": "visual_dim", "text_dim": "text_dim", "query_dim": "query_dim", "hidden_dim": "hidden_dim",
    "video_len": "max_ctx_len", "ctx_mode": "ctx_mode", "lw_st_ed": "lw_st_ed", "lw_video_ce": "lw_video_ce",
    "similarity_measure": "similarity_measure", "use_debug": "debug", "no_output_moe_weight": "no_output_moe_weight",
    "qal_impl": "qal_impl", "masked_vs_pool": "masked_vs_pool", "masked_netvlad": "masked_netvlad",
    "gate_per_query": "gate_per_query",
}


def build_model(model_cfg, opt, source=None):
    """CONQUER from a model config (e.g. checkpoint["model_cfg"]) and the options (dict or EasyDict).

    `source`, the file the model config was read from, is named in a ModelConfigError. With the option
    model = first_stage, the first-stage retriever (method/first_stage.py) instead.
    """
    options = opt if isinstance(opt, dict) else vars(opt)
    if options.get("model", "conquer") == "first_stage":
        return build_first_stage(model_cfg, options)
    kwargs = {argument: options[name] for argument, name in MODEL_OPTIONS.items() if name in options}
    try:
        return CONQUER(model_cfg, **kwargs)
    except ModelConfigError as e:
        if source is None:
            raise
        raise ModelConfigError(f"{source}: {e}") from None


def load_model_checkpoint(path, opt):
    """(model, checkpoint): the model of the checkpoint at `path`, rebuilt from its own model_cfg and the
    options (dict or EasyDict; `opt["model"]` picks CONQUER or the first stage), its weights loaded on the CPU."""
    checkpoint = load_checkpoint(path, map_location="cpu")
    model = build_model(checkpoint["model_cfg"], opt, source=f"{path} (model_cfg)")
    load_model_weights(model, checkpoint["model"], source=path)
    logger.info("loaded %s (epoch %s)", path, checkpoint.get("epoch"))
    return model, checkpoint


def load_trained_model(opt):
    """CONQUER of a run (inference options: opt.ckpt_filepath, the dims and variant options), on opt.device."""
    return load_model_checkpoint(opt.ckpt_filepath, opt)[0].to(opt.device)


def load_encoder_pretrain(model, path):
    """Initialise `model.encoder` (and `model.query_weight`) from a first-stage checkpoint (fixes [Q10]).

    Keys `encoder.*` / `query_weight.*` lose exactly that prefix and are loaded strictly; tensors are
    mapped to CPU first. Gate weights are skipped with a warning when the model has no MoE gate.
    Returns the number of tensors copied per part: {"encoder": n, "query_weight": n}.
    """
    state = load_checkpoint(path, required_keys=("model",))["model"]
    encoder_state = {key[len("encoder."):]: value for key, value in state.items() if key.startswith("encoder.")}
    gate_state = {key[len("query_weight."):]: value for key, value in state.items() if key.startswith("query_weight.")}
    if not encoder_state:
        raise CheckpointError(f"{path}: no parameter named 'encoder.*' to initialise the encoder from")
    load_model_weights(model.encoder, encoder_state, source=f"{path} (encoder.*)")
    loaded = {"encoder": len(encoder_state), "query_weight": 0}
    if gate_state:
        if model.query_weight is None:
            logger.warning("%s: %d query_weight.* tensors ignored: the model has no MoE gate "
                           "(ctx_mode visual or --no_output_moe_weight)", path, len(gate_state))
        else:
            load_model_weights(model.query_weight, gate_state, source=f"{path} (query_weight.*)")
            loaded["query_weight"] = len(gate_state)
    return loaded
