"""summary.py (jsonl -> csv/summary.json) and plots.py (PNGs) on a synthetic preempted run."""
import csv
import json
import os

import numpy as np
import pytest

from kellen.train.plots import write_plots
from kellen.train.summary import (dedupe, read_rows, row_kind, summarize, write_csv,
                                  write_summary)

# Segment 1 logs steps 10..50, is preempted, resumes from the step-20 checkpoint and re-logs
# 30..50 (with different values) and goes on to 80. elapsed is cumulative: segment 2 adds 100 s.
SEG1_EXACT = {20: 0.40, 40: 0.99}  # the 0.99 at step 40 is superseded and must not count
SEG2_EXACT = {40: 0.82, 60: 0.90, 80: 0.70}


def _train(step, offset, bad=False, **drop):
    row = {"step": step, "epoch": step / 10,
           "train/lm_loss": 2.0 - step / 100 + (5.0 if bad else 0.0),
           "train/accuracy": step / 100, "train/lr": 1e-4 * min(1.0, step / 40),
           "perf/examples_per_sec": 100.0 + step, "perf/tokens_per_sec": 1000.0 + step,
           "time": 1.7e9 + step, "elapsed": step * 6.0 + offset}
    for k in drop:
        row.pop(k.replace("__", "/"))
    return row


def _eval(step, offset, exact):
    return {"step": step, "eval/all/lm_loss": 1.5 - step / 200, "eval/all/accuracy": exact + 0.05,
            "eval/all/exact_accuracy": exact, "eval/all/count": 100,
            "eval/hard/lm_loss": 1.8 - step / 200, "eval/hard/accuracy": exact / 2,
            "eval/hard/exact_accuracy": exact / 4, "eval/seconds": 3.0,
            "time": 1.7e9 + step, "elapsed": step * 6.0 + offset + 1}


def _rows():
    rows = [{"start": {"config": "x"}, "num_params": 7_000_000}]
    for step in (10, 20, 30, 40, 50):
        rows.append(_train(step, 0, bad=step > 20))
        if step in SEG1_EXACT:
            rows.append(_eval(step, 0, SEG1_EXACT[step]))
    rows.append({"resume": {"step": 20, "changed": {}}})
    for step in (30, 40, 50, 60, 70, 80):
        # step 70 lacks lr and perf keys: tolerated, not counted in the throughput mean
        drop = ({"train__lr": 1, "perf__examples_per_sec": 1, "perf__tokens_per_sec": 1}
                if step == 70 else {})
        rows.append(_train(step, 100, **drop))
        if step in SEG2_EXACT:
            rows.append(_eval(step, 100, SEG2_EXACT[step]))
    return rows


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in _rows())
    path.write_text(text + '{"step": 90, "train/lm_loss": 0.')  # killed mid-write
    return str(path)


def test_read_rows_skips_truncated_line(jsonl):
    rows = read_rows(jsonl)
    assert rows == _rows()
    assert all(r.get("step") != 90 for r in rows)


def test_row_kind():
    assert row_kind(_train(10, 0)) == "train"
    assert row_kind(_eval(20, 0, 0.5)) == "eval"
    assert row_kind({"resume": {"step": 3}}) == "other:resume"
    assert row_kind({"start": {}, "num_params": 3}) == "other:num_params,start"


def test_dedupe_later_rows_win_and_order_by_step(jsonl):
    rows = dedupe(read_rows(jsonl))
    train = [r for r in rows if row_kind(r) == "train"]
    evals = [r for r in rows if row_kind(r) == "eval"]
    assert [r["step"] for r in train] == [10, 20, 30, 40, 50, 60, 70, 80]
    assert [r["step"] for r in evals] == [20, 40, 60, 80]
    # resumed values replace the segment-1 ones for steps 30..50; 10 and 20 keep segment 1
    assert train[2]["train/lm_loss"] == pytest.approx(2.0 - 0.30)
    assert train[2]["elapsed"] == 30 * 6.0 + 100
    assert train[1]["elapsed"] == 20 * 6.0
    assert evals[1]["eval/all/exact_accuracy"] == 0.82
    steps = [r["step"] for r in rows if "step" in r]
    assert steps == sorted(steps)
    # bookkeeping rows survive, and do not supersede one another
    assert sum("start" in r for r in rows) == 1 and sum("resume" in r for r in rows) == 1


def test_summary_values(jsonl):
    s = summarize(read_rows(jsonl))
    assert s["primary_set"] == "all"
    assert s["eval_sets"] == ["all", "hard"]
    assert s["num_params"] == 7_000_000
    assert s["steps"] == 80
    assert s["wall_clock_seconds"] == 80 * 6.0 + 101
    # first reach uses the resumed 0.82 at step 40, not the superseded 0.99
    assert s["reach"] == {"0.80": {"step": 40, "elapsed": 40 * 6.0 + 101},
                          "0.85": {"step": 60, "elapsed": 60 * 6.0 + 101}}
    assert s["best_eval"]["step"] == 60 and s["best_eval"]["eval/all/exact_accuracy"] == 0.90
    assert s["best_eval"]["eval/hard/exact_accuracy"] == pytest.approx(0.225)
    assert s["final_eval"]["step"] == 80 and s["final_eval"]["eval/all/exact_accuracy"] == 0.70
    assert s["final_eval"]["eval/seconds"] == 3.0
    # deduped train rows that have perf keys: steps 10..60 and 80 (70 lacks them)
    have = [10, 20, 30, 40, 50, 60, 80]
    assert s["mean_examples_per_sec"] == pytest.approx(np.mean([100.0 + x for x in have]))
    assert s["mean_tokens_per_sec"] == pytest.approx(np.mean([1000.0 + x for x in have]))
    json.dumps(s, allow_nan=False)


