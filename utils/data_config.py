"""Data config (`config/tvr_data_config.json`): where a corpus in the release layout lives.

Every path key in the file is relative to `root_path`; `load_data_config` returns them already joined
with it (absolute), so nothing downstream joins paths again. A relative `root_path` is taken relative to
the current working directory, as in the original.
"""
import json
import os

from easydict import EasyDict

from utils.errors import ConquerError

# Keys whose value is a path below root_path, in the order config/tvr_data_config.json lists them.
PATH_KEYS = (
    "desc_bert_path",
    "sub_bert_path",
    "vid_feat_path",
    "train_data_path",
    "eval_data_path",
    "test_data_path",
    "train_first_VR_ranklist_path",
    "eval_first_VR_ranklist_path_hero",
    "test_public_first_VR_ranklist_path_hero",
    "video_duration_idx_path",
)
# `ctx_mode` may also appear in the file; it is ignored (the --ctx_mode option is used) [Q31].
REQUIRED_KEYS = ("dset_name", "root_path") + PATH_KEYS


class DataConfigError(ConquerError):
    """The data config file is missing, malformed or points nowhere; the message names file and key."""


def load_data_config(path):
    """Read the data config JSON at `path` -> EasyDict with every path key absolute.

    Raises DataConfigError (naming the file and the key) for a missing file, invalid JSON, a missing or
    non-string key, or a `root_path` that is not an existing directory.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataConfigError(f"data config {path}: file not found")
    with open(path, "r") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise DataConfigError(f"data config {path}: invalid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise DataConfigError(f"data config {path}: expected a JSON object, found {type(raw).__name__}")
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise DataConfigError(f"data config {path}: missing key {key!r} (required: {', '.join(REQUIRED_KEYS)})")
        if not isinstance(raw[key], str):
            raise DataConfigError(
                f"data config {path}: key {key!r} must be a string, found {type(raw[key]).__name__} {raw[key]!r}")

    root_path = os.path.abspath(os.path.expanduser(raw["root_path"]))
    if not os.path.isdir(root_path):
        raise DataConfigError(
            f"data config {path}: root_path {raw['root_path']!r} is not an existing directory. Download and "
            f"extract the TVR feature release, then edit `root_path` in config/tvr_data_config.json (or in "
            f"the file given by --dataset_config) to the extracted folder.")

    config = EasyDict(raw)
    config.root_path = root_path
    for key in PATH_KEYS:
        config[key] = os.path.join(root_path, raw[key])
    return config
