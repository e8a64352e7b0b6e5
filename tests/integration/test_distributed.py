"""Data-parallel training and evaluation (utils/distributed.py, train.py under torchrun): the helpers on their
own, then real 2-process runs on the CPU with gloo (spawned processes and `torchrun`) on the tiny corpus,
compared with single-process runs."""
import glob
import os
import random
import re
import socket
import subprocess
import sys
import time

import pytest
import torch
from easydict import EasyDict
from torch.utils.data import DataLoader

import inference
import train
from config.options import TestOptions
from method.checkpoint import load_checkpoint
from method.dataset import StartEndDataset
from utils import distributed

from utils.run_dir import REPO_ROOT
TINY_MODEL_CONFIG = os.path.join(REPO_ROOT, "config", "model_config_tiny.json")
# One thread per process: 2 processes fit the 2 cores, and every process computes with the same kernels.
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1")
WORLD_SIZE = 2
TIMEOUT_S = 240
SUBMISSION = "tvr_val_predictions_VCMR_SVMR_VR.json"
LOG_EPOCH = re.compile(r"\[Epoch\] (-01|\d{3})")


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------
# helpers, without a process group

@pytest.mark.parametrize("n_items, batch_size, world_size", [(24, 8, 1), (24, 8, 2), (23, 8, 4), (9, 4, 2)])
def test_rank_slices_make_up_the_single_process_batches(n_items, batch_size, world_size):
    dataset = list(range(n_items))

    def rank_loader(rank, shuffle):
        # As in train.py, the loader and the sampler share the generator (the loader first draws its worker
        # base seed from it, then the sampler its permutation, as with DataLoader(shuffle=True)).
        generator = torch.Generator().manual_seed(7)
        sampler = distributed.GlobalBatchSampler(n_items, batch_size, rank, world_size, shuffle, generator)
        return DataLoader(dataset, batch_sampler=sampler, generator=generator)

    for shuffle in (True, False):
        expected = [b.tolist() for b in DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=True,
                                                   generator=torch.Generator().manual_seed(7))]
        loaders = [rank_loader(rank, shuffle) for rank in range(world_size)]
        per_rank = [[b.tolist() for b in loader] for loader in loaders]
        assert expected and all(len(batches) == len(expected) == len(loader)
                                for batches, loader in zip(per_rank, loaders))
        for step, batch in enumerate(expected):
            assert [len(batches[step]) for batches in per_rank] == [batch_size // world_size] * world_size
            assert sum((batches[step] for batches in per_rank), []) == batch
        assert (expected[0] != list(range(batch_size))) == shuffle


def test_global_batch_must_divide():
    with pytest.raises(distributed.OptionError, match="not divisible by 3 ranks"):
        distributed.GlobalBatchSampler(20, 8, 0, 3, shuffle=False)


def test_per_rank_batch_size(monkeypatch):
    assert distributed.per_rank_batch_size(8) == 8
    monkeypatch.setattr(distributed, "get_world_size", lambda: 3)
    assert distributed.per_rank_batch_size(9) == 3
    with pytest.raises(distributed.OptionError, match=r"--bsz 8 is the global batch .* 3 processes .* --bsz 6"):
        distributed.per_rank_batch_size(8)


def test_training_refuses_a_global_batch_that_does_not_split(monkeypatch):
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    with pytest.raises(distributed.OptionError, match="--bsz 9 is the global batch"):
        distributed.per_rank_batch_size(9)


def test_shard_bounds_are_contiguous_balanced_batches():
    for n_items in range(0, 30):
        for chunk in (1, 3, 8):
            for world_size in (1, 2, 3, 5):
                bounds = [distributed.shard_bounds(n_items, chunk, rank, world_size) for rank in range(world_size)]
                assert bounds[0][0] == 0 and bounds[-1][1] == n_items
                assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
                assert all(start % chunk == 0 for start, stop in bounds if stop > start)
                n_chunks = [-(-(stop - start) // chunk) for start, stop in bounds]
                assert max(n_chunks) - min(n_chunks) <= 1 and n_chunks == sorted(n_chunks, reverse=True)
                assert n_items == 0 or bounds[0][1] > 0  # rank 0 always has queries


class ToyEvalDataset(torch.utils.data.Dataset):
    has_gt, inference_top_k, video2idx = True, 2, {"v": 0}

    def __init__(self, n):
        self.query_data = [{"desc_id": i} for i in range(n)]

    def __len__(self):
        return len(self.query_data)

    def __getitem__(self, index):
        return ("item", self.query_data[index]["desc_id"])

    def eval_video_names(self, index):
        return ["names", self.query_data[index]["desc_id"]]

    def get_query_item(self, index):
        return ("query", self.query_data[index]["desc_id"])

    def get_video_inputs(self, name):
        return ("video", name)


def test_rank_seeds():
    assert distributed.rank_seed(2018, 0) == 2018 and distributed.rank_seed(2018) == 2018
    seeds = [distributed.rank_seed(2018, rank) for rank in range(1, 9)]
    assert len(set(seeds + [2018])) == 9 and seeds == [distributed.rank_seed(2018, rank) for rank in range(1, 9)]
    assert all(0 <= s < 2 ** 32 for s in seeds) and distributed.rank_seed(2019, 1) not in seeds


def test_without_process_group_everything_is_one_process():
    assert not distributed.is_distributed() and not distributed.init_from_env()
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.is_main_process()) == (0, 1, True)
    model, dataset, results = torch.nn.Linear(2, 2), ToyEvalDataset(3), {"VR": [1], "video2idx": {}}
    assert distributed.wrap_model(model, torch.device("cpu")) is model
    assert distributed.shard_bounds(len(dataset), 2) == (0, 3)
    assert distributed.gather_predictions(results) is results
    assert distributed.broadcast_object(results) is results and distributed.gather_object(results) == [results]
    assert distributed.mean_over_ranks([0.1, 0.2]) == [0.1, 0.2]
    assert distributed.local_device(torch.device("cpu")) == torch.device("cpu")


def test_gather_predictions_merges_in_rank_order(monkeypatch):
    parts = [{"VCMR": [0, 1], "SVMR": ["a", "b"], "video2idx": {"v": 0}},
             {"VCMR": [2], "SVMR": ["c"], "video2idx": {"v": 0}},
             {}]  # a rank without queries
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "gather_object", lambda obj: parts)
    merged = distributed.gather_predictions(parts[0])
    assert merged == {"VCMR": [0, 1, 2], "SVMR": ["a", "b", "c"], "video2idx": {"v": 0}}
    assert list(merged) == ["VCMR", "SVMR", "video2idx"] and parts[0]["VCMR"] == [0, 1]
    monkeypatch.setattr(distributed, "gather_object", lambda obj: None)  # ranks other than 0
    assert distributed.gather_predictions(parts[1]) is None


# ----------------------------------------------------------------------------------------------------
# 2 processes

def tiny_flags(tiny_corpus, tiny_corpus_kwargs, results_root, exp_id):
    return ["--dataset_config", tiny_corpus, "--model_config", TINY_MODEL_CONFIG,
            "--visual_dim", str(tiny_corpus_kwargs["visual_dim"]), "--text_dim", str(tiny_corpus_kwargs["text_dim"]),
            "--query_dim", str(tiny_corpus_kwargs["query_dim"]), "--hidden_dim", "32", "--max_ctx_len", "30",
            "--device", "-1", "--num_workers", "0", "--bsz", "8", "--eval_query_bsz", "8", "--lr", "1e-3",
            "--results_root", str(results_root), "--exp_id", exp_id]


def run_flags(tiny_corpus, tiny_corpus_kwargs, results_root, exp_id):
    """A run evaluated after every epoch (val has 3 query batches: the shards of 2 ranks differ in size).
    VR R@1 of the first-stage scores is the stop score: best at epoch 0, never better later, so every run
    writes the same files however its numbers turn out."""
    return tiny_flags(tiny_corpus, tiny_corpus_kwargs, results_root, exp_id) + [
        "--use_interal_vr_scores", "--stop_task", "VR", "--no_eval_untrained"]


def one_step_flags(tiny_corpus, tiny_corpus_kwargs, results_root):
    """One optimizer step: 9 training queries (int(48 * 0.2)) with --bsz 8, no evaluation."""
    return tiny_flags(tiny_corpus, tiny_corpus_kwargs, results_root, "step") + [
        "--similarity_measure", "exclusive", "--data_ratio", "0.2", "--n_epoch", "1", "--no_eval_untrained",
        "--disable_eval"]


def without_dropout(build_model):
    """train.build_model whose model never drops anything (every Dropout and the attention dropout at 0), so
    that no dropout mask depends on how the batch is split."""
    def build(*args, **kwargs):
        model = build_model(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if hasattr(module, "dropout_prob"):
                module.dropout_prob = 0.0
        return model
    return build


def negatives_seeded_by_query(sample_negatives):
    """`StartEndDataset._sample_negatives` drawing from a generator seeded by the query, so every process layout
    trains on the same negatives."""
    def sample(self, ranked_names, gt_name, desc_id):
        state = random.getstate()
        random.seed(desc_id)
        try:
            return sample_negatives(self, ranked_names, gt_name, desc_id)
        finally:
            random.setstate(state)
    return sample


def spawned_rank(rank, world_size, runs):
    """One rank of a spawned job: the torchrun environment, then train.main for every (argv, deterministic,
    port); deterministic runs draw no dropout and the same negatives in any layout. Each run has its own port:
    rank 0 serves the rendezvous of a run until it leaves that run."""
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    sample_negatives, build_model = StartEndDataset._sample_negatives, train.build_model
    for argv, deterministic, port in runs:
        os.environ["MASTER_PORT"] = str(port)
        StartEndDataset._sample_negatives = (negatives_seeded_by_query(sample_negatives) if deterministic
                                             else sample_negatives)
        train.build_model = without_dropout(build_model) if deterministic else build_model
        train.main(argv)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def only_run_dir(results_root):
    run_dirs = glob.glob(os.path.join(results_root, "*"))
    assert len(run_dirs) == 1, run_dirs  # made by rank 0 alone
    return run_dirs[0]


@pytest.fixture(scope="module")
def spawned_runs(tiny_corpus, tiny_corpus_kwargs, tmp_path_factory):
    """2 spawned ranks: the one-step run (same negatives as any layout), then an uninterrupted 2-epoch run."""
    root = tmp_path_factory.mktemp("spawned")
    full_run = run_flags(tiny_corpus, tiny_corpus_kwargs, root / "full", "full") + ["--n_epoch", "2"]
    runs = [(one_step_flags(tiny_corpus, tiny_corpus_kwargs, root / "step"), True, free_port()),
            (full_run, False, free_port())]
    context = torch.multiprocessing.start_processes(spawned_rank, args=(WORLD_SIZE, runs),
                                                    nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.time() + TIMEOUT_S
    try:
        while not context.join(timeout=1):
            assert time.time() < deadline, "the spawned ranks did not finish in time"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return {"step": only_run_dir(root / "step"), "full": only_run_dir(root / "full")}


def logged_losses(run_dir):
    with open(os.path.join(run_dir, "train.log.txt")) as f:
        return [float(x) for x in re.findall(r" (\d+\.\d{4})", f.read())]


def test_one_step_on_two_ranks_equals_one_process(spawned_runs, tiny_corpus, tiny_corpus_kwargs, tmp_path,
                                                  monkeypatch):
    monkeypatch.setattr(StartEndDataset, "_sample_negatives",
                        negatives_seeded_by_query(StartEndDataset._sample_negatives))
    monkeypatch.setattr(train, "build_model", without_dropout(train.build_model))
    single = train.main(one_step_flags(tiny_corpus, tiny_corpus_kwargs, tmp_path))
    ddp_ckpt = load_checkpoint(os.path.join(spawned_runs["step"], "last.ckpt"))
    single_ckpt = load_checkpoint(os.path.join(single, "last.ckpt"))
    assert ddp_ckpt["global_step"] == single_ckpt["global_step"] == 1
    assert len(ddp_ckpt["rank_rng_states"]) == WORLD_SIZE and "rank_rng_states" not in single_ckpt
    assert ddp_ckpt["model"].keys() == single_ckpt["model"].keys()
    for name, weight in single_ckpt["model"].items():
        assert torch.allclose(ddp_ckpt["model"][name], weight, rtol=0, atol=1e-6), name
    states = ddp_ckpt["optimizer"]["state"].values()
    assert states and all(state["step"] == 1 for state in states)
    assert max(state["exp_avg"].abs().max().item() for state in states) > 0  # a real update
    # The logged loss is the global batch's (mean over the ranks).
    assert len(logged_losses(single)) == 3
    assert logged_losses(spawned_runs["step"]) == pytest.approx(logged_losses(single), abs=2e-4)


def torchrun(argv, script="train.py", expect_success=True):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD_SIZE),
               script] + argv
    result = subprocess.run(command, cwd=REPO_ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert (result.returncode == 0) == expect_success, result.stderr[-4000:]
    return result


def logged_epochs(run_dir, name):
    with open(os.path.join(run_dir, name)) as f:
        return LOG_EPOCH.findall(f.read())


def listing(run_dir):
    tensorboard = os.path.join(run_dir, "tensorboard_log")
    return sorted(os.listdir(run_dir)), sorted(d for d in os.listdir(tensorboard)
                                               if os.path.isdir(os.path.join(tensorboard, d)))


def test_torchrun_run_with_resume_matches_single_process_run(spawned_runs, tiny_corpus, tiny_corpus_kwargs,
                                                             tmp_path):
    # 2 epochs under torchrun, as 1 epoch and then --resume.
    torchrun(run_flags(tiny_corpus, tiny_corpus_kwargs, tmp_path / "torchrun", "full") + ["--n_epoch", "1"])
    run_dir = only_run_dir(tmp_path / "torchrun")
    torchrun(["--resume", run_dir, "--n_epoch", "2"])
    single = train.main(run_flags(tiny_corpus, tiny_corpus_kwargs, tmp_path / "single", "full") + ["--n_epoch", "2"])

    # Same files as a single process, each epoch logged once.
    assert listing(run_dir) == listing(single)
    assert {f"best_{SUBMISSION}", f"latest_{SUBMISSION}", "model.ckpt", "run.log"} <= set(os.listdir(run_dir))
    for name in ("train.log.txt", "eval.log.txt"):
        assert logged_epochs(run_dir, name) == logged_epochs(single, name) == ["000", "001"], name
    assert glob.glob(os.path.join(run_dir, "tensorboard_log", "events.out.tfevents.*"))

    # Resumed = uninterrupted (both on 2 ranks): weights, optimizer, every rank's RNG, early-stopping state, logs.
    resumed, uninterrupted = (load_checkpoint(os.path.join(d, "last.ckpt")) for d in (run_dir, spawned_runs["full"]))
    assert resumed["epoch"] == uninterrupted["epoch"] == 1
    for name, weight in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][name], weight), name
    for index, state in uninterrupted["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][index]["exp_avg_sq"], state["exp_avg_sq"])
    for a, b in zip(resumed["rank_rng_states"], uninterrupted["rank_rng_states"]):
        assert torch.equal(a["torch"], b["torch"])
    assert (resumed["best_score"], resumed["es_cnt"]) == (uninterrupted["best_score"], uninterrupted["es_cnt"])
    for name in ("train.log.txt", "eval.log.txt"):
        lines = [[line[19:] for line in open(os.path.join(d, name)).read().split("\n")]
                 for d in (run_dir, spawned_runs["full"])]
        assert lines[0] == lines[1], name

    # The sharded evaluation wrote what one process writes for the same checkpoint (model.ckpt <-> best_*).
    opt = TestOptions().parse(["--model_dir", run_dir, "--dataset_config", tiny_corpus, "--device", "-1",
                               "--num_workers", "0", "--eval_query_bsz", "8", "--output_dir", str(tmp_path / "eval"),
                               "--tasks", "VCMR", "SVMR", "VR", "--eval_id", "single"])
    _, _, paths = inference.run_inference(opt)
    with open(paths[0], "rb") as single_process, open(os.path.join(run_dir, f"best_{SUBMISSION}"), "rb") as sharded:
        assert single_process.read() == sharded.read()

    # inference.py under torchrun: the same files (submission, NMS submission, metrics) as one process.
    inference_flags = ["--model_dir", run_dir, "--dataset_config", tiny_corpus, "--device", "-1", "--num_workers", "0",
                       "--eval_query_bsz", "3", "--nms_thd", "0.7", "--tasks", "VCMR", "SVMR", "VR", "--eval_id",
                       "single"]
    result = torchrun(inference_flags + ["--output_dir", str(tmp_path / "eval_torchrun")], script="inference.py")
    _, _, paths = inference.run_inference(EasyDict(opt, nms_thd=0.7, eval_query_bsz=3))
    assert len(paths) == 4 and result.stdout.count("written:") == 1  # only rank 0 reports
    for path in paths:
        with open(path, "rb") as single_process, open(
                os.path.join(tmp_path, "eval_torchrun", os.path.basename(path)), "rb") as sharded:
            assert single_process.read() == sharded.read(), os.path.basename(path)
    # Rank 0 cannot write: every rank stops with its message (none waits for the others in the evaluation).
    (tmp_path / "a_file").write_text("")
    result = torchrun(inference_flags + ["--output_dir", str(tmp_path / "a_file" / "out")], script="inference.py",
                      expect_success=False)
    assert result.stderr.count("is not writable") == WORLD_SIZE


# ----------------------------------------------------------------------------------------------------
# scripts

def run_script_with_fake_python(tmp_path, gpus, extra_env=None, script=("train.sh", "x")):
    """Run scripts/train.sh (or `script`: name, first argument) with PYTHON set to a stub that prints its
    environment and arguments."""
    stub = tmp_path / "python"
    stub.write_text('#!/usr/bin/env bash\necho "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    env = dict(os.environ, PYTHON=str(stub))
    env.pop("TORCHRUN_ARGS", None)
    env.update(extra_env or {})
    return subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", script[0]), script[1], gpus, "--bsz", "64"],
                          env=env, capture_output=True, text=True)


def test_train_script_launches_torchrun_for_a_gpu_list(tmp_path):
    result = run_script_with_fake_python(tmp_path, "0,1,3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "CUDA_VISIBLE_DEVICES=0,1,3"
    assert lines[1:8] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3", "train.py",
                          "--dataset_config"]
    assert " ".join(lines).endswith("--device 0 --bsz 64")

    multi_node = "--nnodes 2 --node_rank 1 --rdzv_backend c10d --rdzv_endpoint host:29500 --rdzv_id run7"
    result = run_script_with_fake_python(tmp_path, "0,1", {"TORCHRUN_ARGS": multi_node})
    assert result.returncode == 0, result.stderr
    assert " ".join(result.stdout.splitlines()[1:]).startswith(
        f"-m torch.distributed.run {multi_node} --nproc_per_node 2 train.py")

    result = run_script_with_fake_python(tmp_path, "2")
    assert result.stdout.splitlines()[:2] == ["CUDA_VISIBLE_DEVICES=2", "train.py"]


def test_inference_script_launches_torchrun_for_a_gpu_list(tmp_path):
    script = ("inference.sh", str(tmp_path))
    result = run_script_with_fake_python(tmp_path, "0,2", script=script)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "CUDA_VISIBLE_DEVICES=0,2"
    assert lines[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "inference.py"]
    assert " ".join(lines).endswith(f"--model_dir {tmp_path} --tasks VR SVMR VCMR --device 0 --bsz 64")
    assert run_script_with_fake_python(tmp_path, "cpu", script=script).stdout.splitlines()[1] == "inference.py"
    result = run_script_with_fake_python(tmp_path, "0,x", script=script)
    assert result.returncode == 2 and "GPU list '0,x'" in result.stderr


@pytest.mark.parametrize("script,preset", [
    ("train_didemo.sh", "--dataset_config config/didemo_data_config.json --dset_name didemo --train_set_honours_options "
                        "--ctx_mode visual "
                        "--clip_length 2.5 --max_ctx_len 12"),
    ("train_anet.sh", "--dataset_config config/anet_data_config.json --dset_name anet --train_set_honours_options "
                      "--ctx_mode visual "
                      "--clip_length 3.0 --max_ctx_len 100"),
])
def test_corpus_presets_run_the_paper_recipe_with_their_flags(tmp_path, script, preset):
    result = run_script_with_fake_python(tmp_path, "cpu", script=(script, "x"))
    assert result.returncode == 0, result.stderr
    command = " ".join(result.stdout.splitlines()[1:])
    recipe = "--use_interal_vr_scores --bsz 16 --use_extend_pool 1000 --neg_video_num 3 --device -1"
    # The preset's flags follow the recipe's (so they win over its TVR data config); the user's come last.
    assert command.startswith("train.py --dataset_config config/tvr_data_config.json")
    assert command.endswith(f"{recipe} {preset} --visual_dim 4352 --query_dim 768 --bsz 64")
