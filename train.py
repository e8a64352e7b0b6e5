"""Train CONQUER.

    python train.py --dataset_config config/tvr_data_config.json --model_config config/model_config.json \
        --exp_id my_run [--device -1] [...]            # or one of the scripts/train_*.sh recipes
    python train.py --resume RESULTS/tvr-my_run-<time> [--n_epoch 60]   # continue a run

The run directory (utils/run_dir.py) receives opt.json, code.zip, the logs, tensorboard_log/, model.ckpt (best
evaluation), the latest_* / best_* prediction and metrics files, and last.ckpt (written atomically at the end
of every epoch; what --resume continues from). A resumed run keeps its opt.json options, overridden by the
flags given with --resume (e.g. a larger --n_epoch); the optimizer, including its learning rates, comes from
last.ckpt; log lines written after last.ckpt (an unfinished epoch) are cut off, and that epoch runs again.
Random streams are per epoch (utils/random_streams.py), so a resumed run ends bitwise identical to an
uninterrupted one on the CPU with --num_workers 0.

Under torchrun (utils/distributed.py) the model trains with DistributedDataParallel: --bsz stays the global
batch, rank 0 alone writes the run directory and takes the early-stopping decision, which every rank follows,
and evaluation is sharded across the ranks.
"""
import functools
import itertools
import json
import logging
import os
import pprint
import random
import shutil
import time

import torch
from easydict import EasyDict
from torch.utils.data import DataLoader
from tqdm import tqdm

from config.options import BaseOptions
from method.amp import autocast_context, make_grad_scaler
from method.checkpoint import build_model, load_checkpoint, load_encoder_pretrain, load_model_weights, save_checkpoint
from method.dataset import build_training_datasets, prepare_batch_inputs, start_end_collate
from method import first_stage
from method.evaluation import eval_epoch
from method.optimization import apply_warmup, build_optimizer, training_step, warmup_steps_for
from utils import distributed, random_streams, run_dir
from utils.errors import ConquerError, OptionError, run_cli
from utils.io_utils import load_json, remove_stale_temp_files
from utils.tvr_format import IOU_THRESHOLDS

logger = logging.getLogger("train")

TRAIN_LOG_LINE = "{time_str} [Epoch] {epoch:03d} [Loss] {loss_str}\n"
EVAL_LOG_LINE = "{time_str} [Epoch] {epoch:03d} [Metrics] {metrics_str}\n"
LOSS_NAMES = ("moment_ce_loss", "video_ce_loss", "loss_overall")

# --debug: a small run that still trains and evaluates for real.
DEBUG_N_EPOCH = 2
DEBUG_BATCHES_PER_EPOCH = 3
DEBUG_EVAL_QUERIES = 10


class AverageMeter:
    """Running mean of a scalar, summed in the order the values arrive (as the original)."""

    def __init__(self):
        self.sum, self.count = 0.0, 0

    def update(self, value):
        self.sum += value
        self.count += 1

    @property
    def avg(self):
        return self.sum / self.count if self.count else 0.0


# ----------------------------------------------------------------------------------------------------
# the models this loop trains (--model): each brings its datasets, its evaluation and its loss names

class ConquerRecipe:
    """CONQUER: `build_training_datasets`, `eval_epoch` (VCMR / SVMR / VR over the first-stage candidates)."""
    loss_names = LOSS_NAMES
    stop_metric_names = {"VR": ("r1",), "SVMR": ("0.5-r1", "0.7-r1"), "VCMR": ("0.5-r1", "0.7-r1")}

    @staticmethod
    def build_datasets(opt, model_cfg):
        return build_training_datasets(opt)

    evaluate = staticmethod(eval_epoch)


def model_recipe(opt):
    """The recipe of --model: build_datasets(opt, model_cfg) -> (train, eval-loss, evaluation datasets);
    evaluate(model, eval_dataset, opt, submission_filename, tasks, max_after_nms) -> (metrics holding
    opt.stop_task, metrics with NMS or None, written paths); loss_names (the keys of the model's loss dict);
    stop_metric_names {task: metric names whose sum picks the best checkpoint and drives early stopping}."""
    return first_stage.TRAINING_RECIPE if opt.get("model", "conquer") == "first_stage" else ConquerRecipe


