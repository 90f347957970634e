"""Where the runs of an experiment group stand, read from their run records (local or gs://).

`run_status(run_dir)` reads `status.json` (written by `RunRecord.status`) and `summary.json`;
`group_status(group)` does it for every run of a GroupSpec and names the group's overall state;
`check_criteria(group, statuses)` evaluates the spec's success criteria.

Run states: the four the trainer writes (running, completed, failed, preempted), plus
  not_started  no status.json in the run dir (nothing ran, or it died before the first status)
  stale        status.json says running but its heartbeat is older than `stale_after` seconds:
               the process probably died (a crash that skipped FAILED.txt, a lost VM)
  unknown      status.json could not be read or parsed; `error` says why
Nothing here raises on a bad record: a status table must show the other runs anyway.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import functools
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

STALE_SECONDS = 15 * 60  # heartbeats come every 30 s by default; 15 min of silence is not a slow step
TRAINER_STATES = ("running", "completed", "failed", "preempted")
RUN_STATES = ("not_started",) + TRAINER_STATES + ("stale", "unknown")
GROUP_STATES = ("Not Started", "Running", "Complete", "Failed")


GCS_PROBE_SECONDS = 15.0


@functools.lru_cache(maxsize=None)
def _gcs_unreachable(bucket: str) -> Optional[str]:
    """Why `bucket` cannot be read right now (None if it can). The storage client retries a dead
    network for minutes per call; one bounded probe per bucket keeps status and guides quick."""
    from kellen import gcs

    result: Dict[str, Any] = {}

    def probe():
        try:
            gcs.exists(f"gs://{bucket}/")
            result["ok"] = True
        except Exception as e:  # no credentials, no network, no such bucket
            result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(GCS_PROBE_SECONDS)
    if "ok" in result:
        return None
    return result.get("error") or f"gs://{bucket} did not answer within {GCS_PROBE_SECONDS:.0f} s"


def _read(path: str) -> Optional[str]:
    """The text of a local file or gs:// object; None when it does not exist."""
    from kellen import gcs

    if gcs.is_gcs(path):
        why = _gcs_unreachable(gcs.split_gcs(path)[0])
        if why:
            raise OSError(why)
        try:
            return gcs.read_text(path)
        except FileNotFoundError:
            return None
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _heartbeat_unix(body: Mapping[str, Any]) -> Optional[float]:
    hb = body.get("heartbeat_unix")
    if isinstance(hb, (int, float)) and not isinstance(hb, bool) and math.isfinite(hb):
        return float(hb)
    try:  # older records: only the ISO time
        when = datetime.datetime.fromisoformat(str(body.get("heartbeat")))
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def _load_json(text: str, name: str) -> Dict[str, Any]:
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError(f"{name} is not a JSON object")
    return obj


def run_status(run_dir: str, stale_after: float = STALE_SECONDS, now: Optional[float] = None) -> Dict[str, Any]:
    """{"run_dir", "state", "step", "total", "heartbeat", "heartbeat_unix", "host", "metrics",
    "summary" (summary.json or None), "error" (None or why the record is unreadable)}."""
    run_dir = str(run_dir).rstrip("/")
    out: Dict[str, Any] = {"run_dir": run_dir, "state": "not_started", "step": None, "total": None,
                           "heartbeat": None, "heartbeat_unix": None, "host": None, "metrics": {},
                           "summary": None, "error": None}
    try:
        text = _read(f"{run_dir}/status.json")
    except Exception as e:  # network, credentials, permissions: report, never raise
        return dict(out, state="unknown", error=f"cannot read {run_dir}/status.json: {e}")
    if text is not None:
        try:
            body = _load_json(text, "status.json")
        except ValueError as e:
            return dict(out, state="unknown", error=f"corrupt {run_dir}/status.json: {e}")
        state = body.get("state")
        out.update(step=body.get("step"), total=body.get("total"), heartbeat=body.get("heartbeat"),
                   heartbeat_unix=_heartbeat_unix(body), host=body.get("host"),
                   metrics=body.get("metrics") if isinstance(body.get("metrics"), dict) else {})
        if state not in TRAINER_STATES:
            return dict(out, state="unknown", error=f"{run_dir}/status.json: unexpected state {state!r}")
        out["state"] = state
        hb = out["heartbeat_unix"]
        if state == "running" and hb is not None and (time.time() if now is None else now) - hb > stale_after:
            out["state"] = "stale"
    # summary.json is rewritten at each eval; a bad one costs the numbers, not the state.
    try:
        text = _read(f"{run_dir}/summary.json")
        out["summary"] = None if text is None else _load_json(text, "summary.json")
    except Exception as e:
        out["error"] = f"cannot read {run_dir}/summary.json: {e}"
    return out


