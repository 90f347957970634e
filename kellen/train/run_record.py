"""The run directory: `<output_root>/<group>/<run name>/` with config.yaml, overrides.yaml,
metadata.json, requirements.txt and logs/metrics.jsonl.

Only process 0 writes. With a gs:// output root the record is staged on local disk and uploaded
on `sync()` (evals, checkpoints, the end), since GCS objects cannot be appended to.
"""
from __future__ import annotations

import datetime
import importlib.metadata as md
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional

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
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


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
            self._write(name, json.dumps(dict(obj, time=datetime.datetime.now(datetime.timezone.utc)
                                              .isoformat(timespec="seconds"))) + "\n")
            self.sync()

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
            f.write(text)
        os.replace(path + ".tmp", path)

    def log(self, record: Dict[str, Any]) -> None:
        if not self.writer:
            return
        if self._log is None:
            self._log = open(os.path.join(self.local, "logs", "metrics.jsonl"), "a", buffering=1)
        self._log.write(json.dumps(record) + "\n")

    def sync(self) -> None:
        if self._log is not None:
            self._log.flush()
        if self.writer and self.remote:
            from kellen import gcs
            gcs.upload_tree(self.local, self.root)

    def close(self) -> None:
        self.sync()
        if self._log is not None:
            self._log.close()
            self._log = None


def metadata(mesh, process_count: int, hostnames: List[str], repo: str) -> Dict[str, Any]:
    import jax

    devices = jax.devices()
    return {
        "git": git_info(repo),
        "command": [sys.executable] + sys.argv,
        "hostnames": hostnames,
        "versions": versions(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "process_count": process_count,
        "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
