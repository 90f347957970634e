"""Run a selection of configs one after another, each to completion, without prompts.

Per run, from its status.json, checkpoints and lease (see `decide`):
  completed                              skip (or --rerun: run afresh as <name>--rerunK)
  running, fresh heartbeat / live lease  skip: running elsewhere
  failed                                 skip (or --retry-failed: run/resume it again)
  preempted, stale, or has checkpoints   resume from step N
  missing config, data or bad config     blocked: why
  otherwise                              run
Runs go one at a time (each uses the whole pod) under a lease on their run dir, so two batch
runners over the same selection train each run once. Exit codes: 0 completed, 75 preempted
(retried up to --retries times, else left for the next batch to resume), others failed.

`<logs_dir>/<batch id>/batch_status.json` is replaced atomically after every change, so a killed
batch loses nothing; `<run>.out|.err` beside it hold each run's console. SIGTERM/SIGINT/SIGHUP:
the current run gets SIGTERM, saves, exits 75; the batch records it and exits 75.
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from kellen.experiments import lease as leases
from kellen.experiments import runs
from kellen.experiments.runs import RunError, RunTarget, Selection

STALE_AFTER_S = 15 * 60.0  # as kellen.experiments.status: 15 min without a heartbeat is dead
DEFAULT_LOGS_DIR = "runs/_batches"


@dataclass
class Plan:
    config: str
    target: Optional[RunTarget]
    decision: str  # run | resume | skip | blocked
    detail: str = ""  # why (skip/blocked), or what (resume from step N)
    resume_step: Optional[int] = None
    run_state: Optional[str] = None  # the run's state when decided (kellen.experiments.status)

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


def decide(target: RunTarget, *, stale_after_s: float = STALE_AFTER_S, retry_failed: bool = False,
           rerun: bool = False, config_dir: Optional[str] = None, output_root: Optional[str] = None,
           ignore_lease_token: Optional[str] = None) -> Plan:
    """What to do with one run now (see the module doc). Never raises on a bad record."""
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


def table(header: List[str], rows: List[List[Any]]) -> str:
    rows = [[("" if v is None else str(v)) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    fmt = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header)] + [fmt(r) for r in rows])


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_batch_id() -> str:  # time-sortable, and unique for two batches started in the same second
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


class BatchState:
    """batch_status.json: the batch and every run's progress, rewritten atomically on each change."""

    def __init__(self, path: str, batch_id: str, argv: List[str]):
        self.path = path
        self.lock = threading.Lock()
        self.body: Dict[str, Any] = {"batch_id": batch_id, "argv": argv, "host": socket.gethostname(),
                                     "pid": os.getpid(), "state": "running", "started": _now(), "ended": None,
                                     "exit_code": None, "runs": {}}

    def run(self, key: str, **fields: Any) -> Dict[str, Any]:
        with self.lock:
            entry = self.body["runs"].setdefault(key, {})
            entry.update(fields)
            self._save()
            return entry

    def finish(self, state: str, exit_code: int) -> None:
        with self.lock:
            self.body.update(state=state, exit_code=exit_code, ended=_now())
            self._save()

    def _save(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.body, f, indent=1, default=str)
        os.replace(tmp, self.path)


