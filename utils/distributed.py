"""Data-parallel training and evaluation under torchrun (PyTorch's DistributedDataParallel).

    torchrun --nproc_per_node 4 train.py ...                     # one node, 4 GPUs
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 \\
        --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id RUN train.py ...   # on every node

A process started by torchrun finds RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its
environment; `init_from_env` then joins the process group. Without them (plain `python train.py`) nothing
here starts a process group and every helper is the identity of a single process, so single-process runs
do exactly what they did before.

Semantics (train.py and method/evaluation.py):
* --bsz is the global batch: each optimizer step consumes the batch a single process would draw for the
  same seed and epoch (`GlobalBatchSampler`), cut into world_size contiguous slices; DDP averages the
  gradients, which equals the gradient of the global batch because the losses are means over queries.
* Rank r runs on cuda:LOCAL_RANK (or the CPU with --device -1). Tensors of the model go through NCCL on
  CUDA (gloo on the CPU); small Python objects (run directory, early-stopping decision, predictions) go
  through gloo on the CPU.
* Randomness drawn per rank (negative videos, dropout, worker seeds) uses `rank_seed`, so it differs
  between ranks, is reproducible, and rank 0 draws exactly what a single process would.
* Evaluation: each rank scores a contiguous share of the queries (`shard_bounds`), rank 0 gathers them in
  dataset order (`gather_predictions`) and alone writes files.
* Several nodes: every node reads the data (and --encoder_pretrain_ckpt_filepath) at the same paths; the
  run directory is written by rank 0 only, but --resume reads last.ckpt on every rank, so resuming needs
  --results_root on storage that every node sees.
"""
import datetime
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from utils.errors import ConquerError, OptionError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Commands that share videos between ranks (extraction, transcription) gather at the end, after the slowest rank's
# share, which can take hours: longer than torch's default collective timeout.
COMMAND_COLLECTIVE_TIMEOUT = datetime.timedelta(days=7)


# ----------------------------------------------------------------------------------------------------
# process group

def launched_by_torchrun():
    return all(name in os.environ for name in TORCHRUN_ENV)


def init_from_env(timeout=None):
    """Join the process group described by torchrun's environment variables; True if there is one.

    The group serves CPU tensors with gloo and, where CUDA exists, CUDA tensors with NCCL. timeout: how long a
    collective waits for the other ranks (default: torch's, 30 minutes for gloo).
    """
    if not launched_by_torchrun():
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo",
                                **({} if timeout is None else dict(timeout=timeout)))
    return True


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def get_backend():
    """e.g. "gloo" or "cpu:gloo,cuda:nccl"; None without a process group."""
    return dist.get_backend() if is_distributed() else None


def get_local_rank():
    return int(os.environ["LOCAL_RANK"]) if is_distributed() else 0


def is_main_process():
    return get_rank() == 0


def broadcast_object(obj, src=0):
    """`obj` of rank `src` (any picklable object), on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj):
    """On every rank, the list of every rank's `obj` in rank order ([obj] without a process group)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_object(obj, dst=0):
    """On rank `dst`, the list of every rank's `obj` in rank order; None on the other ranks."""
    if not is_distributed():
        return [obj]
    gathered = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(obj, gathered, dst=dst)
    return gathered


def run_on_main(fn):
    """fn() on rank 0 alone; every rank returns its result, or raises the ConquerError it raised, so no rank goes
    on to wait for a rank 0 that stopped. Without a process group: fn()."""
    result = error = None
    if is_main_process():
        try:
            result = fn()
        except ConquerError as e:
            error = e
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def mean_over_ranks(values):
    """Element-wise mean over the ranks of a list of floats (the list itself without a process group)."""
    if not is_distributed():
        return list(values)
    total = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(total)
    return (total / get_world_size()).tolist()


# ----------------------------------------------------------------------------------------------------
# devices, model, seeds

