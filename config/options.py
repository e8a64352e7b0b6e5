"""Every command-line option, in one place, and every check of option values and their combinations.

`BaseOptions` holds the original CONQUER options (same names, types, defaults and choices, including the
misspelt `--use_interal_vr_scores`) followed by this implementation's extensions, each of which defaults
to the original behaviour. `BaseOptions().parse()` is what `train.py` runs: it creates the run directory
(utils/run_dir.py: code.zip, opt.json; under torchrun on rank 0 alone). `TestOptions().parse()` is what
`inference.py` runs: it restores the training options from a run directory's `opt.json`.
"""
import argparse
import os
import sys

import torch
from easydict import EasyDict

from method.amp import check_amp
from method.conquer import SIMILARITY_MEASURES
from utils import distributed, run_dir
from utils.errors import OptionError
from utils.io_utils import load_json
from utils.torch_requirement import require_torch
from utils.tvr_format import CTX_MODES, TASKS
from utils.windows import WindowError, check_stride

# Options that inference takes from its own command line rather than from the run's opt.json. The first
# block is the original's list (it also names two options that never existed, kept for fidelity); the
# second block holds the extensions that describe how to run, not what was trained.
NOT_RESTORED_AT_INFERENCE = (
    "results_root", "nms_thd", "debug", "dataset_config", "model_config", "device", "eval_split_name",
    "eval_query_bsz", "eval_context_bsz", "device_ids", "max_vcmr_video", "max_pred_l", "min_pred_l",
    "external_inference_vr_res_path",
    "num_workers", "resume", "amp", "video_cache", "nms_input_full", "force_model_dir", "qal_impl",
    "output_dir", "nms_metrics_by_dset",
)


