"""Orbax checkpoints of everything a run needs to continue exactly; local dirs and gs:// alike.

A checkpoint holds the train state (params, optimizer state, puzzle table, EMA, ACT carry, step),
the run's RNG key as raw key data, and JSON metadata (config identity, data position, versions).
Saves are async; the loop only blocks to hand the arrays over. Orbax commits a step by renaming
its temporary directory, so a half-written step is never listed and restore takes the latest
committed one. A background save's error is raised in the loop at the first step after it
finished (or at the next save or wait), as CheckpointSaveError naming the step, the directory and
the cause (e.g. "No space left on device (ENOSPC)"); never swallowed, never retried.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
from typing import Any, Dict, Optional

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "preempted, resumable"; the batch runner restarts on it

# Keys that may change between a run and its resume: they do not change the model, the optimizer
# or the data. Everything else must match the frozen config.yaml.
RESUMABLE_CHANGES = ("epochs", "eval_interval", "min_eval_interval", "eval_at_start", "max_steps", "log_every",
                     "checkpoint_every_steps", "checkpoint_keep", "checkpoint_every_eval", "save_checkpoint_steps",
                     "output_root", "run_name", "group", "project_name", "checkpoint_path", "load_checkpoint",
                     "compilation_cache_dir", "distributed", "mesh", "use_tpu", "num_workers", "data_build",
                     "eval_save_outputs", "heartbeat_seconds", "peak_tflops_per_device", "wandb")


def identity(config: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}


def config_hash(config: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_differences(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> list:
    """Dotted keys whose values differ in the identity part of two configs."""
    out = []
    a, b = (identity(old), identity(new)) if not prefix else (old, new)
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += config_differences(a[k], b[k], key + ".")
        elif a.get(k) != b.get(k):
            out.append(key)
    return out


def _key_name(path) -> str:
    parts = []
    for p in path:
        parts.append(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))))
    return "__".join(parts)  # not ".": Orbax reads dots in names as nesting


def flatten(tree) -> Dict[str, Any]:
    """{path joined by "__": leaf}: Orbax restores plain dicts onto target shardings on every process,
    where NamedTuples (the ACT carry, optax states) would lose them."""
    return {_key_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten(flat: Dict[str, Any], like):
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[_key_name(p)] for p, _ in paths])


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, no permission, storage gone): the run stops,
    failed; the checkpoints committed before stay as they were."""

    def __init__(self, step: int, directory: str, cause: BaseException):
        super().__init__(f"checkpoint save of step {step} to {directory} failed: {error_reason(cause)}")
        self.step, self.directory = step, directory


def error_reason(e: BaseException) -> str:
    """One line for a storage error: the OS error by name when there is one (an OSError anywhere in
    the chain, or tensorstore's "[os_error_code='28']"), else the error's first line."""
    seen, code = e, None
    while seen is not None and code is None:
        code = seen.errno if isinstance(seen, OSError) and seen.errno else None
        if code is None:
            m = re.search(r"os_error_code='?(\d+)", str(seen))
            code = int(m.group(1)) if m else None
        seen = seen.__cause__ or seen.__context__
    if code is not None:
        return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


class Checkpointer:
    def __init__(self, directory: str, every_steps: Optional[int], keep: int):
        save_policies = [policies.PreemptionCheckpointingPolicy()]  # keep Orbax's preemption save
        if every_steps:
            save_policies.append(policies.FixedIntervalPolicy(every_steps))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(save_policies),
            preservation_policy=policies.AnyPreservationPolicy([
                policies.LatestN(n=keep),
                policies.BestN(get_metric_fn=lambda m: m["exact_accuracy"], n=1,
                               keep_checkpoints_without_metrics=False),
            ]),
            enable_async_checkpointing=True,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.directory, self.every_steps = directory, every_steps
        self.manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))
        self.pending: Optional[int] = None  # the step of the async save in flight
        # Look at a finished save every step only in one process: processes would see it finish at
        # different steps; with several, errors surface at the next save or wait, where all meet.
        self.poll = jax.process_count() == 1
        self.failed = False  # a save failed (and was raised); close() then lets the run's error stand

    def due(self, step: int) -> bool:
        """A periodic save (every `every_steps`, the Orbax policy's interval) falls on this step."""
        return bool(self.every_steps and step % self.every_steps == 0)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state, rng_data, meta: Dict[str, Any], metrics: Optional[Dict[str, float]] = None,
             force: bool = False) -> bool:
        """Start an async save (if the policy or `force` says so); raises CheckpointSaveError for a
        previous save that failed, as soon as it has finished."""
        self._settle(block=force or self.due(step))
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"train": flatten(state), "rng": rng_data}),
                meta=ocp.args.JsonSave(meta)), metrics=metrics, force=force)
        except Exception as e:  # Orbax waits for a save still in flight first: then it is that one's error
            raise self._failure(self.pending if self.pending is not None else step, e) from e
        if saved:
            self.pending = step
        return saved

    def _settle(self, block: bool) -> None:
        """Raise the in-flight save's error once it has finished (block: wait for it)."""
        if self.pending is None or (not block and (not self.poll or self.manager.is_saving_in_progress())):
            return
        step, self.pending = self.pending, None
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:
            raise self._failure(step, e) from e

    def _failure(self, step: int, e: BaseException) -> CheckpointSaveError:
        self.failed = True
        return CheckpointSaveError(step, self.directory, e)

    def restore(self, step: int, abstract_state, abstract_rng):
        """Restore onto the shardings in the abstract targets (any mesh or device count)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"train": flatten(abstract_state), "rng": abstract_rng}),
            meta=ocp.args.JsonRestore()))
        return unflatten(out.state["train"], abstract_state), out.state["rng"], out.meta

    def wait(self) -> None:
        self._settle(block=True)

    def close(self) -> None:
        raised = self.failed
        try:
            self._settle(block=True)
            self.manager.close()
        except Exception:
            if not raised:  # a save error not raised before: raise it now
                raise
            # else it was raised already and is what the run reports; Orbax re-raises it on close


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with the target shardings: what Orbax restores onto."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class PreemptionWatch:
    """True at a step boundary once this run should stop and save: SIGTERM in a single process, or
    JAX's preemption sync point (all processes agree on the step) after jax.distributed init."""

    def __init__(self):
        self.flag = False
        self.multi = jax.process_count() > 1
        if not self.multi:
            self._old = signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, *_):
        self.flag = True

    def __call__(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.flag

    def close(self) -> None:
        if not self.multi:
            signal.signal(signal.SIGTERM, self._old)


def write_status(run_dir_local: str, state: str, step: int) -> None:
    import time

    path = os.path.join(run_dir_local, "status.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"state": state, "step": step, "time": time.time()}, f)
    os.replace(path + ".tmp", path)
