"""utils/standalone_eval.py: hand-computed metrics, a per-query loop reference, submission errors, CLI."""
import json
import math

import numpy as np
import pytest

from utils.io_utils import save_json, save_jsonl
from utils.standalone_eval import (GroundTruthError, SubmissionError, eval_retrieval, main, prediction_matrix,
                                   prediction_table, rounded_percentage)

VIDEO2IDX = {"a": 0, "b": 1, "c": 2, "d": 3}
GT = [
    {"desc_id": 10, "vid_name": "a", "ts": [0.0, 10.0], "type": "v", "desc": "q10"},
    {"desc_id": 11, "vid_name": "b", "ts": [5.0, 15.0], "type": "t", "desc": "q11"},
    {"desc_id": 12, "vid_name": "c", "ts": [0.0, 3.0], "type": "vt", "desc": "q12"},
]


def task_entries(predictions_by_desc_id):
    return [{"desc_id": d, "desc": f"q{d}", "predictions": p} for d, p in predictions_by_desc_id.items()]


# ---------------------------------------------------------------------------------------------------
# Plain per-query reference: loops and float32 scalars, as the metric definition reads

def plain_iou(pred, gt):
    st, ed, gst, ged = (np.float32(x) for x in (pred[0], pred[1], gt[0], gt[1]))
    intersection = max(np.float32(0), min(ed, ged) - max(st, gst))
    hull = max(ed, ged) - min(st, gst)
    return np.float32(0) if hull == 0 else np.float32(intersection / hull)


def plain_metrics(submission, gt_rows, use_desc_type=True):
    video2idx, out, by_type_all = submission["video2idx"], {}, {}
    for task in [t for t in ("VCMR", "SVMR", "VR") if t in submission]:
        preds = {e["desc_id"]: e["predictions"][:100] for e in submission[task]}
        hits = {}  # (label, k) -> list of bool per query
        for gt in gt_rows:
            rows = preds[gt["desc_id"]]
            matched = [np.float32(r[0]) == np.float32(video2idx[gt["vid_name"]]) for r in rows]
            ts = gt["ts"] if len(gt["ts"]) >= 4 else [gt["ts"]]
            need = 2 if len(gt["ts"]) >= 4 else 1
            for k in (1, 5, 10, 100):
                if task == "VR":
                    hits.setdefault(("", k), []).append(any(matched[:k]))
                    continue
                for thd in (0.5, 0.7):
                    correct = [m and sum(plain_iou(r[1:3], t) >= np.float32(thd) for t in ts) >= need
                               for r, m in zip(rows, matched)]
                    considered = correct[:k] if task == "VCMR" else [c for c, m in zip(correct, matched) if m][:k]
                    hits.setdefault((f"{thd}-", k), []).append(any(considered))
        labels = [""] if task == "VR" else ["0.5-", "0.7-"]
        out[task] = {f"{lab}r{k}": rounded_percentage(np.mean(hits[(lab, k)])) for lab in labels for k in (1, 5, 10, 100)}
        by_type = {}
        for t in ("v", "t", "vt"):
            idx = [i for i, gt in enumerate(gt_rows) if gt["type"] == t]
            for lab in labels:
                for k in (1, 5, 10, 100):
                    by_type[f"{t}-{lab}r{k}"] = (rounded_percentage(sum(hits[(lab, k)][i] for i in idx) / len(idx))
                                                 if idx else float("nan"))
        by_type["desc_type_ratio"] = "v {} t {} vt {}".format(
            *[rounded_percentage(sum(g["type"] == t for g in gt_rows) / len(gt_rows)) for t in ("v", "t", "vt")])
        by_type_all[task + "_by_type"] = by_type
    if use_desc_type:
        out.update(by_type_all)
    return out


def same_metrics(a, b):
    assert list(a) == list(b)
    for task in a:
        assert list(a[task]) == list(b[task]), task
        for key in a[task]:
            x, y = a[task][key], b[task][key]
            assert x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)), (task, key, x, y)


# ---------------------------------------------------------------------------------------------------
# Hand-computed cases

