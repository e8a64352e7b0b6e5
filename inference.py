"""Evaluate a trained CONQUER run directory (opt.json + model.ckpt) on val or test_public.

    python inference.py --model_dir RUN_DIR --dataset_config config/tvr_data_config.json \
        [--eval_split_name val|test_public] [--tasks VCMR SVMR VR] [--nms_thd 0.7] [--device -1]

or `bash scripts/inference.sh RUN_DIR GPU [flags]`. The model is rebuilt from the checkpoint's own
`model_cfg`; outputs are written next to the checkpoint that was read (or to --output_dir).

Several GPUs: `bash scripts/inference.sh RUN_DIR 0,1,2,3` (or `torchrun --nproc_per_node 4 inference.py ...`)
splits the queries across the processes; rank 0 gathers them and alone writes the files, which are identical
to a single process's.
"""
import logging

import torch
from easydict import EasyDict

from config.options import TestOptions
from method.checkpoint import load_trained_model
from method.dataset import build_eval_dataset
from method.evaluation import eval_epoch, resolve_tasks
from utils import distributed, run_dir
from utils.errors import run_cli
from utils.report import format_metrics_table

logger = logging.getLogger(__name__)


def submission_filename(opt, tasks):
    """The original's name, listing `tasks`: the tasks that run (SVMR is skipped on a split without GT, where
    the original crashes), in the order given."""
    return (f"inference_{opt.dset_name}_{opt.eval_split_name}_{opt.eval_id}_predictions_"
            f"{'_'.join(tasks)}_hero.json")


def run_inference(opt):
    """Evaluate the run of `opt`; returns (metrics without NMS, metrics with NMS, written paths), on rank 0
    under torchrun and (None, None, []) on the other ranks."""
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    # Every input is checked before the output directory is touched.
    eval_dataset = build_eval_dataset(opt)
    eval_dataset.check_feature_dims(opt.query_dim, opt.visual_dim, opt.text_dim)
    model = load_trained_model(opt)
    distributed.run_on_main(lambda: run_dir.check_writable(opt.output_dir))  # only rank 0 writes
    eval_opt = EasyDict(opt, results_dir=opt.output_dir)
    tasks = resolve_tasks(opt.tasks, opt.eval_split_name, eval_dataset.has_gt)
    return eval_epoch(model, eval_dataset, eval_opt, submission_filename(opt, tasks), tasks=tasks)


def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    distributed.init_from_env()  # under torchrun; a plain `python inference.py` has no process group
    try:
        opt = TestOptions().parse(argv)
        opt.device = distributed.local_device(opt.device)
        metrics_no_nms, metrics_nms, paths = run_inference(opt)
        main_process = distributed.is_main_process()
    finally:
        distributed.shutdown()
    if not main_process:
        return
    for title, metrics in (("no NMS", metrics_no_nms), (f"NMS {opt.nms_thd}", metrics_nms)):
        if metrics is not None:
            print(f"\n{opt.eval_split_name} metrics ({title})\n{format_metrics_table(metrics)}")
    print("\nwritten:\n" + "\n".join(paths))


if __name__ == "__main__":
    run_cli(main)
