"""Options: original names/defaults, run-dir naming, opt.json layout, inference restore rules."""
import json
import os
import zipfile

import pytest

from config.options import BaseOptions, OptionError, TestOptions

# SPEC §6.4: the key order of opt.json as the original writes it.
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


def test_original_defaults():
    opt = BaseOptions()
    opt.initialize()
    defaults = vars(opt.parser.parse_args([]))
    expected = {
        "dset_name": "tvr", "eval_split_name": "val", "data_ratio": 1.0, "results_root": "results", "seed": 2018,
        "device": 0, "device_ids": [0], "num_workers": 8, "lr": 1e-4, "wd": 0.01, "n_epoch": 50, "max_es_cnt": 3,
        "stop_task": "VCMR", "eval_tasks_at_training": ["VCMR", "SVMR", "VR"], "bsz": 32, "eval_query_bsz": 8,
        "grad_clip": -1, "eval_epoch_num": 1, "max_ctx_len": 100, "max_desc_len": 30, "clip_length": 1.5,
        "ctx_mode": "visual_sub", "visual_dim": 4352, "text_dim": 768, "query_dim": 768, "hidden_dim": 768,
        "lw_st_ed": 0.01, "lw_video_ce": 0.05, "lr_mul": 1, "use_extend_pool": 1000, "neg_video_num": 3,
        "encoder_pretrain_ckpt_filepath": "None", "use_interal_vr_scores": False, "similarity_measure": "general",
        "min_pred_l": 0, "max_pred_l": 24, "max_before_nms": 200, "max_vcmr_video": 10, "nms_thd": -1,
        # SPEC Q3: the original's 0.01 was never applied; 0 reproduces its constant learning rate.
        "lr_warmup_proportion": 0.0,
    }
    for key, value in expected.items():
        assert defaults[key] == value, key


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
    # SPEC Q8: the saved results_dir no longer exists (downloaded/renamed run): read the run dir itself.
    _make_run("downloads/paper_run", "/somewhere/else/tvr-run")
    opt = TestOptions().parse(["--model_dir", "downloads/paper_run", "--device", "-1"])
    assert opt.results_dir == "downloads/paper_run"


def test_test_options_missing_run_dir_is_clear(in_tmp):
    with pytest.raises(OptionError, match="--model_dir nowhere"):
        TestOptions().parse(["--model_dir", "nowhere", "--device", "-1"])
    _make_run("results/no_ckpt", "results/no_ckpt", with_ckpt=False)
    with pytest.raises(OptionError, match="model.ckpt"):
        TestOptions().parse(["--model_dir", "no_ckpt", "--device", "-1"])