def make_loader(dataset, batch_size, opt, shuffle, drop_last, generator):
    """Batches of `batch_size`; under torchrun, this rank's slice of each such global batch (drop_last)."""
    seed_worker = functools.partial(random_streams.seed_worker, rank=distributed.get_rank())
    common = dict(collate_fn=start_end_collate, num_workers=opt.num_workers, pin_memory=opt.device.type == "cuda",
                  generator=generator, worker_init_fn=seed_worker)
    if not distributed.is_distributed():
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, **common)
    assert drop_last, "a global batch is split evenly across the ranks only when incomplete batches are dropped"
    batch_sampler = distributed.GlobalBatchSampler(len(dataset), batch_size, distributed.get_rank(),
                                                   distributed.get_world_size(), shuffle, generator)
    return DataLoader(dataset, batch_sampler=batch_sampler, **common)


def count_parameters(model):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


# ----------------------------------------------------------------------------------------------------
# the loop

class Trainer:
    """Owns the model, optimizer, loaders, writer and the bookkeeping that last.ckpt saves."""

    def __init__(self, model, model_cfg, train_dataset, eval_loss_dataset, eval_dataset, opt):
        self.model, self.model_cfg, self.opt = model, model_cfg, opt
        self.recipe = model_recipe(opt)
        # What training steps run through: DDP around `model` under torchrun, else `model` itself.
        self.train_model = distributed.wrap_model(model, opt.device)
        self.eval_dataset = eval_dataset
        self.train_generator = torch.Generator()
        self.train_loader = make_loader(train_dataset, opt.bsz, opt, shuffle=True, drop_last=True,
                                        generator=self.train_generator)
        if len(self.train_loader) == 0:
            raise OptionError(f"the training set has {len(train_dataset)} queries, fewer than --bsz {opt.bsz}: "
                                "no full batch to train on (batches are dropped when incomplete)")
        self.eval_loss_generator = torch.Generator()
        self.eval_loss_loader = None if eval_loss_dataset is None else make_loader(
            eval_loss_dataset, opt.bsz, opt, shuffle=False, drop_last=True, generator=self.eval_loss_generator)
        self.batches_per_epoch = len(self.train_loader)
        if opt.debug:
            self.batches_per_epoch = min(self.batches_per_epoch, DEBUG_BATCHES_PER_EPOCH)
        self.n_epoch = min(opt.n_epoch, DEBUG_N_EPOCH) if opt.debug else opt.n_epoch
        self.warmup_steps = warmup_steps_for(self.n_epoch * self.batches_per_epoch, opt.lr_warmup_fraction)
        self.optimizer = build_optimizer(model, opt)
        self.scaler = make_grad_scaler(opt.amp, opt.device)
        self.start_epoch = 0 if opt.no_eval_untrained else -1
        self.submission_filename = (f"latest_{opt.dset_name}_{opt.eval_split_name}_predictions_"
                                    f"{'_'.join(opt.eval_tasks_at_training)}.json")
        # Bookkeeping saved in last.ckpt.
        self.last_epoch = self.start_epoch - 1
        self.best_score = 0.0
        self.es_cnt = 0
        self.stopped_early = False
        self.writer = None

    # --- checkpoints -------------------------------------------------------------------------------

    def save_last_checkpoint(self, epoch):
        opt = self.opt
        rank_rng_states = distributed.gather_object(random_streams.capture_rng_state())
        if not distributed.is_main_process():
            return
        # Under torchrun also every rank's RNG states, in rank order (rng_state is rank 0's).
        extra = {"rank_rng_states": rank_rng_states} if distributed.is_distributed() else {}
        save_checkpoint(
            opt.last_ckpt_filepath, self.model.state_dict(), self.model_cfg, epoch,
            optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
            best_score=self.best_score, es_cnt=self.es_cnt, stopped_early=self.stopped_early,
            global_step=(epoch + 1) * self.batches_per_epoch, rng_state=rank_rng_states[0],
            log_sizes=run_dir.log_sizes(opt.results_dir), **extra)

    def restore(self, checkpoint):
        """Continue from a last.ckpt: weights, optimizer, RNG states, early-stopping state and logs."""
        load_model_weights(self.model, checkpoint["model"], source=self.opt.last_ckpt_filepath)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"]:  # empty when the run so far had no fp16 loss scaling
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.last_epoch = checkpoint["epoch"]
        self.best_score = checkpoint["best_score"]
        self.es_cnt = checkpoint["es_cnt"]
        self.stopped_early = checkpoint["stopped_early"]
        random_streams.restore_rank_rng_state(checkpoint.get("rank_rng_states") or [checkpoint["rng_state"]],
                                              self.opt.seed, checkpoint["epoch"])
        if distributed.is_main_process():
            # Lines appended after last.ckpt was written belong to the unfinished epoch, which runs again.
            run_dir.truncate_logs(self.opt.results_dir, checkpoint["log_sizes"])

    # --- training ----------------------------------------------------------------------------------

    def train_epoch(self, epoch):
        opt, model, optimizer = self.opt, self.train_model, self.optimizer
        self.train_generator.manual_seed(random_streams.stream_seed(opt.seed, epoch, random_streams.SAMPLER_STREAM))
        random.seed(distributed.rank_seed(random_streams.stream_seed(opt.seed, epoch, random_streams.NEGATIVES_STREAM)))
        model.train()
        meters = {name: AverageMeter() for name in self.recipe.loss_names}
        batches = itertools.islice(self.train_loader, self.batches_per_epoch)
        for batch_idx, (_, model_inputs) in enumerate(tqdm(batches, total=self.batches_per_epoch,
                                                           desc=f"Training epoch {epoch}", leave=False,
                                                           disable=not distributed.is_main_process())):
            global_step = epoch * self.batches_per_epoch + batch_idx
            apply_warmup(optimizer, global_step, self.warmup_steps)
            model_inputs = prepare_batch_inputs(model_inputs, opt.device, non_blocking=opt.device.type == "cuda")
            loss_dict = training_step(model, model_inputs, optimizer, self.scaler, opt.amp, opt.grad_clip)
            # The losses are means over queries: their mean over the ranks is the global batch's.
            loss_dict = dict(zip(loss_dict, distributed.mean_over_ranks(loss_dict.values())))

            self.writer.add_scalar("Train/LR_top", float(optimizer.param_groups[0]["lr"]), global_step)
            self.writer.add_scalar("Train/LR_pretrain", float(optimizer.param_groups[-1]["lr"]), global_step)
            for name, value in loss_dict.items():
                self.writer.add_scalar(f"Train/{name}", value, global_step)
                meters[name].update(float(value))

        loss_str = " ".join(f"{name} {meter.avg:.4f}" for name, meter in meters.items())
        if distributed.is_main_process():
            run_dir.append_line(opt.train_log_filepath, TRAIN_LOG_LINE.format(
                time_str=time.strftime(run_dir.TIME_FORMAT), epoch=epoch, loss_str=loss_str))
        logger.info("epoch %d: %s", epoch, loss_str)

    @torch.no_grad()
    def eval_loss_pass(self, epoch):
        """Training losses on the val set (with sampled negatives [Q30]) in eval mode; tensorboard only."""
        self.model.eval()
        meters = {name: AverageMeter() for name in self.recipe.loss_names}
        n_batches = len(self.eval_loss_loader)
        if self.opt.debug:
            n_batches = min(n_batches, DEBUG_BATCHES_PER_EPOCH)
        batches = itertools.islice(self.eval_loss_loader, n_batches)
        for _, model_inputs in tqdm(batches, total=n_batches, desc="Eval loss", leave=False,
                                    disable=not distributed.is_main_process()):
            model_inputs = prepare_batch_inputs(model_inputs, self.opt.device)
            with autocast_context(self.opt.amp, self.opt.device):
                _, loss_dict = self.model(model_inputs)
            for name, value in loss_dict.items():
                meters[name].update(float(value))
        # Every rank saw its slice of the same batches: the mean of the ranks' means is the global mean.
        averages = distributed.mean_over_ranks(meter.avg for meter in meters.values())
        for name, average in zip(meters, averages):
            self.writer.add_scalar(f"Eval_Loss/{name}", average, epoch)

    # --- evaluation, best checkpoint, early stopping -------------------------------------------------

    def should_evaluate(self, epoch):
        return epoch % self.opt.eval_epoch_num == 0 or epoch == self.n_epoch - 1 or epoch == self.start_epoch

    def evaluate(self, epoch):
        """Evaluate, keep the best checkpoint, count towards early stopping; True when training must stop.

        Under torchrun every rank scores its share of the queries; rank 0 gets all predictions, writes the
        files and decides, and every rank receives the decision and the early-stopping state.
        """
        opt = self.opt
        evaluation_seed = random_streams.stream_seed(opt.seed, epoch, random_streams.EVALUATION_STREAM)
        self.eval_loss_generator.manual_seed(evaluation_seed)
        with random_streams.isolated_rng(distributed.rank_seed(evaluation_seed)):
            self.eval_loss_pass(epoch)
            metrics_no_nms, metrics_nms, latest_file_paths = self.recipe.evaluate(
                self.model, self.eval_dataset, opt, self.submission_filename,
                tasks=opt.eval_tasks_at_training, max_after_nms=100)
        stop = None
        if distributed.is_main_process():
            stop = self.record_evaluation(epoch, metrics_no_nms, metrics_nms, latest_file_paths)
        stop, self.best_score, self.es_cnt = distributed.broadcast_object((stop, self.best_score, self.es_cnt))
        return stop

    def record_evaluation(self, epoch, metrics_no_nms, metrics_nms, latest_file_paths):
        """Log an evaluation, keep the best checkpoint, count towards early stopping (rank 0)."""
        opt = self.opt
        run_dir.append_line(opt.eval_log_filepath, EVAL_LOG_LINE.format(
            time_str=time.strftime(run_dir.TIME_FORMAT), epoch=epoch, metrics_str=json.dumps(metrics_no_nms)))
        shown = {k: v for k, v in metrics_no_nms.items() if "by_type" not in k}
        logger.info("metrics_no_nms %s", pprint.pformat(shown, indent=4))
        logger.info("metrics_nms %s", pprint.pformat(metrics_nms, indent=4))
        self.log_metrics(metrics_no_nms, (epoch + 1) * self.batches_per_epoch)

        stop_metric_names = list(self.recipe.stop_metric_names[opt.stop_task])
        stop_score = sum(metrics_no_nms[opt.stop_task][name] for name in stop_metric_names)
        if stop_score > self.best_score:
            self.es_cnt = 0
            self.best_score = stop_score
            save_checkpoint(opt.ckpt_filepath, self.model.state_dict(), self.model_cfg, epoch)
            for path in latest_file_paths:
                # Only the file name changes (the original replaced "latest" anywhere in the path [Q23]).
                directory, name = os.path.split(path)
                os.replace(path, os.path.join(directory, name.replace("latest", "best", 1)))
            logger.info("epoch %d: new best %s score %.2f; %s updated", epoch, opt.stop_task, stop_score,
                        opt.ckpt_filepath)
            return False
        self.es_cnt += 1
        if opt.max_es_cnt != -1 and self.es_cnt > opt.max_es_cnt:
            run_dir.append_line(opt.train_log_filepath, f"Early Stop at epoch {epoch}")
            logger.info("Early stop at %d with %s %s", epoch, " ".join([opt.stop_task] + stop_metric_names),
                        self.best_score)
            return True
        return False

    def log_metrics(self, metrics, global_step):
        for task in ("SVMR", "VCMR"):
            if task in metrics:
                for iou in IOU_THRESHOLDS:
                    self.writer.add_scalars(f"Eval/{task}-{iou}",
                                            {k: v for k, v in metrics[task].items() if str(iou) in k}, global_step)
        if "VR" in metrics:
            self.writer.add_scalars("Eval/VR", dict(metrics["VR"]), global_step)

    # --- epochs ------------------------------------------------------------------------------------

    def run(self):
        opt = self.opt
        first_epoch = self.last_epoch + 1
        if self.stopped_early:
            logger.info("this run stopped early at epoch %d; nothing to resume", self.last_epoch)
            return
        if first_epoch >= self.n_epoch:
            logger.info("all %d epochs are done; pass a larger --n_epoch to train further", self.n_epoch)
            return
        self.writer = run_dir.open_tensorboard(opt.tensorboard_log_dir, first_epoch if opt.resume else None,
                                               self.batches_per_epoch)
        try:
            for epoch in tqdm(range(first_epoch, self.n_epoch), desc="Epoch", initial=first_epoch - self.start_epoch,
                              total=self.n_epoch - self.start_epoch, disable=not distributed.is_main_process()):
                if epoch >= 0:
                    self.train_epoch(epoch)
                if opt.disable_eval:
                    if distributed.is_main_process():
                        save_checkpoint(opt.ckpt_filepath, self.model.state_dict(), self.model_cfg, epoch)
                elif self.should_evaluate(epoch):
                    self.stopped_early = self.evaluate(epoch)
                self.last_epoch = epoch
                self.writer.flush()  # the points of a finished epoch are on disk before last.ckpt says so
                self.save_last_checkpoint(epoch)
                if self.stopped_early:
                    break
        finally:
            self.writer.close()


