"""Where a corpus's features come from, so that features made at different times can be checked to agree.

Two records:

* The **recipe** of a folder of clip features, `<features>/recipe.json`, written by
  `utils.extract_video_features`: the backbones (model id, pretrained or seeded random weights), frames per
  clip, clip length, crop, L2 normalisation, model dtype and the feature dimension. A folder holds features of
  one recipe only.
* The **provenance** of a corpus, read from its data config (written by `utils.build_corpus`): ctx_mode, clip
  length, the recipe of every video feature set (None where the folder had none) and the text encoder's
  settings. A model trained on one corpus gives meaningful scores on another only when the two agree.

`recipe_difference` / `provenance_difference` name the first entry in which two records differ, as
`key: A -> B`, for one-line errors. The model dtype is recorded but not compared across corpora: fp16 and fp32
features of one recipe differ by rounding only.
"""
import json
import os

from utils.errors import ConquerError
from utils.io_utils import save_json

RECIPE_FILENAME = "recipe.json"
RECIPE_FORMAT = "conquer-clip-features"
# Entries that do not change what the features mean: not compared between a corpus and the one a model saw.
NOT_COMPARED_ACROSS_CORPORA = ("dtype",)
TEXT_ENCODER_KEYS = ("name_or_path", "max_length")


class ProvenanceError(ConquerError):
    """A recipe or provenance record is unreadable, or two of them disagree; the message names both sides."""


def read_recipe(path):
    """The recipe dict of a feature folder (its recipe.json) or of a recipe file of any name; None when there is
    no such file."""
    if os.path.isdir(path):
        path = os.path.join(path, RECIPE_FILENAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            recipe = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ProvenanceError(f"{path}: unreadable feature recipe ({e})") from None
    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
        raise ProvenanceError(f"{path}: not a feature recipe (expected a JSON object with format {RECIPE_FORMAT!r})")
    return recipe


def write_recipe(folder, recipe):
    """Write `recipe` (a dict) as `<folder>/recipe.json`, atomically."""
    save_json(dict(recipe, format=RECIPE_FORMAT), os.path.join(folder, RECIPE_FILENAME), save_pretty=True)


def recipe_difference(old, new, ignore=()):
    """The first entry (sorted keys) in which two recipes differ, as 'key: old -> new', or None."""
    for key in sorted(set(old) | set(new)):
        if key not in ignore and old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return None


def provenance(data_config):
    """A data config (dict) -> {"ctx_mode", "clip_length", "video_features": [recipe or None per set],
    "text_encoder": {name_or_path, max_length} or None}."""
    encoder = data_config.get("text_encoder")
    return dict(ctx_mode=data_config.get("ctx_mode"), clip_length=data_config.get("clip_length"),
                video_features=[feature_set.get("recipe") for feature_set in data_config.get("video_feature_sets", [])],
                text_encoder={key: encoder.get(key) for key in TEXT_ENCODER_KEYS} if encoder else None)


def provenance_difference(trained, new):
    """The first entry in which a corpus's provenance (`new`) differs from the one a model was trained on, as
    'key: trained -> new', or None. Recipes are compared without NOT_COMPARED_ACROSS_CORPORA. What one side
    does not record (None, no feature sets: a corpus not made by the builder, features made before recipes were
    recorded) compares equal to anything."""
    for key in ("ctx_mode", "clip_length", "text_encoder"):
        if None not in (trained.get(key), new.get(key)) and trained[key] != new[key]:
            return f"{key}: {trained[key]!r} -> {new[key]!r}"
    trained_sets, new_sets = trained.get("video_features") or [], new.get("video_features") or []
    if trained_sets and new_sets and len(trained_sets) != len(new_sets):
        return f"video feature sets: {len(trained_sets)} -> {len(new_sets)}"
    for i, (old, current) in enumerate(zip(trained_sets, new_sets)):
        if old is not None and current is not None:
            difference = recipe_difference(old, current, ignore=NOT_COMPARED_ACROSS_CORPORA)
            if difference:
                return f"video feature set {i} recipe {difference}"
    return None