class BaseOptions:
    def __init__(self):
        self.parser = argparse.ArgumentParser(description=self.__doc__)
        self.initialized = False
        self.opt = None

    def initialize(self):
        self.initialized = True
        p = self.parser
        p.add_argument("--dset_name", type=str, default="tvr",
                       help="corpus name, used in result names; tvr adds per-query-type (v, t, vt) metrics")
        p.add_argument("--eval_split_name", type=str, default="val",
                       help="split evaluated (val or test_public); metrics are computed for val only")
        p.add_argument("--data_ratio", type=float, default=1.0,
                       help="keep the first fraction of every split's annotations (1.0 = all)")
        p.add_argument("--debug", action="store_true",
                       help="small real run: few batches per epoch, few evaluation queries, results in "
                            "debug_results/")
        p.add_argument("--disable_eval", action="store_true",
                       help="no evaluation; model.ckpt is saved every epoch")
        p.add_argument("--results_root", type=str, default="results")
        p.add_argument("--exp_id", type=str, default=None, help="id of this run, required for training")
        p.add_argument("--seed", type=int, default=2018, help="random seed")
        p.add_argument("--device", type=int, default=0, help="CUDA device (uses --device_ids[0]); -1 = CPU")
        p.add_argument("--device_ids", type=int, nargs="+", default=[0], help="GPU ids (only the first is used)")
        p.add_argument("--num_workers", type=int, default=8,
                       help="DataLoader worker processes (0 = main process); capped at the CPU count")

        # training
        p.add_argument("--lr", type=float, default=1e-4, help="learning rate")
        p.add_argument("--lr_warmup_proportion", type=float, default=0.01,
                       help="unused, as in the original (parsed and saved in opt.json, no effect); the "
                            "warmup is --lr_warmup_fraction")
        p.add_argument("--wd", type=float, default=0.01, help="weight decay")
        p.add_argument("--n_epoch", type=int, default=50, help="number of epochs to run")
        p.add_argument("--max_es_cnt", type=int, default=3,
                       help="early-stop patience in evaluations without improvement; -1 disables")
        p.add_argument("--stop_task", type=str, default="VCMR", choices=list(TASKS),
                       help="task whose metric decides early stopping and the best checkpoint")
        p.add_argument("--eval_tasks_at_training", type=str, nargs="+", default=list(TASKS),
                       choices=list(TASKS), help="tasks evaluated during training")
        p.add_argument("--bsz", type=int, default=32, help="training mini-batch size (queries)")
        p.add_argument("--eval_query_bsz", type=int, default=8, help="evaluation mini-batch size (queries)")
        p.add_argument("--no_eval_untrained", action="store_true",
                       help="skip the evaluation of the untrained model (epoch -1)")
        p.add_argument("--grad_clip", type=float, default=-1, help="max gradient norm; -1 disables clipping")
        p.add_argument("--eval_epoch_num", type=int, default=1, help="evaluate every this many epochs")

        # data
        p.add_argument("--max_ctx_len", type=int, default=100, help="max number of clips per video (L)")
        p.add_argument("--max_desc_len", type=int, default=30, help="max number of query tokens (Lq)")
        p.add_argument("--clip_length", type=float, default=1.5, help="seconds per clip")
        p.add_argument("--ctx_mode", type=str, default="visual_sub", choices=list(CTX_MODES),
                       help="video modalities")
        p.add_argument("--dataset_config", type=str, help="data config JSON (config/tvr_data_config.json)")

        # model
        p.add_argument("--visual_dim", type=int, default=4352, help="visual feature dimension")
        p.add_argument("--text_dim", type=int, default=768, help="subtitle feature dimension")
        p.add_argument("--query_dim", type=int, default=768, help="query feature dimension")
        p.add_argument("--hidden_dim", type=int, default=768, help="joint dimension (= model config hidden_size)")
        p.add_argument("--no_output_moe_weight", action="store_true",
                       help="disable query-dependent fusion (plain mean of the modalities)")
        p.add_argument("--model_config", type=str, help="model config JSON (training only)")

        # losses and sampling
        p.add_argument("--lw_st_ed", type=float, default=0.01, help="weight of the moment cross-entropy loss")
        p.add_argument("--lw_video_ce", type=float, default=0.05, help="weight of the video cross-entropy loss")
        p.add_argument("--lr_mul", type=float, default=1, help="learning-rate multiplier of the backbone")
        p.add_argument("--use_extend_pool", type=int, default=1000,
                       help="negative pool = first (GT rank + this) first-stage videos")
        p.add_argument("--neg_video_num", type=int, default=3,
                       help="negative videos per query; 0 disables shared normalization")
        p.add_argument("--encoder_pretrain_ckpt_filepath", type=str, default="None",
                       help="first-stage checkpoint whose encoder (and query_weight) initialise the model")
        p.add_argument("--use_interal_vr_scores", "--use_internal_vr_scores", dest="use_interal_vr_scores",
                       action="store_true",
                       help="use the first-stage video scores (general measure); the original's spelling")

        # evaluation
        p.add_argument("--similarity_measure", type=str, choices=list(SIMILARITY_MEASURES),
                       default="general", help="how moment scores are ranked across videos")
        p.add_argument("--min_pred_l", type=int, default=0, help="valid moments have ed - st >= this (clips)")
        p.add_argument("--max_pred_l", type=int, default=24, help="valid moments have ed - st < this (clips)")
        p.add_argument("--max_before_nms", type=int, default=200, help="moments kept per query before NMS")
        p.add_argument("--max_vcmr_video", type=int, default=10, help="candidate videos re-ranked per query")
        p.add_argument("--nms_thd", type=float, default=-1,
                       help="temporal NMS IoU threshold; -1 = no NMS (0.7 for the paper's numbers)")

        # extensions: each default reproduces the original
        p.add_argument("--lr_warmup_fraction", type=float, default=0.0,
                       help="fraction of the total training steps with a linear LR warmup from 0 (0 = constant "
                            "LR, as the original)")
        p.add_argument("--train_set_honours_options", action="store_true",
                       help="build the training set with --max_ctx_len, --max_desc_len, --clip_length and "
                            "--ctx_mode; the original always builds it with 100, 30, 1.5 and visual_sub (same "
                            "results with the default options). On by itself for --ctx_mode visual_sub with "
                            "--max_ctx_len other than 100, where the original crashes")
        p.add_argument("--nms_metrics_by_dset", action="store_true",
                       help="evaluate the NMS submission with query types only when --dset_name is tvr, as the "
                            "submission without NMS; the original always asks for types there, so corpora "
                            "without a 'type' field (DiDeMo) need this flag with --nms_thd")
        p.add_argument("--resume", type=str, default=None,
                       help="continue the run in this run directory from its last.ckpt")
        p.add_argument("--amp", type=str, default="off", choices=["off", "bf16", "fp16"],
                       help="autocast precision (bf16 also on CPU; fp16 on CUDA only)")
        p.add_argument("--optimizer", type=str, default="bert_adamw", choices=["bert_adamw", "torch_adamw"],
                       help="bert_adamw is the original's update; torch_adamw is not equivalent")
        p.add_argument("--nms_input_full", action="store_true",
                       help="NMS reads the first max_before_nms moments (the original reads only the 100 "
                            "left by the submission truncation)")
        p.add_argument("--qal_impl", type=str, default="decomposed", choices=["decomposed", "plain"],
                       help="trilinear similarity: decomposed (memory-light) or plain (materialised concat)")
        p.add_argument("--no_video_cache", dest="video_cache", action="store_false",
                       help="at evaluation, re-encode every candidate video per query as the original")
        p.add_argument("--masked_vs_pool", action="store_true",
                       help="video-scoring max-pool over valid clips only (original: over all clips)")
        p.add_argument("--masked_netvlad", action="store_true",
                       help="query-dependent fusion gate ignores padded query tokens (original: pools them)")
        p.add_argument("--gate_per_query", action="store_true",
                       help="fusion gate computed once per query in training (original: per query-video copy)")

        p.add_argument("--model", type=str, default="conquer", choices=["conquer", "first_stage"],
                       help="conquer (the second stage) or first_stage (the video retriever that writes the "
                            "ranklists CONQUER re-ranks; its --model_config is config/first_stage_config.json)")

        p.add_argument("--window_stride", type=int, default=0,
                       help="read a video longer than --max_ctx_len clips as windows of --max_ctx_len clips "
                            "starting every this many clips (the last window ends at the video's last clip); 0 "
                            "reads only its first --max_ctx_len clips, as the original. Saved with the run: "
                            "evaluation, ranking and search read the windows the run was trained with")

        p.add_argument("--config", help="JSON file whose keys set options not given on the command line")

    def parse(self, argv=None):
        require_torch()  # train.py and inference.py start here
        if not self.initialized:
            self.initialize()
        argv = sys.argv[1:] if argv is None else list(argv)
        opt = EasyDict(vars(self._parse_with_config(argv)))

        if opt.debug:
            opt.results_root = os.path.join(os.path.dirname(os.path.normpath(opt.results_root)), "debug_results")

        if isinstance(self, TestOptions):
            self._restore_saved_options(opt, argv)
            self._validate(opt)
        elif opt.resume:
            self._restore_resumed_options(opt, argv)
        else:
            self._validate(opt)
            self._create_run_dir(opt)
        run_dir.add_run_paths(opt)
        opt.num_workers = cap_num_workers(opt.num_workers)
        opt.device = resolve_device(opt.device, opt.device_ids)
        self.opt = opt
        return opt

    def _parse_with_config(self, argv):
        """argparse, then the keys of `--config` for every option not given on the command line.

        Unlike the original, config values go through the option's type and choices, and an unknown key is
        an error, so a typo cannot silently train with a default.
        """
        args = self.parser.parse_args(argv)
        if args.config is not None:
            config_values = load_json(args.config)
            given = given_dests(self.parser, argv)
            actions = {action.dest: action for action in self.parser._actions}
            for key, value in config_values.items():
                if key not in actions or key == "config":
                    raise OptionError(f"{args.config}: unknown option key {key!r}")
                if key not in given:
                    setattr(args, key, _coerce_config_value(actions[key], value, args.config))
        del args.config
        return args

    def _create_run_dir(self, opt):
        """Rank 0 creates the run directory; under torchrun the other ranks receive its path."""
        if opt.exp_id is None:
            raise OptionError("--exp_id is required for training")
        opt.results_dir = distributed.run_on_main(lambda: run_dir.create_run_dir(opt))

    def _restore_resumed_options(self, opt, argv):
        """`--resume RUN_DIR`: the run's saved options, with the flags given on this command line on top
        (e.g. a larger --n_epoch). opt.json itself is left as the run started."""
        opt_path = os.path.join(opt.resume, run_dir.OPT_FILENAME)
        if not os.path.isfile(opt_path):
            raise OptionError(f"--resume {opt.resume}: not a run directory (no {run_dir.OPT_FILENAME})")
        given = given_dests(self.parser, argv)
        for key, value in load_json(opt_path).items():
            if key in opt and key not in given and key != "resume":
                opt[key] = value
        opt.results_dir = opt.resume
        self._validate(opt)

    def _restore_saved_options(self, opt, argv):
        raise NotImplementedError

    @staticmethod
    def _validate(opt):
        if opt.get("model", "conquer") == "first_stage":
            BaseOptions._validate_first_stage(opt)
        elif opt.stop_task not in opt.eval_tasks_at_training:
            raise OptionError(f"--stop_task {opt.stop_task} must be one of --eval_tasks_at_training "
                              f"{' '.join(opt.eval_tasks_at_training)}")
        if "tasks" not in opt and not opt.disable_eval and opt.eval_split_name != "val":
            raise OptionError(f"--eval_split_name {opt.eval_split_name}: training evaluates on a split with ground "
                              "truth to pick the best checkpoint and stop early, so it needs --eval_split_name val "
                              "(or --disable_eval)")
        tasks = opt.get("tasks", opt.eval_tasks_at_training if not opt.disable_eval else [])
        uses_first_stage_scores = opt.get("model", "conquer") == "conquer" and opt.similarity_measure == "general"
        if uses_first_stage_scores and not opt.use_interal_vr_scores and {"VR", "VCMR"} & set(tasks):
            raise OptionError("--similarity_measure general ranks videos by the first-stage scores, so it needs "
                              "--use_interal_vr_scores when VR or VCMR is evaluated (the original crashes here); "
                              "add the flag, or evaluate --tasks SVMR only")
        for name in ("max_ctx_len", "max_desc_len", "bsz", "eval_query_bsz", "max_vcmr_video", "max_before_nms",
                     "visual_dim", "text_dim", "query_dim", "hidden_dim"):
            if opt[name] <= 0:
                raise OptionError(f"--{name} must be positive, got {opt[name]}")
        if opt.clip_length <= 0:
            raise OptionError(f"--clip_length must be positive, got {opt.clip_length}")
        try:
            check_stride(opt.window_stride, opt.max_ctx_len)
        except WindowError as e:
            raise OptionError(str(e)) from None
        if opt.neg_video_num < 0:
            raise OptionError(f"--neg_video_num must be >= 0, got {opt.neg_video_num}")
        if not 0 <= opt.lr_warmup_fraction < 1:
            raise OptionError(f"--lr_warmup_fraction must be in [0, 1), got {opt.lr_warmup_fraction}")
        if "tasks" not in opt:
            distributed.per_rank_batch_size(opt.bsz)
        # No GPU, or a precision the device cannot run: fail before a run directory is created.
        check_amp(opt.amp, resolve_device(opt.device, opt.device_ids))


    @staticmethod
    def _validate_first_stage(opt):
        """The first stage ranks videos: it is evaluated and stopped on VR, and ranked by its own module."""
        if "tasks" in opt:
            raise OptionError(f"--model_dir {opt.model_dir} holds a first-stage run (--model first_stage): rank with "
                              "`python -m method.rank_first_stage --model_dir RUN_DIR` (scripts/rank_first_stage.sh)")
        if not opt.disable_eval and (opt.stop_task != "VR" or list(opt.eval_tasks_at_training) != ["VR"]):
            raise OptionError(f"--model first_stage retrieves videos only: pass --stop_task VR and "
                              f"--eval_tasks_at_training VR (got --stop_task {opt.stop_task} and "
                              f"--eval_tasks_at_training {' '.join(opt.eval_tasks_at_training)})")


