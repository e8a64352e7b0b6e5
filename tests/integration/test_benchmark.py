"""method/tools/benchmark.py --quick: every section runs and reports ratios; the fast formulations give the plain
ones' results (training losses, cached vs uncached predictions, post-processing outputs)."""
import json
import math
import subprocess
import sys

import pytest

from method.tools import benchmark
from method.tools.benchmark import REPO_ROOT, SECTIONS, main


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark") / "benchmark.json"
    main(["--quick", "--out", str(out)])
    with open(out) as f:
        return json.load(f)


def test_every_section_has_positive_finite_ratios(quick_results):
    for section in SECTIONS:
        ratios = quick_results[section]["ratios"]
        assert ratios, section
        for name, value in ratios.items():
            assert math.isfinite(value) and value > 0, (section, name, value)
    assert {"step_time", "peak_memory", "step_time_bf16_vs_fp32"} <= set(quick_results["train"]["ratios"])
    assert {"queries_per_s", "queries_per_s_bf16_vs_fp32"} <= set(quick_results["eval"]["ratios"])
    assert "total_time_speedup" in quick_results["post"]["ratios"]
    assert quick_results["meta"]["quick"] is True
    assert {check["section"] for check in quick_results["targets"]} == set(SECTIONS)


def test_fast_formulations_give_the_plain_results(quick_results):
    train = quick_results["train"]
    assert train["losses_match_first_step"]
    assert max(train["loss_rel_diff_per_step"]) < 1e-4
    assert quick_results["eval"]["identical_predictions"]
    assert quick_results["post"]["identical_outputs"]


def test_flops_and_memory_are_reported(quick_results):
    train, evaluation = quick_results["train"], quick_results["eval"]
    assert train["flops_per_step"] > 0
    for run in train["runs"].values():
        assert run["peak_memory_bytes"] >= run["memory_before_first_step_bytes"] > 0
        assert len(run["step_times_s"]) == quick_results["sizes"]["train_steps"]
    assert evaluation["runs"]["cache_off"]["flops_per_query"] > evaluation["runs"]["cache_on"]["flops_per_query"] > 0
    assert evaluation["cache_bytes"] > 0 and quick_results["peak"]["fp32"] > 0


def test_bad_flags_are_clear_errors(capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--amp", "fp16"])  # fp16 needs CUDA
    assert "--amp fp16 needs a CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--real_annotations", REPO_ROOT])
    assert "no tvr_val_release.jsonl" in capsys.readouterr().err


def test_shell_wrapper_passes_flags_through():
    completed = subprocess.run(["bash", "scripts/benchmark.sh", "--help"], cwd=REPO_ROOT, capture_output=True,
                               text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert completed.returncode == 0, completed.stderr
    assert "--sections" in completed.stdout and "--quick" in completed.stdout
