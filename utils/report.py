"""Readable tables of evaluation metrics for the terminal."""
from utils.tvr_format import IOU_THRESHOLDS, RECALL_TOPK, TASKS


def format_metrics_table(metrics, columns=None):
    """Render `{task: {metric: value}}` (the evaluator's output) as a text table.

    `columns` optionally maps column titles to several such dicts, to put runs side by side
    (e.g. {"untrained": m0, "trained": m1}); otherwise `metrics` alone is shown.
    """
    columns = columns or {"value": metrics}
    rows = []
    recalls = [f"r{k}" for k in RECALL_TOPK]
    for task in TASKS:
        if not any(task in m for m in columns.values()):
            continue
        keys = recalls if task == "VR" else [f"{iou}-{r}" for iou in IOU_THRESHOLDS for r in recalls]
        for key in keys:
            values = [m.get(task, {}).get(key) for m in columns.values()]
            rows.append([f"{task} {key}"] + ["-" if v is None else f"{v:.2f}" for v in values])
    header = ["metric"] + list(columns)
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(cell).rjust(w) if i else str(cell).ljust(w) for i, (cell, w) in
                       enumerate(zip(row, widths))) for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
