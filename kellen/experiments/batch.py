"""Run a selection of configs one after another, each to completion, without prompts.

Per run, `kellen.experiments.plan.decide` says run, resume (from step N), skip (completed,
running elsewhere, failed), wait (the trainer of a killed batch is still saving) or blocked.
Runs go one at a time (each uses the whole pod) under a lease on their run dir, so two batch
runners over the same selection train each run once. Exit codes: 0 completed, 75 preempted
(retried up to --retries times, else left for the next batch to resume), others failed.

`<logs_dir>/<batch id>/batch_status.json` is replaced atomically after every change, so a killed
batch loses nothing; `<run>.out|.err` beside it hold each run's console. SIGTERM/SIGINT/SIGHUP:
the current run gets SIGTERM, saves, exits 75; the batch records it and exits 75.

A batch killed outright (SIGKILL, OOM) cannot forward anything: its trainers are started with a
parent-death signal (kellen.procs), so they get SIGTERM, save and exit 75 all the same. Its lease
names the trainer; a batch started again on this machine takes the dead batch's lease over at
once, waits for that trainer to exit (up to KELLEN_ORPHAN_WAIT_S, default 900 s) and resumes the
run from its checkpoint, so two trainers never share a run dir.
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
from typing import Any, Dict, List, Optional

from kellen import procs
from kellen.experiments import lease as leases
from kellen.experiments import runs
# decide and plan_all are also used as batch.decide / batch.plan_all
from kellen.experiments.plan import STALE_AFTER_S, Plan, decide, plan_all, run_status
from kellen.experiments.runs import RunError, RunTarget, Selection

DEFAULT_LOGS_DIR = "runs/_batches"
ORPHAN_WAIT_ENV = "KELLEN_ORPHAN_WAIT_S"


def default_logs_dir(output_root: Optional[str]) -> str:
    """<output root>/_batches for a local output root (nothing lands outside it), else runs/_batches."""
    local = output_root and not output_root.startswith("gs://")
    return runs.join_path(output_root, "_batches") if local else runs.join_path(DEFAULT_LOGS_DIR)


def orphan_wait_s() -> float:
    try:
        return max(float(os.environ.get(ORPHAN_WAIT_ENV) or 900.0), 0.0)
    except ValueError:
        return 900.0


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
        from kellen.train.redact import redact_obj

        self.body: Dict[str, Any] = {"batch_id": batch_id, "argv": redact_obj(list(argv)), "host": socket.gethostname(),
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
                 lease_expires_s: Optional[float] = None, out=None):
        self.plans, self.launcher, self.state, self.logs_dir = plans, launcher, state, logs_dir
        self.retries, self.fail_fast, self.decide_kw = retries, fail_fast, decide_kw or {}
        self.lease_expires_s, self.out = lease_expires_s, out or sys.stdout  # sys.stdout as it is now
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
            fresh = decide(target, ignore_lease_token=lease.owner["token"], replaced_lease=lease.took_over,
                           **self.decide_kw)
            if fresh.decision == "wait":
                fresh = self._wait_for_trainer(fresh, lease)
            if fresh.decision in ("skip", "blocked"):
                return self._not_launched(plan.name, fresh)
            return self._launch_attempts(plan.name, fresh, lease)
        finally:
            lease.release()

    def _wait_for_trainer(self, plan: Plan, lease: leases.Lease) -> Plan:
        """A killed batch's trainer still runs (it got SIGTERM and is saving): hold the lease, let it
        exit, then decide again. If it outlives the wait (or we are stopped), skip the run."""
        pid, limit = plan.trainer_pid, orphan_wait_s()
        self.state.run(plan.name, state="waiting", detail=plan.describe())
        self.say(f"{plan.name}: waiting up to {limit:.0f}s for trainer pid {pid} of a stopped batch to save and exit")
        deadline = time.time() + limit
        while procs.pid_alive(pid) and time.time() < deadline and self.stop_signal is None:
            time.sleep(0.5)
        fresh = decide(plan.target, ignore_lease_token=lease.owner["token"], replaced_lease=lease.took_over,
                       **self.decide_kw)
        if fresh.decision != "wait":
            return fresh
        why = "the batch was stopped" if self.stop_signal is not None else f"it did not exit within {limit:.0f}s"
        return Plan(plan.config, plan.target, "skip", f"running elsewhere (trainer pid {fresh.trainer_pid}; {why})",
                    run_state=fresh.run_state)

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

    def _launch_attempts(self, key: str, plan: Plan, lease: leases.Lease) -> str:
        target, lease_token = plan.target, lease.owner["token"]
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
                if hasattr(self.launcher, "on_start"):  # the lease names the trainer (see the module doc)
                    self.launcher.on_start = lambda pid: lease.note(trainer=procs.owner(pid))
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
              out=None) -> int:
    """Plan, print the plan, run (unless dry_run), print the final table; returns the exit code:
    0 all done or skipped; 1 a selected run failed (now or before) or was blocked; 75 interrupted or a
    run left preempted; 2 a bad selection. Dry runs compose each config through Hydra; 1 if any is blocked."""
    out = out or sys.stdout
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
    logs = os.path.join(default_logs_dir(output_root) if not logs_dir else os.path.abspath(logs_dir), batch_id)
    state = BatchState(state_path or os.path.join(logs, "batch_status.json"), batch_id, list(argv or sys.argv))
    print(f"batch {batch_id}: {len(plans)} runs, launcher {getattr(launcher, 'name', '?')}, state {state.path}",
          file=out, flush=True)
    runner = BatchRunner(plans, launcher, state=state, logs_dir=logs, retries=retries, fail_fast=fail_fast,
                         decide_kw=dict(decide_kw, rerun=False), out=out)
    code = runner.run()
    print(final_table(state), file=out, flush=True)
    print(f"batch {batch_id}: exit code {code}; state {state.path}", file=out, flush=True)
    return code


