"""method/tools/benchmark.py: the fast formulations give the plain ones' results (training losses, cached vs
uncached predictions, post-processing outputs), FLOPs and memory are reported, sections plug in by module,
and bad flags are clear errors. That every ratio is finite and positive is the benchmark's own smoke check
(--quick exits with status 1 otherwise); the tests only read its exit status."""
import json
import subprocess
import sys

import pytest

from method.tools import benchmark
from method.tools.benchmark import CORE_SECTIONS, REPO_ROOT, main, sanity_problems, section_modules


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark") / "benchmark.json"
    status = main(["--quick", "--out", str(out)])
    with open(out) as f:
        return status, json.load(f)


def test_smoke_run_passes_its_own_checks_for_every_section(quick_run):
    status, results = quick_run
    assert status == 0, results["sanity_problems"]
    modules = section_modules()
    sections = set(CORE_SECTIONS) | {"corpus", "extract"} | {name for name, module in modules.items()
                                                              if getattr(module, "SMOKE_BY_DEFAULT", True)}
    assert set(results["meta"]["sections"]) == sections and sections <= set(results)
    assert "long_videos" in modules and "long_videos" not in sections  # eight training runs: only when named


def test_long_video_recall_is_split_by_where_the_moment_starts(tmp_path):
    from method.tools.benchmark_long_videos import moment_subsets, vcmr_by_subset
    from utils.io_utils import save_json
    rows = [dict(desc_id=i, vid_name="v", duration=300.0, ts=[start, start + 6.0], desc="", type="v")
            for i, start in enumerate([10.0, 140.0, 150.0, 200.0])]
    subsets = moment_subsets(rows, 150.0)
    assert subsets == {"first window": [0, 1], "after": [2, 3]}
    # Queries 0 and 2 are found at rank 1, queries 1 and 3 not at all.
    found = {0: [[5, 10.0, 16.0, 1.0]], 1: [[5, 0.0, 3.0, 1.0]], 2: [[5, 150.0, 156.0, 1.0]], 3: [[6, 200.0, 206.0, 1.0]]}
    path = tmp_path / "submission.json"
    save_json({"video2idx": {"v": 5, "w": 6}, "VCMR": [dict(desc_id=i, desc="", predictions=p) for i, p in found.items()]},
              path)
    metrics = vcmr_by_subset(str(path), rows, subsets)
    assert metrics["first window"]["0.5-r1"] == metrics["after"]["0.5-r1"] == 50.0


def test_fast_formulations_give_the_plain_results(quick_run):
    _, results = quick_run
    train = results["train"]
    assert train["losses_match_first_step"]
    assert max(train["loss_rel_diff_per_step"]) < 1e-4
    assert results["eval"]["identical_predictions"]
    assert results["post"]["identical_outputs"]


def test_flops_and_memory_are_reported(quick_run):
    _, results = quick_run
    train, evaluation = results["train"], results["eval"]
    for run in train["runs"].values():
        assert run["flops_per_step"] > 0
        assert run["peak_memory_bytes"] >= run["memory_before_first_step_bytes"] > 0
        assert len(run["step_times_s"]) == results["sizes"]["train_steps"]
    assert evaluation["runs"]["cache_off"]["flops_per_query"] > evaluation["runs"]["cache_on"]["flops_per_query"] > 0
    assert evaluation["cache_bytes"] > 0 and results["peak"]["fp32"] > 0


def test_smoke_check_flags_implausible_numbers():
    good = {"ratios": {"speedup": 2.0}, "runs": {"a": {"step_times_s": [0.1], "peak_bytes": 10, "label": "x"}}}
    assert sanity_problems({"train": good}, ["train"]) == []
    bad = {"ratios": {"speedup": float("nan")}, "runs": {"a": {"step_times_s": [0.0], "videos_per_s": -1}}}
    assert len(sanity_problems({"train": bad}, ["train", "post"])) == 4  # nan, 0 s, negative rate, no post


def test_bad_flags_are_clear_errors(capsys, monkeypatch):
    modules = section_modules()
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--amp", "fp16"], modules)  # fp16 needs CUDA
    assert "--amp fp16 needs a CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--real_annotations", REPO_ROOT], modules)
    assert "no tvr_val_release.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--sections", "no_such_section"], modules)
    assert "invalid choice: 'no_such_section'" in capsys.readouterr().err
    monkeypatch.setattr(modules["corpus"], "REQUIRES", {"no_such_module_xyz": "corpus"})
    with pytest.raises(benchmark.BenchmarkError, match=r"--sections corpus: needs .*no_such_module_xyz.*\[corpus\]"):
        benchmark.check_requirements(["train", "corpus"], modules)


def test_shell_wrapper_passes_flags_through():
    completed = subprocess.run(["bash", "scripts/benchmark.sh", "--help"], cwd=REPO_ROOT, capture_output=True,
                               text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert completed.returncode == 0, completed.stderr
    assert "--sections" in completed.stdout and "--corpus_videos" in completed.stdout
