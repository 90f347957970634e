"""The run directory `<output_root>/<group>/<run name>/`, written whatever the W&B mode:

  config.yaml, overrides.yaml, metadata.json, requirements.txt, reproduce.sh   at the first start
  logs/metrics.jsonl, logs/train.log                                           as the run goes
  metrics.csv, summary.json, plots/*.png                                       at each eval, the end
  status.json (running / completed / failed / preempted + heartbeat)           atomically, always
  FAILED.txt                                                                   on an exception or NaN

Only process 0 writes, and every text goes through `redact` first. With a gs:// output root the
record is staged on local disk and uploaded on `sync()` (changed files only), since GCS objects
cannot be appended to; status.json is uploaded on its own at each heartbeat.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib.metadata as md
import json
import logging
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

from kellen.procs import owner
from kellen.train.redact import environment, redact, redact_obj

# Overrides that do not change what a run computes, so they do not rename it.
NAME_NEUTRAL = ("run_name", "group", "project_name", "output_root", "checkpoint_path", "load_checkpoint",
                "compilation_cache_dir", "log_every", "wandb.", "distributed.", "mesh.", "hydra.",
                "use_tpu", "num_workers")


def default_group(config_name: str) -> str:
    """exp03_a -> exp03, exp04a_100 -> exp04a; anything else -> adhoc."""
    m = re.match(r"(exp\d+[a-z]?)(_|$)", config_name or "")
    return m.group(1) if m else "adhoc"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_")


def run_name(explicit: Optional[str], config_name: str, overrides: List[str]) -> str:
    """The config's own name (or its run_name); command-line overrides make it distinct and readable:
    `exp03_a epochs=10000` -> `exp03_a--epochs=10000`. `+experiment=X` on the base config names it X;
    run_name=... on the command line is taken as it is."""
    if explicit and any(o.lstrip("+~").split("=", 1)[0] == "run_name" for o in overrides):
        return _safe(explicit)  # named on the command line: exactly that
    base = explicit or config_name
    extra = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key == "experiment" and not explicit and config_name == "cfg_pretrain":
            base = o.split("=", 1)[1]
        elif not key.startswith(NAME_NEUTRAL):
            extra.append(o.lstrip("+~"))
    return _safe("--".join([base] + extra))


def git_info(path: str) -> Dict[str, Any]:
    def git(*args):
        return subprocess.run(["git", "-C", path, *args], capture_output=True, text=True, timeout=20).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if not commit:
        return {"commit": None, "branch": None, "dirty": None}
    return {"commit": commit, "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "remote": git("config", "--get", "remote.origin.url") or None}  # redacted when written


def versions() -> Dict[str, Optional[str]]:
    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "hydra-core", "wandb"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def requirements() -> str:
    """The installed distributions, as `pip freeze` would list them (without running pip)."""
    seen = {}
    for d in md.distributions():
        name = d.metadata.get("Name")
        if name:
            seen[name.lower()] = f"{name}=={d.version}"
    return "\n".join(sorted(seen.values(), key=str.lower)) + "\n"


def all_hostnames() -> List[str]:
    """Every process's hostname, gathered over the JAX processes (all must call this)."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    name = socket.gethostname().encode()[:255]
    local = np.zeros(256, np.uint8)
    local[: len(name)] = np.frombuffer(name, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), 256)
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in gathered]