def overall_state(states: List[str]) -> str:
    """The group's state from its runs' states (see GROUP_STATES).

    Failed wins once nothing is live: a stale run is presumed dead, so failed + stale is Failed;
    otherwise stale, preempted, unknown and a mix of done and not started all read as Running,
    since the group still needs someone to (re)start something."""
    # A run whose record cannot be read (e.g. gs:// unreachable from here) shows as unknown in the
    # run table; it does not make the group look started.
    if not states or all(s in ("not_started", "unknown") for s in states):
        return "Not Started"
    if all(s == "completed" for s in states):
        return "Complete"
    if "failed" in states and "running" not in states:
        return "Failed"
    return "Running"


def group_status(group, output_root: Optional[str] = None, stale_after: float = STALE_SECONDS,
                 now: Optional[float] = None) -> Dict[str, Any]:
    """{"group": id, "state": one of GROUP_STATES, "runs": {run name: run_status(...)} in run order}.
    Run dirs are GroupSpec.run_dir(run, output_root) (a relative root is relative to the cwd)."""
    runs = {r.name: run_status(group.run_dir(r.name, output_root), stale_after=stale_after, now=now)
            for r in group.runs}
    return {"group": group.id, "state": overall_state([s["state"] for s in runs.values()]), "runs": runs}


def _runs_of(statuses: Optional[Mapping[str, Any]]) -> Mapping[str, Any]:
    """Accept group_status() output or its "runs" mapping."""
    if not statuses:
        return {}
    if isinstance(statuses.get("runs"), Mapping) and isinstance(statuses.get("state"), str):
        return statuses["runs"]
    return statuses


def metric_value(status: Optional[Mapping[str, Any]], metric: str) -> Optional[float]:
    """A completed run's value of `metric`: its summary's final_eval[metric], else a top-level
    summary number (wall_clock_seconds, num_params, ...). None for unfinished runs: their
    final_eval is only the latest eval, and a criterion judged on it would flip later."""
    if not status or status.get("state") != "completed" or not isinstance(status.get("summary"), Mapping):
        return None
    summary = status["summary"]
    final = summary.get("final_eval") if isinstance(summary.get("final_eval"), Mapping) else {}
    value = final.get(metric, summary.get(metric))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def check_criteria(group, statuses: Optional[Mapping[str, Any]]) -> List[Tuple[str, Optional[bool]]]:
    """[(criterion text, True | False | None)] in spec order, None meaning "not decided yet".
    See criteria_details for how each is judged."""
    return [(c["text"], c["result"]) for c in criteria_details(group, statuses)]


def criteria_details(group, statuses: Optional[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """[{"text", "result": True | False | None, "measured": {run: value}}] in spec order.

    Values come from completed runs' summary.json final_eval (the end of training, which is what
    a scaling comparison reports; best_eval would favour noisy runs). Scopes: baseline, a run
    name, all (False as soon as one finished run fails), any (True as soon as one holds)."""
    runs = _runs_of(statuses)
    out: List[Dict[str, Any]] = []
    for c in group.success_criteria:
        if c.scope in ("all", "any"):
            names = [r.name for r in group.runs]
        elif c.scope == "baseline":
            names = [group.baseline_run.name] if group.baseline_run else []
        else:
            names = [c.scope] if any(r.name == c.scope for r in group.runs) else []
        values = {n: metric_value(runs.get(n), c.metric) for n in names}
        results = [None if v is None else c.holds(v) for v in values.values()]
        if not results:
            result = None
        elif c.scope == "any":
            result = True if True in results else (False if None not in results else None)
        else:  # all, baseline, one run: every named run must hold
            result = False if False in results else (True if None not in results else None)
        out.append({"text": c.text, "result": result, "metric": c.metric,
                    "measured": {n: v for n, v in values.items() if v is not None}})
    return out
