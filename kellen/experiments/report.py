"""Results back into the docs: the guide's Results section (`kellen guide <group> --results`) and
the dated entries of kellen/experiments/EXPERIMENT_LOG.md.

The section is built from `compare.write_report` (table, plots, scaling fit) written beside the
guides (`<guides>/results/<group>/`, so the links work wherever the guide is read) and from the
spec's success criteria judged on the same records. A group gets a log entry once every run of
its spec has completed; re-running replaces that group's entry in place, so the log holds one
entry per finished group, newest findings included.
"""
from __future__ import annotations

import datetime
import os
import re
from typing import Any, Dict, List, Mapping, Optional

from kellen.experiments.compare import fit_line, fmt_cell, to_markdown, write_report
from kellen.experiments.status import criteria_details, overall_state

LOG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "EXPERIMENT_LOG.md")
LOG_HEADER = ("# Experiment log\n\nOne dated entry per finished experiment group, written by "
              "`kellen guide <group> --results`. Newest group last; an entry is replaced when its group is "
              "re-reported.\n")
_ENTRY = r"<!-- entry: {id} -->.*?<!-- /entry: {id} -->\n?"


def _value(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:.4f}"


def criteria_lines(group, statuses: Mapping[str, Any]) -> List[Dict[str, str]]:
    """Each success criterion with ✅ / ❌ / ⏳ (not decided: its runs have not completed) and
    the values it was judged on."""
    out = []
    for c in criteria_details(group, statuses):
        mark = {True: "✅", False: "❌", None: "⏳"}[c["result"]]
        measured = ", ".join(f"`{n}` {_value(v)}" for n, v in c["measured"].items()) or "no completed run yet"
        out.append({"mark": mark, "text": c["text"], "measured": measured})
    return out


def results_context(group, report: Dict[str, Any], guide_dir: str, now: datetime.datetime) -> Dict[str, Any]:
    statuses = {r.name: r.status for r in report["runs"] if r.in_spec}
    state = overall_state([statuses.get(r.name, {}).get("state", "not_started") for r in group.runs])
    done = sum(1 for r in group.runs if statuses.get(r.name, {}).get("state") == "completed")
    return {
        "table": to_markdown(report["rows"]).rstrip("\n"),
        "plots": [{"name": os.path.splitext(os.path.basename(p))[0],
                   "link": os.path.relpath(p, guide_dir).replace(os.sep, "/")} for p in report["plots"]],
        "fit": fit_line(report["fit"]),
        "criteria": criteria_lines(group, statuses),
        "state": state,
        "status_line": f"{state}: {done} of {len(group.runs)} runs completed",
        "report_dir": os.path.relpath(report["out_dir"], guide_dir).replace(os.sep, "/"),
        "updated": now.strftime("%Y-%m-%d %H:%M %Z").strip(),
    }


def build(group, guide_dir: str, source: Optional[str] = None, now=None) -> Dict[str, Any]:
    """Write the compare report into <guide_dir>/results/<group>/ and return the template's
    `results` context (also holding the report under "report")."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    report = write_report(group, source, os.path.join(guide_dir, "results", group.id))
    ctx = results_context(group, report, guide_dir, now)
    ctx.update(report=report, guide_dir=os.path.abspath(guide_dir))
    return ctx


# ----------------------------------------------------------------------------- EXPERIMENT_LOG.md
def _best(rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    scored = [r for r in rows if isinstance(r.get("final_exact_accuracy"), float) and r["state"] == "completed"]
    return max(scored, key=lambda r: r["final_exact_accuracy"]) if scored else None


def log_entry(group, ctx: Dict[str, Any], log_dir: str, now: datetime.datetime) -> str:
    rows = ctx["report"]["rows"]
    guide_dir = ctx["guide_dir"]
    lines = [f"<!-- entry: {group.id} -->", f"## {now:%Y-%m-%d} · {group.id}{': ' + group.name if group.name else ''}", ""]
    lines.append(f"- **Tested:** {group.question or group.hypothesis or '_not stated_'}")
    if group.hypothesis and group.question:
        lines.append(f"- **Hypothesis:** {group.hypothesis}")
    changes = []
    for v in group.variables:
        seen = []
        for r in rows:
            if r.get(v) is not None and fmt_cell(v, r[v]) not in seen:
                seen.append(fmt_cell(v, r[v]))
        changes.append(f"`{v}` ∈ {{{', '.join(seen)}}}")
    lines.append(f"- **Configuration changes:** {'; '.join(changes) or 'none'} ({len(group.runs)} runs)")
    best = _best(rows)
    if best:
        lines.append(f"- **Best run:** `{best['run']}`, final eval exact accuracy {best['final_exact_accuracy']:.4f}, "
                     f"{fmt_cell('examples_per_sec', best.get('examples_per_sec'))} ex/s, "
                     f"{fmt_cell('params', best.get('params'))} params")
    base = group.baseline_run
    brow = next((r for r in rows if base and r["run"] == base.name), None)
    if brow:
        lines.append(f"- **Baseline `{brow['run']}`:** final eval exact accuracy {_value(brow.get('final_exact_accuracy'))}")
    if ctx["fit"]:
        lines.append(f"- **{ctx['fit'][0].upper()}{ctx['fit'][1:]}**")
    for c in ctx["criteria"]:
        lines.append(f"- {c['mark']} {c['text']} ({c['measured']})")
    links = [f"[{p['name']}]({os.path.relpath(os.path.join(guide_dir, p['link']), log_dir)})" for p in ctx["plots"]]
    guide = os.path.relpath(os.path.join(guide_dir, f"{group.id}.md"), log_dir)
    lines.append(f"- **Plots:** {', '.join(links) or 'none'}; guide: [{group.id}]({guide})")
    lines.append(f"<!-- /entry: {group.id} -->")
    return "\n".join(lines) + "\n"


def update_log(group, ctx: Dict[str, Any], path: Optional[str] = None, now=None) -> Optional[str]:
    """Add or replace the group's entry when the group is complete; returns the path written,
    or None (the group is not finished: nothing is logged)."""
    if ctx["state"] != "Complete":
        return None
    from kellen.experiments.generate import write_atomic

    path = path or LOG_PATH
    now = now or datetime.datetime.now(datetime.timezone.utc)
    entry = log_entry(group, ctx, os.path.dirname(os.path.abspath(path)), now)
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else LOG_HEADER
    pattern = re.compile(_ENTRY.format(id=re.escape(group.id)), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: entry, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + entry
    write_atomic(path, text)
    return path