def test_vcmr_svmr_vr_by_hand():
    submission = {
        "video2idx": VIDEO2IDX,
        "VCMR": task_entries({
            # rank 1 is the right moment on the wrong video; rank 2 has IoU exactly 0.7 (7/10) on the right one
            10: [[1, 0.0, 10.0, 0.9], [0, 0.0, 7.0, 0.8]],
            # IoU 0.5 exactly at rank 1 ([5, 10] vs [5, 15]); just below 0.7 at rank 6
            11: [[1, 5.0, 10.0, 0.9]] + [[3, 0.0, 1.0, 0.5]] * 4 + [[1, 5.0, 11.99, 0.4]],
            12: [],  # no predictions at all
        }),
        "SVMR": task_entries({
            10: [[1, 0.0, 10.0, 0.9], [0, 0.0, 7.0, 0.8]],  # first matched row has IoU 0.7
            11: [[0, 5.0, 15.0, 0.9]] * 5 + [[1, 5.0, 12.0, 0.1]],  # wrong video 5x; 6th row: 1st matched, IoU 0.7
            12: [[2, 0.0, 1.4, 0.9]],  # IoU 1.4/3 < 0.5
        }),
        "VR": task_entries({
            10: [[0, 0, 0, 0.9]],
            11: [[0, 0, 0, 0.9]] * 5 + [[1, 0, 0, 0.1]],
            12: [[3, 0, 0, 0.9]],
        }),
    }
    metrics = eval_retrieval(submission, GT)
    assert list(metrics) == ["VCMR", "SVMR", "VR", "VCMR_by_type", "SVMR_by_type", "VR_by_type"]
    assert metrics["VCMR"] == {"0.5-r1": 33.33, "0.5-r5": 66.67, "0.5-r10": 66.67, "0.5-r100": 66.67,
                               "0.7-r1": 0.0, "0.7-r5": 33.33, "0.7-r10": 33.33, "0.7-r100": 33.33}
    assert metrics["SVMR"] == {"0.5-r1": 66.67, "0.5-r5": 66.67, "0.5-r10": 66.67, "0.5-r100": 66.67,
                               "0.7-r1": 66.67, "0.7-r5": 66.67, "0.7-r10": 66.67, "0.7-r100": 66.67}
    assert metrics["VR"] == {"r1": 33.33, "r5": 33.33, "r10": 66.67, "r100": 66.67}
    by_type = metrics["VCMR_by_type"]
    assert list(by_type)[:3] == ["v-0.5-r1", "v-0.5-r5", "v-0.5-r10"]
    assert by_type["v-0.5-r1"] == 0.0 and by_type["v-0.5-r5"] == 100.0 and by_type["t-0.5-r1"] == 100.0
    assert by_type["vt-0.7-r100"] == 0.0 and by_type["t-0.7-r10"] == 0.0
    assert by_type["desc_type_ratio"] == "v 33.33 t 33.33 vt 33.33"
    assert metrics["VR_by_type"]["t-r10"] == 100.0 and metrics["VR_by_type"]["t-r5"] == 0.0
    assert list(metrics["VR_by_type"])[-1] == "desc_type_ratio"
    same_metrics(metrics, plain_metrics(submission, GT))


def test_only_first_100_rows_count():
    rows = [[1, 0.0, 1.0, 0.5]] * 100 + [[0, 0.0, 10.0, 0.1]]
    submission = {"video2idx": VIDEO2IDX, "VCMR": task_entries({10: rows}), "VR": task_entries({10: rows})}
    metrics = eval_retrieval(submission, GT[:1], use_desc_type=False)
    assert list(metrics) == ["VCMR", "VR"]
    assert metrics["VCMR"]["0.5-r100"] == 0.0 and metrics["VR"]["r100"] == 0.0


def test_didemo_needs_two_gt_moments():
    gt = [{"desc_id": 1, "vid_name": "a", "ts": [[0, 5], [0, 5], [10, 15], [20, 25]]},
          {"desc_id": 2, "vid_name": "a", "ts": [[0, 5], [10, 15], [20, 25], [30, 35]]}]
    submission = {"video2idx": VIDEO2IDX, "VCMR": task_entries({1: [[0, 0.0, 5.0, 1.0]], 2: [[0, 0.0, 5.0, 1.0]]})}
    metrics = eval_retrieval(submission, gt, use_desc_type=False)
    assert metrics["VCMR"]["0.5-r1"] == 50.0  # query 1 overlaps two GT moments, query 2 only one


