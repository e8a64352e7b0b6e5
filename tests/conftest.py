"""Shared pytest fixtures.

tiny_corpus: a small synthetic TVR-format corpus (utils/synthetic_tvr.py), generated once per test session;
the fixture value is the path of its data config; `tiny_corpus_kwargs` gives the generate_corpus arguments
(sizes, dims: visual 12, text 8, query 8).
"""
import pytest

from utils.synthetic_tvr import generate_corpus

TINY_CORPUS_KWARGS = dict(n_train_videos=24, n_val_videos=20, n_test_videos=16, n_train_queries=48,
                          n_val_queries=24, n_test_queries=12, visual_dim=12, text_dim=8, query_dim=8,
                          min_duration=15.0, max_duration=45.0, seed=0)


@pytest.fixture(scope="session")
def tiny_corpus_kwargs():
    return dict(TINY_CORPUS_KWARGS)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """Path of the data config of a session-wide tiny synthetic corpus (read-only: copy it to modify)."""
    return generate_corpus(tmp_path_factory.mktemp("tiny_corpus"), **TINY_CORPUS_KWARGS)
