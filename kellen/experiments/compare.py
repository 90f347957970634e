"""`kellen compare <group>`: one row per run of an experiment group, as a terminal table, CSV and
markdown, plus plots (kellen/experiments/compare_plots.py).

Columns (eval numbers are the spec's primary eval set, `all` when present):
  variables, params, state; final and best eval exact_accuracy and accuracy (best with its step);
  gap = train exact_accuracy (mean over the last eval interval) - final eval exact_accuracy, the
  overfitting signal; steps and wall-clock to 80% / 85% eval exact accuracy; mean examples/s and
  MFU over training; wall-clock; pareto = on the accuracy-vs-throughput frontier; note = what is
  missing from the record. Unfinished runs show their latest numbers and say so in the note.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from kellen.experiments.records import RunResult, load_group_results

DEFAULT_OUT = "reports"
THRESHOLDS = ("0.80", "0.85")


def _num(v: Any) -> Optional[float]:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _mean(values: Sequence[Any]) -> Optional[float]:
    vals = [x for x in (_num(v) for v in values) if x is not None]
    return sum(vals) / len(vals) if vals else None


def train_gap(run: RunResult, primary: str) -> Optional[float]:
    """Train exact accuracy, averaged over the train rows since the eval before the final one
    (single batches are noisy), minus the final eval exact accuracy."""
    final = run.summary.get("final_eval") or {}
    eval_acc, final_step = _num(final.get(f"eval/{primary}/exact_accuracy")), _num(final.get("step"))
    if eval_acc is None or final_step is None:
        return None
    eval_steps = sorted({r["step"] for r in run.rows if any(k.startswith("eval/") for k in r)
                         and _num(r.get("step")) is not None and r["step"] < final_step})
    since = eval_steps[-1] if eval_steps else -1
    train = [r.get("train/exact_accuracy") for r in run.rows if "train/exact_accuracy" in r
             and _num(r.get("step")) is not None and since < r["step"] <= final_step]
    mean = _mean(train)
    return None if mean is None else mean - eval_acc


def row_of(run: RunResult, variables: Sequence[str]) -> Dict[str, Any]:
    s = run.summary
    primary = s.get("primary_set") or "all"
    final, best = s.get("final_eval") or {}, s.get("best_eval") or {}
    reach = s.get("reach") or {}
    train = [r for r in run.rows if any(k.startswith("train/") for k in r)]
    row: Dict[str, Any] = {"run": run.name}
    row.update({v: run.values.get(v) for v in variables})
    row.update({
        "params": s.get("num_params"),
        "state": run.state,
        "final_exact_accuracy": _num(final.get(f"eval/{primary}/exact_accuracy")),
        "final_accuracy": _num(final.get(f"eval/{primary}/accuracy")),
        "best_exact_accuracy": _num(best.get(f"eval/{primary}/exact_accuracy")),
        "best_step": best.get("step"),
        "best_accuracy": _num(best.get(f"eval/{primary}/accuracy")),
        "train_eval_gap": train_gap(run, primary),
    })
    for t in THRESHOLDS:
        hit = reach.get(t) if isinstance(reach.get(t), dict) else {}
        row[f"steps_to_{t}"] = hit.get("step")
        row[f"seconds_to_{t}"] = _num(hit.get("elapsed"))
    row.update({
        "examples_per_sec": _num(s.get("mean_examples_per_sec")) or _mean([r.get("perf/examples_per_sec") for r in train]),
        "mfu": _mean([r.get("perf/mfu") for r in train]),
        "wall_clock_seconds": _num(s.get("wall_clock_seconds")),
        "steps": s.get("steps") if s.get("steps") is not None else run.status.get("step"),
    })
    notes = list(run.notes)
    if run.state not in ("completed", "not_started") and row["final_exact_accuracy"] is not None:
        notes.append(f"{run.state}: latest eval, not final")
    if not run.in_spec:
        notes.append("not in the spec (override variant)")
    row["note"] = "; ".join(notes)
    return row


def pareto_front(rows: List[Dict[str, Any]], x: str = "examples_per_sec", y: str = "final_exact_accuracy") -> List[str]:
    """Runs no other run beats on both speed and accuracy (higher is better for both)."""
    pts = [(r[x], r[y], r["run"]) for r in rows if _num(r.get(x)) is not None and _num(r.get(y)) is not None]
    return [n for xa, ya, n in pts
            if not any(xb >= xa and yb >= ya and (xb > xa or yb > ya) for xb, yb, _ in pts)]


def compare_rows(group, runs: List[RunResult]) -> List[Dict[str, Any]]:
    rows = [row_of(r, group.variables) for r in runs]
    front = set(pareto_front(rows))
    for r in rows:
        r["pareto"] = r["run"] in front if _num(r.get("examples_per_sec")) is not None else None
    return rows


# ----------------------------------------------------------------------------- formatting
def fmt_cell(key: str, v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "✓" if v else ""
    if key.startswith("seconds_to_") or key == "wall_clock_seconds":
        return f"{v / 3600:.2f} h" if v >= 3600 else f"{v:.0f} s"
    if key == "params":
        return f"{v / 1e6:.2f}M" if v >= 1e5 else f"{int(v):,}"
    if key == "mfu":
        return f"{100 * v:.1f}%"
    if key == "examples_per_sec":
        return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"
    if isinstance(v, float):
        return f"{v:+.4f}" if key == "train_eval_gap" else f"{v:.4f}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


HEADERS = {"final_exact_accuracy": "final exact", "final_accuracy": "final acc", "best_exact_accuracy": "best exact",
           "best_step": "best step", "best_accuracy": "best acc", "train_eval_gap": "train−eval gap",
           "steps_to_0.80": "steps→80%", "seconds_to_0.80": "time→80%", "steps_to_0.85": "steps→85%",
           "seconds_to_0.85": "time→85%", "examples_per_sec": "ex/s", "mfu": "MFU",
           "wall_clock_seconds": "wall-clock"}


def columns(rows: List[Dict[str, Any]]) -> List[str]:
    return list(rows[0]) if rows else []


def to_csv(rows: List[Dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns(rows), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
    return buf.getvalue()


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: List[Dict[str, Any]]) -> str:
    cols = columns(rows)
    if not cols:
        return "_no runs_\n"
    head = "| " + " | ".join(_md_escape(HEADERS.get(c, f"`{c}`" if "." in c else c)) for c in cols) + " |"
    lines = [head, "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"`{r['run']}`" if c == "run" else _md_escape(fmt_cell(c, r[c])) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_table(rows: List[Dict[str, Any]], title: str, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = columns(rows)
    table = Table(title=title, show_lines=False)
    for c in cols:
        table.add_column(HEADERS.get(c, c), no_wrap=c != "note", overflow="fold")
    for r in rows:
        table.add_row(*[fmt_cell(c, r[c]) for c in cols])
    Console(file=file or sys.stdout, width=max(120, 14 * len(cols))).print(table)


# ----------------------------------------------------------------------------- the report
def write_report(group, source: Optional[str] = None, out_dir: Optional[str] = None,
                 plots: bool = True) -> Dict[str, Any]:
    """Read the group's records, write compare.csv / compare.md / compare.json and plots/ into
    `out_dir` (default reports/<group>); returns {"rows", "fit", "plots", "out_dir", "runs"}."""
    from kellen.experiments.generate import write_atomic

    runs = load_group_results(group, source)
    rows = compare_rows(group, runs)
    out_dir = os.path.abspath(out_dir or os.path.join(DEFAULT_OUT, group.id))
    os.makedirs(out_dir, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"output dir {out_dir} is not writable")
    result: Dict[str, Any] = {"rows": rows, "fit": None, "plots": [], "out_dir": out_dir, "runs": runs}
    if plots:
        from kellen.experiments import compare_plots

        result["plots"], result["fit"] = compare_plots.write_plots(group, runs, rows, os.path.join(out_dir, "plots"))
    write_atomic(os.path.join(out_dir, "compare.csv"), to_csv(rows))
    write_atomic(os.path.join(out_dir, "compare.md"), to_markdown(rows))
    write_atomic(os.path.join(out_dir, "compare.json"),
                 json.dumps({"group": group.id, "rows": rows, "fit": result["fit"],
                             "plots": [os.path.relpath(p, out_dir) for p in result["plots"]]}, indent=1) + "\n")
    return result


def fit_line(fit: Optional[Dict[str, Any]]) -> Optional[str]:
    if not fit:
        return None
    if fit.get("error"):
        return f"scaling fit: {fit['error']}"
    return (f"scaling fit: {fit['metric']} = {fit['a']:.4f} - {fit['b']:.4g}·params^-{fit['c']:.4f} "
            f"({fit['points']} runs, rmse {fit['rmse']:.4f})")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compare", help="compare the runs of an experiment group: table, CSV, markdown, plots")
    p.add_argument("group", metavar="GROUP", help="group id (configs/experiments/<id>.yaml)")
    p.add_argument("--from", dest="source", default=None, metavar="DIR|gs://…",
                   help="where <group>/<run>/ records are (default: results/ if downloaded, else the spec's output_root)")
    p.add_argument("--out", default=None, metavar="DIR", help=f"report dir (default {DEFAULT_OUT}/<group>)")
    p.add_argument("--spec-dir", default=None, metavar="DIR", help="group specs (default configs/experiments)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.set_defaults(fn=cmd_compare)
    return p


def cmd_compare(args) -> int:
    from kellen.experiments import spec

    try:
        group = spec.load_group(args.group, args.spec_dir)
        report = write_report(group, args.source, args.out, plots=not args.no_plots)
    except (ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"kellen compare: error: {msg}", file=sys.stderr)
        return 2
    print_table(report["rows"], f"{group.id}: {group.name}" if group.name else group.id)
    line = fit_line(report["fit"])
    if line:
        print(line)
    rel = os.path.relpath(report["out_dir"]) if report["out_dir"].startswith(os.getcwd()) else report["out_dir"]
    print(f"wrote {rel}/compare.csv, compare.md, compare.json and {len(report['plots'])} plots in {rel}/plots/")
    return 0
