"""What the batch runner does with each run now: run, resume, skip, wait or blocked (`decide`).

Per run, from its status.json, checkpoints and lease:
  completed                              skip (or --rerun: run afresh as <name>--rerunK)
  running, fresh heartbeat / live lease  skip: running elsewhere
  running, its trainer alive on this     wait: the trainer of a batch that was killed (its lease is
    machine, its batch's lease dead        stale) got SIGTERM with its batch and is saving; the
                                           runner waits for it to exit, then decides again
  running, its trainer gone from this    resume (the trainer died: a kill, an OOM)
    machine
  failed                                 skip (or --retry-failed: run/resume it again)
  preempted, stale, or has checkpoints   resume from step N
  missing config, data or bad config     blocked: why
  otherwise                              run
"Alive on this machine" compares the records' {machine, pid, start} (kellen.procs) with the
process table here; records from other machines are judged by their heartbeat and lease only.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from kellen import procs
from kellen.experiments import lease as leases
from kellen.experiments import runs
from kellen.experiments.runs import RunError, RunTarget

STALE_AFTER_S = 15 * 60.0  # as kellen.experiments.status: 15 min without a heartbeat is dead


@dataclass
class Plan:
    config: str
    target: Optional[RunTarget]
    decision: str  # run | resume | skip | wait | blocked
    detail: str = ""  # why (skip/blocked/wait), or what (resume from step N)
    resume_step: Optional[int] = None
    run_state: Optional[str] = None  # the run's state when decided (kellen.experiments.status)
    trainer_pid: Optional[int] = None  # wait: the running trainer waited for

    @property
    def name(self) -> str:
        return self.target.name if self.target else self.config

    def describe(self) -> str:
        if self.decision == "resume":
            return f"resume from step {self.resume_step}" if self.resume_step is not None else "resume"
        return f"{self.decision}: {self.detail}" if self.detail else self.decision


def run_status(run_dir: str, stale_after_s: float) -> Dict[str, Any]:
    from kellen.experiments.status import run_status as read_status

    return read_status(run_dir, stale_after=stale_after_s)


def trainer_record(run_dir: str) -> Optional[Dict[str, Any]]:
    """status.json's body when it says running (its pid/machine/start name the trainer), else None."""
    from kellen import gcs

    path = f"{run_dir.rstrip('/')}/status.json"
    try:
        if gcs.is_gcs(path):
            text = gcs.read_text(path) if gcs.exists(path) else None
        else:
            with open(path) as f:
                text = f.read()
        body = json.loads(text) if text else None
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and body.get("state") == "running" else None


def live_trainer(run_dir: str, lease_body: Optional[Dict[str, Any]]) -> Optional[int]:
    """The pid of a trainer of this run still running on this machine: the one a (dead) batch
    noted in its lease, or the one status.json names."""
    for who in ((lease_body or {}).get("trainer"), trainer_record(run_dir)):
        if procs.local_owner_alive(who):
            return int(who["pid"])
    return None


