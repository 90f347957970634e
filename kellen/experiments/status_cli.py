"""`kellen status [PATTERN]`: where the selected runs stand, from their run records (local or gs://).

    kellen status exp03                 # exp03 and exp03_* (and their variants, e.g. exp03_a--epochs=10000)
    kellen status 'exp0[1-3]*' --watch  # refresh every 30 s until Ctrl-C
    kellen status --json                # every run, machine-readable (a list of dicts)

Runs are the configs the pattern selects (as `batch --pattern`), their variants found beside
them (`<run>--...`), and run dirs under the output root whose name matches. A `running` run
whose heartbeat is older than --stale-after seconds shows as `stale` (its process likely died).
ETA = (total - step) x the last perf/step_time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):  # run as a script: make `kellen` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kellen.experiments import runs  # noqa: E402
from kellen.experiments.runs import RunError  # noqa: E402
from kellen.cli import ArgumentParser  # noqa: E402

STALE_AFTER_S = 15 * 60.0
SKIP_DIRS = ("_batches",)  # under the output root but not groups


def run_dirs(pattern: Optional[str], *, config_dir: Optional[str] = None,
             output_root: Optional[str] = None) -> Dict[str, str]:
    """{run name: run dir} for the selection, in a stable order (configs first, then found dirs)."""
    selection = runs.Selection(patterns=[pattern] if pattern else [])
    out: Dict[str, str] = {}
    groups: Dict[str, List[str]] = {}  # group dir -> names of selected configs in it
    for name in runs.select(selection, config_dir):
        try:
            target = runs.resolve(name, [], config_dir=config_dir, output_root=output_root)
        except RunError:
            continue
        out.setdefault(target.name, target.run_dir)
        groups.setdefault(target.run_dir.rsplit("/", 1)[0] if target.run_dir.startswith("gs://")
                          else os.path.dirname(target.run_dir), []).append(target.name)
    for group_dir, names in groups.items():  # variants: exp03_a--epochs=10000, exp03_a--rerun1
        for child in runs.list_dir(group_dir):
            if any(child.startswith(n + "--") for n in names):
                out.setdefault(child, runs.join_path(group_dir, child))
    root = runs.join_path(output_root or "runs")
    for group in runs.list_dir(root):
        if group in SKIP_DIRS or group.startswith("."):
            continue
        for child in runs.list_dir(runs.join_path(root, group)):
            base = child.split("--", 1)[0]
            if not pattern or runs.matches_pattern(child, pattern) or runs.matches_pattern(base, pattern):
                path = runs.join_path(root, group, child)
                if child not in out and runs.exists(f"{path.rstrip('/')}/status.json"):
                    out[child] = path
    return out


def _num(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def eval_exact(metrics: Dict[str, Any], summary: Optional[Dict[str, Any]]) -> Optional[float]:
    """The last eval exact accuracy: status.json's metrics (primary set `all` first), else summary.json."""
    keys = sorted((k for k in metrics if k.startswith("eval/") and k.endswith("/exact_accuracy")),
                  key=lambda k: k != "eval/all/exact_accuracy")
    if keys:
        return _num(metrics[keys[0]])
    from kellen.experiments.batch import final_exact_accuracy

    return final_exact_accuracy(summary)


def row(name: str, run_dir: str, stale_after_s: float, now: Optional[float] = None) -> Dict[str, Any]:
    from kellen.experiments.status import run_status

    now = time.time() if now is None else now
    s = run_status(run_dir, stale_after=stale_after_s, now=now)
    m = s.get("metrics") or {}
    step, total, step_time = _num(s.get("step")), _num(s.get("total")), _num(m.get("perf/step_time"))
    eta = (total - step) * step_time if s["state"] == "running" and None not in (step, total, step_time) else None
    hb = _num(s.get("heartbeat_unix"))
    return {"run": name, "run_dir": run_dir, "state": s["state"], "step": s.get("step"), "total": s.get("total"),
            "lm_loss": _num(m.get("train/lm_loss")), "eval_exact_accuracy": eval_exact(m, s.get("summary")),
            "examples_per_sec": _num(m.get("perf/examples_per_sec")), "eta_s": eta, "host": s.get("host"),
            "heartbeat_age_s": None if hb is None else round(now - hb, 1), "error": s.get("error")}


def duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    seconds = int(max(seconds, 0))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def render(rows: List[Dict[str, Any]]) -> str:
    from kellen.experiments.batch import table

    def f(v, spec):
        return "" if v is None else format(v, spec)

    lines = [[r["run"], r["state"], "" if r["step"] is None else f"{r['step']}/{r['total'] or '?'}",
              f(r["lm_loss"], ".4f"), f(r["eval_exact_accuracy"], ".4f"), f(r["examples_per_sec"], ".1f"),
              duration(r["eta_s"]), r["host"] or "", duration(r["heartbeat_age_s"])] for r in rows]
    return table(["RUN", "STATE", "STEP", "LM_LOSS", "EVAL_EXACT", "EX/S", "ETA", "HOST", "HEARTBEAT"], lines)


def collect(args) -> List[Dict[str, Any]]:
    dirs = run_dirs(args.pattern, config_dir=args.config_dir, output_root=args.output_root)
    now = time.time()
    return [row(name, path, args.stale_after, now) for name, path in dirs.items()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", metavar="PATTERN", help="glob over run names; a bare prefix like exp03 "
                                                                  "matches exp03 and exp03_* (default: all)")
    p.add_argument("--watch", nargs="?", type=float, const=30.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 30) until Ctrl-C")
    p.add_argument("--json", action="store_true", help="print a JSON list of dicts instead of the table")
    p.add_argument("--output-root", metavar="ROOT", help="where run records are (default: each config's, else runs)")
    p.add_argument("--config-dir", metavar="DIR", help="look up configs in DIR first")
    p.add_argument("--stale-after", type=float, default=STALE_AFTER_S, metavar="S",
                   help="show a running run as stale after S seconds without a heartbeat (default 900)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """`kellen status ...`"""
    p = subparsers.add_parser("status", help="table of the selected runs' progress (local or gs:// records)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(fn=run_args)
    return p


def run_args(args) -> int:
    try:
        if args.pattern:
            runs.check_pattern(args.pattern)
        if args.output_root and not args.output_root.startswith("gs://"):
            args.output_root = os.path.abspath(args.output_root)
        while True:
            rows = collect(args)
            if args.json:
                print(json.dumps(rows, indent=1))
            else:
                if args.watch and sys.stdout.isatty():
                    print("\033[H\033[J", end="")  # clear the screen between refreshes
                print(render(rows) if rows else "no runs selected")
            sys.stdout.flush()
            if not args.watch:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
    except RunError as e:
        print(f"kellen status: error: {e}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    p = ArgumentParser(prog="kellen status", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
