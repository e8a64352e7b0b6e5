"""Shared pytest fixtures. Tests are laid out as tests/unit/test_<module>.py (one file per production module)
and tests/integration/ (training, inference, distributed runs, fault tolerance, bad inputs, demo, benchmark).

repo_root: the repository root (utils.run_dir.REPO_ROOT, which test modules also import).
tiny_corpus: a small synthetic TVR-format corpus (utils/synthetic_tvr.py), generated once per test session;
the fixture value is the path of its data config; `tiny_corpus_kwargs` gives the generate_corpus arguments
(sizes, dims: visual 12, text 8, query 8).
tiny_train_flags: train.py / inference.py flags for that corpus with the tiny model config on the CPU.
trained_runs: a run directory per similarity measure, trained 1 epoch with those flags.
one_thread: torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): fast on a
shared 2-core machine, and the same numerics in the test process and in its OMP_NUM_THREADS=1 subprocesses.
"""
import os

import pytest
import torch

from utils.run_dir import REPO_ROOT
from utils.synthetic_tvr import generate_corpus

TINY_CORPUS_KWARGS = dict(n_train_videos=24, n_val_videos=20, n_test_videos=16, n_train_queries=48,
                          n_val_queries=24, n_test_queries=12, visual_dim=12, text_dim=8, query_dim=8,
                          min_duration=15.0, max_duration=45.0, seed=0)


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_corpus_kwargs():
    return dict(TINY_CORPUS_KWARGS)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """Path of the data config of a session-wide tiny synthetic corpus (read-only: copy it to modify)."""
    return generate_corpus(tmp_path_factory.mktemp("tiny_corpus"), **TINY_CORPUS_KWARGS)


TINY_MODEL_CONFIG = os.path.join(REPO_ROOT, "config", "model_config_tiny.json")


@pytest.fixture(scope="session")
def tiny_train_flags(tiny_corpus):
    """Data, tiny model and CPU flags; everything else from the defaults or the caller."""
    k = TINY_CORPUS_KWARGS
    return ["--dataset_config", tiny_corpus, "--model_config", TINY_MODEL_CONFIG,
            "--visual_dim", str(k["visual_dim"]), "--text_dim", str(k["text_dim"]), "--query_dim", str(k["query_dim"]),
            "--hidden_dim", "32", "--max_ctx_len", "30", "--device", "-1", "--num_workers", "0", "--bsz", "8",
            "--eval_query_bsz", "8", "--lr", "1e-3"]


# Flags of each similarity measure's run (the general measure ranks videos by the first-stage scores).
MEASURE_FLAGS = {
    "general": ["--use_interal_vr_scores"],
    "exclusive": ["--similarity_measure", "exclusive"],
    "disjoint": ["--similarity_measure", "disjoint"],
}


@pytest.fixture(scope="session")
def trained_runs(tiny_train_flags, tmp_path_factory):
    """{measure: run directory} trained 1 epoch on the tiny corpus (checkpoint saved without evaluation)."""
    import train

    root = tmp_path_factory.mktemp("runs")
    return {measure: train.main(tiny_train_flags + flags + ["--results_root", str(root), "--exp_id", measure,
                                                            "--n_epoch", "1", "--disable_eval", "--no_eval_untrained"])
            for measure, flags in MEASURE_FLAGS.items()}


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