class StopRequested(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM/SIGHUP while a run is being launched."""


class BatchRunner:
    def __init__(self, plans: List[Plan], launcher, *, state: BatchState, logs_dir: str, retries: int = 0,
                 fail_fast: bool = False, decide_kw: Optional[Dict[str, Any]] = None,
                 lease_expires_s: float = leases.DEFAULT_EXPIRES_S, out=sys.stdout):
        self.plans, self.launcher, self.state, self.logs_dir = plans, launcher, state, logs_dir
        self.retries, self.fail_fast, self.decide_kw = retries, fail_fast, decide_kw or {}
        self.lease_expires_s, self.out = lease_expires_s, out
        self.stop_signal: Optional[int] = None
        self.launching = False

    def say(self, message: str) -> None:
        print(f"[batch {_now()}] {message}", file=self.out, flush=True)

    def _on_signal(self, signum, _frame) -> None:
        first = self.stop_signal is None
        self.stop_signal = signum
        if first:
            self.say(f"got {signal.Signals(signum).name}: stopping the current run (it saves and exits 75)")
        if self.launching or not first:
            raise StopRequested()  # interrupts the launcher's wait; it forwards SIGTERM to the run

    def run(self) -> int:
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, self._on_signal) for s in handled} if main else {}
        try:
            for plan in self.plans:
                self.state.run(plan.name, config=plan.config, run_dir=plan.target and plan.target.run_dir,
                               decision=plan.decision, detail=plan.describe(), state="pending", attempts=0,
                               exit_codes=[], run_state=plan.run_state)
            for plan in self.plans:
                if self.stop_signal is not None:
                    self.state.run(plan.name, state="not_run", detail="batch stopped before this run")
                    continue
                outcome = self.execute(plan)
                if outcome == "failed" and self.fail_fast:
                    self.stop_signal = self.stop_signal or -1
                    self.say(f"{plan.name} failed; --fail-fast: not starting the rest")
        except StopRequested:
            self.stop_signal = self.stop_signal or signal.SIGTERM
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        return self.exit_code()

    def exit_code(self) -> int:
        states = [r.get("state") for r in self.state.body["runs"].values()]
        if self.stop_signal is not None and self.stop_signal > 0:
            code, state = runs.EXIT_PREEMPTED, "interrupted"
        elif any(s in ("failed", "blocked") for s in states) or any(
                r.get("run_state") == "failed" for r in self.state.body["runs"].values()):
            code, state = 1, "failed"
        elif "preempted" in states:
            code, state = runs.EXIT_PREEMPTED, "preempted"
        else:
            code, state = 0, "done"
        self.state.finish(state, code)
        return code

    def execute(self, plan: Plan) -> str:
        if plan.decision in ("skip", "blocked"):
            return self._not_launched(plan.name, plan)
        target = plan.target
        lease = leases.Lease(target.run_dir, expires_after_s=self.lease_expires_s)
        try:
            acquired = lease.acquire()
        except Exception as e:  # storage trouble: this run cannot be guarded, so it is not run
            return self._not_launched(plan.name, Plan(plan.config, target, "blocked", f"lease: {runs.one_line(e)}"))
        if not acquired:
            held = f"running elsewhere (lease held by {leases.describe(lease.holder)})"
            return self._not_launched(plan.name, Plan(plan.config, target, "skip", held))
        try:
            # Another runner may have finished it between planning and now: decide again.
            fresh = decide(target, ignore_lease_token=lease.owner["token"], **self.decide_kw)
            if fresh.decision in ("skip", "blocked"):
                return self._not_launched(plan.name, fresh)
            return self._launch_attempts(plan.name, fresh, lease.owner["token"])
        finally:
            lease.release()

    def _not_launched(self, key: str, plan: Plan) -> str:
        """Record a skipped or blocked run, with where its record stands (for the final table)."""
        state = "skipped" if plan.decision == "skip" else "blocked"
        fields = dict(state=state, decision=plan.decision, detail=plan.describe())
        if plan.run_state is not None:
            fields["run_state"] = plan.run_state
        if plan.target is not None and plan.run_state not in (None, "not_started"):
            status = run_status(plan.target.run_dir, float("inf"))
            fields.update(step=status.get("step"), total=status.get("total"),
                          exact_accuracy=final_exact_accuracy(status.get("summary")))
        self.state.run(key, **fields)
        self.say(f"{plan.name}: {plan.describe()}")
        return state

    def _launch_attempts(self, key: str, plan: Plan, lease_token: str) -> str:
        target = plan.target
        if self.stop_signal is not None:
            self.state.run(key, state="not_run", detail="batch stopped before this run")
            return "not_run"
        out_path = os.path.join(self.logs_dir, f"{target.name}.out")
        err_path = os.path.join(self.logs_dir, f"{target.name}.err")
        entry = self.state.run(key, run=target.name, run_dir=target.run_dir, decision=plan.decision,
                               detail=plan.describe(), stdout=out_path, stderr=err_path,
                               started=_now(), started_unix=time.time())
        outcome = "failed"
        while True:
            attempt = entry["attempts"] + 1
            self.state.run(key, state="running", attempts=attempt)
            self.say(f"{target.name}: {plan.describe()} (attempt {attempt}; log {out_path})")
            try:
                self.launching = True
                code = self.launcher.launch(target, target.pretrain_argv(), runs.run_env(), out_path, err_path)
            except StopRequested:
                code = None  # stopped before or hard during the launch
            except Exception as e:  # a launcher problem (ssh, tmux): this run failed, the batch goes on
                self.say(f"{target.name}: launcher error: {runs.one_line(e)}")
                self.state.run(key, error=runs.one_line(e))
                code = -1
            finally:
                self.launching = False
            entry = self.state.run(key, exit_codes=entry["exit_codes"] + [code])
            if code == runs.EXIT_COMPLETED:
                outcome = "completed"
            elif code == runs.EXIT_PREEMPTED or code is None:
                outcome = "preempted"
                if self.stop_signal is None and attempt <= self.retries:
                    plan = decide(target, ignore_lease_token=lease_token, **dict(self.decide_kw, retry_failed=True))
                    if plan.decision == "resume":
                        continue
            else:
                outcome = "failed"
            break
        self._record_end(key, target, outcome, code)
        return outcome

    def _record_end(self, key: str, target: RunTarget, outcome: str, code: Optional[int]) -> None:
        status = run_status(target.run_dir, float("inf"))
        entry = self.state.body["runs"][key]
        self.state.run(key, state=outcome, ended=_now(), wall_s=round(time.time() - entry["started_unix"], 1),
                       step=status.get("step"), total=status.get("total"),
                       exact_accuracy=final_exact_accuracy(status.get("summary")))
        hint = {2: " (bad config or data)", None: " (interrupted)"}.get(code, "")
        self.say(f"{target.name}: {outcome}, exit code {code}{hint}; step {status.get('step')}/{status.get('total')}")


def final_exact_accuracy(summary: Optional[Dict[str, Any]]) -> Optional[float]:
    final = (summary or {}).get("final_eval") or {}
    key = f"eval/{(summary or {}).get('primary_set') or 'all'}/exact_accuracy"
    value = final.get(key)
    return value if isinstance(value, (int, float)) else None


def final_table(state: BatchState) -> str:
    rows = []
    for name, r in state.body["runs"].items():
        step = f"{r.get('step')}/{r.get('total')}" if r.get("step") is not None else ""
        acc = r.get("exact_accuracy")
        wall = r.get("wall_s")
        rows.append([name, r.get("detail") or r.get("decision"), r.get("state"), step,
                     "" if acc is None else f"{acc:.4f}", "" if wall is None else f"{wall:.0f}s"])
    return table(["RUN", "DECISION", "OUTCOME", "STEP", "EXACT_ACC", "WALL"], rows)


def run_batch(selection: Selection, launcher=None, *, dry_run: bool = False, retries: int = 0,
              fail_fast: bool = False, rerun: bool = False, retry_failed: bool = False,
              output_root: Optional[str] = None, config_dir: Optional[str] = None,
              logs_dir: Optional[str] = None, state_path: Optional[str] = None,
              stale_after_s: float = STALE_AFTER_S, argv: Optional[List[str]] = None,
              out=sys.stdout) -> int:
    """Plan, print the plan, run (unless dry_run), print the final table; returns the exit code:
    0 all done or skipped; 1 a selected run failed (now or before) or was blocked; 75 interrupted or a
    run left preempted; 2 a bad selection. Dry runs compose each config through Hydra; 1 if any is blocked."""
    try:
        names = runs.select(selection, config_dir)
        if not names:
            raise RunError("nothing selected" + ("" if not selection.empty else ": give --pattern, --regex or names"))
        for o in selection.overrides:
            runs.check_override(o)
    except RunError as e:
        print(f"batch: error: {e}", file=sys.stderr)
        return 2
    decide_kw = dict(stale_after_s=stale_after_s, retry_failed=retry_failed, rerun=rerun, config_dir=config_dir,
                     output_root=output_root)
    plans = plan_all(names, selection.overrides, validate=dry_run, **decide_kw)
    print(table(["RUN", "PLAN"], [[p.name, p.describe()] for p in plans]), file=out, flush=True)
    if dry_run:
        return 1 if any(p.decision == "blocked" for p in plans) else 0
    launcher = launcher or runs.LocalLauncher()
    batch_id = new_batch_id()
    logs = os.path.join(os.path.abspath(logs_dir) if logs_dir else runs.join_path(DEFAULT_LOGS_DIR), batch_id)
    state = BatchState(state_path or os.path.join(logs, "batch_status.json"), batch_id, list(argv or sys.argv))
    print(f"batch {batch_id}: {len(plans)} runs, launcher {getattr(launcher, 'name', '?')}, state {state.path}",
          file=out, flush=True)
    runner = BatchRunner(plans, launcher, state=state, logs_dir=logs, retries=retries, fail_fast=fail_fast,
                         decide_kw=dict(decide_kw, rerun=False), out=out)
    code = runner.run()
    print(final_table(state), file=out, flush=True)
    print(f"batch {batch_id}: exit code {code}; state {state.path}", file=out, flush=True)
    return code