def test_summary_args_and_primary_set():
    rows = _rows()
    s = summarize(rows, num_params=5, thresholds=(0.2, 0.5), primary_set="hard")
    assert s["num_params"] == 5 and s["primary_set"] == "hard"
    # hard exact = exact / 4: 0.1 @20, 0.205 @40, 0.225 @60, 0.175 @80
    assert s["reach"] == {"0.20": {"step": 40, "elapsed": 341.0}, "0.50": None}
    assert s["best_eval"]["step"] == 60
    # without an "all" set the first set seen is primary
    only = [{"step": 1, "eval/test/exact_accuracy": 0.9, "eval/extra/exact_accuracy": 0.1}]
    s = summarize(only)
    assert s["primary_set"] == "test" and s["reach"]["0.85"] == {"step": 1, "elapsed": None}


def test_summary_no_eval_rows_is_null(tmp_path):
    rows = [_train(10, 0, perf__examples_per_sec=1, perf__tokens_per_sec=1, elapsed=1),
            {"resume": {}}]
    path = tmp_path / "summary.json"
    write_summary(rows, str(path))
    s = json.loads(path.read_text())
    assert s["steps"] == 10
    for key in ("final_eval", "best_eval", "primary_set", "num_params", "mean_examples_per_sec",
                "mean_tokens_per_sec", "wall_clock_seconds"):
        assert s[key] is None, key
    assert s["reach"] == {"0.80": None, "0.85": None}
    assert summarize([])["steps"] is None


def test_write_summary_is_strict_json(tmp_path):
    rows = [{"step": 5, "eval/all/exact_accuracy": 0.5, "eval/all/lm_loss": float("nan"),
             "elapsed": 9.0}]
    path = tmp_path / "summary.json"
    returned = write_summary(rows, str(path), num_params=11)
    text = path.read_text()
    assert "NaN" not in text and text.startswith("{\n ")
    s = json.loads(text)
    assert s == returned
    assert s["final_eval"] == {"step": 5, "elapsed": 9.0, "eval/all/exact_accuracy": 0.5,
                               "eval/all/lm_loss": None}
    assert s["num_params"] == 11 and s["wall_clock_seconds"] == 9.0
    assert os.listdir(tmp_path) == ["summary.json"]  # no tmp file left behind


def test_csv_round_trip(jsonl, tmp_path):
    path = tmp_path / "metrics.csv"
    write_csv(read_rows(jsonl), str(path))
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames
        lines = list(reader)
    assert cols[0] == "step" and cols[1:] == sorted(cols[1:])
    assert "start" not in cols and "resume" not in cols  # nested values are skipped
    assert "num_params" in cols and "eval/hard/exact_accuracy" in cols
    # start row (num_params), 8 train rows, 4 eval rows; the all-nested resume row has no line
    assert len(lines) == 13
    assert lines[0]["num_params"] == "7000000" and lines[0]["step"] == ""
    by = {(r["step"], "train" if r["train/lm_loss"] else "eval"): r for r in lines[1:]}
    assert float(by[("30", "train")]["train/lm_loss"]) == 2.0 - 0.30  # exact repr round trip
    assert float(by[("40", "eval")]["eval/all/exact_accuracy"]) == 0.82
    assert by[("40", "eval")]["train/lm_loss"] == ""
    assert by[("70", "train")]["train/lr"] == ""
    assert by[("70", "train")]["perf/examples_per_sec"] == ""
    assert by[("80", "train")]["train/lr"] == repr(1e-4)
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv", "metrics.jsonl"]


def _check_png(path):
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 0 and img.shape[1] > 0
    assert float(np.std(img[..., :3])) > 0  # something was drawn


def test_write_plots(jsonl, tmp_path):
    out = tmp_path / "plots"
    paths = write_plots(read_rows(jsonl), str(out))
    names = ["loss_vs_step.png", "loss_vs_time.png", "eval_accuracy.png", "lr.png"]
    assert paths == [str(out / n) for n in names]
    assert sorted(os.listdir(out)) == sorted(names)  # no tmp files left
    for p in paths:
        _check_png(p)
    # called again (every eval): overwrites in place
    assert write_plots(read_rows(jsonl), str(out)) == paths


def test_write_plots_skips_absent_data(tmp_path):
    rows = [_train(s, 0, train__lr=1) for s in (10, 20)]
    paths = write_plots(rows, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["loss_vs_step.png", "loss_vs_time.png"]
    assert not (tmp_path / "lr.png").exists() and not (tmp_path / "eval_accuracy.png").exists()
    for p in paths:
        _check_png(p)
    assert write_plots([{"resume": {}}], str(tmp_path / "none")) == []
    # a single eval point still draws (marker)
    one = write_plots([_eval(5, 0, 0.5)], str(tmp_path / "one"))
    assert [os.path.basename(p) for p in one] == ["loss_vs_step.png", "loss_vs_time.png",
                                                  "eval_accuracy.png"]
    for p in one:
        _check_png(p)


def test_write_plots_concurrent_threads(tmp_path):
    # e.g. a background plotting thread overlapping the next eval's call: unique tmp names
    import threading

    rows = [_train(s, 0) for s in (10, 20, 30)] + [_eval(20, 0, 0.5)]
    results, errors = [], []

    def run():
        try:
            results.append(write_plots(rows, str(tmp_path)))
        except Exception as e:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3 and all(len(r) == 4 for r in results)
    assert len(os.listdir(tmp_path)) == 4
    for p in results[0]:
        _check_png(p)