class TestOptions(BaseOptions):
    """Inference options: the run's opt.json plus --model_dir, --eval_id, --tasks and --output_dir."""

    __test__ = False  # not a pytest test class, despite the name

    def initialize(self):
        BaseOptions.initialize(self)
        self.parser.add_argument("--eval_id", type=str, help="evaluation id, part of the output file names")
        self.parser.add_argument("--model_dir", type=str, required=True,
                                 help="run directory: a path, or a name under results/ as in the original")
        self.parser.add_argument("--tasks", type=str, nargs="+", choices=list(TASKS), default=list(TASKS),
                                 help="tasks to run: VCMR (corpus moments), SVMR (moments in the GT video), "
                                      "VR (videos)")
        self.parser.add_argument("--force_model_dir", action="store_true",
                                 help="read model.ckpt from and write outputs to --model_dir even when the "
                                      "results_dir saved in opt.json holds a checkpoint")
        self.parser.add_argument("--output_dir", type=str, default=None,
                                 help="where predictions and metrics go (default: next to the checkpoint read)")

    def _restore_saved_options(self, opt, argv):
        opt.model_dir = run_dir.locate_model_dir(opt.model_dir)
        saved = load_json(os.path.join(opt.model_dir, run_dir.OPT_FILENAME))
        check_windows_match(saved, opt, given_dests(self.parser, argv), f"--model_dir {opt.model_dir}")
        for key, value in saved.items():
            if key not in NOT_RESTORED_AT_INFERENCE:
                opt[key] = value
        # opt.json may predate an option; its documented default (the original behaviour) applies.
        defaults = vars(self.parser.parse_args(["--model_dir", opt.model_dir]))
        for key, value in defaults.items():
            opt.setdefault(key, value)
        opt.results_dir = run_dir.choose_checkpoint_dir(opt.get("results_dir"), opt.model_dir, opt.force_model_dir)
        opt.output_dir = opt.output_dir or opt.results_dir


