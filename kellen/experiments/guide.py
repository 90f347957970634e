"""Experiment guides: one markdown page per experiment group, rendered from its spec and run status.

    kellen guide exp03                  -> kellen/experiments/guides/exp03.md
    kellen guide --all [--out DIR] [--output-root ROOT] [--no-status]

All guides share one Jinja2 template, `templates/experiment_guide.md`, rendered with
StrictUndefined so a field the template names but the context lacks is an error, not a blank.
Python prepares the numbers (tables, totals, criteria); the template owns the words and layout.
A guide is rewritten only when something besides its "Last updated" line changed, so
regenerating all of them does not churn files that say the same thing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from kellen.cli import ArgumentParser
from kellen.experiments.spec import flatten
from kellen.experiments.status import check_criteria, group_status, overall_state

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # parent of kellen/
TEMPLATE = "experiment_guide.md"
DEFAULT_OUT = os.path.join(REPO, "kellen", "experiments", "guides")
DEFAULT_PROJECT = "TRM-Scaling-Research"  # what the trainer uses without wandb.project / project_name
DEFAULT_METRICS = ["eval/all/exact_accuracy", "eval/all/accuracy", "train/lm_loss", "perf/examples_per_sec"]
LAST_UPDATED = re.compile(r"^_?Last updated: .*$", re.M)  # the one line allowed to differ on rewrite

GROUP_BADGES = {"Not Started": "⏸️ Not Started", "Running": "▶️ Running", "Complete": "✅ Complete",
                "Failed": "❌ Failed"}
RUN_BADGES = {"not_started": "⏸️ not started", "running": "▶️ running", "completed": "✅ completed",
              "failed": "❌ failed", "preempted": "⏳ preempted", "stale": "⚠️ stale", "unknown": "❓ unknown"}


# ----------------------------------------------------------------------------- formatting helpers
def fmt(value: Any) -> str:
    """A config value as it would be written in YAML / on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


def cell(value: Any) -> str:
    """Safe inside a markdown table cell: no pipes or newlines."""
    text = value if isinstance(value, str) else fmt(value)
    return text.replace("|", "\\|").replace("\n", " ").strip() or "—"


def hours(h: Optional[float]) -> str:
    if h is None:
        return "unknown"
    text = f"{h:g} h"
    return f"{text} ({h / 24:.1f} days)" if h >= 48 else text


def _rel(path: str) -> str:
    """Repo-relative where possible, so a guide reads the same on every machine."""
    if path and os.path.isabs(path) and os.path.abspath(path).startswith(REPO + os.sep):
        return os.path.relpath(path, REPO)
    return path


