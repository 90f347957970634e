"""Post-process a run's logs/metrics.jsonl into metrics.csv and summary.json.

Row kinds: "train" if any key starts with "train/", else "eval" if any key starts with
"eval/", else "other:<sorted top-level keys>" (e.g. "other:resume", "other:num_params,start"),
so unrelated bookkeeping rows never supersede one another. After a preemption the run restarts
from its last checkpoint and re-logs the steps after it, so for each (kind, step) only the last
row written is the truth.
"""
from __future__ import annotations

import json
import math
import os
import threading
from typing import Any, Dict, Iterable, List, Optional, Sequence

_BOOKKEEPING = ("step", "time", "elapsed")


def read_rows(path: str) -> List[Dict[str, Any]]:
    """All JSON-object lines of a metrics.jsonl; unparsable lines (a killed writer's torn last
    line) are skipped rather than failing the whole report."""
    with open(path, "r", errors="replace") as f:
        return parse_rows(f)


def parse_rows(lines: Iterable[str]) -> List[Dict[str, Any]]:
    """The JSON-object lines among `lines` (see read_rows); also for text fetched from gs://."""
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def row_kind(row: Dict[str, Any]) -> str:
    if any(k.startswith("train/") for k in row):
        return "train"
    if any(k.startswith("eval/") for k in row):
        return "eval"
    return "other:" + ",".join(sorted(k for k in row if k not in _BOOKKEEPING))


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def dedupe(rows: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Last row per (kind, step), ordered by step (stable: ties keep file order of the kept rows).
    A row without a numeric "step" sorts at the step of the row logged before it (-1 at the
    start), so e.g. a {"resume": ...} row stays near where it was written."""
    kept: Dict[Any, tuple] = {}
    sort_step = -1
    for i, row in enumerate(rows):
        step = row.get("step")
        has_step = _is_num(step)
        if has_step:
            sort_step = step
        kept[(row_kind(row), step if has_step else None)] = (sort_step, i, row)
    return [row for _, _, row in sorted(kept.values(), key=lambda t: (t[0], t[1]))]


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (int, float, str, bool))


def _atomic_write(path: str, text: str) -> None:
    # Unique tmp per process/thread so concurrent writers never interleave into one tmp file.
    tmp = f"{path}.tmp{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def write_csv(rows: Iterable[Dict[str, Any]], path: str) -> None:
    """metrics.csv: one line per deduped row that has any scalar value; columns "step" then the
    sorted union of scalar keys; nested dicts/lists are skipped, missing values are empty."""
    import csv
    import io

    rows = [{k: v for k, v in r.items() if _scalar(v)} for r in dedupe(rows)]
    rows = [r for r in rows if r]
    cols = ["step"] + sorted({k for r in rows for k in r} - {"step"})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, restval="", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    _atomic_write(path, buf.getvalue())


def eval_sets(rows: Iterable[Dict[str, Any]]) -> List[str]:
    """Eval set names in first-seen order, from keys "eval/<set>/<metric>" ("eval/seconds" is not
    a set)."""
    names: List[str] = []
    for r in rows:
        for k in r:
            if k.startswith("eval/"):
                name, _, metric = k[len("eval/"):].rpartition("/")
                if name and metric and name not in names:
                    names.append(name)
    return names


def _clean(v: Any) -> Any:
    # NaN/inf are not valid JSON; report them as unknown.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _eval_view(row: Dict[str, Any]) -> Dict[str, Any]:
    out = {"step": row.get("step"), "elapsed": row.get("elapsed")}
    out.update({k: v for k, v in row.items() if k.startswith("eval/")})
    return out


def _mean(values: List[float]) -> Optional[float]:
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else None


def summarize(rows: Sequence[Dict[str, Any]], num_params: Optional[int] = None,
              thresholds: Sequence[float] = (0.80, 0.85),
              primary_set: Optional[str] = None) -> Dict[str, Any]:
    """Headline numbers of a run (see module doc for row kinds). Unknown fields are None."""
    rows = list(rows)
    if num_params is None:  # from the raw rows: dedupe may have dropped an older start row
        for r in rows:
            if _is_num(r.get("num_params")):
                num_params = r["num_params"]
    rows = dedupe(rows)
    train = [r for r in rows if row_kind(r) == "train"]
    evals = [r for r in rows if row_kind(r) == "eval"]
    sets = eval_sets(evals)
    if primary_set is None and sets:
        primary_set = "all" if "all" in sets else sets[0]
    key = f"eval/{primary_set}/exact_accuracy"
    scored = [r for r in evals if _is_num(r.get(key)) and math.isfinite(r[key])]

    best = None
    for r in scored:  # strict > keeps the earliest of equal bests
        if best is None or r[key] > best[key]:
            best = r
    reach: Dict[str, Any] = {}
    for t in thresholds:
        hit = next((r for r in scored if r[key] >= t), None)
        reach[f"{t:.2f}"] = None if hit is None else {"step": hit.get("step"),
                                                       "elapsed": hit.get("elapsed")}
    steps = [r["step"] for r in rows if _is_num(r.get("step"))]
    elapsed = [r["elapsed"] for r in rows if _is_num(r.get("elapsed"))]
    return _clean({
        "primary_set": primary_set,
        "eval_sets": sets,
        "final_eval": _eval_view(evals[-1]) if evals else None,
        "best_eval": _eval_view(best) if best is not None else None,
        "reach": reach,
        "num_params": num_params,
        "mean_examples_per_sec": _mean([r["perf/examples_per_sec"] for r in train
                                        if _is_num(r.get("perf/examples_per_sec"))]),
        "mean_tokens_per_sec": _mean([r["perf/tokens_per_sec"] for r in train
                                      if _is_num(r.get("perf/tokens_per_sec"))]),
        "wall_clock_seconds": max(elapsed) if elapsed else None,
        "steps": max(steps) if steps else None,
    })


def write_summary(rows: Sequence[Dict[str, Any]], path: str, **kw: Any) -> Dict[str, Any]:
    """summarize(rows, **kw) written atomically as JSON; returns the summary."""
    summary = summarize(rows, **kw)
    _atomic_write(path, json.dumps(summary, indent=1, allow_nan=False) + "\n")
    return summary