def local_device(device):
    """The device of this rank: cuda:LOCAL_RANK when `device` is a CUDA device, else `device`."""
    if not is_distributed() or device.type != "cuda":
        return device
    local_rank, n_devices = get_local_rank(), torch.cuda.device_count()
    if local_rank >= n_devices:
        raise OptionError(f"LOCAL_RANK {local_rank} has no GPU: this node shows {n_devices} CUDA device(s); "
                               "start at most that many processes per node (torchrun --nproc_per_node) or "
                               "widen CUDA_VISIBLE_DEVICES")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def command_device(value, error_class, flag="--device"):
    """The device of a command that torchrun may start: `value` (e.g. "cpu", "cuda") parsed, CUDA checked, the
    process group joined under torchrun (leave it with `shutdown`), then this rank's `local_device`. A bad value
    is an `error_class` naming `flag`."""
    try:
        device = torch.device(value)
    except RuntimeError as e:
        raise error_class(f"{flag} {value}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise error_class(f"{flag} {value}: CUDA is not available here; use {flag} cpu")
    init_from_env(timeout=COMMAND_COLLECTIVE_TIMEOUT)
    return local_device(device)


def wrap_model(model, device):
    """DistributedDataParallel around `model` (already on `device`) under torchrun, else `model` itself.

    DDP copies rank 0's weights to every rank, then all-reduces (averages) the gradients in backward.
    """
    if not is_distributed():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def rank_seed(seed, rank=None):
    """A 32-bit seed of this rank's own random stream derived from `seed`; rank 0 keeps `seed` itself."""
    rank = get_rank() if rank is None else rank
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2 ** 32, rank]).generate_state(1)[0])


def per_rank_batch_size(global_batch_size, flag="--bsz"):
    world_size = get_world_size()
    if global_batch_size % world_size:
        raise OptionError(f"{flag} {global_batch_size} is the global batch and must be divisible by the "
                               f"{world_size} processes (nproc_per_node x nnodes); use e.g. {flag} "
                               f"{max(world_size, global_batch_size // world_size * world_size)}")
    return global_batch_size // world_size


# ----------------------------------------------------------------------------------------------------
# data

class GlobalBatchSampler(Sampler):
    """Batch sampler yielding this rank's slice of every global batch.

    The global batches are those of `DataLoader(batch_size=global_batch_size, drop_last=True)` with
    `shuffle=True, generator=generator` (or in order with shuffle=False): the same permutation, drawn
    lazily from `generator` when iteration starts, after the loader has drawn its worker base seed. Each
    is cut into world_size contiguous slices and rank r gets slice r, so the ranks of one step together
    hold exactly the batch a single process would train on. An incomplete last batch is dropped.
    """

    def __init__(self, n_items, global_batch_size, rank, world_size, shuffle, generator=None):
        if global_batch_size % world_size:
            raise OptionError(f"global batch size {global_batch_size} is not divisible by {world_size} ranks")
        if shuffle and generator is None:
            raise ValueError("GlobalBatchSampler: shuffle=True needs the generator that every rank seeds alike")
        self.n_items, self.global_batch_size = n_items, global_batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.generator = shuffle, generator

    def __len__(self):
        return self.n_items // self.global_batch_size

    def __iter__(self):
        order = (torch.randperm(self.n_items, generator=self.generator).tolist() if self.shuffle
                 else list(range(self.n_items)))
        per_rank = self.global_batch_size // self.world_size
        for start in range(0, len(self) * self.global_batch_size, self.global_batch_size):
            first = start + self.rank * per_rank
            yield order[first:first + per_rank]


def shard_bounds(n_items, chunk, rank=None, world_size=None):
    """[start, stop) of rank's contiguous share of `n_items` (default: this process's), cut at multiples of
    `chunk` (the evaluation batch, so that every rank scores exactly the batches a single process would);
    earlier ranks take the remainder."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    n_chunks = -(-n_items // chunk)
    base, extra = divmod(n_chunks, world_size)
    first = rank * base + min(rank, extra)
    last = first + base + (rank < extra)
    return min(first * chunk, n_items), min(last * chunk, n_items)


def gather_predictions(results):
    """Merge every rank's predictions on rank 0, in rank (hence dataset) order; None on the other ranks.

    `results` maps a key to a list (one entry per query of the shard, concatenated across ranks) or to any
    other value, taken from the lowest rank that has the key (e.g. "video2idx"). Without a process group
    `results` is returned as is.
    """
    if not is_distributed():
        return results
    parts = gather_object(results)
    if parts is None:
        return None
    merged = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, list):
                merged.setdefault(key, []).extend(value)
            else:
                merged.setdefault(key, value)
    return merged