def test_qvhighlights_windows_score_the_best_iou_window():
    gt = [{"desc_id": 1, "vid_name": "a", "ts": [[0, 10], [40, 44]], "ts_min_overlaps": 1},
          {"desc_id": 2, "vid_name": "a", "ts": [[0, 10], [20, 30], [40, 50], [60, 70]], "ts_min_overlaps": 1},
          {"desc_id": 3, "vid_name": "a", "ts": [[0, 10], [20, 30]], "ts_min_overlaps": 1}]
    submission = {"video2idx": VIDEO2IDX, "VCMR": task_entries({1: [[0, 40.0, 44.0, 1.0]], 2: [[0, 60.0, 70.0, 1.0]],
                                                                 3: [[0, 12.0, 28.0, 1.0]]})}
    metrics = eval_retrieval(submission, gt, use_desc_type=False)
    # 1: the second window exactly; 2: the fourth, where DiDeMo's rule would want two; 3: IoU 8/18 with [20, 30].
    assert metrics["VCMR"]["0.5-r1"] == metrics["VCMR"]["0.7-r1"] == 66.67


@pytest.mark.parametrize("seed", range(3))
def test_qvhighlights_recall_at_1_equals_the_official_best_window_rule(seed):
    """Moment-DETR's R1@θ: take the GT window of highest IoU with the top prediction, count a hit when that IoU
    reaches θ."""
    rng = np.random.default_rng(seed)
    gt, predictions = [], {}
    for desc_id in range(40):
        starts = np.sort(rng.choice(np.arange(0, 140, 2), size=rng.integers(1, 6), replace=False))
        windows = [[float(st), float(min(st + 2 * rng.integers(1, 6), 150))] for st in starts]
        gt.append({"desc_id": desc_id, "vid_name": "a", "ts": windows if len(windows) > 1 else windows[0]}
                  | ({"ts_min_overlaps": 1} if len(windows) > 1 else {}))
        st = float(rng.choice(starts) + rng.integers(-3, 4))
        predictions[desc_id] = [[0, st, st + float(rng.integers(1, 12)), 1.0]]
    metrics = eval_retrieval({"video2idx": VIDEO2IDX, "VCMR": task_entries(predictions)}, gt, use_desc_type=False)
    for thd in (0.5, 0.7):
        hits = []
        for row in gt:
            windows = row["ts"] if "ts_min_overlaps" in row else [row["ts"]]
            top = predictions[row["desc_id"]][0][1:3]
            hits.append(max(plain_iou(top, w) for w in windows) >= np.float32(thd))
        assert metrics["VCMR"][f"{thd}-r1"] == rounded_percentage(np.mean(hits))
    assert 0 < metrics["VCMR"]["0.5-r1"] < 100


def test_type_without_queries_gives_nan():
    submission = {"video2idx": VIDEO2IDX, "VR": task_entries({10: [[0, 0, 0, 1.0]]})}
    by_type = eval_retrieval(submission, GT[:1])["VR_by_type"]
    assert by_type["v-r1"] == 100.0 and math.isnan(by_type["t-r1"])
    assert by_type["desc_type_ratio"] == "v 100.0 t 0.0 vt 0.0"


def test_rounding_is_numpy_float64_round():
    assert rounded_percentage(1 / 3) == 33.33 and rounded_percentage(2 / 3) == 66.67
    # 0.52535 * 100 == 52.535: Python's correctly rounded round() gives 52.53, numpy's (the original's) 52.54.
    assert round(0.52535 * 100, 2) == 52.53
    assert rounded_percentage(0.52535) == 52.54


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_equals_per_query_loops_on_random_submissions(seed):
    rng = np.random.default_rng(seed)
    gt = []
    for i in range(40):
        st = float(rng.integers(0, 20)) * 1.5
        ts = ([[st, st + 3.0], [st, st + 4.5], [st + 3.0, st + 6.0], [st + 1.5, st + 9.0]] if i % 7 == 0
              else [st, st + float(rng.integers(1, 8)) * 1.5])
        gt.append({"desc_id": 100 + i, "vid_name": "abcd"[i % 4], "ts": ts, "type": ("v", "t", "vt")[i % 3]})
    submission = {"video2idx": VIDEO2IDX}
    for task in ("VCMR", "SVMR", "VR"):
        entries = {}
        for g in gt:
            n = int(rng.integers(0, 130))
            st = rng.integers(0, 25, size=n) * 1.5
            entries[g["desc_id"]] = [[int(v), float(s), float(s + 1.5 * rng.integers(0, 8)), float(rng.random())]
                                     for v, s in zip(rng.integers(0, 4, size=n), st)]
        submission[task] = task_entries(entries)
    same_metrics(eval_retrieval(submission, gt), plain_metrics(submission, gt))