class RunRecord:
    def __init__(self, root: str, writer: bool):
        from kellen import gcs

        self.root, self.writer = root.rstrip("/"), writer
        self.remote = gcs.is_gcs(root)
        if self.remote:
            self.local = os.path.join(tempfile.gettempdir(), "kellen-runs", _safe(self.root[len("gs://"):]))
        else:
            self.local = self.root
        if writer:
            if self.remote and gcs.exists(self.root + "/"):
                gcs.download_tree(self.root, self.local)  # a resumed run appends to its record
            os.makedirs(os.path.join(self.local, "logs"), exist_ok=True)
        self._log = None
        self._uploaded: Dict[str, tuple] = {}
        self.sinks: List[Callable[[Dict[str, Any]], None]] = []  # e.g. W&B; get every logged row
        # Training wall-clock continues across preemptions: `elapsed` picks up where the log stopped.
        self.elapsed_base, self.t0 = (self._last_elapsed() if writer else 0.0), time.time()

    def _last_elapsed(self) -> float:
        from kellen.train.summary import read_rows

        path = os.path.join(self.local, "logs", "metrics.jsonl")
        rows = read_rows(path) if os.path.exists(path) else []
        return max((float(r["elapsed"]) for r in rows if isinstance(r.get("elapsed"), (int, float))), default=0.0)

    def elapsed(self) -> float:
        return round(self.elapsed_base + time.time() - self.t0, 3)

    def read(self, name: str) -> Optional[str]:
        """A file of the record as it stands (every process can read; the local copy or gs://)."""
        from kellen import gcs

        if self.remote:
            url = f"{self.root}/{name}"
            return gcs.read_text(url) if gcs.exists(url) else None
        path = os.path.join(self.local, name)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return f.read()

    def write_json(self, name: str, obj: Dict[str, Any]) -> None:
        if self.writer:
            self._write(name, json.dumps(dict(obj, time=_now())) + "\n")
            self.sync()

    def status(self, state: str, step: int, total: Optional[int] = None,
               metrics: Optional[Dict[str, Any]] = None, reason: Optional[str] = None) -> None:
        """status.json for any tool (runners, status tables): state, progress, last metrics and a
        heartbeat (and why, for a failed run); replaced atomically, uploaded on its own on gs://."""
        if not self.writer:
            return
        body = {"state": state, "step": step, "total": total, "metrics": metrics or {},
                "heartbeat": _now(), "heartbeat_unix": round(time.time(), 3), "host": socket.gethostname(),
                **owner()}  # pid, machine, start: a runner on this machine can tell whether it still runs
        if reason is not None:
            body["reason"] = reason
        self._write("status.json", json.dumps(body, default=float) + "\n")
        self.sync_file("status.json")

    def say(self, message: str, echo: bool = True) -> None:
        """A console line from process 0, kept in logs/train.log too (echo=False: the file only)."""
        if not self.writer:
            return
        if echo:
            print(redact(message), flush=True)  # the console is kept too (batch logs, tmux, W&B)
        with open(os.path.join(self.local, "logs", "train.log"), "a") as f:
            f.write(f"{_now()} {redact(message)}\n")

    @contextlib.contextmanager
    def library_errors_to_log(self, *names: str):
        """While in the block, errors logged by library loggers `names`, and errors that C extensions
        cannot raise (sys.unraisablehook), go to logs/train.log only, not the console. A failed
        background save makes Orbax log it, tracebacks and all, from several threads; tensorstore's
        late write callbacks then hit Orbax's closed event loop, and asyncio reports the failed
        futures when they are collected, which may be at exit. The run reports the error once, in one
        line: so if the block fails, this stays in place until the process exits."""
        if not self.writer:
            yield
            return
        record = self

        def to_log(text: str) -> None:
            try:
                record.say(text, echo=False)
            except Exception:  # the log's disk may be the full one
                pass

        class ToTrainLog(logging.Filter):
            def filter(self, rec: logging.LogRecord) -> bool:
                if rec.levelno < logging.ERROR:
                    return True
                to_log(f"{rec.levelname} {rec.name}: " + logging.Formatter().format(rec))
                return False

        def unraisable(u) -> None:
            where = f" in {u.object!r}" if u.object is not None else ""
            to_log(f"{u.err_msg or 'exception ignored'}{where}:\n" +
                   "".join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))

        loggers, only, hook = [logging.getLogger(n) for n in names], ToTrainLog(), sys.unraisablehook
        for logger in loggers:
            logger.addFilter(only)
        sys.unraisablehook = unraisable
        yield  # an exception leaves it all in place (see above)
        for logger in loggers:
            logger.removeFilter(only)
        sys.unraisablehook = hook

    def write_reproduce(self, argv: List[str], git: Dict[str, Any], repo_url: Optional[str]) -> None:
        """reproduce.sh: check out the commit, install, run the exact command."""
        if not self.writer:
            return
        lines = ["#!/usr/bin/env bash", f"# Reproduces run {self.root} (written {_now()}).", "set -euo pipefail"]
        if git.get("commit"):
            if repo_url:
                lines += [f"git clone {shlex.quote(repo_url)} kellen-repro", "cd kellen-repro"]
            else:
                lines.append("# run inside a clone of this repository")
            lines.append(f"git checkout {git['commit']}")
            if git.get("dirty"):
                lines.append("# WARNING: the run started from a tree with uncommitted changes to tracked files")
        else:
            lines.append("# no git commit was recorded; run inside the source tree the run used")
        lines += ["python3 -m venv .venv && . .venv/bin/activate", "pip install -e .",
                  "# environment at the start (secrets masked):"]
        lines += [f"#   {k}={v}" for k, v in environment().items()]
        lines.append(shlex.join(["python", "pretrain_jax.py", *argv]))
        self._write("reproduce.sh", "\n".join(lines) + "\n")
        os.chmod(os.path.join(self.local, "reproduce.sh"), 0o755)

    def write_failed(self, step: int, reason: str, trace: str, last_metrics: Dict[str, Any]) -> None:
        if not self.writer:
            return
        text = (f"run failed at step {step}: {reason}\ntime {_now()} host {socket.gethostname()}\n\n"
                f"last metrics:\n{json.dumps(last_metrics, indent=1, default=float)}\n\ntraceback:\n{trace}")
        self._write("FAILED.txt", text)
        self.sync()

    def write_derived(self, num_params: Optional[int] = None) -> None:
        """metrics.csv, summary.json and plots/ from logs/metrics.jsonl (all of it, every segment)."""
        if not self.writer:
            return
        from kellen.train import plots, summary

        if self._log is not None:
            self._log.flush()
        rows = summary.read_rows(os.path.join(self.local, "logs", "metrics.jsonl"))
        summary.write_csv(rows, os.path.join(self.local, "metrics.csv"))
        summary.write_summary(rows, os.path.join(self.local, "summary.json"), num_params=num_params)
        os.makedirs(os.path.join(self.local, "plots"), exist_ok=True)
        plots.write_plots(rows, os.path.join(self.local, "plots"))

    def write_start(self, config_yaml: str, overrides: List[str], metadata: Dict[str, Any],
                    resumed: bool = False) -> None:
        if not self.writer:
            return
        if resumed:  # the frozen config.yaml stays; this start's metadata is kept beside it
            self._write(f"metadata.resume-{metadata['start_time'].replace(':', '')}.json",
                        json.dumps(metadata, indent=1, default=str) + "\n")
            self.sync()
            return
        self._write("config.yaml", config_yaml)
        self._write("overrides.yaml", "".join(f"- {json.dumps(o)}\n" for o in overrides) or "[]\n")
        self._write("metadata.json", json.dumps(metadata, indent=1, default=str) + "\n")
        self._write("requirements.txt", requirements())
        self.sync()

    def _write(self, name: str, text: str) -> None:
        path = os.path.join(self.local, name)
        with open(path + ".tmp", "w") as f:
            f.write(redact(text))
        os.replace(path + ".tmp", path)

    def log(self, record: Dict[str, Any]) -> None:
        if not self.writer:
            return
        record = dict(record, elapsed=record.get("elapsed", self.elapsed()))
        if self._log is None:
            self._log = open(os.path.join(self.local, "logs", "metrics.jsonl"), "a", buffering=1)
        self._log.write(json.dumps(redact_obj(record)) + "\n")
        for sink in self.sinks:
            sink(record)

    def sync(self) -> None:
        if self._log is not None:
            self._log.flush()
        if self.writer and self.remote:
            from kellen import gcs
            gcs.upload_tree(self.local, self.root, changed=self._uploaded)

    def sync_file(self, name: str) -> None:
        if self.writer and self.remote:
            from kellen import gcs
            with open(os.path.join(self.local, name)) as f:
                gcs.write_text(f"{self.root}/{name}", f.read())

    def close(self) -> None:
        self.sync()
        if self._log is not None:
            self._log.close()
            self._log = None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def metadata(mesh, process_count: int, hostnames: List[str], repo: str) -> Dict[str, Any]:
    import jax

    devices = jax.devices()
    return {
        "git": git_info(repo),
        "command": [sys.executable] + sys.argv,
        "environment": environment(),
        "hostnames": hostnames,
        "versions": versions(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "process_count": process_count,
        "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