def main(argv=None):
    distributed.init_from_env()  # under torchrun; a plain `python train.py` has no process group
    try:
        opt = BaseOptions().parse(argv)
        opt.device = distributed.local_device(opt.device)
        run_logged(opt)
    finally:
        distributed.shutdown()
    return opt.results_dir


def run_logged(opt):
    handlers = run_dir.setup_logging(opt.results_dir)
    discard_run_dir = False
    try:
        train(opt)
    except ConquerError:
        # A new run stopped by bad input before its first checkpoint holds nothing worth keeping.
        checkpoints = (opt.ckpt_filepath, opt.last_ckpt_filepath)
        discard_run_dir = not opt.resume and not any(map(os.path.exists, checkpoints))
        raise
    finally:
        for handler in handlers:
            logging.getLogger().removeHandler(handler)
            handler.close()
        if discard_run_dir and distributed.is_main_process():
            shutil.rmtree(opt.results_dir, ignore_errors=True)


def train(opt):
    # Rank 0 seeds as a single process; DDP gives every rank rank 0's initial weights.
    random_streams.set_seed(distributed.rank_seed(opt.seed))
    if distributed.is_distributed():
        logger.info("DistributedDataParallel: %d processes (backend %s), global batch %d (%d per process), "
                    "%s on rank 0", distributed.get_world_size(), distributed.get_backend(), opt.bsz,
                    distributed.per_rank_batch_size(opt.bsz), opt.device)
    if opt.debug:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

    checkpoint = None
    if opt.resume:
        if not os.path.isfile(opt.last_ckpt_filepath):
            raise OptionError(f"--resume {opt.resume}: no {os.path.basename(opt.last_ckpt_filepath)} there "
                                "(the run did not finish an epoch); start a new run instead")
        checkpoint = load_checkpoint(opt.last_ckpt_filepath, map_location="cpu")
        model_cfg = checkpoint["model_cfg"]
        if distributed.is_main_process():
            remove_stale_temp_files(opt.results_dir)  # left by a process killed while writing
        logger.info("resuming %s after epoch %d", opt.results_dir, checkpoint["epoch"])
    else:
        model_cfg = load_json_config(opt.model_config)
    logger.info("model_config %s", pprint.pformat(model_cfg, indent=4))

    train_dataset, eval_loss_dataset, eval_dataset = model_recipe(opt).build_datasets(opt, model_cfg)
    if opt.debug and eval_dataset is not None:
        eval_dataset = eval_dataset.subset(0, DEBUG_EVAL_QUERIES)
    for dataset in (train_dataset, eval_dataset):
        if dataset is not None:
            dataset.check_feature_dims(opt.query_dim, opt.visual_dim, opt.text_dim)
    model = build_model(model_cfg, opt, source=opt.last_ckpt_filepath if checkpoint else opt.model_config)
    logger.info("%s", model, extra={"file_only": True})
    if opt.encoder_pretrain_ckpt_filepath != "None" and checkpoint is None:
        load_encoder_pretrain(model, opt.encoder_pretrain_ckpt_filepath)
        logger.info("loaded the encoder pretrain weights from %s", opt.encoder_pretrain_ckpt_filepath)
    total, trainable = count_parameters(model)
    logger.info("Parameter Count: all %s; trainable %s", f"{total:,d}", f"{trainable:,d}")
    model.to(opt.device)

    trainer = Trainer(model, model_cfg, train_dataset, eval_loss_dataset, eval_dataset, opt)
    if checkpoint is not None:
        trainer.restore(checkpoint)
    logger.info("Start Training...")
    trainer.run()


def load_json_config(path):
    if path is None:
        raise OptionError("--model_config is required for training (e.g. config/model_config.json)")
    return EasyDict(load_json(path))


if __name__ == "__main__":
    run_cli(main)