def test_bulk_prediction_table_equals_per_query_matrices():
    """One np.array call over all queries (ragged, empty, int-only, longer than 100) = per-query conversion."""
    rng = np.random.default_rng(7)
    queries = [[[int(v), float(s), float(s) + 1.5, float(p)] for v, s, p in
                zip(rng.integers(0, 9, n), rng.integers(0, 50, n) * 1.5, rng.random(n))]
               for n in rng.integers(0, 140, size=30)]
    queries += [[], [[3, 0, 6, 1]] * 4]  # an empty list and int-only rows
    preds, is_row = prediction_table(queries, "VCMR", list(range(len(queries))))
    plain_preds, plain_is_row = prediction_table(queries, "VCMR", list(range(len(queries))), bulk=False)
    np.testing.assert_array_equal(preds, plain_preds)
    np.testing.assert_array_equal(is_row, plain_is_row)
    for q, rows in enumerate(queries):
        matrix = prediction_matrix(rows, "VCMR", q)
        assert is_row[q].sum() == len(matrix) == min(len(rows), 100)
        np.testing.assert_array_equal(preds[q, :len(matrix)], matrix)
        assert not preds[q, len(matrix):].any()
    bad = queries[:3] + [[[0, 0.0, 1.0, 0.5]] * 99 + [[0, "x", 1.0, 0.5]]]  # bad row within the first 100
    with pytest.raises(SubmissionError, match="desc_id 3: prediction row 99"):
        prediction_table(bad, "VCMR", list(range(4)))


def original_matrix(rows):
    """The original evaluator's conversion of one query's rows."""
    return np.array([e[:3] for e in rows][:100], dtype=np.float32).reshape(-1, 3)


def test_rows_the_original_reads_are_scored_like_it():
    """3-field rows, extra or non-numeric trailing fields and junk past row 100 are read as the original
    reads them (first three fields of the first 100 rows), in both conversions."""
    queries = [[[0, 0.0, 10.0]], [[1, 4.5, 15.0, 0.9, "extra"]], [[2, 0.0, 3.0, "score"]],
               [[3, 1.5, 3.0, 0.5]] * 100 + [[3, "x"], "junk"], [[1.5, 0.0, 1.0, 0.5], [True, 0, 1, 0]]]
    for bulk in (True, False):
        preds, is_row = prediction_table(queries, "VCMR", list(range(len(queries))), bulk=bulk)
        for q, rows in enumerate(queries):
            np.testing.assert_array_equal(preds[q][is_row[q]], original_matrix(rows))
    faithful = {10: [[0, 0.0, 10.0]], 11: [[1, 4.5, 15.0, 0.9, "extra"]], 12: [[2, 0.0, 3.0, "score"]]}
    clean = {d: [row[:3] + [1.0] for row in rows] for d, rows in faithful.items()}
    metrics = eval_retrieval(submission_with(task_entries(faithful)), GT)
    assert metrics == eval_retrieval(submission_with(task_entries(clean)), GT)
    assert metrics["VCMR"]["0.5-r1"] == 100.0


def test_duplicate_desc_id_keeps_the_last_entry_with_a_warning(caplog):
    entries = task_entries({10: [[3, 0.0, 10.0, 1.0]]}) + task_entries(GOOD)  # GOOD's 10 comes last
    with caplog.at_level("WARNING"):
        metrics = eval_retrieval(submission_with(entries), GT)
    assert metrics == eval_retrieval(submission_with(task_entries(GOOD)), GT)
    assert "VCMR: desc_id 10 appears more than once" in caplog.text


# ---------------------------------------------------------------------------------------------------
# Errors

def submission_with(vcmr):
    return {"video2idx": VIDEO2IDX, "VCMR": vcmr}


GOOD = {10: [[0, 0.0, 1.0, 0.5]], 11: [[1, 0.0, 1.0, 0.5]], 12: []}


