"""The learning proof: the demo pipeline (synthetic corpus -> paper training script -> inference script),
shrunk to run in well under a minute, must leave the trained model clearly ahead of the untrained one."""
import os

from method.tools.demo import learning_margin, run_demo

# Fewer and shorter videos than the demo, and less noise so that ~150 small steps show the learning.
SMALL_CORPUS = dict(n_train_videos=40, n_val_videos=30, n_test_videos=12, n_train_queries=320, n_val_queries=80,
                    n_test_queries=12, min_duration=30.0, max_duration=60.0, noise=0.5, seed=1)
SMALL_RUN = ["--n_epoch", "4", "--bsz", "8", "--lr", "2e-3", "--max_ctx_len", "40", "--eval_query_bsz", "20"]


def test_training_beats_the_untrained_model(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    untrained, trained, trained_nms, run_dir = run_demo(str(tmp_path / "corpus"), str(tmp_path / "results"),
                                                        SMALL_CORPUS, SMALL_RUN)
    before, after = untrained["SVMR"]["0.5-r5"], trained["SVMR"]["0.5-r5"]
    assert after >= 2 * before and after >= before + 15, (before, after)
    assert set(trained_nms) == set(trained)
    assert os.path.isfile(os.path.join(run_dir, "model.ckpt"))
    # learning_margin is what the demo prints; it must agree with the numbers it is given.
    (name, b, a, holds), _ = learning_margin(untrained, trained)
    assert (name, b, a) == ("SVMR 0.5-r1", untrained["SVMR"]["0.5-r1"], trained["SVMR"]["0.5-r1"])
    assert holds == (a >= 3 * b and a >= b + 10)