def check_windows_match(saved, opt, given, run):
    """A run reads videos as it was trained: --window_stride given at inference must be the run's (a model
    trained on windows sees only the first clips without them; one trained without sees no window offsets)."""
    trained = saved.get("window_stride", 0)
    if "window_stride" in given and opt.window_stride != trained:
        raise OptionError(f"--window_stride {opt.window_stride}: {run} was trained with --window_stride {trained}; "
                          "a run is evaluated with the windows it was trained with (leave the flag out)")


_NOT_GIVEN = object()


def given_dests(parser, argv):
    """Names (dests) of the options that `argv` sets, whatever spelling it uses: an alias, a negated flag
    (`--no_video_cache` sets video_cache), `--name=value` or an abbreviation argparse accepts.

    argparse fills in a default only for a dest missing from the namespace it is given, so a namespace
    pre-filled with a marker keeps the marker exactly for the options not on the command line.
    """
    namespace = argparse.Namespace(**{action.dest: _NOT_GIVEN for action in parser._actions
                                      if action.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=namespace)
    return {dest for dest, value in vars(namespace).items() if value is not _NOT_GIVEN}


def _coerce_config_value(action, value, config_path):
    def convert(item):
        if action.type is not None and item is not None:
            try:
                item = action.type(item)
            except (TypeError, ValueError):
                raise OptionError(f"{config_path}: option {action.dest!r} expects {action.type.__name__}, "
                                  f"got {item!r}") from None
        if action.choices is not None and item not in action.choices:
            raise OptionError(f"{config_path}: option {action.dest!r} must be one of {list(action.choices)}, "
                              f"got {item!r}")
        return item

    if action.nargs in ("+", "*"):
        return [convert(item) for item in (value if isinstance(value, list) else [value])]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise OptionError(f"{config_path}: option {action.dest!r} is a flag, expects true/false, got {value!r}")
        return value
    return convert(value)


def cap_num_workers(num_workers):
    available = os.cpu_count() or 1
    if num_workers > available:
        print(f"note: --num_workers {num_workers} capped at {available}, the number of CPUs of this machine")
        return available
    return max(num_workers, 0)


def resolve_device(device, device_ids):
    """`--device` >= 0 selects CUDA device `device_ids[0]`; -1 selects the CPU."""
    if device < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise OptionError(f"--device {device} asks for CUDA, but no CUDA device is available; run on the CPU with "
                          "--device -1 (the scripts take `cpu` as their GPU argument)")
    if not device_ids or device_ids[0] >= torch.cuda.device_count():
        raise OptionError(f"--device_ids {device_ids}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(f"cuda:{device_ids[0]}")
