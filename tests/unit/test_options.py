"""Options: original names/defaults, run-dir naming, opt.json layout, inference restore rules."""
import json
import os
import zipfile

import pytest

from config.options import BaseOptions, OptionError, TestOptions

# The key order of opt.json as the original writes it.
ORIGINAL_OPT_JSON_ORDER = [
    "dset_name", "eval_split_name", "data_ratio", "debug", "disable_eval", "results_root", "exp_id", "seed",
    "device", "device_ids", "num_workers", "lr", "lr_warmup_proportion", "wd", "n_epoch", "max_es_cnt",
    "stop_task", "eval_tasks_at_training", "bsz", "eval_query_bsz", "no_eval_untrained", "grad_clip",
    "eval_epoch_num", "max_ctx_len", "max_desc_len", "clip_length", "ctx_mode", "dataset_config", "visual_dim",
    "text_dim", "query_dim", "hidden_dim", "no_output_moe_weight", "model_config", "lw_st_ed", "lw_video_ce",
    "lr_mul", "use_extend_pool", "neg_video_num", "encoder_pretrain_ckpt_filepath", "use_interal_vr_scores",
    "similarity_measure", "min_pred_l", "max_pred_l", "max_before_nms", "max_vcmr_video", "nms_thd",
]

CPU = ["--device", "-1", "--use_interal_vr_scores"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# The original's options table: name -> (type, default, choices); "flag" = store_true. The types are what
# argparse converts with (nargs "+" options list their item type).
ORIGINAL_OPTIONS = {
    "dset_name": (str, "tvr", ("tvr", "didemo")), "eval_split_name": (str, "val", None),
    "data_ratio": (float, 1.0, None), "debug": ("flag", False, None), "disable_eval": ("flag", False, None),
    "results_root": (str, "results", None), "exp_id": (str, None, None), "seed": (int, 2018, None),
    "device": (int, 0, None), "device_ids": (int, [0], None), "num_workers": (int, 8, None),
    "lr": (float, 1e-4, None), "lr_warmup_proportion": (float, 0.01, None), "wd": (float, 0.01, None),
    "n_epoch": (int, 50, None), "max_es_cnt": (int, 3, None), "stop_task": (str, "VCMR", ("VCMR", "SVMR", "VR")),
    "eval_tasks_at_training": (str, ["VCMR", "SVMR", "VR"], None), "bsz": (int, 32, None),
    "eval_query_bsz": (int, 8, None), "no_eval_untrained": ("flag", False, None), "grad_clip": (float, -1, None),
    "eval_epoch_num": (int, 1, None), "max_ctx_len": (int, 100, None), "max_desc_len": (int, 30, None),
    "clip_length": (float, 1.5, None), "ctx_mode": (str, "visual_sub", None), "dataset_config": (str, None, None),
    "visual_dim": (int, 4352, None), "text_dim": (int, 768, None), "query_dim": (int, 768, None),
    "hidden_dim": (int, 768, None), "no_output_moe_weight": ("flag", False, None),
    "model_config": (str, None, None), "lw_st_ed": (float, 0.01, None), "lw_video_ce": (float, 0.05, None),
    "lr_mul": (float, 1, None), "use_extend_pool": (int, 1000, None), "neg_video_num": (int, 3, None),
    "encoder_pretrain_ckpt_filepath": (str, "None", None), "use_interal_vr_scores": ("flag", False, None),
    "similarity_measure": (str, "general", ("general", "exclusive", "disjoint")), "min_pred_l": (int, 0, None),
    "max_pred_l": (int, 24, None), "max_before_nms": (int, 200, None), "max_vcmr_video": (int, 10, None),
    "nms_thd": (float, -1, None), "config": (str, None, None),
}
ORIGINAL_TEST_OPTIONS = {"eval_id": (str, None, None), "model_dir": (str, None, None),
                         "tasks": (str, ["VCMR", "SVMR", "VR"], ("VCMR", "SVMR", "VR"))}
# Deliberate differences (each has a row in the README's differences table): choices this implementation
# adds where the original accepted anything (and crashed later), or widens (any corpus name).
WIDENED_CHOICES = {"dset_name": None, "ctx_mode": ("visual_sub", "visual"),
                   "eval_tasks_at_training": ("VCMR", "SVMR", "VR")}


def _actions(options):
    options.initialize()
    return {action.dest: action for action in options.parser._actions}


@pytest.mark.parametrize("options, table", [(BaseOptions, ORIGINAL_OPTIONS),
                                            (TestOptions, {**ORIGINAL_OPTIONS, **ORIGINAL_TEST_OPTIONS})])
def test_options_match_the_original_table(options, table):
    actions = _actions(options())
    for name, (kind, default, choices) in table.items():
        action = actions[name]
        assert f"--{name}" in action.option_strings, name
        if kind == "flag":
            assert action.nargs == 0 and action.const is True, name
        else:
            assert action.type in (kind, None if kind is str else kind), name
        assert action.default == default and type(action.default) is type(default), name
        expected_choices = WIDENED_CHOICES.get(name, choices)
        assert (tuple(action.choices) if action.choices else None) == expected_choices, name


def test_extensions_default_to_the_original_behaviour():
    actions = _actions(TestOptions())
    extensions = set(actions) - set(ORIGINAL_OPTIONS) - set(ORIGINAL_TEST_OPTIONS) - {"help"}
    expected = {"resume": None, "amp": "off", "optimizer": "bert_adamw", "nms_input_full": False,
                "qal_impl": "decomposed", "video_cache": True, "masked_vs_pool": False, "masked_netvlad": False,
                "gate_per_query": False, "lr_warmup_fraction": 0.0, "train_set_honours_options": False,
                "nms_metrics_by_dset": False, "model": "conquer", "force_model_dir": False, "output_dir": None,
                "window_stride": 0}
    assert {name: actions[name].default for name in extensions} == expected


def test_run_dir_opt_json_and_code_zip(in_tmp):
    opt = BaseOptions().parse(["--exp_id", "demo", "--use_internal_vr_scores", "--device", "-1"])
    assert os.path.basename(opt.results_dir).startswith("tvr-demo-")
    assert opt.use_interal_vr_scores is True
    saved = json.load(open(os.path.join(opt.results_dir, "opt.json")))
    keys = list(saved)
    assert keys[: len(ORIGINAL_OPT_JSON_ORDER)] == ORIGINAL_OPT_JSON_ORDER
    assert keys[-1] == "results_dir" and "config" not in saved
    assert saved["device"] == -1
    with zipfile.ZipFile(os.path.join(opt.results_dir, "code.zip")) as zf:
        names = zf.namelist()
    assert "code/config/options.py" in names
    assert not any("/results" in n or n.endswith(".pyc") for n in names)


def test_same_second_runs_get_distinct_dirs(in_tmp):
    dirs = {BaseOptions().parse(["--exp_id", "same"] + CPU).results_dir for _ in range(3)}
    assert len(dirs) == 3


def test_debug_results_root(in_tmp):
    opt = BaseOptions().parse(["--exp_id", "d", "--debug", "--results_root", "out/results"] + CPU)
    assert opt.results_dir.startswith(os.path.join("out", "debug_results") + os.sep)


def test_config_file_typed_and_cli_wins(in_tmp):
    json.dump({"lr": "0.5", "bsz": 4, "n_epoch": 9}, open("cfg.json", "w"))
    opt = BaseOptions().parse(["--exp_id", "c", "--config", "cfg.json", "--bsz=7"] + CPU)
    assert opt.lr == 0.5 and opt.bsz == 7 and opt.n_epoch == 9 and "config" not in opt
    json.dump({"similarity_measure": "cosine"}, open("bad.json", "w"))
    with pytest.raises(OptionError, match="bad.json.*similarity_measure"):
        BaseOptions().parse(["--exp_id", "c", "--config", "bad.json"] + CPU)
    json.dump({"learning_rate": 1}, open("typo.json", "w"))
    with pytest.raises(OptionError, match="typo.json.*learning_rate"):
        BaseOptions().parse(["--exp_id", "c", "--config", "typo.json"] + CPU)


# Every spelling of an option on the command line beats --config and --resume.
SPELLINGS = [
    (["--use_internal_vr_scores"], "use_interal_vr_scores", True, False),
    (["--use_interal_vr_scores"], "use_interal_vr_scores", True, False),
    (["--no_video_cache"], "video_cache", False, True),
    (["--bsz=7"], "bsz", 7, 5),
    (["--bsz", "7"], "bsz", 7, 5),
    (["--n_ep", "7"], "n_epoch", 7, 5),  # an abbreviation (argparse's default, as the original)
    (["--n_ep=7"], "n_epoch", 7, 5),
]


@pytest.mark.parametrize("argv, dest, given, in_file", SPELLINGS)
def test_every_spelling_wins_over_config(in_tmp, argv, dest, given, in_file):
    json.dump({dest: in_file}, open("cfg.json", "w"))
    base = ["--exp_id", "c", "--config", "cfg.json", "--device", "-1", "--similarity_measure", "disjoint"]
    opt = BaseOptions().parse(base + argv)
    assert opt[dest] == given


@pytest.mark.parametrize("argv, dest, given, in_file", SPELLINGS)
def test_every_spelling_wins_over_resume(in_tmp, argv, dest, given, in_file):
    started = BaseOptions().parse(["--exp_id", "r", "--device", "-1", "--similarity_measure", "disjoint"])
    saved = json.load(open(os.path.join(started.results_dir, "opt.json")))
    saved[dest] = in_file
    json.dump(saved, open(os.path.join(started.results_dir, "opt.json"), "w"))
    opt = BaseOptions().parse(["--resume", started.results_dir] + argv)
    assert opt[dest] == given
    assert BaseOptions().parse(["--resume", started.results_dir])[dest] == in_file


@pytest.mark.parametrize("argv, flag", [
    (["--stop_task", "VR", "--eval_tasks_at_training", "VCMR"], "--stop_task"),
    (["--max_ctx_len", "0"], "--max_ctx_len"),
])
def test_invalid_combinations_name_the_flag(in_tmp, argv, flag):
    with pytest.raises(OptionError, match=flag):
        BaseOptions().parse(["--exp_id", "x"] + CPU + argv)
    assert not os.path.exists("results"), "no run dir may be created for invalid options"


def test_general_without_internal_scores_is_a_config_error(in_tmp):
    with pytest.raises(OptionError, match="use_interal_vr_scores"):
        BaseOptions().parse(["--exp_id", "x", "--device", "-1"])


def test_cuda_request_without_cuda_says_how_to_use_cpu(in_tmp, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OptionError, match="--device -1"):
        BaseOptions().parse(["--exp_id", "x", "--use_interal_vr_scores", "--device", "0"])


def _make_run(root, saved_results_dir, with_ckpt=True, **extra):
    os.makedirs(root, exist_ok=True)
    saved = {"similarity_measure": "general", "use_interal_vr_scores": True, "max_ctx_len": 64, "nms_thd": 0.5,
             "eval_query_bsz": 99, "results_dir": saved_results_dir, "an_unknown_future_key": 1}
    saved.update(extra)
    json.dump(saved, open(os.path.join(root, "opt.json"), "w"))
    if with_ckpt:
        open(os.path.join(root, "model.ckpt"), "wb").close()


def test_test_options_restore_rules(in_tmp):
    _make_run("results/run_a", "results/run_a")
    opt = TestOptions().parse(["--model_dir", "run_a", "--device", "-1", "--tasks", "VCMR", "VR"])
    assert opt.model_dir == os.path.join("results", "run_a")
    assert opt.max_ctx_len == 64, "training options come from opt.json"
    assert opt.nms_thd == -1 and opt.eval_query_bsz == 8, "overridable options come from the command line"
    assert opt.an_unknown_future_key == 1 and opt.tasks == ["VCMR", "VR"]
    assert opt.results_dir == "results/run_a" and opt.output_dir == "results/run_a"


def test_test_options_moved_run_dir_falls_back_to_model_dir(in_tmp):
    # [Q8]: the saved results_dir no longer exists (downloaded/renamed run): read the run dir itself.
    _make_run("downloads/paper_run", "/somewhere/else/tvr-run")
    opt = TestOptions().parse(["--model_dir", "downloads/paper_run", "--device", "-1"])
    assert opt.results_dir == "downloads/paper_run"


def test_test_options_missing_run_dir_is_clear(in_tmp):
    with pytest.raises(OptionError, match="--model_dir nowhere"):
        TestOptions().parse(["--model_dir", "nowhere", "--device", "-1"])
    _make_run("results/no_ckpt", "results/no_ckpt", with_ckpt=False)
    with pytest.raises(OptionError, match="model.ckpt"):
        TestOptions().parse(["--model_dir", "no_ckpt", "--device", "-1"])
