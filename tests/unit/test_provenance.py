"""utils/provenance.py: feature recipes on disk, a corpus's provenance from its data config, and the first
difference between two of either."""
import json
import os

import pytest

from utils.provenance import (RECIPE_FILENAME, RECIPE_FORMAT, ProvenanceError, provenance, provenance_difference,
                              read_recipe, recipe_difference, write_recipe)

RECIPE = dict(clip_length=1.5, frames_per_clip=3, full_frame=False, l2_normalize=True, dtype="fp32",
              backbones=[dict(name="resnet18", model="microsoft/resnet-18", weights="none", seed=0, dim=512)],
              dim=512)
ENCODER = dict(name_or_path="roberta-base", dtype="float32", max_length=510, tokens="every token")


def data_config(recipes=(RECIPE,), ctx_mode="visual_sub", clip_length=1.5, text_encoder=ENCODER):
    return dict(dset_name="videos", root_path="/corpus", ctx_mode=ctx_mode, clip_length=clip_length,
                video_feature_sets=[dict(path=f"/feats{i}", recipe=r) for i, r in enumerate(recipes)],
                text_encoder=text_encoder)


def test_a_written_recipe_reads_back_with_its_format(tmp_path):
    assert read_recipe(tmp_path) is None
    write_recipe(tmp_path, RECIPE)
    assert read_recipe(tmp_path) == dict(RECIPE, format=RECIPE_FORMAT)
    assert os.listdir(tmp_path) == [RECIPE_FILENAME]  # written atomically: no temporary file left
    write_recipe(tmp_path, dict(RECIPE, frames_per_clip=4))
    assert read_recipe(tmp_path)["frames_per_clip"] == 4


@pytest.mark.parametrize("content, message", [
    ("{not json", "unreadable feature recipe"),
    (json.dumps([1, 2]), "not a feature recipe"),
    (json.dumps(dict(RECIPE, format="something-else")), "not a feature recipe"),
    (json.dumps(RECIPE), "not a feature recipe"),
])
def test_an_unreadable_recipe_is_one_line_naming_the_file(tmp_path, content, message):
    (tmp_path / RECIPE_FILENAME).write_text(content)
    with pytest.raises(ProvenanceError, match=rf"^{tmp_path / RECIPE_FILENAME}: {message}") as error:
        read_recipe(tmp_path)
    assert "\n" not in str(error.value)


def test_recipe_difference_names_the_first_differing_key_in_order():
    assert recipe_difference(RECIPE, dict(RECIPE)) is None
    changed = dict(RECIPE, l2_normalize=False, dtype="fp16")
    assert recipe_difference(RECIPE, changed) == "dtype: 'fp32' -> 'fp16'"
    assert recipe_difference(RECIPE, changed, ignore=("dtype",)) == "l2_normalize: True -> False"
    assert recipe_difference(RECIPE, dict(RECIPE, extra=1)) == "extra: None -> 1"
    without_dim = {k: v for k, v in RECIPE.items() if k != "dim"}
    assert recipe_difference(RECIPE, without_dim) == "dim: 512 -> None"


def test_provenance_of_a_data_config():
    assert provenance(data_config(recipes=(RECIPE, None))) == dict(
        ctx_mode="visual_sub", clip_length=1.5, video_features=[RECIPE, None],
        text_encoder=dict(name_or_path="roberta-base", max_length=510))
    # A corpus not made by the builder records neither feature sets nor an encoder.
    assert provenance(dict(dset_name="tvr", ctx_mode="visual_sub")) == dict(
        ctx_mode="visual_sub", clip_length=None, video_features=[], text_encoder=None)


def test_provenance_difference_compares_what_both_sides_record():
    trained = provenance(data_config())
    assert provenance_difference(trained, provenance(data_config())) is None
    cases = [
        (data_config(ctx_mode="visual"), "ctx_mode: 'visual_sub' -> 'visual'"),
        (data_config(clip_length=2.0), "clip_length: 1.5 -> 2.0"),
        (data_config(text_encoder=dict(ENCODER, max_length=128)),
         "text_encoder: {'name_or_path': 'roberta-base', 'max_length': 510} -> {'name_or_path': 'roberta-base', "
         "'max_length': 128}"),
        (data_config(recipes=(RECIPE, RECIPE)), "video feature sets: 1 -> 2"),
        (data_config(recipes=(dict(RECIPE, frames_per_clip=8),)), "video feature set 0 recipe frames_per_clip: 3 -> 8"),
    ]
    for other, expected in cases:
        assert provenance_difference(trained, provenance(other)) == expected
    # Not compared: the model dtype (rounding only), and whatever one side does not record.
    same = [data_config(recipes=(dict(RECIPE, dtype="bf16"),)), data_config(recipes=(None,)),
            data_config(text_encoder=None), dict(ctx_mode="visual_sub"), data_config(recipes=())]
    for other in same:
        assert provenance_difference(trained, provenance(other)) is None, other
    # A dtype difference still refuses a feature folder (recipe_difference ignores nothing by default).
    assert recipe_difference(RECIPE, dict(RECIPE, dtype="bf16")) == "dtype: 'fp32' -> 'bf16'"