def decide(target: RunTarget, *, stale_after_s: float = STALE_AFTER_S, retry_failed: bool = False,
           rerun: bool = False, config_dir: Optional[str] = None, output_root: Optional[str] = None,
           ignore_lease_token: Optional[str] = None, replaced_lease: Optional[Dict[str, Any]] = None) -> Plan:
    """What to do with one run now (see the module doc). Never raises on a bad record.
    ignore_lease_token: the caller's own lease; replaced_lease: the stale lease it took over."""
    status = run_status(target.run_dir, stale_after_s)
    state = status["state"]
    if state == "completed" and rerun:
        return decide(next_rerun(target, stale_after_s, config_dir, output_root), stale_after_s=stale_after_s,
                      retry_failed=retry_failed, config_dir=config_dir, output_root=output_root)
    plan = Plan(target.config_name, target, "skip", run_state=state)
    if state == "completed":
        plan.detail = "completed"
        return plan
    lease = leases.read(target.run_dir)
    ours = ignore_lease_token is not None and (lease or {}).get("owner", {}).get("token") == ignore_lease_token
    if leases.is_live(lease) and not ours:
        plan.detail = f"running elsewhere (lease held by {leases.describe(lease)})"
        return plan
    dead_batch = replaced_lease if ours else lease  # a lease left by a runner that is gone, if any
    pid = live_trainer(target.run_dir, dead_batch)
    if pid is not None and dead_batch is not None:
        return Plan(target.config_name, target, "wait", f"trainer pid {pid} of a stopped batch is still running",
                    run_state=state, trainer_pid=pid)
    if state == "running" and pid is None and procs.local_owner_dead(trainer_record(target.run_dir)):
        state = "stale"  # its trainer died on this machine (killed, OOM): resume it below
    if state == "running":  # a live trainer without our lease (a manual run, an orphan): leave it
        age = time.time() - (status.get("heartbeat_unix") or 0)
        plan.detail = f"running elsewhere ({status.get('host')}, heartbeat {age:.0f}s ago)"
        return plan
    if state == "failed" and not retry_failed:
        plan.detail = f"failed at step {status.get('step')} (see FAILED.txt; --retry-failed runs it again)"
        return plan
    if state == "unknown":
        why = status.get("error") or "unreadable status.json"
        return Plan(target.config_name, target, "blocked", why, run_state=state)
    why = missing_data(target)
    if why:
        return Plan(target.config_name, target, "blocked", why, run_state=state)
    step = checkpoint_step(target.checkpoint_dir)
    if step is not None or state in ("preempted", "stale"):
        return Plan(target.config_name, target, "resume", resume_step=step if step is not None else status.get("step"),
                    run_state=state)
    return Plan(target.config_name, target, "run", run_state=state)


def checkpoint_step(checkpoint_dir: str) -> Optional[int]:
    """The latest committed checkpoint step (Orbax renames `<step>` into place when committed)."""
    steps = [int(n) for n in runs.list_dir(checkpoint_dir) if n.isdigit()]
    return max(steps) if steps else None


def missing_data(target: RunTarget) -> Optional[str]:
    """Why the run's dataset prerequisite is not met, or None. A config with data_build builds a
    missing local dataset itself, so only a missing gs:// set or one without a recipe blocks."""
    if runs.exists(target.data_path):
        return None
    if target.data_build and not target.data_path.startswith("gs://"):
        return None
    return f"dataset {target.data_path} not found" + ("" if target.data_build else " (and no data_build)")


def next_rerun(target: RunTarget, stale_after_s: float, config_dir: Optional[str],
               output_root: Optional[str]) -> RunTarget:
    """<name>--rerun1, --rerun2, ...: the first that is not completed (an interrupted rerun resumes)."""
    base = target.name
    for k in range(1, 1000):
        candidate = runs.with_run_name(target, f"{base}--rerun{k}", config_dir=config_dir, output_root=output_root)
        if run_status(candidate.run_dir, stale_after_s)["state"] != "completed":
            return candidate
    raise RunError(f"{base}: 999 reruns already")


def plan_all(names: List[str], overrides: List[str], *, config_dir=None, output_root=None, validate=False,
             **decide_kw) -> List[Plan]:
    """A Plan per selected config. validate=True composes each config once through Hydra (dry run)
    and reads the target from the composed values; a bad config is `blocked` with Hydra's error."""
    plans = []
    for name in names:
        try:
            target = runs.resolve(name, overrides, config_dir=config_dir, output_root=output_root)
            if validate:
                from omegaconf import OmegaConf

                target = runs.with_values(target, OmegaConf.to_container(runs.compose(target), resolve=True))
            plans.append(decide(target, config_dir=config_dir, output_root=output_root, **decide_kw))
        except Exception as e:  # RunError, or storage trouble reading the record: report and go on
            plans.append(Plan(name, None, "blocked", runs.one_line(e)))
    return plans

