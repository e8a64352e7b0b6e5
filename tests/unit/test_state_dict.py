"""State-dict layout and parameter counts against the original model's dumps (tests/reference/*.tsv)."""
import glob
import os
import re

import pytest

from method.tools.param_count import build_meta_model, main as param_count_main, parameter_counts
from model_fixtures import load_model_config
from utils.run_dir import REPO_ROOT

REFERENCE_DIR = os.path.join(REPO_ROOT, "tests", "reference")
REFERENCE_FILES = sorted(glob.glob(os.path.join(REFERENCE_DIR, "state_dict_*.tsv")))
NAME_PATTERN = re.compile(r"state_dict_(general|disjoint|exclusive)_(visual_sub|visual)(_nomoe)?(_small)?\.tsv")


def read_reference(path):
    shapes = {}
    with open(path) as f:
        for line in f:
            name, shape = line.rstrip("\n").split("\t")
            shapes[name] = tuple(int(d) for d in shape.strip("[]").split(",") if d)
    return shapes


def paper_input_model(similarity_measure="general", ctx_mode="visual_sub", nomoe=False, config_name="paper"):
    config = load_model_config(config_name)
    return build_meta_model(config, visual_dim=4352, text_dim=768, query_dim=768,
                            hidden_dim=config["bert_config"]["hidden_size"], video_len=100, ctx_mode=ctx_mode,
                            similarity_measure=similarity_measure, no_output_moe_weight=nomoe)


def test_every_reference_variant_is_present():
    assert len(REFERENCE_FILES) == 10
    assert all(NAME_PATTERN.fullmatch(os.path.basename(path)) for path in REFERENCE_FILES)


@pytest.mark.parametrize("path", REFERENCE_FILES, ids=os.path.basename)
def test_state_dict_matches_reference(path):
    measure, ctx_mode, nomoe, small = NAME_PATTERN.fullmatch(os.path.basename(path)).groups()
    model = paper_input_model(measure, ctx_mode, bool(nomoe), "small" if small else "paper")
    ours = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    reference = read_reference(path)
    assert sorted(set(ours) - set(reference)) == []
    assert sorted(set(reference) - set(ours)) == []
    assert {name: shape for name, shape in ours.items() if shape != reference[name]} == {}


def test_parameter_counts_of_paper_config():
    expected_totals = {("general", "visual_sub", False): 47_672_640, ("disjoint", "visual_sub", False): 47_672_640,
                       ("exclusive", "visual_sub", False): 57_816_512, ("general", "visual", False): 46_982_144,
                       ("general", "visual_sub", True): 47_574_272}
    for variant, total in expected_totals.items():
        assert sum(parameter_counts(paper_input_model(*variant)).values()) == total, variant
    assert parameter_counts(paper_input_model("exclusive")) == {
        "encoder": 18_817_792, "query_weight": 98_368, "query_aware_feature_learning_layer": 2_304,
        "contextual_QAL_feature_learning": 9_454_080, "moment_localization_head": 19_300_096,
        "video_scoring_head": 10_143_872}


@pytest.mark.parametrize("argv, total", [
    ([], "47,672,640"),
    (["--similarity_measure", "exclusive"], "57,816,512"),
    (["--ctx_mode", "visual"], "46,982,144"),
    (["--no_output_moe_weight"], "47,574,272"),
])
def test_param_count_cli(argv, total, capsys):
    param_count_main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].split() == ["total", total]
    assert lines[0].split()[0] == "encoder"