def _number(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# ----------------------------------------------------------------------------- context pieces
def _runtime(group) -> Dict[str, Any]:
    """Per-run hours from runtime_estimate.per_run_hours (one number, or {run: hours}); the total
    is their sum, or 'unknown' if any run has no estimate."""
    est = dict(group.runtime_estimate or {})
    per = est.pop("per_run_hours", None)
    hardware = est.pop("hardware", None)
    rows = []
    for r in group.runs:
        h = _number(per.get(r.name)) if isinstance(per, Mapping) else _number(per)
        rows.append({"name": r.name, "hours": h, "text": hours(h)})
    known = [row["hours"] for row in rows if row["hours"] is not None]
    total = sum(known) if rows and len(known) == len(rows) else None
    uniform = _number(per) if not isinstance(per, Mapping) else None
    formula = f"{uniform:g} h × {len(rows)} runs" if uniform is not None and rows else None
    return {"rows": rows, "total": hours(total), "formula": formula, "hardware": hardware or "unknown",
            "known": len(known), "other": [(k, fmt(v)) for k, v in est.items()]}


def _final_accuracy(status: Mapping[str, Any]) -> str:
    summary = status.get("summary") or {}
    final = summary.get("final_eval") if isinstance(summary, Mapping) else None
    if not isinstance(final, Mapping):
        return "—"
    key = f"eval/{summary.get('primary_set') or 'all'}/exact_accuracy"
    v = _number(final.get(key))
    if v is None:
        return "—"
    latest = "" if status.get("state") == "completed" else ", latest"  # not final until completed
    return f"{v:.4f} (step {final.get('step', '?')}{latest})"


def _status_rows(group, runs: Mapping[str, Any]) -> List[Dict[str, str]]:
    rows = []
    for r in group.runs:
        s = runs.get(r.name) or {"state": "not_started"}
        step, total = s.get("step"), s.get("total")
        if step is None:
            progress = "—"
        elif _number(total):
            progress = f"{step} / {total} ({100 * step / total:.0f}%)"
        else:
            progress = f"{step} / ?"
        wall = _number((s.get("summary") or {}).get("wall_clock_seconds"))
        rows.append({"name": r.name, "state": RUN_BADGES.get(s.get("state"), s.get("state")), "progress": progress,
                     "accuracy": _final_accuracy(s), "wall": "—" if wall is None else f"{wall / 3600:.1f} h",
                     "heartbeat": s.get("heartbeat") or "—", "note": cell(s.get("error") or "")})
    return rows


def _plots(group, metrics: List[str]) -> List[str]:
    """Comparison plots that answer a sweep: the main metric against each variable, over time."""
    main = metrics[0]
    out = [f"`{main}` vs step, one line per run (the runs' `metrics.csv` side by side)",
           f"`{main}` vs training wall-clock (`elapsed`), one line per run: what each setting costs"]
    out += [f"final `{main}` vs `{v}`" for v in group.variables]
    out.append("steps and wall-clock to 80% / 85% eval exact accuracy per run (`reach` in summary.json)")
    out.append("`perf/examples_per_sec` and `num_params` per run, to separate speed from sample efficiency")
    return out


def context(group, statuses: Optional[Mapping[str, Any]] = None, now=None,
            output_root: Optional[str] = None, results: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Everything the template uses besides `group` itself."""
    runs = {}
    if statuses:
        runs = statuses["runs"] if isinstance(statuses.get("runs"), Mapping) else statuses
    state = overall_state([(runs.get(r.name) or {}).get("state", "not_started") for r in group.runs])
    metrics = list(group.metrics) or DEFAULT_METRICS
    derived = [k for k in group.derived if k not in group.variables and any(k in r.values for r in group.runs)]
    columns = list(group.variables) + derived
    configs = [{"name": r.name, "cells": [cell(r.values[c]) if c in r.values else "—" for c in columns],
                "baseline": "⭐ baseline" if r.baseline else "", "notes": cell(r.notes) if r.notes else ""}
               for r in group.runs]
    sweeps = []
    for v in group.variables:
        seen: List[str] = []
        for r in group.runs:
            if v in r.values and fmt(r.values[v]) not in seen:
                seen.append(fmt(r.values[v]))
        sweeps.append({"name": v, "choices": ", ".join(seen) or "—"})
    criteria = [{"text": text, "result": result} for text, result in check_criteria(group, runs)]
    example = group.baseline_run or (group.runs[0] if group.runs else None)
    shown_root = output_root or group.output_root or "runs"
    storage = [{"name": r.name, "checkpoint": group.checkpoint_dir(r.name)
                or f"{group.run_dir(r.name, shown_root)}/checkpoints",
                "record": group.run_dir(r.name, shown_root)} for r in group.runs]
    if isinstance(now, (int, float)):
        now = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    stamp = now if isinstance(now, str) else now.strftime("%Y-%m-%d %H:%M %Z").strip()
    return {
        "spec_path": _rel(group.path),
        "sha": (group.sha256 or "")[:12],
        "state": state,
        "badge": GROUP_BADGES[state],
        "status_collected": statuses is not None,
        "sweeps": sweeps,
        # What a group varies or derives is not one of its controls, even where its base fixes it.
        "fixed": [(k, fmt(v)) for k, v in flatten(group.fixed).items()
                  if k not in group.variables and k not in group.derived],
        "data": [(k, fmt(v)) for k, v in flatten(group.data).items()],
        "columns": [c if c in group.variables else f"{c} (derived)" for c in columns],
        "configs": configs,
        "derived": [(k, expr) for k, expr in group.derived.items()],
        "example_run": example.name if example else f"{group.id}_a",
        "criteria": criteria,
        "metrics": metrics,
        "metrics_default": not group.metrics,
        "runtime": _runtime(group),
        "plots": _plots(group, metrics),
        "storage": storage,
        "checkpoint_group": (f"{group.storage_root.rstrip('/')}/checkpoints/{group.id}"
                             if group.storage_root else None),
        "record_group": f"{shown_root.rstrip('/')}/{group.id}",
        "records_remote": shown_root.startswith("gs://"),
        "wandb_project": group.wandb_project or DEFAULT_PROJECT,
        "wandb_tags": [group.id] + [t for t in group.tags if t != group.id],
        "run_rows": _status_rows(group, runs),
        "last_updated": stamp,
        "results": results,  # report.build() output for `--results`, else None
    }


# ----------------------------------------------------------------------------- rendering and writing
def environment(template_dir: Optional[str] = None):
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(template_dir or os.path.join(REPO, "templates")),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True, autoescape=False)
    env.filters.update(fmt=fmt, cell=cell)
    return env


def render_guide(group, statuses: Optional[Mapping[str, Any]] = None, now=None,
                 template_dir: Optional[str] = None, output_root: Optional[str] = None,
                 results: Optional[Mapping[str, Any]] = None) -> str:
    """The guide's markdown. `statuses`: group_status() output (or its "runs" mapping); None
    renders every run as not started. `now`: datetime, unix time or a string for "Last updated".
    `output_root`: the run-record root shown in the guide (default the spec's, else `runs`)."""
    template = environment(template_dir).get_template(TEMPLATE)
    return template.render(group=group, **context(group, statuses, now, output_root, results))


RESULTS_BLOCK = re.compile(r"<!-- results -->\n.*?<!-- /results -->\n", re.S)
FILLED = "_Filled by `kellen guide"


def _same_apart_from_timestamp(a: str, b: str) -> bool:
    return LAST_UPDATED.sub("", a) == LAST_UPDATED.sub("", b)


def _read_root(root: Optional[str]) -> Optional[str]:
    """Relative local roots are the repo's (where the run commands are started), not the cwd's."""
    if root and not root.startswith("gs://") and not os.path.isabs(root):
        return os.path.join(REPO, root)
    return root


def write_guide(group, out_dir: Optional[str] = None, output_root: Optional[str] = None,
                with_status: bool = True, now=None, template_dir: Optional[str] = None,
                results: Optional[Mapping[str, Any]] = None) -> Tuple[str, bool]:
    """Render `<out_dir>/<id>.md`; returns (path, whether the file was (re)written). `results`:
    report.build() output, which fills the Results section (and the Status table, from the same
    records)."""
    out_dir = out_dir or DEFAULT_OUT
    os.makedirs(out_dir, exist_ok=True)
    statuses = None
    if results is not None:
        statuses = {r.name: r.status for r in results["report"]["runs"] if r.in_spec}
    elif with_status:
        statuses = group_status(group, _read_root(output_root or group.output_root or "runs"))
    text = render_guide(group, statuses, now=now, template_dir=template_dir, output_root=output_root, results=results)
    path = os.path.join(out_dir, f"{group.id}.md")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
        if results is None:  # a plain re-render keeps the Results an earlier --results filled in
            kept = RESULTS_BLOCK.search(old)
            if kept and FILLED in kept.group(0):
                text = RESULTS_BLOCK.sub(lambda _m: kept.group(0), text, count=1)
        if _same_apart_from_timestamp(old, text):
            return path, False
    from kellen.experiments.generate import write_atomic  # one atomic writer for generated files

    write_atomic(path, text)
    return path, True


def write_guides(groups: Iterable[Any], out_dir: Optional[str] = None, output_root: Optional[str] = None,
                 with_status: bool = True, now=None, template_dir: Optional[str] = None) -> List[str]:
    """write_guide for each group; returns every guide's path (rewritten or not), in order."""
    return [write_guide(g, out_dir, output_root, with_status, now, template_dir)[0] for g in groups]


# ----------------------------------------------------------------------------- command line
def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("groups", nargs="*", metavar="GROUP", help="group ids (configs/experiments/<id>.yaml); with --all, only these")
    p.add_argument("--all", action="store_true", help="every group spec")
    p.add_argument("--spec-dir", default=None, metavar="DIR", help="group specs (default configs/experiments)")
    p.add_argument("--out", default=None, metavar="DIR", help=f"where guides go (default {_rel(DEFAULT_OUT)})")
    p.add_argument("--output-root", default=None, metavar="ROOT",
                   help="run-record root to read status from (default: the spec's output_root, else runs)")
    p.add_argument("--no-status", action="store_true", help="do not read run records")
    p.add_argument("--results", action="store_true",
                   help="fill the Results section (compare table, plots, criteria) and, for a finished group, "
                        "its EXPERIMENT_LOG.md entry")
    p.add_argument("--from", dest="source", default=None, metavar="DIR|gs://…",
                   help="with --results: where <group>/<run>/ records are (default: results/ if downloaded, else the output root)")
    p.add_argument("--log", default=None, metavar="FILE", help="with --results: the experiment log (default kellen/experiments/EXPERIMENT_LOG.md)")
    p.set_defaults(fn=cmd_guide)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("guide", help="write experiment guides (markdown) from group specs and run status")
    _configure(p)
    return p


def _load(args) -> List[Any]:
    from kellen.experiments import spec  # the loader lives beside the dataclasses

    if args.all:
        groups = spec.load_all(args.spec_dir)
        groups = list(groups.values()) if isinstance(groups, Mapping) else list(groups)
        return [g for g in groups if not args.groups or g.id in args.groups]
    return [spec.load_group(g, args.spec_dir) for g in args.groups]


def cmd_guide(args) -> int:
    if not args.all and not args.groups:
        print("kellen guide: error: name a group (kellen guide exp03) or use --all", file=sys.stderr)
        return 2
    try:
        for group in _load(args):
            results = None
            if args.results:
                from kellen.experiments import report

                results = report.build(group, args.out or DEFAULT_OUT, args.source or args.output_root)
            path, changed = write_guide(group, args.out, args.output_root, with_status=not args.no_status,
                                        results=results)
            print(f"{'wrote' if changed else 'unchanged'} {_rel(path)}")
            if results is not None:
                logged = report.update_log(group, results, args.log)
                print(f"{results['status_line']}; " + (f"logged in {_rel(logged)}" if logged
                                                       else "not logged in the experiment log until every run completes"))
    except Exception as e:  # spec errors, template errors, unwritable out dir: one line, exit 2
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if not isinstance(e, (ValueError, OSError)) or not msg:  # e.g. KeyError 'x': say what kind
            msg = f"{type(e).__name__}: {msg}".rstrip(": ")
        print(f"kellen guide: error: {msg}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = ArgumentParser(prog="kellen guide", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its message
        return int(e.code or 0)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