@pytest.mark.parametrize("entries,message", [
    ({10: GOOD[10], 11: GOOD[11]}, "VCMR: no predictions for GT desc_id 12"),
    ({**GOOD, 99: []}, "VCMR: desc_id 99 is not in the GT"),
    ({**GOOD, 11: [[1, 0.0, 1.0, 0.5], [1, "0", 1.0, 0.5]]}, "VCMR: desc_id 11: prediction row 1"),
    ({**GOOD, 11: [[1, 0.0]]}, "desc_id 11: prediction row 0"),
    ({**GOOD, 11: [["1", 0.0, 1.0, 0.5]]}, "desc_id 11: prediction row 0"),
    ({**GOOD, 11: [[0, 0.0, 1.0, 0.5], [[1], 0.0, 1.0, 0.5]]}, "desc_id 11: prediction row 1"),
    ({**GOOD, 11: [[0, 0.0, 1.0, 0.5], None]}, "desc_id 11: prediction row 1"),
    ({**GOOD, 11: "nope"}, "desc_id 11: 'predictions' must be"),
])
def test_submission_errors_name_task_and_desc_id(entries, message):
    with pytest.raises(SubmissionError, match=message):
        eval_retrieval(submission_with(task_entries(entries)), GT)


def test_missing_video2idx_is_an_error():
    with pytest.raises(SubmissionError, match="video2idx"):
        eval_retrieval({"VCMR": task_entries(GOOD)}, GT)
    with pytest.raises(SubmissionError, match="GT video 'c'"):
        eval_retrieval({"video2idx": {"a": 0, "b": 1}, "VCMR": task_entries(GOOD)}, GT)


def test_unmatched_ids_allowed_without_match_number():
    metrics = eval_retrieval(submission_with(task_entries({10: [[0, 0.0, 10.0, 1.0]], 99: []})), GT,
                             match_number=False, use_desc_type=False)
    assert metrics["VCMR"]["0.5-r1"] == 100.0  # only desc_id 10 is evaluated


def test_gt_errors():
    with pytest.raises(GroundTruthError, match="desc_id 10: no 'ts'"):
        eval_retrieval(submission_with(task_entries({10: []})), [{"desc_id": 10, "vid_name": "a", "type": "v"}])
    with pytest.raises(GroundTruthError, match="missing key 'type'"):
        eval_retrieval(submission_with(task_entries({10: []})), [{"desc_id": 10, "vid_name": "a", "ts": [0, 1]}])
    for ts, min_overlaps, message in [([[0, 1], [2, 3]], None, "'ts' must be"), ([0, 1], 1, "'ts' must be"),
                                      ([[0, 1], [2, 3]], 3, "'ts_min_overlaps' must be an integer from 1 to the 2"),
                                      ([[0, 1], [2, 3]], True, "'ts_min_overlaps' must be")]:
        row = {"desc_id": 10, "vid_name": "a", "type": "v", "ts": ts}
        row.update({} if min_overlaps is None else {"ts_min_overlaps": min_overlaps})
        with pytest.raises(GroundTruthError, match=f"desc_id 10: {message}"):
            eval_retrieval(submission_with(task_entries({10: [[0, 0, 1, 1.0]]})), [row])


def test_cli_writes_pretty_metrics_and_reports_errors(tmp_path, capsys):
    submission = {"video2idx": VIDEO2IDX, "VR": task_entries({10: [[0, 0, 0, 1.0]], 11: [], 12: []})}
    save_json(submission, tmp_path / "sub.json")
    save_jsonl(GT, tmp_path / "gt.jsonl")
    argv = ["--submission_path", str(tmp_path / "sub.json"), "--gt_path", str(tmp_path / "gt.jsonl"),
            "--save_path", str(tmp_path / "out.json"), "--not_verbose"]
    metrics = main(argv)
    text = (tmp_path / "out.json").read_text()
    assert json.loads(text) == metrics and text == json.dumps(metrics, indent=4)
    assert metrics["VR"]["r1"] == 33.33 and "VR_by_type" in metrics
    save_json({"video2idx": VIDEO2IDX, "VR": task_entries({10: []})}, tmp_path / "bad.json")
    with pytest.raises(SystemExit) as exit_info:
        main(["--submission_path", str(tmp_path / "bad.json")] + argv[2:])
    assert exit_info.value.code == 2
    assert "no predictions for GT desc_id 11" in capsys.readouterr().err
