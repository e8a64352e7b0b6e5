"""Random streams of a training run: seeding, per-epoch streams, capture and restore (for --resume), and an
isolated block for evaluation.

Every epoch's shuffling (SAMPLER) and negative sampling (NEGATIVES) are seeded from (seed, epoch), and
evaluation runs with its own stream (EVALUATION) inside `isolated_rng`, which puts the previous states back.
An epoch's batches and negatives therefore depend only on the seed and the epoch number, and a run resumed
from last.ckpt (which holds the captured states) continues exactly where it stopped. Under torchrun each rank
mixes its rank into the seeds (`utils.distributed.rank_seed`; rank 0 draws what a single process would).
"""
import contextlib
import logging
import random

import numpy as np
import torch

from utils import distributed

logger = logging.getLogger(__name__)

SAMPLER_STREAM, NEGATIVES_STREAM, EVALUATION_STREAM, RESUMED_RANK_STREAM = 0, 1, 2, 3


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def stream_seed(seed, epoch, stream):
    """A 32-bit seed for one random stream of one epoch, independent of everything that ran before."""
    return int(np.random.SeedSequence([seed % 2 ** 32, epoch + 1, stream]).generate_state(1)[0])


def seed_worker(worker_id, rank=0):
    """DataLoader `worker_init_fn`: the loader gives each worker torch seed base_seed + worker_id, with base_seed
    drawn from the loader's generator (the same on every rank); python `random` (negative sampling) and numpy
    follow it, mixed with the rank."""
    worker_seed = distributed.rank_seed(torch.initial_seed() % 2 ** 32, rank)
    random.seed(worker_seed)
    np.random.seed(worker_seed)


def capture_rng_state():
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # Plain Python values, so the checkpoint loads without unpickling numpy objects.
        "numpy": (numpy_state[0], numpy_state[1].tolist()) + tuple(numpy_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rank_rng_state(rank_states, seed, epoch):
    """This rank's RNG states from `rank_states` (one per rank of the run that saved them): its own when that
    run had as many ranks; otherwise rank 0 takes the first and the other ranks start streams derived from
    (seed, epoch, rank)."""
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    if len(rank_states) == world_size:
        restore_rng_state(rank_states[rank])
        return
    logger.warning("last.ckpt holds the RNG states of %d process(es), this run has %d: ranks other than 0 "
                   "start new random streams", len(rank_states), world_size)
    if rank == 0:
        restore_rng_state(rank_states[0])
    else:
        set_seed(distributed.rank_seed(stream_seed(seed, epoch, RESUMED_RANK_STREAM)))


@contextlib.contextmanager
def isolated_rng(seed):
    """Run a block with python/numpy/torch RNGs seeded from `seed`, then put the previous states back,
    so evaluation never shifts the random streams of training."""
    saved = capture_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        restore_rng_state(saved)
